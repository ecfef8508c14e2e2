"""The seed band and the Analyses section in headless Chromium, on the instant fake zoo: DARE run over 3 seeds
shows each seed and a range, the history keeps one row that names the seeds, the Probe section says the zoo is
not benchmarked, the quick pruning curve draws and describes itself; axe finds no critical/serious problem and
nothing is wider than a 390-px phone. Screenshots go to /tmp/merge-lab-analyses/."""

from __future__ import annotations

from pathlib import Path

import pytest
from browser import axe_violations, browser_page, button, overflow, settle

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = Path("/tmp/merge-lab-analyses")
DARE_LABEL = "DARE (linear) · dare_linear"


def _headers(page, elem: str) -> list[str]:
    return page.locator(f"#{elem}").evaluate(
        "el => Array.from(el.querySelectorAll('thead th')).map(c => c.textContent.replace('⋮', '').trim())")


def _pick(page, label: str, option: str) -> None:
    page.get_by_label(label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()


def test_seed_band_and_analyses(fake_app_url):
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    with browser_page(1366, 900, failure_shot=SHOTS / "analyses-failure.png") as page:
        page.goto(fake_app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
        button(page, "Load experts").click()
        expect(page.locator("#experts-table")).to_contain_text("few-shot", timeout=120_000)
        settle(page)
        expect(page.locator("#probe-findings")).to_contain_text("Not benchmarked on this zoo")
        _pick(page, "Method", DARE_LABEL)
        expect(page.locator("#band-eta")).to_contain_text("seeds 0, 1, 2", timeout=30_000)
        button(page, "Run over 3 seeds").click()
        expect(page.locator("#band-status")).to_contain_text("Over seeds 0, 1, 2", timeout=180_000)
        settle(page)
        headers = _headers(page, "band-table")
        assert headers[:4] == ["task", "seed 0", "seed 1", "seed 2"] and "range" in headers, headers
        expect(page.locator("#band-status")).to_contain_text("seed 0's")
        expect(page.locator("#history-table")).to_contain_text("seeds 0, 1, 2 (kept: 0)")
        expect(page.locator("#predict-uses")).to_contain_text("#1 dare_linear")
        page.locator("#band-table").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "band-1366.png"))

        page.get_by_text("Analyses · where APL helps").click()
        expect(page.locator("#analyses-stored")).to_contain_text("bench_apl_analyses.py")
        button(page, "Pruning curve (quick)").click()
        expect(page.locator("#pruning-status")).to_contain_text("at p = 0.95", timeout=300_000)
        settle(page)
        page.locator("#pruning-status").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "pruning-1366.png"))
        bad = axe_violations(page)
        assert bad == [], bad

        page.set_viewport_size({"width": 390, "height": 844})
        settle(page)
        wide = overflow(page)
        assert wide["scroll"] <= wide["width"] and not wide["wider"], wide
        for elem in ("band-table", "pruning-status"):
            page.locator(f"#{elem}").scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / f"{elem}-390.png"))
