"""Hardware simulator: the bay boards, cabinet board, energy meter and QR scanner.

Imports only ``protocol``; the daemon never imports this package.
"""
