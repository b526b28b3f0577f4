"""The demo and the fleet simulation: simulated riders, the embedded broker, the backend stand-in.

Not installed on a cabinet; it needs the simulator (`sim/`).
"""
