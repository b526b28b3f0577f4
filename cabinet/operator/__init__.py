"""`cabinet watch`: the operator's fleet view, a laptop tool that never runs in a cabinet."""
