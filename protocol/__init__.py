"""Pure data shared by the daemon and the simulator: register maps, wire timing, units.

Nothing in this package performs I/O; both sides of the bus import it so that an
address or a scaling factor is written down exactly once.
"""
