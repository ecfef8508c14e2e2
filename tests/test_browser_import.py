"""Recipe import on the page, in headless Chromium on the instant fake zoo: a pasted Merge Lab recipe and an
uploaded mergekit config fill the experts, the method's controls, every per-layer slider and the seed, and
merge; the merge's recorded recipe is the imported one; a bad recipe's message gives its line and field."""

from __future__ import annotations

import pytest
from browser import SHOTS, axe_violations, browser_page, button, settle

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]

OPEN = "Import a recipe (Merge Lab recipe.yaml or a mergekit config) and merge it"


def _recipe(zoo, drop: str = "0.6") -> str:
    return (f"merge_lab: 1\nmethod: ties\nbase: zoo:{zoo.name}/base\nexperts:\n"
            f"  - name: topic\n    model: zoo:{zoo.name}/topic\n"
            '    parameters: {weight: {"0": 0.4, default: 1.0}, drop_ratio: {"1": 0.2}}\n'
            f"  - name: mood\n    model: zoo:{zoo.name}/mood\n"
            f"parameters: {{drop_ratio: {drop}, lambda: 0.9}}\nseed: 7\n")


def _import(page, expect, text: str | None = None) -> None:
    if text is not None:
        page.locator("#recipe-text textarea").fill(text)
    button(page, "Import recipe and merge").click()


def _history_recipe(page, expect) -> dict:
    """The recipe of the session's last merge, from a freshly downloaded history file."""
    link = page.locator("#history-file a").first
    before = link.get_attribute("href") if link.count() else None
    page.get_by_role("button", name="Download history (JSON)").click()
    expect(link).to_be_visible(timeout=60_000)
    expect(link).not_to_have_attribute("href", before or "-", timeout=60_000)
    return page.request.get(link.get_attribute("href")).json()["merges"][-1]["recipe"]


def _slider(page, key: str, index: int) -> float:
    return float(page.locator(f"#{key}-{index} input[type=number]").input_value())


def test_pasted_recipe_and_uploaded_mergekit_config_fill_the_page_and_merge(fake_app_url, app_zoo, tmp_path):
    from playwright.sync_api import expect

    zoo, _ = app_zoo
    with browser_page(1366, 900, failure_shot=SHOTS / "import-failure.png") as page:
        page.goto(fake_app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
        page.get_by_text(OPEN).click()
        # a bad value: the message says where (field and YAML line), nothing is loaded
        _import(page, expect, _recipe(zoo, drop="1.7"))
        toast = page.locator("[data-testid=toast-body]").first
        expect(toast).to_contain_text("parameters.drop_ratio", timeout=30_000)
        expect(toast).to_contain_text("(line 10)")
        # the recipe: experts, method, controls, every slider, seed — then merged
        _import(page, expect, _recipe(zoo))
        status = page.locator("#recipe-status")
        expect(status).to_contain_text("Merged", timeout=120_000)
        expect(status).to_be_focused(timeout=30_000)  # the step's result takes the focus
        expect(page.locator("#experts-table")).to_contain_text("mood")
        expect(page.locator("#merge-status")).to_contain_text("lambda=0.9")
        settle(page)
        expect(page.locator("#plan-expert input")).to_have_value("topic")  # the expert the sliders show
        layers = ["embeddings", "0", "1", "head"]  # the fake zoo's, in slider order
        for i, layer in enumerate(layers):  # the expert shown first is topic
            assert _slider(page, "weight", i) == pytest.approx(0.4 if layer == "0" else 1.0)
            assert _slider(page, "drop", i) == pytest.approx(0.2 if layer == "1" else 0.6)
        assert page.get_by_role("spinbutton", name="Seed", exact=True).input_value() == "7"
        recipe = _history_recipe(page, expect)
        assert recipe["method"] == "ties" and recipe["seed"] == 7
        assert recipe["parameters"] == {"drop_ratio": 0.6, "lambda": 0.9}
        topic = next(e for e in recipe["experts"] if e["name"] == "topic")["parameters"]
        assert {k: topic["weight"][k] for k in layers} == {k: 0.4 if k == "0" else 1.0 for k in layers}
        assert {k: topic["drop_ratio"][k] for k in layers} == {k: 0.2 if k == "1" else 0.6 for k in layers}
        found = axe_violations(page)
        assert not found, found
        page.screenshot(path=str(SHOTS / "import-1366.png"), full_page=True)

        # a mergekit config, uploaded: its text shows in the box, density becomes drop ratio = 1 − density
        config = tmp_path / "mergekit.yml"
        config.write_text(f"merge_method: dare_ties\nbase_model: zoo:{zoo.name}/base\nmodels:\n"
                          f"  - model: zoo:{zoo.name}/topic\n    parameters: {{weight: 0.7, density: 0.25}}\n"
                          f"  - model: zoo:{zoo.name}/mood\n    parameters: {{weight: 1.0, density: 0.5}}\n"
                          "dtype: float16\n")
        page.locator("#recipe-file input[type=file]").set_input_files(str(config))
        expect(page.locator("#recipe-text textarea")).to_have_value(config.read_text(), timeout=30_000)
        _import(page, expect)
        expect(status).to_contain_text("DARE", timeout=120_000)
        expect(status).to_contain_text("Merged")
        settle(page)
        for i in range(len(layers)):
            assert _slider(page, "drop", i) == pytest.approx(0.75)
            assert _slider(page, "weight", i) == pytest.approx(0.7)
        expect(page.get_by_role("radio", name="fp16")).to_be_checked()
        recipe = _history_recipe(page, expect)
        assert recipe["method"] == "dare_ties"
