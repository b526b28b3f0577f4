"""A bay-board firmware update through the running daemon, at 19200 and 115200 baud.

Starts `cabinet sim` (2 ms slave turnaround, the wire time of every frame modelled)
and `cabinet run` with a firmware key, signs a random 64 KiB image and times
`cabinet firmware update IMAGE --bay 1` end to end: transfer (interleaved with the
daemon's normal polling, which keeps going), verify, activate, reboot (1.5 s in the
simulator), confirm. Compares the transfer with its wire-time floor: 274 FC16 writes
of 123 registers.

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

from protocol import firmware_map, rtu_timing
from sim.launcher import start_simulator, stop_process

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
        started = time.perf_counter()
        result = cabinet("firmware", "update", str(image), "--bay", "1", "-c", str(config))
        total = time.perf_counter() - started
        assert result.returncode == 0, result.stdout + result.stderr
        return {"total_s": total, "floor_s": floor_s(size, baud)}
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
    print(f"{'baud':>7}  {'total s':>8}  {'transfer floor s':>16}  ratio")
    for baud in args.baud:
        with tempfile.TemporaryDirectory() as tmp:
            row = measure(baud, size, Path(tmp))
        print(
            f"{baud:>7}  {row['total_s']:8.1f}  {row['floor_s']:16.1f}  "
            f"{row['total_s'] / row['floor_s']:.2f}"
        )


if __name__ == "__main__":
    main()
