"""A bay-board firmware update through the running daemon, at 19200 and 115200 baud.

Starts `cabinet sim` (2 ms slave turnaround, the wire time of every frame modelled)
and `cabinet run` with a firmware key, signs a random 64 KiB image and times
`cabinet firmware update IMAGE --bay 1` end to end: transfer (interleaved with the
daemon's normal polling, which keeps going), verify, activate, reboot (1.5 s in the
simulator), confirm. Compares the transfer with its wire-time floor: 274 FC16 writes
of 123 registers. Meanwhile it watches the simulator's per-unit read counters and
prints the longest gap between two reads of one bay board: the daemon must keep reading
every bay at least once a second during the update. A second floor, "shared", adds the
wire time that polling 12 bays and the cabinet board once a second takes: no schedule
can beat it while honouring that second.

    .venv/bin/python bench/firmware.py [--size KIB] [--baud N ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests.read_gap_watch

from protocol import bay_map, cabinet_map, firmware_map, rtu_timing
from protocol.units import BAY_UNITS
from sim.launcher import start_simulator, stop_process
from tests.read_gap_watch import ReadGapWatch

RATIO_GOAL = 1.25
GAP_GOAL_S = 1.0

REPO = Path(__file__).resolve().parent.parent


def cabinet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cabinet.console.cli", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
        timeout=900,
    )


def wait_ready(config: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        result = cabinet("status", "--json", "-c", str(config))
        if result.returncode == 0 and json.loads(result.stdout)["ready"]:
            return
        time.sleep(0.2)
    raise RuntimeError("daemon not ready")


def floor_s(size: int, baud: int) -> float:
    chunks = -(-size // firmware_map.CHUNK_BYTES)
    request = rtu_timing.write_multiple_request_bytes(3 + firmware_map.CHUNK_DATA_REGS)
    per_chunk = rtu_timing.frame_time(request, baud) + rtu_timing.frame_time(
        rtu_timing.WRITE_SINGLE_BYTES, baud
    )
    return chunks * (per_chunk + 0.002)


def shared_floor_s(size: int, baud: int) -> float:
    """The transfer floor when every bay and the cabinet board are read once a second."""
    reply_s = 0.002
    polling = len(BAY_UNITS) * rtu_timing.read_transaction_time(
        bay_map.STATUS_COUNT, baud, reply_s
    ) + rtu_timing.read_transaction_time(cabinet_map.STATUS_COUNT, baud, reply_s)
    return floor_s(size, baud) / (1.0 - polling)


def measure(baud: int, size: int, tmp: Path) -> dict[str, float]:
    sim, ready = start_simulator("--baud", str(baud), "--reply-ms", "2")
    daemon = None
    try:
        cabinet("keys", "generate", str(tmp / "vendor"))
        payload = tmp / "payload.bin"
        payload.write_bytes(os.urandom(size))
        image = tmp / "image.cfw"
        signed = cabinet(
            "firmware", "sign", str(payload), "--key", str(tmp / "vendor.key"),
            "--version", "2.0", "-o", str(image),
        )  # fmt: skip
        assert signed.returncode == 0, signed.stderr
        config = tmp / f"cabinet-{baud}.toml"
        config.write_text(
            f'[cabinet]\nid = "bench"\nstate_dir = "{tmp}/state-{baud}"\n'
            f'[bus]\nurl = "{ready["bus"]}"\n'
            f'[firmware]\npublic_keys = ["{tmp}/vendor.pub"]\n'
        )
        log = (tmp / "daemon.log").open("ab")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "cabinet.console.cli", "run", "-c", str(config)],
            stdout=log,
            stderr=log,
            cwd=REPO,
        )
        wait_ready(config)
        # bay 1 is flashed and reboots (silent for a while); the other boards are watched
        with ReadGapWatch(ready["control"], BAY_UNITS[1:]) as watch:
            started = time.perf_counter()
            result = cabinet("firmware", "update", str(image), "--bay", "1", "-c", str(config))
            total = time.perf_counter() - started
        assert result.returncode == 0, result.stdout + result.stderr
        return {
            "total_s": total,
            "floor_s": floor_s(size, baud),
            "shared_floor_s": shared_floor_s(size, baud),
            "gap_s": watch.worst_s,
            "wire_gap_s": watch.worst_wire_s,
        }
    finally:
        if daemon is not None:
            stop_process(daemon)
        stop_process(sim)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=64, help="image payload in KiB")
    parser.add_argument("--baud", type=int, nargs="+", default=[19200, 115200])
    args = parser.parse_args()
    size = args.size * 1024
    print(f"firmware update of a {args.size} KiB image on bay 1, through the daemon")
    print(
        f"{'baud':>7}  {'total s':>8}  {'transfer floor s':>16}  ratio (goal <= {RATIO_GOAL})"
        f"  {'shared floor s':>14}  ratio  longest read gap of a bay (goal <= {GAP_GOAL_S} s):"
        " wall clock / line busy"
    )
    for baud in args.baud:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(baud, size, Path(tmp))
        print(
            f"{baud:>7}  {row['total_s']:8.1f}  {row['floor_s']:16.1f}  "
            f"{row['total_s'] / row['floor_s']:18.2f}  {row['shared_floor_s']:14.1f}  "
            f"{row['total_s'] / row['shared_floor_s']:5.2f}  "
            f"{row['gap_s']:.2f} / {row['wire_gap_s']:.2f} s"
        )


if __name__ == "__main__":
    main()
