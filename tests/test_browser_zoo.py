"""The page while the demo zoo is still being built (from server start-up): one progress line, the
zoo-dependent buttons explain themselves, and everything works once the build is done. The build is the
instant fake zoo behind an event the test sets, so nothing trains."""

from __future__ import annotations

import pytest
from browser import SHOTS, browser_page, button

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_page_while_the_zoo_builds(merge_lab_cache, blocked_zoo_build, monkeypatch):
    from fake_zoo import build_tiny_zoo
    from playwright.sync_api import expect
    from served_app import launched_app

    from merging.workbench import zoo_build

    name = "blocked-zoo"  # merge_lab_cache, not app_zoo: it would point MERGE_LAB_ZOO at the fake zoo for the session
    monkeypatch.setenv("MERGE_LAB_ZOO", name)
    release = blocked_zoo_build(lambda zoo_name: build_tiny_zoo(merge_lab_cache, name=zoo_name),
                                reports=[(0.05, "topic: step 2/40, loss 1.100"), (0.1, "topic: step 4/40, loss 1.000")])
    with launched_app() as url, browser_page(failure_shot=SHOTS / "zoo-build-failure.png") as page:
        assert name in zoo_build._BUILDS  # started with the server, before any tab opened
        page.goto(url)
        status = page.locator("#zoo-status")
        expect(status).to_contain_text("expert 1 of", timeout=30_000)
        expect(status).to_contain_text("topic · step 4/40", timeout=30_000)
        expect(status).to_contain_text("left", timeout=30_000)
        guided = page.locator("#btn-guided")
        expect(guided).to_be_disabled()
        # Load experts with a zoo pick says why it cannot, and what to do
        pick = page.locator("#zoo-pick input")
        pick.click()
        pick.type("topic")
        pick.press("Enter")
        button(page, "Load experts").click()
        toast = page.locator("[data-testid=toast-body]").first
        expect(toast).to_contain_text("the demo zoo is still being built (expert 1 of", timeout=30_000)
        expect(toast).to_contain_text("try again in", timeout=30_000)
        # one progress line, not a progress bar copied over every input
        assert page.get_by_text("step 4/40").count() == 1
        release.set()
        expect(status).to_contain_text("ready", timeout=60_000)
        expect(guided).to_be_enabled(timeout=30_000)
        guided.click()
        expect(page.locator("#load-status")).to_contain_text("Guided setup done", timeout=30_000)
        button(page, "Load experts").click()
        expect(page.locator("#experts-table")).to_contain_text("few-shot", timeout=120_000)
