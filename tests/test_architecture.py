"""The layering rules of DESIGN.md §3, checked on the source so a stray import fails CI."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORDER = ["protocol", "drivers", "firmware_bridge", "cabinet"]
FIRST_PARTY = {*ORDER, "sim"}


def imports_of(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (REPO / package).rglob("*.py"):
        tree = ast.parse(path.read_text())
        names: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(REPO))] = names & FIRST_PARTY
    return found


def test_imports_flow_one_way() -> None:
    for rank, package in enumerate(ORDER):
        allowed = set(ORDER[: rank + 1])
        for path, names in imports_of(package).items():
            # the CLI's sim commands and the demo run the simulator; the daemon never does
            runs_sim = path in {"cabinet/cli.py", "cabinet/fleet_sim.py"} or path.startswith(
                "cabinet/demo"
            )
            extra = names - allowed - ({"sim"} if runs_sim else set())
            assert not extra, f"{path} imports {sorted(extra)}"


def test_sim_imports_only_protocol() -> None:
    for path, names in imports_of("sim").items():
        assert names <= {"protocol", "sim"}, f"{path} imports {sorted(names)}"


def test_the_cli_imports_sim_only_inside_the_sim_commands() -> None:
    tree = ast.parse((REPO / "cabinet" / "cli.py").read_text())
    for node in tree.body:  # module level: what `cabinet run` would load
        if isinstance(node, ast.ImportFrom) and node.module:
            assert not node.module.startswith("sim"), "cli.py imports sim at module level"


def test_protocol_does_no_io() -> None:
    forbidden = {"socket", "asyncio", "serial", "pymodbus", "paho", "sqlite3", "os", "time"}
    for path in imports_of("protocol"):
        tree = ast.parse((REPO / path).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                assert not {m.split(".")[0] for m in mods} & forbidden, f"{path}: {mods}"


def test_building_the_command_line_loads_no_simulator_code() -> None:
    probe = (
        "import sys; from cabinet.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m == 'sim' or m.startswith('sim.')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, cwd=REPO
    )
    assert out.stdout.strip() == "[]"
