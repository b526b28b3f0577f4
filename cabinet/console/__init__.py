"""The `cabinet` command line: the technician's and operator's front door.

It loads the daemon, the operator tool, the demo and the simulator lazily, per command, so
`cabinet run` on a cabinet loads the daemon alone.
"""
