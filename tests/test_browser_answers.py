"""The page's answers in headless Chromium, on the instant fake zoo: the guided walk highlights each next
button and says what the step showed; the per-expert layer chart sits beside the heatmap; the history says
what changed ("→") and flags tasks below the base; the sweep's Stop stops the work. Screenshots at 1366 px
go to /tmp/merge-lab-answers/."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import pytest
from browser import browser_page, button, table_values

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = Path("/tmp/merge-lab-answers")


def _highlighted(page) -> list[str]:
    return page.eval_on_selector_all(".ml-next", "els => els.map(e => e.textContent.trim())")


def _table(page, elem: str) -> tuple[list[str], list[list[str]]]:
    return table_values(page, elem)


def test_guided_walk_layer_chart_and_history(fake_app_url):
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    with browser_page(1366, 900, failure_shot=SHOTS / "failure.png") as page:
        page.goto(fake_app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
        guide = page.locator("#guide")
        steps = [("Load experts", "Compute importance", "Step 2 of 5"),
                 ("Compute importance", "Merge", "Step 3 of 5"),
                 ("Merge", "Run probe", "Step 4 of 5"),
                 ("Run probe", "Export", "Step 5 of 5")]
        page.locator("#btn-guided").click()
        expect(guide).to_contain_text("Step 1 of 5", timeout=30_000)
        expect(page.locator("#btn-load")).to_have_class(re.compile("ml-next"), timeout=30_000)
        assert _highlighted(page) == ["Load experts"]
        page.screenshot(path=str(SHOTS / "guide-start.png"))
        for pressed, upcoming, line in steps:
            button(page, pressed).click()
            expect(guide).to_contain_text(line, timeout=120_000)
            expect(guide).to_contain_text("What you just saw")
            assert _highlighted(page) == [upcoming], (pressed, _highlighted(page))
            if pressed == "Run probe":  # the line floats at the bottom, beside the step just done
                assert guide.evaluate("e => getComputedStyle(e).position") == "fixed"
                page.screenshot(path=str(SHOTS / "guide-probe.png"))
            if pressed == "Compute importance":
                heat, layer = page.locator("#heatmap .js-plotly-plot"), page.locator("#layer-chart .js-plotly-plot")
                expect(heat).to_be_visible(timeout=60_000)
                expect(layer).to_be_visible(timeout=60_000)
                expect(page.locator("#layer-answer")).to_contain_text("Which layer matters most")
                a, b = heat.bounding_box(), layer.bounding_box()
                assert b["x"] >= a["x"] + a["width"] - 5 and abs(b["y"] - a["y"]) < 120, (a, b)  # beside
                heat.scroll_into_view_if_needed()
                page.screenshot(path=str(SHOTS / "importance.png"))
        button(page, "Export").click()
        expect(guide).to_contain_text("whole loop", timeout=120_000)
        assert _highlighted(page) == []
        expect(page.locator("#export-uses")).to_contain_text("#1 apl")
        expect(page.locator("#predict-uses")).to_contain_text("#1 apl")
        # the export line and the download box show one size for one file
        note = page.locator("#export-status")
        expect(note).to_contain_text("stored zip", timeout=60_000)
        size = re.search(r"\(([\d.]+ [KMG]?B), stored zip", note.inner_text()).group(1)
        expect(page.locator("#export-file")).to_contain_text(re.compile(size.replace(" ", r"\s")))
        # move one layer's drop ratio and merge again: the history says what changed, and flags tasks below
        # the base
        track = page.locator("#drop-1 input[type=range]")
        track.scroll_into_view_if_needed()
        box = track.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 2)
        expect(page.locator("#drop-1")).to_contain_text("✎", timeout=30_000)
        layer = re.search(r"layer (\S+) ·", page.locator("#drop-1").inner_text()).group(1)
        page.locator("#btn-merge").scroll_into_view_if_needed()
        button(page, "Merge").click()
        expect(page.locator("#merge-status")).to_contain_text("#2", timeout=60_000)
        button(page, "Run probe").click()
        expect(page.locator("#history-table")).to_contain_text("#2 apl", timeout=120_000)
        headers, rows = _table(page, "history-table")
        col = {h: i for i, h in enumerate(headers)}
        assert rows[0][col["changed from previous"]] == "first merge"
        changed = rows[1][col["changed from previous"]]
        assert re.search(rf"L{layer} drop [\d.]+ → 0\.9", changed), changed
        probe_headers, probe_rows = _table(page, "probe-table")
        base = next(r for r in probe_rows if r[0] == "base")
        tasks = [h[:-4] for h in headers if h.endswith(" acc")]
        for row in rows:
            for t in tasks:
                acc = float(row[col[f"{t} acc"]])
                base_acc = float(base[probe_headers.index(next(h for h in probe_headers if h.startswith(t)))])
                assert (f"⚠ {t} " in row[col["below base"]]) == (acc < base_acc), (t, acc, base_acc, row)
        page.locator("#history-table").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "history.png"))
        # exact mode: the time it will take is said before pressing (forward passes × a measured rate), and
        # then the gradient-vs-exact agreement per expert at layer and module level
        eta = page.locator("#importance-eta")
        page.locator("#btn-importance").scroll_into_view_if_needed()
        page.get_by_role("radio", name="exact").check()
        expect(eta).to_contain_text(re.compile(r"exact importance, layers and modules: .*forward passes × "),
                                    timeout=30_000)
        page.get_by_label("layers (quick)").check()
        expect(eta).to_contain_text("exact importance, layers (quick)", timeout=30_000)
        page.get_by_label("layers and modules").check()
        button(page, "Compute importance").click()
        fid = page.get_by_text("Spearman ρ per expert")
        expect(fid).to_be_visible(timeout=120_000)
        for expert in ("topic", "mood"):
            expect(fid).to_contain_text(re.compile(rf"{expert}: module (-?[\d.]+|n/a), layer (-?[\d.]+|n/a)"))
        expect(eta).to_contain_text("measured on the last exact run", timeout=30_000)
        fid.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "fidelity.png"))


def test_sweep_stop_stops_the_work(fake_app_url, monkeypatch):
    """The sweep (slowed here: each probe of a merge takes a moment) shows its progress in words on one line,
    and Stop ends it: the button works again and no further merge is probed."""
    from playwright.sync_api import expect

    from merging.zoo.probe import Prober

    calls: list[float] = []
    original = Prober.probe_body
    lock = threading.Lock()

    def slow_probe(self, body, name="merged", changed_layers=None):
        if name.startswith("sweep"):
            with lock:
                calls.append(time.monotonic())
            time.sleep(0.8)
        return original(self, body, name=name, changed_layers=changed_layers)

    monkeypatch.setattr(Prober, "probe_body", slow_probe)
    with browser_page(1366, 900, failure_shot=SHOTS / "sweep-failure.png") as page:
        page.goto(fake_app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
        button(page, "Load experts").click()
        expect(page.locator("#experts-table")).to_contain_text("few-shot", timeout=120_000)
        page.get_by_text("Drop-ratio sweep").click()  # the accordion: the time it will take is said first
        expect(page.locator("#sweep-eta")).to_contain_text("merges and probes", timeout=60_000)
        total = int(re.search(r"(\d+) merges and probes", page.locator("#sweep-eta").inner_text()).group(1))
        sweep = page.locator("#btn-sweep")
        sweep.scroll_into_view_if_needed()
        sweep.click()
        words = page.locator("#sweep-progress")
        expect(words).to_contain_text(re.compile(r"sweep · \S+ at drop ratio [\d.]+ \(\d+ of \d+\)"), timeout=60_000)
        # the words show once: on the sweep's line, not over the chart as well
        assert page.get_by_text(re.compile(r"sweep · .* of \d+")).count() == 1
        page.screenshot(path=str(SHOTS / "sweep-running.png"))
        expect(sweep).to_be_disabled()
        page.locator("#btn-sweep-stop").click()
        expect(sweep).to_be_enabled(timeout=30_000)
        stopped = len(calls)
        time.sleep(3)
        assert len(calls) <= stopped + 1, (stopped, len(calls))  # at most the step already running
        assert len(calls) < total
