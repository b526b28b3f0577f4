"""The rider's screen in a real headless browser, against the real daemon and simulator.

One browser and one cabinet for the module (they are slow to start); the scenarios run
in order, smoke and the restart last. Every check is on the text a rider would read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser import kiosk, needs_browser
from tests.daemon_harness import Cabinet, running_cabinet, wait_until
from tests.mqtt_broker import free_port, running_broker
from tests.test_swap_end_to_end import collect, deposit

pytestmark = needs_browser

WAIT_S = 20.0


class Screen:
    """The page as a rider sees it."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver

    def text(self) -> str:
        from selenium.webdriver.common.by import By  # noqa: PLC0415

        return str(self.driver.find_element(By.TAG_NAME, "body").text)

    def wait_text(self, *needles: str) -> str:
        """Wait until every needle is on screen; return the screen's text."""
        return self._wait(f"{needles} on screen", lambda: all(n in self.text() for n in needles))

    def big_bay(self) -> str:
        from selenium.webdriver.common.by import By  # noqa: PLC0415

        return str(self.driver.find_element(By.ID, "bay").text)

    def qr(self) -> str:
        """The QR code's SVG as drawn ("" when none is shown)."""
        from selenium.webdriver.common.by import By  # noqa: PLC0415

        return str(self.driver.find_element(By.ID, "qr").get_attribute("innerHTML"))

    def until(self, what: str, ok: Callable[[], bool]) -> str:
        """Wait for any condition on the page; return the screen's text."""
        return self._wait(what, ok)

    def _wait(self, what: str, ok: Callable[[], bool]) -> str:
        from selenium.common.exceptions import TimeoutException  # noqa: PLC0415
        from selenium.webdriver.support.wait import WebDriverWait  # noqa: PLC0415

        try:
            WebDriverWait(self.driver, WAIT_S, poll_frequency=0.05).until(lambda _d: ok())
        except TimeoutException:
            raise AssertionError(f"timed out waiting for {what}; shown: {self.text()!r}") from None
        return self.text()


def return_begins(cab: Cabinet, rider: str) -> dict[str, Any]:
    """A rider leaving the fleet scans a return-only token (needs only an empty bay)."""
    count = len(cab.events("swap.started"))
    cab.scan(cab.token(rider, "--mode", "return"))
    wait_until("swap.started", lambda: len(cab.events("swap.started")) > count)
    return cab.events("swap.started")[-1]


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cabinet, Screen]]:
    tmp = tmp_path_factory.mktemp("browser")
    port = free_port()
    with running_broker(tmp) as broker:  # the fleet link: the screen shows its code
        extra: dict[str, dict[str, Any]] = {
            "mqtt": {"url": broker.url},
            "display": {"enabled": True, "port": port},
            "swap": {"deposit_timeout_s": 10.0},  # a walk-away, yet room for a loaded CI
        }
        yield from _rig(tmp, port, extra)


def _rig(
    tmp: Path, port: int, extra: dict[str, dict[str, Any]]
) -> Iterator[tuple[Cabinet, Screen]]:
    with running_cabinet(tmp, seed=41, extra=extra) as cab:
        driver = kiosk(800, 480)
        try:
            driver.get(f"http://127.0.0.1:{port}/")
            screen = Screen(driver)
            screen.wait_text("or hold your pass to the scanner")
            yield cab, screen
        finally:
            driver.quit()


def test_a_whole_swap_on_the_screen(rig: tuple[Cabinet, Screen]) -> None:
    cab, screen = rig
    assert "full batter" in screen.wait_text("Scan this code with the app")
    started = cab.swap_begins("R-browser")
    ret, out = started["return_bay"], started["dispense_bay"]
    screen.wait_text(f"Put your battery in bay {ret}, plug it in and shut the door")
    assert screen.big_bay() == str(ret)
    assert "seconds left" in screen.text()
    deposit(cab, ret, "BAT-BR1")
    screen.wait_text(f"Take the battery from bay {out} and shut the door")
    assert screen.big_bay() == str(out)
    collect(cab, out)
    screen.wait_text("Thank you, ride safe!")


def test_a_refused_battery_is_handed_back_on_the_screen(rig: tuple[Cabinet, Screen]) -> None:
    cab, screen = rig
    started = return_begins(cab, "R-unplugged")
    ret = started["return_bay"]
    cab.wait_door(ret, "open")
    cab.ctl("insert", str(ret), "--battery", "BAT-BR2", "--soc", "20", "--unplugged")
    cab.ctl("close", str(ret))
    screen.wait_text(f"The battery was not plugged in: take it back from bay {ret}")
    assert screen.big_bay() == str(ret)
    cab.wait_door(ret, "open")
    cab.ctl("take", str(ret))
    cab.ctl("close", str(ret))
    screen.wait_text("Your battery was not accepted. Contact support with code cab-test-")


def test_a_walk_away_ends_the_session_on_the_screen(rig: tuple[Cabinet, Screen]) -> None:
    cab, screen = rig
    started = return_begins(cab, "R-walks")
    screen.wait_text(f"bay {started['return_bay']}")
    screen.wait_text("Time is up: the swap is cancelled. Scan again to retry")


def test_smoke_has_its_own_screen(rig: tuple[Cabinet, Screen]) -> None:
    cab, screen = rig
    cab.ctl("fault", "smoke")
    try:
        shown = screen.wait_text("Smoke detected", "Step away from the cabinet")
        assert "Scan this code" not in shown  # nobody is invited to swap
    finally:
        cab.ctl("heal", "smoke")
    screen.wait_text("Scan this code with the app")


def test_the_page_comes_back_by_itself_after_a_daemon_restart(
    rig: tuple[Cabinet, Screen],
) -> None:
    cab, screen = rig
    screen.wait_text("Scan this code with the app")
    before = screen.qr()
    cab.stop()
    cab.start()
    # a fresh challenge after the restart: the page is live again without a reload
    screen.until("a new QR code on the same page", lambda: screen.qr() not in ("", before))
    assert "or hold your pass to the scanner" in screen.text()
