"""Field I/O: the Modbus bus master, typed board drivers, the QR scanner, the MQTT link.

Imports ``protocol`` only; everything above (firmware bridge, daemon) goes through here.
"""
