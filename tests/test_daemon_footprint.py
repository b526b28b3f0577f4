"""What `cabinet run` carries for the rest of its life: only the daemon's own code.

DESIGN.md §6 keeps the daemon's resident memory under 60 MB (bench/daemon_resources.py
measures it). Most of it is modules, so these tests pin down the modules: the real
daemon, started as systemd starts it, reports every module it loads (Python's ``-v``,
on stderr) while it starts, answers a technician and begins a swap; none of them may
belong only to another command or to the optional web display.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path

import pytest

from cabinet.console.cli import _parser_for, build_parser
from tests.conftest import cabinet_cmd
from tests.daemon_harness import running_cabinet

#: Loaded only by other commands (demo, sim, watch, fleet sim, firmware and technician
#: commands), by the web display when enabled, or by nobody at run time (rich: structlog
#: renders tracebacks with it on a terminal; the daemon logs JSON lines). Ed25519 is
#: PyNaCl's everywhere (cabinet/daemon/tokens.py): ``cryptography``, ~5 MB more resident
#: for the same signatures, is only the tests' certificate maker (tests/tls_certs.py).
#: ``TypeAdapter`` and ``create_model`` build the per-type event schemas for the schema
#: files, never in the daemon (protocol/messages.py).
NOT_IN_THE_DAEMON = (
    "amqtt",
    "aiohttp",
    "segno",
    "rich",
    "pygments",
    "sim",
    "cabinet.demo",
    "cabinet.operator",
    "cabinet.console.firmware_cli",
    "cabinet.console.technician_cli",
    "cabinet.daemon.display.server",
    "cryptography",
    "pydantic.type_adapter",
)

#: ``python -v`` says this once a module is loaded (not when an import fails: structlog
#: tries, and must fail, to import rich).
_LOADED = re.compile(r"^import '([\w.]+)' # <", re.MULTILINE)


def _is_under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def test_a_running_daemon_loads_no_other_commands_code(tmp_path: Path) -> None:
    with running_cabinet(tmp_path, seed=41, env={"PYTHONVERBOSE": "1"}) as cab:
        status = cabinet_cmd("status", "-c", str(cab.config), "--json")
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)  # the daemon answered
        cab.swap_begins("R-footprint")  # verifies a token, opens a door
    imported = _LOADED.findall((tmp_path / "daemon.log").read_text())
    assert {"cabinet.daemon.run", "structlog", "cabinet.daemon.control_server"} <= set(imported)
    loaded = sorted(
        m for m in imported if any(_is_under(m, package) for package in NOT_IN_THE_DAEMON)
    )
    assert loaded == [], f"`cabinet run` loaded {loaded}"


def _outcome(argv: list[str], parser_argv: list[str] | None = None) -> tuple[str, str, object]:
    """stdout, stderr and the exit code (or parsed arguments) of parsing ``argv``."""
    parser = build_parser() if parser_argv is None else _parser_for(parser_argv)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = vars(parser.parse_args(argv))
        except SystemExit as exc:
            result = exc.code
    return out.getvalue(), err.getvalue(), result


@pytest.mark.parametrize(
    "argv",
    [
        ["run"],
        ["run", "-c", "/etc/cabinet/x.toml"],
        ["run", "--config=y.toml"],
        ["run", "--help"],
        ["run", "-c"],
        ["run", "--nope"],
        ["run", "extra"],
    ],
)
def test_cabinet_run_parses_exactly_as_the_whole_command_tree(argv: list[str]) -> None:
    """The daemon builds only its own parser; help, errors and arguments stay the same."""
    assert _outcome(argv, parser_argv=argv) == _outcome(argv)


def test_every_other_command_line_gets_the_whole_tree() -> None:
    whole = build_parser().format_help()
    assert all(f"\n    {command} " in whole for command in ("run", "watch", "firmware", "demo"))
    for argv in (["--help"], ["-h", "run"], ["status"], [], ["runs"]):
        assert _parser_for(argv).format_help() == whole
