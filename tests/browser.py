"""Driving the page in headless Chromium (Playwright) for the browser tests: the browser, and the page's buttons."""

from __future__ import annotations

import contextlib
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


@contextlib.contextmanager
def browser_page(width: int = 1400, height: int = 1000, failure_shot: Path | None = None):
    """A page of a fresh headless Chromium (skipped, or failed in CI, without one), ``width`` × ``height``.
    When the block raises, the page as it was goes to ``failure_shot`` (full page) first, so a failure in CI
    leaves a picture of what the test saw; the browser is closed whatever happens."""
    browser_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            try:
                yield page
            except Exception:
                if failure_shot is not None:
                    failure_shot.parent.mkdir(parents=True, exist_ok=True)
                    with contextlib.suppress(Exception):  # a page too broken to draw must not hide the failure
                        page.screenshot(path=str(failure_shot), full_page=True)
                raise
        finally:
            browser.close()


def button(page, label: str):
    from playwright.sync_api import expect

    loc = page.get_by_role("button", name=label, exact=True)
    expect(loc).to_have_count(1)
    return loc


def axe_violations(page, impacts=("critical", "serious")) -> list[tuple[str, str, int, list]]:
    """axe-core's violations of ``impacts`` on the page as it is now: (impact, rule, node count, first targets).
    The label / visible-name rule (WCAG 2.5.3), experimental in the bundled axe, is switched on."""
    from axe_playwright_python.sync_playwright import Axe

    options = {"resultTypes": ["violations"], "rules": {"label-content-name-mismatch": {"enabled": True}}}
    found = Axe().run(page, options=options).response["violations"]
    return [(v["impact"], v["id"], len(v["nodes"]), [n["target"] for n in v["nodes"][:4]])
            for v in found if v["impact"] in impacts]


OVERFLOW_JS = """() => {
  // elements whose right edge passes the viewport, unless a box that scrolls or clips sideways holds them
  const width = document.documentElement.clientWidth, out = [];
  const held = (e) => { for (let p = e.parentElement; p; p = p.parentElement) {
    const x = getComputedStyle(p).overflowX; if (x === 'auto' || x === 'scroll' || x === 'hidden') {
      if (p.getBoundingClientRect().right <= width + 1) return true; } } return false; };
  document.querySelectorAll('body *').forEach((e) => {
    const r = e.getBoundingClientRect();
    if (r.width > 0 && r.height > 0 && r.right > width + 1 && !held(e)) out.push(
      (e.id ? '#' + e.id : e.tagName.toLowerCase() + '.' + String(e.className).slice(0, 40)) + ' → ' + Math.round(r.right));
  });
  return {scroll: document.documentElement.scrollWidth, width, wider: out.slice(0, 20)};
}"""


def overflow(page) -> dict:
    """What is wider than the viewport: {"scroll": page scroll width, "width": viewport, "wider": elements}."""
    return page.evaluate(OVERFLOW_JS)


def load_and_compute(page, expect) -> None:
    """Load the (fake) zoo's experts and compute importance, waiting for the heatmap and the sliders."""
    expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
    button(page, "Load experts").click()
    expect(page.locator("#experts-table")).to_contain_text("few-shot", timeout=120_000)
    button(page, "Compute importance").click()
    expect(page.locator("#heatmap-status")).to_contain_text("most important", timeout=180_000)  # done, not the placeholder
    expect(page.locator("#drop-1 input[type=range]")).to_be_visible(timeout=30_000)
    settle(page)


def settle(page) -> None:
    """Wait until no output shows gradio's pending state (the follow-up events of a step have landed) and the
    charts had a moment to switch layout."""
    page.wait_for_function(SETTLED_JS, timeout=60_000)
    page.wait_for_timeout(1000)
    page.wait_for_function(SETTLED_JS, timeout=60_000)


SETTLED_JS = """() => !document.querySelector('.pending, .generating, button[id^=btn-][disabled]')
  && [...document.querySelectorAll('.js-plotly-plot')].every(gd => !gd._fullLayout || !gd.offsetWidth
       || Math.abs(gd._fullLayout.width - gd.offsetWidth) <= 2)"""


def table_values(page, elem: str) -> tuple[list[str], list[list[str]]]:
    """(headers, rows) of a gradio Dataframe as the page shows it (gradio 6 draws the body rows as
    ``div.virtual-row``; the header table's own tbody is a hidden measuring row)."""
    return page.locator(f"#{elem}").evaluate("""el => {
        const text = c => c.textContent.replace('⋮', '').trim();
        const head = Array.from(el.querySelectorAll('thead th')).map(text);
        const rows = Array.from(el.querySelectorAll('.virtual-row[role=row]'))
            .sort((a, b) => a.dataset.index - b.dataset.index)
            .map(r => Array.from(r.querySelectorAll('[role=gridcell]')).map(text));
        return [head, rows];
    }""")
