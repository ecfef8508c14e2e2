"""The demo-zoo switch in headless Chromium: the page starts on the classifier zoo, switching to language models
builds the LM zoo on first use (the fake LM zoo behind an event the test sets, so nothing trains) with the one
progress line and Guided first merge off, then loads its experts; layer swapping is suggested from APL's layer
importance beside it, merged, and the choice reaches the exported recipe together with the chosen expert's
generation config; the Analyses section shows the LM zoo's stored analyses. Screenshots at 1366 px in
/tmp/merge-lab-lm/."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import yaml
from browser import browser_page, button, settle, table_values

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = Path("/tmp/merge-lab-lm")


def test_switch_to_the_lm_zoo_then_layer_swap_from_importance(app_zoo, blocked_zoo_build):
    from fake_zoo import build_fake_lm_zoo
    from playwright.sync_api import expect
    from served_app import launched_app

    from merging import workbench as wb
    from merging.workbench import zoo_build

    _, cache = app_zoo
    release = blocked_zoo_build(lambda zoo_name: build_fake_lm_zoo(cache, name=zoo_name))
    SHOTS.mkdir(exist_ok=True)
    with launched_app() as url, browser_page(failure_shot=SHOTS / "lm-zoo-failure.png") as page:
        page.goto(url)
        status = page.locator("#zoo-status")
        expect(status).to_contain_text("ready", timeout=60_000)
        assert not [n for n in zoo_build._BUILDS if wb.is_lm_zoo_name(n)]  # never at start-up
        page.locator("#zoo-kind label").filter(has_text="language models (").click()
        expect(status).to_contain_text("Building the LM demo zoo", timeout=30_000)
        expect(status).to_contain_text("running for", timeout=30_000)
        expect(page.locator("#btn-guided")).to_be_disabled()
        release.set()
        expect(status).to_contain_text("ready: 2 experts (count, echo)", timeout=90_000)
        # the switch's label counts the built zoo's own experts (the page was drawn before it was built)
        expect(page.locator("#zoo-kind")).to_contain_text("language models (2 experts)", timeout=30_000)
        expect(page.get_by_label("Base model")).to_have_value(f"zoo:{wb.lm_zoo_name()}/base", timeout=30_000)

        button(page, "Load experts").click()
        expect(page.locator("#load-status")).to_contain_text("Loaded 2 experts", timeout=90_000)
        panel = page.locator("#layer-swap-panel")
        expect(panel).to_be_visible(timeout=30_000)
        expect(page.locator("#try-prompt")).to_be_visible()
        button(page, "Compute importance").click()
        expect(page.locator("#heatmap .js-plotly-plot")).to_be_visible(timeout=120_000)
        settle(page)
        button(page, "Suggest from importance").click()
        expect(page.locator("#layer-swap-status")).to_contain_text("Suggested from importance", timeout=60_000)
        expect(page.locator("#layer-swap-table")).to_contain_text("head", timeout=30_000)
        _, table = table_values(page, "layer-swap-table")
        take = {row[0]: row[-1] for row in table}
        assert set(take) == {"embeddings", "0", "1", "head"} and set(take.values()) <= {"count", "echo"}, table

        method = page.get_by_label("Method", exact=True)
        method.click()
        method.fill("Layer swapping")
        page.get_by_role("option", name="Layer swapping").first.click()
        settle(page)
        button(page, "Merge").click()
        expect(page.locator("#merge-status")).to_contain_text("layer_swap done", timeout=90_000)

        pick = page.locator("#configs-from input")
        expect(pick).to_be_visible()
        pick.click()
        pick.fill("echo")
        pick.press("Enter")
        button(page, "Export").click()
        expect(page.locator("#export-status")).to_contain_text("zip", timeout=90_000)
        page.locator("#layer-swap-panel").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "lm-layer-swap.png"))

        # the Analyses section shows the LM zoo's stored analyses (perplexity), not the classifier zoo's, and
        # says how they were measured without the scratch paths of the machine that ran them
        page.get_by_text("Analyses · where APL helps").click()
        stored = page.locator("#analyses-stored")
        expect(stored).to_contain_text("On the LM zoo APL helps when merging", timeout=30_000)
        expect(stored).to_contain_text("perplexity")
        expect(stored).to_contain_text("Measured by 2 runs of benchmarks/bench_apl_analyses.py")
        assert "/work/" not in stored.inner_text() and "/tmp/" not in stored.inner_text()
        expect(page.locator("#analyses-table-pick")).to_be_visible()
        expect(page.locator("#analyses-table")).to_contain_text("per_task_perplexity")  # an LM-only column
        settle(page)  # includes: every chart as wide as its box (the curve was drawn while the section was closed)
        curve = page.locator("#analyses .js-plotly-plot").first
        assert curve.evaluate("gd => Math.abs(gd._fullLayout.width - gd.offsetWidth)") <= 2
        stored.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "lm-analyses.png"), full_page=True)
        toasts = page.locator("[data-testid=toast-body]").all_inner_texts()
        assert not [t for t in toasts if "went wrong" in t], toasts
    zips = sorted((cache / "exports").glob("*/*.zip"), key=lambda p: p.stat().st_mtime)
    with zipfile.ZipFile(zips[-1]) as archive:
        recipe = yaml.safe_load(archive.read("recipe.yaml"))
        generation = json.loads(archive.read(next(n for n in archive.namelist() if n.endswith("generation_config.json"))))
    names = {"count": "outer", "echo": "inner"}  # outer_expert: first (count), as the page left it
    assert recipe["method"] == "layer_swap"
    assert recipe["parameters"]["take"] == {**{k: names[v] for k, v in take.items()}, "default": "shape"}
    assert recipe["configs_from"] == "echo"
    zoo_root = cache / "zoo" / wb.lm_zoo_name()
    assert generation == json.loads((zoo_root / "experts" / "echo" / "generation_config.json").read_text())
