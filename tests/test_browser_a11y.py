"""The page for phone, keyboard and screen-reader users, in headless Chromium on the instant fake zoo:
axe-core finds no critical or serious violation at 1366 and 390 px, on the page as first opened and after
Load experts and Compute importance; at 390 px nothing is wider than the screen, the heatmap panels are stacked full width, the layer
sliders are no scroll box of their own and the hidden-state chart's titles do not overlap; a focused slider
shows a focus ring; after a step its result has the focus and a live region reads it. Saves screenshots
(tests/screenshots/a11y-1366.png, a11y-390.png)."""

from __future__ import annotations

import pytest
from browser import SHOTS, axe_violations, browser_page, button, load_and_compute, overflow, settle

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]

PANELS_JS = """(sel) => { const gd = document.querySelector(sel + ' .js-plotly-plot'); const L = gd._fullLayout;
  return Object.keys(L).filter(k => /^xaxis\\d*$/.test(k)).map(k => {
    const y = L[k.replace('x', 'y')]; return {width: L[k]._length, x: L[k].domain, y: y.domain}; }); }"""
TITLES_JS = """(sel) => [...document.querySelectorAll(sel + ' .annotation-text')].map(t => {
  const r = t.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; })"""


def _overlap(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("width", [1366, 390])
def test_no_serious_violations_and_a_readable_phone_layout(fake_app_url, width):
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    with browser_page(width, 900, failure_shot=SHOTS / f"a11y-{width}-failure.png") as page:
        page.goto(fake_app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
        settle(page)
        found = axe_violations(page)  # the page as first opened: placeholders, empty charts
        assert not found, found
        load_and_compute(page, expect)
        found = axe_violations(page)
        assert not found, (found, [page.locator(t[0][0] if isinstance(t[0], list) else t[0]).first.evaluate(
            "e => e.outerHTML.slice(0, 400)") for *_, targets in found for t in targets[:1]])
        panels = page.evaluate(PANELS_JS, "#heatmap")
        assert len(panels) == 2  # the fake zoo's two experts
        if width < 600:
            layout = overflow(page)
            assert layout["scroll"] <= layout["width"] and not layout["wider"], layout
            # stacked, each the chart's full width, one above the other; side by side they were 25-px slivers
            assert all(p["x"] == [0, 1] and p["width"] >= 120 for p in panels), panels
            low, high = sorted(p["y"] for p in panels)
            assert high[0] >= low[1] + 0.05, panels  # no overlap in height
            # every module column keeps its tick label (none skipped for lack of room)
            columns = page.evaluate("() => document.querySelector('#heatmap .js-plotly-plot')._fullLayout"
                                    ".xaxis._categories.length")
            assert page.locator("#heatmap .xaxislayer-above text").count() == len(panels) * columns
            # no scroll box inside the page: the layer sliders grow instead
            layers = page.locator(".ml-layers").first
            assert layers.evaluate("e => e.scrollHeight <= e.clientHeight + 1"), "the layer sliders scroll"
            # a wide table scrolls sideways, and says so
            hint = page.locator("#experts-table").evaluate("e => getComputedStyle(e, '::after').content")
            assert "swipe sideways" in hint
        else:
            assert all(p["width"] >= 150 for p in panels), panels
        # every chart has an accessible name (its label), as a figure whose own buttons stay reachable
        names = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].map(g => "
                              "[g.getAttribute('role'), g.getAttribute('aria-label')])")
        assert names and all(role == "figure" and name for role, name in names), names
        titles = page.evaluate(TITLES_JS, "#hidden-plot")
        assert len(titles) == 2 and not _overlap(*titles), titles
        page.screenshot(path=str(SHOTS / f"a11y-{width}.png"), full_page=True)


def _focus_ring(locator) -> dict:
    return locator.evaluate("e => { const c = getComputedStyle(e); return {style: c.outlineStyle, "
                            "width: parseFloat(c.outlineWidth), shadow: c.boxShadow}; }")


def test_focus_is_visible_and_a_finished_step_is_announced(fake_app_url):
    from playwright.sync_api import expect

    with browser_page(failure_shot=SHOTS / "a11y-focus-failure.png") as page:
        page.goto(fake_app_url)
        load_and_compute(page, expect)
        # the importance step ended: its summary has the focus and the live region reads it
        expect(page.locator("#heatmap-status")).to_be_focused(timeout=30_000)
        expect(page.locator("#ml-live")).to_contain_text("most important module", timeout=30_000)
        # a slider reached with the keyboard shows a focus ring (gradio draws none)
        slider = page.locator("#drop-1 input[type=range]")
        slider.scroll_into_view_if_needed()
        slider.focus()
        ring = _focus_ring(slider)
        assert ring["style"] != "none" and ring["width"] >= 2, ring
        page.keyboard.press("Tab")  # the next control, reached by Tab, shows one too
        ring = page.evaluate("() => { const c = getComputedStyle(document.activeElement); "
                             "return {style: c.outlineStyle, width: parseFloat(c.outlineWidth)}; }")
        assert ring["style"] != "none" and ring["width"] >= 2, ring
        merge = button(page, "Merge")
        merge.scroll_into_view_if_needed()
        merge.press("Enter")
        expect(page.locator("#merge-status")).to_contain_text("done", timeout=120_000)
        expect(page.locator("#merge-status")).to_be_focused(timeout=30_000)
        expect(page.locator("#ml-live")).to_contain_text("done", timeout=30_000)
        assert page.locator("#ml-live").get_attribute("aria-live") == "polite"
