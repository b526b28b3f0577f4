"""The cabinet daemon, its swap logic and the ``cabinet`` command line."""

__version__ = "0.1.0"
