"""Driving the page in headless Chromium (Playwright) for the browser tests: the browser, and the page's buttons."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MERGE_LAB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent / "screenshots"


def browser_or_skip():
    found = Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        found = False
    if not found:
        message = (f"Chromium not found at {CHROMIUM} (or playwright missing): install it with "
                   "`apt-get install chromium` (playwright cannot download browsers here)")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


def launch(pw):
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
    return browser, browser.new_page(viewport={"width": 1400, "height": 1000})


def button(page, label: str):
    from playwright.sync_api import expect

    loc = page.get_by_role("button", name=label, exact=True)
    expect(loc).to_have_count(1)
    return loc
