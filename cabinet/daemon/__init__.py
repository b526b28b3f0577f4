"""The daemon `cabinet run`: the runtime that drives the bus, keeps the journal and speaks MQTT.

It imports the core for every decision; nothing here is imported by the core.
"""
