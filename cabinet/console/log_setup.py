"""structlog set-up: JSON lines when not on a terminal (journald, files), readable on a TTY.

Import this module before anything else imports structlog (``cabinet.console.cli`` does so first):
when stderr is not a terminal, structlog is imported without ``rich``. structlog loads rich
(and pygments) at import whenever it is installed, for tracebacks on a terminal only; the
daemon under systemd logs JSON lines and would carry ~4 MB of modules it never runs
(DESIGN.md §6, resident memory). ``rich`` stays importable for everything else.
"""

from __future__ import annotations

import logging
import sys


def _import_structlog_without_rich() -> None:
    if "structlog" in sys.modules or "rich" in sys.modules:
        return  # too late to choose, or rich is loaded anyway
    if sys.stderr is not None and sys.stderr.isatty():
        return  # a person reads the logs: rich renders their tracebacks
    sys.modules["rich"] = None  # type: ignore[assignment] # Python's "not importable" marker
    try:
        import structlog  # noqa: F401, PLC0415 - its modules note that rich is absent
    finally:
        del sys.modules["rich"]


_import_structlog_without_rich()

import structlog  # noqa: E402 - after the choice above

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(level: str = "info", *, json: bool | None = None) -> None:
    """Configure structlog once for the process; logs go to stderr, output to stdout."""
    as_json = not sys.stderr.isatty() if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if as_json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
