"""A bay board rebooting into its new image: found again at once, and not called offline.

A real `cabinet run` against a real `cabinet sim`, the update started as a technician
does (`cabinet firmware update`). The board's reboot (1.5 s in the simulator) is our
own doing: the daemon should neither time out on it (holding the line), nor isolate it
and report ``bay.offline``, nor leave it unread for the bus's 5 s re-probe interval
after it is back. Every timing comes off the simulator's own clock and counters, read
over its control socket many times a second while the update runs; wall-clock limits
are only there to stop a test that hangs.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sim.bootloader import ACK_S, REBOOT_S
from sim.control import call
from tests.conftest import cabinet_cmd, cabinet_popen
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.test_firmware_update import signed

#: The poller reads every bay at least once a second (DESIGN.md): the longest a board
#: that is back may wait for its first read.
POLL_CYCLE_S = 1.0
SAMPLE_PACE_S = 0.01  # between two readings of the simulator's counters
EXIT_PROBLEM = 3


@dataclass(frozen=True, slots=True)
class Sample:
    """One reading of the simulator: its clock and what it saw of one bay board."""

    now: float
    answering: bool
    requests: int  # requests that reached the board (answered or not)
    reads: int
    bytes_out: int  # grows only when the board answers
    last_read_at: float


def control(cab: Cabinet, request: dict[str, Any]) -> Any:
    """One request to the simulator's control socket (milliseconds, not a CLI's start-up)."""
    url = urllib.parse.urlsplit(cab.sim.control)
    assert url.hostname is not None and url.port is not None
    return asyncio.run(call(url.hostname, url.port, request))


def sample(cab: Cabinet, bay: int) -> Sample:
    state: dict[str, Any] = control(cab, {"verb": "state"})
    unit = state["bus"]["units"].get(str(bay), {})
    return Sample(
        now=state["bus"]["now"],
        answering=state["bays"][bay - 1]["firmware"]["answering"],
        requests=unit.get("requests", 0),
        reads=unit.get("reads", 0),
        bytes_out=unit.get("bytes_out", 0),
        last_read_at=unit.get("last_read_at", 0.0),
    )


@pytest.fixture(scope="module")
def vendor(tmp_path_factory: pytest.TempPathFactory) -> Path:
    prefix = tmp_path_factory.mktemp("vendor") / "vendor"
    assert cabinet_cmd("keys", "generate", str(prefix)).returncode == 0
    return prefix


@pytest.fixture(scope="module")
def cab(tmp_path_factory: pytest.TempPathFactory, vendor: Path) -> Iterator[Cabinet]:
    # a board that never comes back is given up on after 8 s, not the default minute: the
    # simulator's boards reboot in 1.5 s (firmware.board_wait_s)
    extra = {"firmware": {"public_keys": [f"{vendor}.pub"], "board_wait_s": 8.0}}
    with running_cabinet(tmp_path_factory.mktemp("reboot"), seed=5, extra=extra) as cabinet:
        yield cabinet


def update_watching(
    cab: Cabinet, image: Path, bay: int, *, during_reboot: dict[str, Any] | None = None
) -> tuple[subprocess.CompletedProcess[str], list[Sample]]:
    """Run `cabinet firmware update IMAGE --bay N`, sampling the board until the CLI exits.

    ``during_reboot``: a control request sent as soon as the board is seen rebooting
    (a fault that keeps it from coming back).
    """
    wait_until(f"bay {bay} polled", lambda: sample(cab, bay).bytes_out > 0)
    proc = cabinet_popen("firmware", "update", str(image), "--bay", str(bay), "-c", str(cab.config))
    samples: list[Sample] = []
    try:
        while proc.poll() is None:
            samples.append(sample(cab, bay))
            if during_reboot is not None and not samples[-1].answering:
                control(cab, during_reboot)
                during_reboot = None
            if len(samples) > 20_000:  # minutes: a hang, not a slow machine
                raise AssertionError("the update did not end")
            with contextlib.suppress(subprocess.TimeoutExpired):  # the pace, or its exit
                proc.wait(timeout=SAMPLE_PACE_S)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), samples


def reboot_window(samples: list[Sample]) -> tuple[int, int]:
    """Indices of the last sample before the board went silent and the first after it."""
    first_silent = next(i for i, s in enumerate(samples) if not s.answering)
    assert first_silent > 0, "the board was already silent when the update started"
    back = next(i for i in range(first_silent, len(samples)) if samples[i].answering)
    return first_silent - 1, back


def bay_events(cab: Cabinet, bay: int, since: int) -> list[dict[str, Any]]:
    return [e for e in cab.events()[since:] if e.get("bay") == bay]


def test_a_rebooting_board_is_read_again_right_after_its_reboot_and_never_called_offline(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    bay = 4
    before = len(cab.events())
    result, samples = update_watching(cab, signed(vendor, tmp_path, "1.4", size=4096), bay)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"bay {bay}: updated (1.3 -> 1.4)" in result.stdout

    went_silent, back = reboot_window(samples)
    rebooting = samples[went_silent + 1 : back]
    assert rebooting, "no sample caught the board rebooting"
    # nothing was sent to the board while it rebooted: no time-out held the line
    sent = samples[back - 1].requests - samples[went_silent + 1].requests
    assert sent == 0, f"{sent} requests went to the board while it was rebooting"
    # its first answered read after the reboot: reads and replies both grew
    probe = next(
        s
        for prev, s in zip(samples[back - 1 :], samples[back:], strict=False)
        if s.reads > prev.reads and s.bytes_out > prev.bytes_out
    )
    # the board went silent after samples[went_silent] (ACTIVATE + ACK_S): read again
    # within its reboot and one poll cycle of that, not the bus's 5 s re-probe later
    since_silent = probe.last_read_at - samples[went_silent].now
    limit = REBOOT_S + POLL_CYCLE_S
    assert since_silent <= limit, (
        f"bay {bay} first read {since_silent:.2f} s after it began rebooting "
        f"(reboot {REBOOT_S} s + ack {ACK_S} s; limit {limit} s)"
    )

    cab.wait_event("bay.enabled", bay=bay, reason="firmware updated")
    types = [e["type"] for e in bay_events(cab, bay, before)]
    assert "firmware.updated" in types
    # the reboot was ours: not news, not an alarm
    assert not {"bay.offline", "bay.online", "alarm.raised"} & set(types), types


def test_a_board_that_does_not_come_back_is_lost_and_stays_out_of_service(
    cab: Cabinet, vendor: Path, tmp_path: Path
) -> None:
    bay = 7
    before = len(cab.events())
    try:
        silent = {"verb": "fault", "kind": "silent", "bay": bay}
        result, samples = update_watching(
            cab, signed(vendor, tmp_path, "1.5", size=4096), bay, during_reboot=silent
        )
    finally:
        cab.ctl("heal", "silent", "--bay", str(bay))
    assert any(not s.answering for s in samples)
    assert result.returncode == EXIT_PROBLEM, result.stdout + result.stderr
    assert f"bay {bay}: failed (board_lost" in result.stdout
    failed = cab.wait_event("firmware.failed", bay=bay)
    assert failed["reason"] == "board_lost"
    assert "within 8 s" in failed["detail"], failed  # firmware.board_wait_s, not the minute
    types = [e["type"] for e in bay_events(cab, bay, before)]
    # once its reboot is over a silent board is news as any other
    assert "bay.offline" in types, types
    assert "bay.enabled" not in types[types.index("bay.disabled") :], types
