"""The fleet simulation at growing N: where one process stops keeping up.

Starts its own mosquitto on a free port (tests/mqtt_broker.py) and runs
`cabinet sim fleet` for each N; prints the fleet's own report lines.

    .venv/bin/python bench/fleet.py [--cabinets 50 150 250] [--duration S]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.mqtt_broker import Mosquitto  # noqa: E402 - after the path set-up


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cabinets", type=int, nargs="+", default=[50, 150, 250])
    parser.add_argument("--duration", type=float, default=30.0)
    args = parser.parse_args()
    for n in args.cabinets:
        with tempfile.TemporaryDirectory() as tmp:
            broker = Mosquitto(Path(tmp))
            broker.start()
            try:
                result = subprocess.run(
                    [sys.executable, "-m", "cabinet.console.cli", "sim", "fleet",
                     "--cabinets", str(n), "--broker", broker.url,
                     "--duration", str(args.duration)],
                    capture_output=True, text=True, cwd=REPO, check=False,
                )  # fmt: skip
            finally:
                broker.stop()
        print(result.stdout.strip() or result.stderr.strip())
        print()


if __name__ == "__main__":
    main()
