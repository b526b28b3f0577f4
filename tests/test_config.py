"""`cabinet config check`: every problem with its key; environment overrides; good files pass."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cabinet.daemon.config import ConfigError, apply_env, load
from tests.conftest import cabinet_cmd

GOOD = """
[cabinet]
id = "cab-0042"
state_dir = "/var/lib/cabinet"

[bus]
url = "serial:///dev/ttyUSB0?baud=19200&parity=E"
timeout_ms = 200

[scanner]
url = "serial:///dev/ttyACM0?baud=9600&parity=N"

[mqtt]
url = "mqtts://fleet.example.net:8883"
username = "cab-0042"

[auth]
public_keys = ["/etc/cabinet/backend.pub"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cabinet.toml"
    path.write_text(text)
    return path


def test_a_good_file_passes(tmp_path: Path) -> None:
    result = cabinet_cmd("config", "check", "-c", str(write(tmp_path, GOOD)))
    assert result.returncode == 0, result.stdout
    assert result.stdout.strip().endswith("valid (cabinet cab-0042)")


def test_world_readable_secrets_are_warned_about(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    text = GOOD.replace(
        'username = "cab-0042"\n',
        f'username = "cab-0042"\npassword = "s3cret"\nclient_key = "{key}"\n',
    )
    path = write(tmp_path, text)
    path.chmod(0o644)
    key.chmod(0o644)
    result = cabinet_cmd("config", "check", "-c", str(path), "--json")
    assert result.returncode == 3, result.stdout
    warnings = {w["key"] for w in json.loads(result.stdout)["warnings"]}
    assert warnings == {"mqtt.password", "mqtt.client_key"}
    path.chmod(0o640)
    key.chmod(0o600)
    fixed = cabinet_cmd("config", "check", "-c", str(path))
    assert fixed.returncode == 0, fixed.stdout
    assert "warning" not in fixed.stdout


def test_every_problem_is_listed_with_its_key(tmp_path: Path) -> None:
    bad = (
        GOOD.replace('"cab-0042"\nstate', '"cab 42!"\nstate')
        .replace("timeout_ms = 200", "timeout_ms = 9000\nbaud = 19200")
        .replace("mqtts://fleet", "http://fleet")
    )
    result = cabinet_cmd("config", "check", "-c", str(write(tmp_path, bad)), "--json")
    assert result.returncode == 3
    problems = {p["key"]: p["message"] for p in json.loads(result.stdout)["problems"]}
    assert set(problems) == {"cabinet.id", "bus.timeout_ms", "bus.baud", "mqtt.url"}
    assert problems["bus.baud"] == "unknown key"
    assert "less than or equal to 2000" in problems["bus.timeout_ms"]


def test_a_bad_bus_url_says_what_is_wrong(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD.replace("baud=19200&parity=E", "baud=19200&parity=X"))
    result = cabinet_cmd("config", "check", "-c", str(path))
    assert result.returncode == 3
    assert result.stdout.splitlines()[0].startswith("bus.url: ")
    assert "parity is N, E or O" in result.stdout


def test_missing_sections_and_unreadable_files(tmp_path: Path) -> None:
    result = cabinet_cmd("config", "check", "-c", str(write(tmp_path, "[cabinet]\n")))
    assert result.returncode == 3
    assert "cabinet.id: Field required" in result.stdout
    assert "bus: Field required" in result.stdout
    missing = cabinet_cmd("config", "check", "-c", str(tmp_path / "nope.toml"))
    assert missing.returncode == 3 and "does not exist" in missing.stdout
    broken = cabinet_cmd("config", "check", "-c", str(write(tmp_path, "[bus\n")))
    assert broken.returncode == 3 and "is not valid TOML" in broken.stdout


def test_environment_overrides_any_key(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD)
    config = load(
        path,
        {
            "CABINET_BUS__TIMEOUT_MS": "120",
            "CABINET_CABINET__ID": "cab-7",
            "CABINET_AUTH__PUBLIC_KEYS": '["/a.pub", "/b.pub"]',
        },
    )
    assert config.bus.timeout_ms == 120
    assert config.cabinet.id == "cab-7"
    assert [str(p) for p in config.auth.public_keys] == ["/a.pub", "/b.pub"]
    with pytest.raises(ConfigError) as err:
        load(path, {"CABINET_BUS__TIMEOUT_MS": "soon"})
    assert err.value.problems[0][0] == "bus.timeout_ms"


def test_env_overlay_leaves_unrelated_variables_alone() -> None:
    merged = apply_env({"bus": {"url": "tcp://a:1"}}, {"CABINET_CONFIG": "/x", "HOME": "/root"})
    assert merged == {"bus": {"url": "tcp://a:1"}}


def test_the_documented_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "docs" / "cabinet.example.toml"
    result = cabinet_cmd("config", "check", "-c", str(example))
    assert result.returncode == 0, result.stdout
