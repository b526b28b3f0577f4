"""The layout of DESIGN.md §3 and the README's tree, checked on the source.

Each folder is one program or one layer, and may import only what sits below it:

    protocol  <  drivers  <  firmware_bridge  <  cabinet.core  <  cabinet.daemon  <  cabinet.console
    sim (the simulated hardware) imports protocol only
    cabinet.operator (`cabinet watch`) and cabinet.demo sit beside the daemon, never under it

The console is the one front door: it reaches the operator tool, the demo and the simulator
only inside the commands that run them, so `cabinet run` never loads them.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO, fresh_python

#: package -> what it may import at module level (first-party names, by package)
ALLOWED: dict[str, set[str]] = {
    "protocol": {"protocol"},
    "drivers": {"protocol", "drivers"},
    "firmware_bridge": {"protocol", "drivers", "firmware_bridge"},
    "sim": {"protocol", "sim"},
    "cabinet.core": {"protocol", "cabinet.core"},
    "cabinet.daemon": {
        "protocol",
        "drivers",
        "firmware_bridge",
        "cabinet",
        "cabinet.core",
        "cabinet.daemon",
    },
    "cabinet.operator": {"protocol", "drivers", "cabinet", "cabinet.core", "cabinet.operator"},
    "cabinet.demo": {
        "protocol",
        "drivers",
        "firmware_bridge",
        "cabinet",
        "cabinet.core",
        "cabinet.daemon",
        "cabinet.demo",
        "sim",
    },
    "cabinet.console": {
        "protocol",
        "drivers",
        "firmware_bridge",
        "cabinet",
        "cabinet.core",
        "cabinet.daemon",
        "cabinet.console",
    },
}
#: what the console may load inside a command's function, never at module level
CONSOLE_LAZY = {"cabinet.operator", "cabinet.demo", "sim"}
FIRST_PARTY = {"protocol", "drivers", "firmware_bridge", "sim", "cabinet"}


def _package_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (``cabinet.core.x`` -> ``cabinet.core``)."""
    parts = module.split(".")
    if parts[0] not in FIRST_PARTY:
        return None
    if parts[0] == "cabinet" and len(parts) > 1 and f"cabinet.{parts[1]}" in ALLOWED:
        return f"cabinet.{parts[1]}"
    return parts[0]


def _source_files(package: str) -> list[Path]:
    return sorted((REPO / package.replace(".", "/")).rglob("*.py"))


def _imports(path: Path, *, module_level: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level else list(ast.walk(tree))
    names: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            # ``from cabinet import x`` names a package below ``cabinet``
            names |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {p for n in names if (p := _package_of(n)) is not None}


def test_every_cabinet_module_lives_in_a_program_or_a_layer() -> None:
    loose = [p.name for p in (REPO / "cabinet").glob("*.py") if p.name != "__init__.py"]
    assert loose == [], f"modules outside a program folder: {loose}"


def test_imports_flow_one_way() -> None:
    for package, allowed in ALLOWED.items():
        for path in _source_files(package):
            top = _imports(path, module_level=True)
            anywhere = _imports(path, module_level=False)
            lazy_allowed = CONSOLE_LAZY if package == "cabinet.console" else set()
            rel = path.relative_to(REPO)
            assert top <= allowed, f"{rel} imports {sorted(top - allowed)}"
            assert anywhere <= allowed | lazy_allowed, (
                f"{rel} imports {sorted(anywhere - allowed - lazy_allowed)}"
            )


def test_the_core_does_no_io_and_reads_no_clock() -> None:
    """The decisions replay from the journal and run under Hypothesis: no I/O, no time."""
    forbidden = {
        "asyncio",
        "sqlite3",
        "structlog",
        "logging",
        "time",
        "datetime",
        "os",
        "socket",
        "serial",
        "pymodbus",
        "paho",
        "subprocess",
        "threading",
        "random",
        "drivers",
    }
    # protocol reads its shipped JSON Schemas with pathlib; the core reads no file at all
    for package, extra in (("protocol", set()), ("cabinet.core", {"pathlib"})):
        for path in _source_files(package):
            tree = ast.parse(path.read_text())
            for node in ast.walk(tree):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    mods = (
                        [a.name for a in node.names]
                        if isinstance(node, ast.Import)
                        else [node.module or ""]
                    )
                    found = {m.split(".")[0] for m in mods} & (forbidden | extra)
                    assert not found, f"{path.relative_to(REPO)}: {sorted(found)}"


def test_building_the_command_line_loads_no_other_program() -> None:
    probe = (
        "import sys; from cabinet.console.cli import build_parser; build_parser(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'sim' "
        "or m.startswith(('cabinet.demo', 'cabinet.operator'))))"
    )
    assert fresh_python(probe).strip() == "[]"
