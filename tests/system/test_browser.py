"""reports/index.html in a real browser: Debian's headless Chromium (``make chromium``
installs it, as ``make test`` does) driven by selenium through chromedriver opens the page
the real report stage wrote for a trained tiny workspace, from file:// with no network.

Every <img> must have loaded (complete, naturalWidth > 0), the console must hold no SEVERE
entry, and a screenshot must not be one colour. Without Chromium the test fails where apt
could have installed it (Debian: `make chromium` was skipped or failed); elsewhere it
skips, except under CI (tests/services.py's rule for PostgreSQL).
"""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib import image
from matplotlib.figure import Figure

from deepopt import cli
from deepopt.figures import png_bytes
from deepopt.illustrations import LECTURE_FIGURES
from deepopt.paths import FIGURES_DIR, REPORT_DIR, REPORT_HTML
from services import unavailable

pytestmark = pytest.mark.slow

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WINDOW = (1280, 1600)  # px: the results table and the first figures in the screenshot


def _missing(what: str) -> None:
    if shutil.which("apt-get"):
        pytest.fail(
            f"{what} is not installed: run `make chromium` (Debian's chromium and "
            "chromium-driver; `make test` runs it first)",
            pytrace=False,
        )
    unavailable(f"{what} is not installed (no apt-get here: install Chromium and chromedriver)")


@pytest.fixture()
def browser() -> Iterator[Any]:
    """Headless Chromium with its console log kept (goog:loggingPrefs)."""
    binary = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver_path = shutil.which("chromedriver")
    if binary is None or driver_path is None:
        _missing("chromium" if binary is None else "chromedriver")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.fail("selenium is not installed: pip install -e '.[dev]'", pytrace=False)
    options = webdriver.ChromeOptions()
    options.binary_location = str(binary)
    for argument in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root, where Chromium's sandbox refuses to start
        "--disable-dev-shm-usage",  # containers' /dev/shm is small
        "--disable-gpu",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # An explicit driver path: selenium's own driver manager would try to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=driver_path))
    try:
        yield driver
    finally:
        driver.quit()


def _figure() -> Figure:
    figure = Figure(figsize=(4, 3))
    figure.add_subplot().plot([0, 1, 2], [2, 0, 1])
    return figure


def test_the_report_page_loads_every_image_without_console_errors(
    finished: Path, browser: Any
) -> None:
    # One lecture figure as the figures stage leaves it, so that part of the page shows an
    # image too (the real stage draws optimizer paths: minutes this test does not need).
    file_name, _ = next(iter(LECTURE_FIGURES.values()))
    FIGURES_DIR.mkdir(exist_ok=True)
    (FIGURES_DIR / file_name).write_bytes(png_bytes(_figure))
    assert cli.main(["report"]) == 0
    page = (finished / REPORT_DIR / REPORT_HTML).resolve()

    browser.get(page.as_uri())
    images = browser.execute_script(
        "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.alt]);"
    )
    assert len(images) >= 3  # val_loss, lr and the lecture figure at least
    assert [alt for complete, width, alt in images if not (complete and width > 0)] == []
    fetched = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);"
    )
    assert fetched == []  # no http(s) fetch (a failed file:// one is a console error below)
    severe = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert severe == []
    links = browser.execute_script(
        "return Array.from(document.links, a => [a.getAttribute('href'), a.textContent]);"
    )
    runs = [(href, text) for href, text in links if "/runs/" in href]
    assert runs and all(href.endswith(f"/runs/{text}") for href, text in runs)

    shot = image.imread(io.BytesIO(browser.get_screenshot_as_png()), format="png")
    colours = np.unique(shot.reshape(-1, shot.shape[-1]), axis=0)
    assert len(colours) > 16  # text, table borders and plot lines, not a blank page
