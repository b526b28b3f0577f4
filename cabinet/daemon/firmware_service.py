"""Bay-board firmware updates inside the daemon, for technicians and operators alike.

An update touches only idle bays: a bay that holds the running session, has its door
open or does not answer is skipped (and says why). Each bay to flash is taken out of
service first — synchronously, after the idle check, so no session can pick it in
between — flashed through the bus scheduler (its commands at routine priority, the
image chunks at ``BULK``, in the line the poller lends between its cycles: riders'
unlocks, the session's reads and every bay's once-a-second read go first, so the
cabinet keeps swapping on the other bays), and put back once its new image is
confirmed. One update runs at a time — from the command that asked for it, so
reading or downloading its image counts. Every step is an event:
``firmware.rejected``, ``firmware.started``, ``firmware.progress`` (every quarter),
``firmware.updated``, ``firmware.failed``.

A board rebooting into its new image is announced to the bus by the updater
(``firmware_bridge.updater``), so ``status`` shows it as restarting, not as failing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import structlog
from nacl.signing import VerifyKey as Ed25519PublicKey  # the one Ed25519 library: PyNaCl

from cabinet.core.swap_machine import BOARD_SILENT, Phase
from cabinet.daemon.bus_scheduler import Priority
from cabinet.daemon.controller import CabinetController
from cabinet.daemon.firmware_download import (
    DOWNLOAD_FAILED,
    FAILED_DETAIL,
    DownloadFailedError,
    DownloadRefusedError,
    check_url,
    download,
)
from cabinet.daemon.journal import JournalError
from drivers.boards import BayBoard
from drivers.modbus_bus import BusError, ModbusBus, UnitRestartingError
from firmware_bridge.image import (
    FirmwareImage,
    ImageRejectedError,
    check_fit,
    check_signature,
    parse_image,
)
from firmware_bridge.image_file import ImageSourceError, inside, open_image, read_image
from firmware_bridge.updater import (
    BOARD_WAIT_S,
    BayUpdater,
    Progress,
    UnconfirmedError,
    UpdateFailedError,
    read_status,
)
from protocol import bay_map
from protocol import firmware_map as fw
from protocol.errors import CodedError, ProtocolError
from protocol.units import BAY_UNITS

log = structlog.get_logger("firmware")

UPDATING = "firmware update"
EVENT_STEPS = 4  # firmware.progress at 25 %, 50 %, 75 %
Report = Callable[[dict[str, Any]], Awaitable[None]]


class FirmwareRefusedError(CodedError):
    """The whole update is refused (no keys, a bad image, another update running)."""


@dataclass(frozen=True, slots=True)
class BayResult:
    """What happened to one bay."""

    bay: int
    outcome: str  # updated, skipped, failed
    detail: str
    version: str | None = None
    duration_s: float | None = None


async def _report_nothing(_item: dict[str, Any]) -> None:
    return None


class FirmwareService:
    """Firmware status and updates for the running cabinet."""

    def __init__(
        self,
        controller: CabinetController,
        keys: list[Ed25519PublicKey],
        *,
        board_wait_s: float = BOARD_WAIT_S,
    ) -> None:
        self.controller = controller
        self.keys = keys
        self.board_wait_s = board_wait_s  # ``firmware.board_wait_s``
        self._busy = False  # claimed synchronously: no await between the check and the claim

    async def _submit(self, job: Callable[[ModbusBus], Awaitable[Any]]) -> Any:
        return await self.controller.scheduler.submit(Priority.ROUTINE, job)

    async def _submit_chunk(self, job: Callable[[ModbusBus], Awaitable[Any]]) -> Any:
        """Image chunks go below polling, in the line it lends: every bay read once a second."""
        return await self.controller.scheduler.submit(Priority.BULK, job)

    async def _board(self, bay: int) -> bay_map.BayStatus:
        status: bay_map.BayStatus = await self._submit(lambda bus: BayBoard(bus, bay).read_status())
        return status

    async def _bootloader(self, bay: int) -> fw.Status:
        status: fw.Status = await self._submit(lambda bus: read_status(bus, bay))
        return status

    # -- status ----------------------------------------------------------------------------

    async def status(self) -> list[dict[str, Any]]:
        """Every bay board's map, running version and bootloader state."""
        rows = []
        for bay in BAY_UNITS:
            row: dict[str, Any] = {"bay": bay, "online": False}
            try:
                board = await self._board(bay)
                row |= {
                    "online": True,
                    "map_version": board.map_version,
                    "version": bay_map.firmware_version_str(board.firmware_version),
                }
                if board.map_version >= fw.FIRMWARE_MAP_VERSION:
                    boot = await self._bootloader(bay)
                    row |= {"bootloader": boot.state.name.lower(), "staged_bytes": boot.received}
                else:
                    row["bootloader"] = None  # map 1: no firmware window, no bus updates
            except UnitRestartingError as exc:  # rebooting into an image we just activated
                row |= {"bootloader": "restarting", "error": str(exc)}
            except (BusError, ProtocolError) as exc:
                row["error"] = str(exc)
            rows.append(row)
        return rows

    # -- updates ---------------------------------------------------------------------------

    def load(self, data: bytes, by: str) -> FirmwareImage:
        """Parse and authenticate an image, or journal why not and raise."""
        try:
            image = parse_image(data)
            check_signature(image, self.keys)
        except ImageRejectedError as exc:
            self.event("firmware.rejected", {"reason": exc.reason, "detail": str(exc), "by": by})
            raise FirmwareRefusedError(exc.reason, str(exc)) from None
        return image

    async def update(
        self,
        image: FirmwareImage,
        bays: list[int],
        *,
        force: bool,
        by: str,
        report: Report = _report_nothing,
    ) -> list[BayResult]:
        """Flash ``image`` onto each of ``bays`` in turn; one result per bay."""
        self.claim()
        try:
            return await self.flash(image, bays, force=force, by=by, report=report)
        finally:
            self.release()

    def claim(self) -> None:
        """Take the service for one update (raise ``busy`` if it is taken); see release."""
        if self._busy:
            raise FirmwareRefusedError("busy", "another firmware update is running")
        self._busy = True

    def release(self) -> None:
        """The update that claimed the service is over: reading, download and flashing."""
        self._busy = False

    async def flash(
        self,
        image: FirmwareImage,
        bays: list[int],
        *,
        force: bool,
        by: str,
        report: Report = _report_nothing,
    ) -> list[BayResult]:
        """``update`` for a caller that already holds the claim."""
        if not self.controller.journal_writable():  # every step is journaled
            raise FirmwareRefusedError(
                "journal_unwritable",
                f"the journal cannot be written: {self.controller.journal_alarm}",
            )
        results = []
        for bay in bays:
            result = await self._update_bay(image, bay, force=force, by=by, report=report)
            results.append(result)
            await report({"result": asdict(result)})
        return results

    def _busy_reason(self, bay: int) -> str | None:
        c = self.controller
        state = c.state
        if state.phase is not Phase.IDLE and bay in (state.return_bay, state.dispense_bay):
            return "a swap is using it"
        snap = c.snapshots.get(bay)
        if snap is None or not snap.online:
            return "the board does not answer"
        if not snap.door_closed:
            return "its door is open"
        return None

    async def _update_bay(
        self, image: FirmwareImage, bay: int, *, force: bool, by: str, report: Report
    ) -> BayResult:
        try:
            board = await self._board(bay)
        except (BusError, ProtocolError) as exc:
            return BayResult(bay, "skipped", f"cannot read the board: {exc}")
        if board.map_version < fw.FIRMWARE_MAP_VERSION:
            return BayResult(bay, "skipped", "register map 1 has no bootloader window")
        try:
            check_fit(
                image, board_type=fw.BAY_BOARD_TYPE, running=board.firmware_version, force=force
            )
        except ImageRejectedError as exc:
            return BayResult(bay, "skipped", str(exc))
        busy = self._busy_reason(bay)  # checked and acted on with no await in between
        if busy is not None:
            return BayResult(bay, "skipped", busy)
        c = self.controller
        was_in_service = bay not in c.out_of_service
        if was_in_service:
            c.set_bay_service(bay, in_service=False, reason=UPDATING, by="firmware")
        running = bay_map.firmware_version_str(board.firmware_version)
        self.event(
            "firmware.started", {"bay": bay, "from": running, "to": image.version_str, "by": by}
        )
        shown: dict[str, Any] = {"quarter": 0, "percent": -1, "phase": ""}

        async def progress(p: Progress) -> None:
            quarter = p.sent * EVENT_STEPS // p.total if p.phase == "sending" else 0
            if 0 < quarter < EVENT_STEPS and quarter > shown["quarter"]:
                shown["quarter"] = quarter
                self.event("firmware.progress", {"bay": bay, "percent": 100 * quarter // 4})
            percent = 100 * p.sent // p.total
            if (percent, p.phase) != (shown["percent"], shown["phase"]):  # a line per percent
                shown["percent"], shown["phase"] = percent, p.phase
                item = {"bay": bay, "phase": p.phase, "sent": p.sent, "total": p.total}
                await report({"progress": item})

        started = time.monotonic()
        try:
            outcome = await BayUpdater(
                self._submit,
                bay,
                image,
                on_progress=progress,
                board_wait_s=self.board_wait_s,
                submit_chunk=self._submit_chunk,
                chunk_share=c.scheduler.bulk_share,
            ).run(board.firmware_version)
        except UpdateFailedError as exc:
            self.event("firmware.failed", {"bay": bay, "reason": exc.reason, "detail": str(exc)})
            if was_in_service:
                self._after_failure(bay, exc)
            return BayResult(bay, "failed", f"{exc.reason}: {exc}")
        duration = round(time.monotonic() - started, 1)
        self.event(
            "firmware.updated",
            {
                "bay": bay,
                "version": image.version_str,
                "previous": running,
                "duration_s": duration,
                "resumes": outcome.resumes,
            },
        )
        if was_in_service:
            c.set_bay_service(bay, in_service=True, reason="firmware updated", by="firmware")
        return BayResult(
            bay, "updated", f"{running} -> {image.version_str}", image.version_str, duration
        )

    def _after_failure(self, bay: int, failure: UpdateFailedError) -> None:
        """The service of a bay whose update failed, by what its board is left running.

        The old image (the update failed before ACTIVATE, or was rolled back): back in
        service. A new image not confirmed: its bootloader reverts it by itself, with a
        reboot, at the end of its confirm window, so the bay is handed to the poller as a
        silent board: back in service at the board's next answered reading, which the
        poller's rules judge like any other. A board that never came back: left out.
        """
        c = self.controller
        if isinstance(failure, UnconfirmedError):
            c.set_bay_service(bay, in_service=False, reason=BOARD_SILENT, by="firmware")
        elif failure.reason != "board_lost":
            c.set_bay_service(bay, in_service=True, reason="firmware unchanged", by="firmware")

    @property
    def busy(self) -> bool:
        """Whether an update is running (or its image is being read or downloaded)."""
        return self._busy

    def event(self, type_: str, payload: dict[str, Any]) -> None:
        """Journal a firmware event."""
        self.controller.record((type_, payload))


class FirmwareFetcher:
    """``cmd/firmware.update``: the image by path in ``firmware.image_dir`` or by http(s) URL.

    The command is answered at once (accepted, or refused with the reason); reading,
    downloading and flashing happen in the background and report through events,
    because none of them may hold up the event loop (docs/firmware.md, "Nothing that
    can block runs on the event loop"). Only what costs no waiting is checked before
    the reply: the scheme, that a URL's host is in ``firmware.allowed_hosts``, that a
    path lies in the image directory, and — on the descriptor opened with
    ``O_NONBLOCK`` — that it is a regular file within the cap. The service is claimed
    before the reply and released when the background work ends, so a second update
    while the first one's image downloads is ``busy``.
    """

    def __init__(
        self,
        service: FirmwareService,
        max_bytes: int,
        image_dir: Path,
        *,
        allowed_hosts: Sequence[str] = (),
        download_timeout_s: float = 120.0,
    ) -> None:
        self.service = service
        self.max_bytes = max_bytes
        self.image_dir = image_dir
        self.allowed_hosts = tuple(allowed_hosts)
        self.download_timeout_s = download_timeout_s
        with contextlib.suppress(OSError):  # where operators put images; no read-only surprise
            image_dir.mkdir(mode=0o750, parents=True, exist_ok=True)
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, source: str, bays: list[int], *, force: bool) -> dict[str, Any]:
        """Validate what can be validated without waiting, then update in the background."""
        if self.service.busy:
            raise FirmwareRefusedError("busy", "another firmware update is running")
        if not self.service.controller.journal_writable():
            alarm = self.service.controller.journal_alarm
            raise FirmwareRefusedError(
                "journal_unwritable", f"the journal cannot be written: {alarm}"
            )
        try:
            parts = urllib.parse.urlsplit(source)
        except ValueError:  # "http://[": a bracket with no IPv6 address in it
            raise FirmwareRefusedError("invalid_source", f"{source!r} is not a valid URL") from None
        scheme = parts.scheme
        if scheme in ("http", "https"):
            try:
                check_url(source, self.allowed_hosts)  # no I/O: nothing resolved or sent
            except DownloadRefusedError as exc:
                raise FirmwareRefusedError(exc.reason, str(exc)) from None
            self._spawn(self._fetch_and_update(source, bays, force))
            return {"accepted": True, "bays": bays, "source": source}
        if scheme not in ("", "file"):
            raise FirmwareRefusedError("invalid_source", f"unsupported source {source!r}")
        path = Path(parts.path if scheme == "file" else source)
        try:
            fd = open_image(inside(path, self.image_dir), self.max_bytes)
        except ImageSourceError as exc:
            raise FirmwareRefusedError(exc.reason, str(exc)) from None
        self._spawn(self._read_and_update(fd, path, bays, force))
        return {"accepted": True, "bays": bays, "source": source}

    async def _read_and_update(self, fd: int, path: Path, bays: list[int], force: bool) -> None:
        try:
            data = await asyncio.to_thread(read_image, fd, path, self.max_bytes)
        except ImageSourceError as exc:
            self._rejected(exc.reason, str(exc))
            return
        await self._load_and_update(data, bays, force)

    async def _load_and_update(self, data: bytes, bays: list[int], force: bool) -> None:
        try:
            image = self.service.load(data, by="operator")
        except FirmwareRefusedError:
            return  # journaled by load
        await self._update(image, bays, force)

    def _rejected(self, reason: str, detail: str) -> None:
        self.service.event(
            "firmware.rejected", {"reason": reason, "detail": detail, "by": "operator"}
        )

    async def _fetch_and_update(self, url: str, bays: list[int], force: bool) -> None:
        try:
            data = await download(
                url,
                self.allowed_hosts,
                deadline_s=self.download_timeout_s,
                max_bytes=self.max_bytes,
            )
        except DownloadFailedError as exc:  # the real reason stays on the device
            log.warning("firmware_download_failed", url=url, error=str(exc))
            self._rejected(DOWNLOAD_FAILED, FAILED_DETAIL)
            return
        except DownloadRefusedError as exc:  # a redirect off the list, over the cap
            log.warning("firmware_download_refused", url=url, error=str(exc))
            self._rejected(exc.reason, str(exc))
            return
        await self._load_and_update(data, bays, force)

    async def _update(self, image: FirmwareImage, bays: list[int], force: bool) -> None:
        try:
            await self.service.flash(image, bays, force=force, by="operator")
        except FirmwareRefusedError as exc:
            self.service.event(
                "firmware.rejected", {"reason": exc.reason, "detail": str(exc), "by": "operator"}
            )

    def _spawn(self, work: Awaitable[None]) -> None:
        """Claim the service now (the reply says accepted), release it when ``work`` ends."""
        self.service.claim()
        task = asyncio.ensure_future(self._logged(work))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _logged(self, work: Awaitable[None]) -> None:
        """A background update that cannot journal stops with one clear line, no traceback."""
        try:
            await work
        except JournalError as exc:
            log.error("firmware_update_stopped", error=str(exc))
        finally:
            self.service.release()
