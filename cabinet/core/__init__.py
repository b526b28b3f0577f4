"""The cabinet's decisions: pure rules and machines, no I/O, no clock, no logging.

Everything here is a function of its inputs so it can be tested exhaustively (Hypothesis)
and replayed from the journal; the daemon feeds it readings and carries out what it returns.
"""
