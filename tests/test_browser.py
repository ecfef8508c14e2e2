"""The page in headless Chromium (Playwright): the five buttons in order, one per-layer slider moved,
and the heatmap, the probe table and the download appear. Saves tests/screenshots/app.png."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MERGE_LAB_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent / "screenshots"
pytestmark = pytest.mark.browser


def _browser_or_skip():
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


def test_browser_flow(app_url, real_zoo):
    _browser_or_skip()
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            page.goto(app_url)
            expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)

            def button(label: str):
                loc = page.get_by_role("button", name=label, exact=True)
                expect(loc).to_have_count(1)
                return loc

            button("Load experts").click()
            expect(page.locator("#experts-table")).to_contain_text("few-shot", timeout=120_000)
            button("Compute importance").click()
            expect(page.locator("#heatmap .js-plotly-plot")).to_be_visible(timeout=180_000)
            # move one per-layer slider (layer index 1) with the mouse: input + release
            track = page.locator("#drop-1 input[type=range]")
            expect(track).to_be_visible(timeout=30_000)
            track.scroll_into_view_if_needed()
            box = track.bounding_box()
            page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 2)
            expect(page.locator("#drop-1")).to_contain_text("✎", timeout=30_000)
            # the preset buttons look like buttons: an outline that differs from their fill
            uniform = button("Uniform")
            border, fill = uniform.evaluate("e => { const c = getComputedStyle(e); "
                                            "return [c.borderTopColor, c.backgroundColor]; }")
            assert border != fill, (border, fill)
            # a table edit applies as soon as the cell is left (no "Apply" button)
            table = page.locator("#weight-table")
            page.get_by_role("tab", name="Weight table").click()
            table.scroll_into_view_if_needed()
            head = table.locator("th").nth(2).bounding_box()
            first = table.get_by_text(real_zoo[0].tasks[0], exact=True).first.bounding_box()
            page.mouse.dblclick(head["x"] + head["width"] / 2, first["y"] + first["height"] / 2)
            page.keyboard.press("Control+A")
            page.keyboard.type("0.25")
            page.keyboard.press("Enter")
            expect(page.get_by_text("Your overrides")).to_be_visible(timeout=30_000)
            expect(page.locator("body")).to_contain_text("weight: 0.250", timeout=30_000)
            button("Merge").click()
            expect(page.locator("#merge-status")).to_contain_text("done", timeout=180_000)
            button("Run probe").click()
            expect(page.locator("#probe-table")).to_contain_text("base", timeout=180_000)
            button("Export").click()
            expect(page.locator("#export-file a").first).to_be_visible(timeout=300_000)
            page.get_by_role("button", name="Download history (JSON)").click()
            expect(page.locator("#history-file a").first).to_be_visible(timeout=60_000)
            page.screenshot(path=str(SHOTS / "app.png"), full_page=True)
            for section, name in (("#heatmap", "importance"), ("#weight-table", "plan"), ("#history-table", "probe")):
                page.locator(section).scroll_into_view_if_needed()
                page.screenshot(path=str(SHOTS / f"app-{name}.png"))
        except Exception:
            page.screenshot(path=str(SHOTS / "app-failure.png"), full_page=True)
            raise
        finally:
            browser.close()
