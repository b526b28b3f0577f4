"""Talking to bay-board firmware: versions and updates over the bus (see the firmware issue)."""
