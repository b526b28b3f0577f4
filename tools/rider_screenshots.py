"""Screenshots of the rider's screen for docs/rider-screen.md (``make screenshots``).

Runs the simulator and the daemon (display on) once per language, drives a rider
through a swap, a refused battery and smoke, and photographs each screen in a
headless Debian chromium at 800x480 (landscape) and 1080x1920 (portrait).

    .venv/bin/python tools/rider_screenshots.py [--out docs/rider-screen]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.browser import kiosk  # noqa: E402
from tests.daemon_harness import Cabinet, running_cabinet, wait_until  # noqa: E402
from tests.display_helpers import get_json  # noqa: E402
from tests.mqtt_broker import free_port, running_broker  # noqa: E402

SIZES = {"landscape": (800, 480), "portrait": (1080, 1920)}


def shoot(drivers: dict[str, Any], out: Path, lang: str, name: str, kind: str) -> None:
    """Photograph the screen in both layouts once the page shows ``kind``."""
    for orientation, driver in drivers.items():

        def showing(d: Any = driver) -> bool:
            return bool(d.execute_script("return document.body.dataset.kind") == kind)

        wait_until(f"{kind} on the {orientation} page", showing)
        path = out / f"{name}-{orientation}-{lang}.png"
        driver.save_screenshot(str(path))
        print(f"wrote {path}")


def _shows_code(port: int) -> bool:
    return bool(get_json(f"http://127.0.0.1:{port}/screen.json")["qr_svg"])


def session(cab: Cabinet, rider: str, mode: str) -> dict[str, Any]:
    """Scan a token for ``rider``; the swap.started event."""
    count = len(cab.events("swap.started"))
    cab.scan(cab.token(rider, "--mode", mode))
    wait_until("swap.started", lambda: len(cab.events("swap.started")) > count)
    return cab.events("swap.started")[-1]


def run(lang: str, out: Path) -> None:
    """One cabinet in ``lang``: every main screen, in both layouts."""
    port = free_port()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_broker(Path(tmp)) as broker,  # the fleet link up: the idle screen has its code
        running_cabinet(
            Path(tmp),
            extra={
                "mqtt": {"url": broker.url},
                "display": {"enabled": True, "port": port, "language": lang},
            },
        ) as cab,
    ):
        drivers = {o: kiosk(*size) for o, size in SIZES.items()}
        try:
            for orientation, driver in drivers.items():
                driver.get(f"http://127.0.0.1:{port}/?orientation={orientation}")
            # the code is up once the fleet link is (without it the screen has none)
            wait_until("the code on the screen", lambda: _shows_code(port))
            shoot(drivers, out, lang, "idle", "idle")
            ret = session(cab, "R-shot", "return")["return_bay"]
            cab.wait_door(ret, "open")
            shoot(drivers, out, lang, "insert", "session")
            cab.ctl("insert", str(ret), "--battery", "BAT-SHOT", "--soc", "20", "--unplugged")
            cab.ctl("close", str(ret))
            wait_until("the refusal", lambda: cab.events("swap.deposit_rejected"))
            shoot(drivers, out, lang, "refused", "session")
            cab.wait_door(ret, "open")
            cab.ctl("take", str(ret))
            cab.ctl("close", str(ret))
            shoot(drivers, out, lang, "failed", "result")
            cab.ctl("fault", "smoke")
            shoot(drivers, out, lang, "smoke", "safety")
            cab.ctl("heal", "smoke")
        finally:
            for driver in drivers.values():
                driver.quit()


def main() -> None:
    """Both languages into ``--out``."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "rider-screen")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for lang in ("en", "zh-CN"):
        run(lang, args.out)


if __name__ == "__main__":
    main()
