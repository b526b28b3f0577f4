"""Signed images and the bootloader transfer, against the simulated board over real RTU."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from nacl.signing import SigningKey

from drivers.modbus_bus import ModbusBus
from firmware_bridge.image import (
    ImageRejectedError,
    build_image,
    check_fit,
    check_signature,
    parse_image,
    parse_version,
)
from firmware_bridge.updater import BayUpdater, Progress, UpdateFailedError, chunk_length
from protocol import firmware_map as fw
from sim.faults import FaultKind
from tests.conftest import master, running_sim

VENDOR = SigningKey.generate()
PAYLOAD = os.urandom(8 * 1024 + 17)  # an odd size: the last chunk is short and odd
V14 = parse_version("1.4")


def image(**overrides: Any) -> bytes:
    args: dict[str, Any] = {"version": V14, "board_type": fw.BAY_BOARD_TYPE, "key": VENDOR}
    return build_image(overrides.pop("payload", PAYLOAD), **{**args, **overrides})


# -- the image format ----------------------------------------------------------------------


def test_a_signed_image_round_trips() -> None:
    parsed = parse_image(image())
    check_signature(parsed, [VENDOR.verify_key])
    check_fit(parsed, board_type=fw.BAY_BOARD_TYPE, running=0x0103, force=False)
    assert parsed.payload == PAYLOAD and parsed.version_str == "1.4"
    assert parsed.target == "bay-board"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"not an image", "malformed"),
        (image()[:-1], "malformed"),  # truncated
        (image()[:-1] + bytes([image()[-1] ^ 1]), "malformed"),  # a flipped payload bit
    ],
)
def test_broken_images_are_refused(data: bytes, reason: str) -> None:
    with pytest.raises(ImageRejectedError) as refused:
        parse_image(data)
    assert refused.value.reason == reason


def test_unsigned_and_mis_signed_images_are_refused() -> None:
    trusted = [VENDOR.verify_key]
    with pytest.raises(ImageRejectedError, match="unsigned") as refused:
        check_signature(parse_image(image(key=None)), trusted)
    assert refused.value.reason == "unsigned"
    forged = parse_image(image(key=SigningKey.generate()))
    with pytest.raises(ImageRejectedError) as refused:
        check_signature(forged, trusted)
    assert refused.value.reason == "bad_signature"
    # the version is signed: raising it in the header breaks the signature
    data = bytearray(image())
    data[9] += 1
    with pytest.raises(ImageRejectedError) as refused:
        check_signature(parse_image(bytes(data)), trusted)
    assert refused.value.reason == "bad_signature"


def test_wrong_target_and_downgrade_are_refused_unless_forced() -> None:
    other = parse_image(image(board_type=0x0C01))
    with pytest.raises(ImageRejectedError) as refused:
        check_fit(other, board_type=fw.BAY_BOARD_TYPE, running=0x0103, force=True)
    assert refused.value.reason == "wrong_target"
    old = parse_image(image(version=parse_version("1.2")))
    with pytest.raises(ImageRejectedError) as refused:
        check_fit(old, board_type=fw.BAY_BOARD_TYPE, running=0x0103, force=False)
    assert refused.value.reason == "downgrade"
    check_fit(old, board_type=fw.BAY_BOARD_TYPE, running=0x0103, force=True)


# -- the transfer against the simulated board -----------------------------------------------


def direct(bus: ModbusBus) -> Callable[[Callable[[ModbusBus], Awaitable[Any]]], Awaitable[Any]]:
    async def submit(job: Callable[[ModbusBus], Awaitable[Any]]) -> Any:
        return await job(bus)

    return submit


def run(scenario: Callable[..., Awaitable[None]]) -> None:
    async def main() -> None:
        async with running_sim() as sim, master(sim.url, timeout_s=1.0) as bus:
            await bus.broadcast_register(100, 1)  # a heartbeat, as the daemon sends
            await scenario(sim, bus)

    asyncio.run(main())


def test_an_update_flashes_verifies_activates_and_confirms() -> None:
    async def scenario(sim: Any, bus: ModbusBus) -> None:
        seen: list[Progress] = []
        updater = BayUpdater(direct(bus), 3, parse_image(image()), on_progress=seen.append)
        outcome = await updater.run(0x0103)
        boot = sim.world.bays[3].boot
        assert boot.active_version == V14 and boot.state is fw.State.IDLE
        assert outcome.version == V14 and outcome.resumes == 0
        assert boot.bytes_received == len(PAYLOAD)  # every byte sent exactly once
        assert [p.phase for p in seen][-3:] == ["verifying", "activating", "confirming"]
        assert sim.world.bays[4].boot.active_version == 0x0103  # the neighbours untouched

    run(scenario)


def test_shortened_chunks_carry_the_image_intact() -> None:
    """Chunks sized by the share of a lend left (1-240 bytes, docs/firmware.md) add up.

    The daemon fills the end of each lend with a shorter chunk (``bulk_share``): the
    board must stage every byte once, in order, and verify the image's hash.
    """
    shares = iter([None, 0.3, 0.9, None, 0.25] * 100)

    async def scenario(sim: Any, bus: ModbusBus) -> None:
        updater = BayUpdater(direct(bus), 2, parse_image(image()), chunk_share=lambda: next(shares))
        await updater.run(0x0103)
        boot = sim.world.bays[2].boot
        assert boot.active_version == V14 and boot.state is fw.State.IDLE
        assert boot.bytes_received == len(PAYLOAD)  # every byte sent exactly once

    run(scenario)
    assert [chunk_length(s) for s in (None, 1.0, 0.5, 0.25)] == [240, 240, 108, 42]


def test_a_reply_lost_before_the_first_chunk_resumes_the_update() -> None:
    """The board misses BEGIN's exchange (a lost frame, a starved line): it is waited for.

    Found by a loaded suite run (tests/test_firmware_polling.py): one reply lost there
    failed the whole update as "internal" and left the bay out of service.
    """

    async def scenario(sim: Any, bus: ModbusBus) -> None:
        loop = asyncio.get_running_loop()
        sim.world.inject(FaultKind.SILENT, bay=8)  # silent from the first exchange on
        loop.call_later(0.5, lambda: sim.world.heal(FaultKind.SILENT, bay=8))
        updater = BayUpdater(direct(bus), 8, parse_image(image()))
        outcome = await updater.run(0x0103)
        assert outcome.resumes >= 1  # the first BEGIN went unanswered
        assert sim.world.bays[8].boot.active_version == V14

    run(scenario)


def test_a_board_silent_at_commit_fails_the_update_with_its_old_firmware() -> None:
    """No answer to COMMIT (or its status read): ``bus``, and the board runs what it ran.

    Before ACTIVATE nothing on the board has changed, so the service puts the bay back in
    service on this failure; the bus error used to escape the updater as "internal", with
    no ``firmware.failed`` and the bay left out of service (found by a flake hunt's review).
    """

    async def scenario(sim: Any, bus: ModbusBus) -> None:
        def progress(p: Progress) -> None:
            if p.phase == "verifying":  # every chunk is in; COMMIT is next
                sim.world.inject(FaultKind.SILENT, bay=7)

        updater = BayUpdater(direct(bus), 7, parse_image(image()), on_progress=progress)
        with pytest.raises(UpdateFailedError) as failed:
            await updater.run(0x0103)
        assert failed.value.reason == "bus"
        assert "unchanged" in str(failed.value)
        assert sim.world.bays[7].boot.active_version == 0x0103

    run(scenario)


def test_a_power_cut_mid_transfer_resumes_where_it_stopped() -> None:
    async def scenario(sim: Any, bus: ModbusBus) -> None:
        loop = asyncio.get_running_loop()
        cut = False

        def progress(p: Progress) -> None:
            nonlocal cut
            if not cut and p.phase == "sending" and p.sent > len(PAYLOAD) // 3:
                cut = True
                sim.world.inject(FaultKind.POWER_CUT, bay=5)
                loop.call_later(1.0, lambda: sim.world.heal(FaultKind.POWER_CUT, bay=5))

        updater = BayUpdater(direct(bus), 5, parse_image(image()), on_progress=progress)
        outcome = await updater.run(0x0103)
        boot = sim.world.bays[5].boot
        assert cut and outcome.resumes >= 1
        assert boot.active_version == V14
        assert boot.bytes_received < 1.2 * len(PAYLOAD)  # resumed, not restarted

    run(scenario)


def test_an_image_that_does_not_boot_is_rolled_back() -> None:
    async def scenario(sim: Any, bus: ModbusBus) -> None:
        sim.world.inject(FaultKind.FIRMWARE_BAD, bay=6)
        updater = BayUpdater(direct(bus), 6, parse_image(image()))
        with pytest.raises(UpdateFailedError) as failed:
            await updater.run(0x0103)
        assert failed.value.reason == "rolled_back"
        boot = sim.world.bays[6].boot
        assert boot.active_version == 0x0103 and boot.activations == 1

    run(scenario)


def test_a_board_that_never_comes_back_is_reported_lost() -> None:
    async def scenario(sim: Any, bus: ModbusBus) -> None:
        def progress(p: Progress) -> None:
            if p.phase == "sending" and p.sent > 1000:
                sim.world.inject(FaultKind.POWER_CUT, bay=7)

        updater = BayUpdater(
            direct(bus), 7, parse_image(image()), on_progress=progress, board_wait_s=1.5
        )
        with pytest.raises(UpdateFailedError) as failed:
            await updater.run(0x0103)
        assert failed.value.reason == "board_lost"
        assert sim.world.bays[7].boot.active_version == 0x0103

    run(scenario)


def test_the_board_refuses_a_chunk_at_the_wrong_offset() -> None:
    async def scenario(sim: Any, bus: ModbusBus) -> None:
        from drivers.modbus_bus import ExceptionReplyError  # noqa: PLC0415

        header = fw.Header(len(PAYLOAD), V14, fw.BAY_BOARD_TYPE, parse_image(image()).sha256)
        await bus.write_registers(2, fw.HEADER_START, header.encode())
        await bus.write_register(2, fw.COMMAND_REG, fw.Command.BEGIN)
        with pytest.raises(ExceptionReplyError):
            await bus.write_registers(2, fw.CHUNK_START, fw.encode_chunk(240, PAYLOAD[240:480]))
        assert sim.world.bays[2].boot.status().received == 0

    run(scenario)
