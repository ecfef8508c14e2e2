"""The page in headless Chromium (Playwright): the five buttons in order, one per-layer slider moved,
and the heatmap, the probe table and the download appear. Saves tests/screenshots/app.png."""

from __future__ import annotations

import pytest
from browser import SHOTS, browser_page, button, load_and_compute

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]


def test_browser_flow(app_url, real_zoo):
    from playwright.sync_api import expect

    SHOTS.mkdir(exist_ok=True)
    with browser_page(failure_shot=SHOTS / "app-failure.png") as page:
        page.goto(app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)

        button(page, "Load experts").click()
        expect(page.locator("#experts-table")).to_contain_text("few-shot", timeout=120_000)
        button(page, "Compute importance").click()
        expect(page.locator("#heatmap-status")).to_contain_text("most important", timeout=180_000)  # done, not the placeholder
        # move one per-layer slider (layer index 1) with the mouse: input + release
        track = page.locator("#drop-1 input[type=range]")
        expect(track).to_be_visible(timeout=30_000)
        track.scroll_into_view_if_needed()
        box = track.bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.9, box["y"] + box["height"] / 2)
        expect(page.locator("#drop-1")).to_contain_text("✎", timeout=30_000)
        # the preset buttons look like buttons: an outline that differs from their fill
        uniform = button(page, "Uniform")
        border, fill = uniform.evaluate("e => { const c = getComputedStyle(e); "
                                        "return [c.borderTopColor, c.backgroundColor]; }")
        assert border != fill, (border, fill)
        # a table edit applies as soon as the cell is left (no "Apply" button)
        table = page.locator("#weight-table")
        page.get_by_role("tab", name="Weight table").click()
        table.scroll_into_view_if_needed()
        # the tab's table is drawn after the click: take positions only once its cells are visible (on a
        # loaded machine a box measured earlier points at a cell that is not there yet)
        cell = table.locator(".virtual-row, tr").get_by_text(real_zoo[0].tasks[0], exact=True)
        expect(cell.first).to_be_visible(timeout=30_000)
        expect(table.locator("th").nth(2)).to_be_visible(timeout=30_000)
        head = table.locator("th").nth(2).bounding_box()
        first = next(c for c in (cell.nth(i) for i in range(cell.count())) if c.is_visible()).bounding_box()
        page.mouse.dblclick(head["x"] + head["width"] / 2, first["y"] + first["height"] / 2)
        page.keyboard.press("Control+A")
        page.keyboard.type("0.25")
        page.keyboard.press("Enter")
        expect(page.get_by_text("Your overrides")).to_be_visible(timeout=30_000)
        expect(page.locator("body")).to_contain_text("weight: 0.250", timeout=30_000)
        button(page, "Merge").click()
        expect(page.locator("#merge-status")).to_contain_text("done", timeout=180_000)
        button(page, "Run probe").click()
        expect(page.locator("#probe-table")).to_contain_text("base", timeout=180_000)
        button(page, "Export").click()
        expect(page.locator("#export-file a").first).to_be_visible(timeout=300_000)
        page.get_by_role("button", name="Download history (JSON)").click()
        expect(page.locator("#history-file a").first).to_be_visible(timeout=60_000)
        page.screenshot(path=str(SHOTS / "app.png"), full_page=True)
        for section, name in (("#heatmap", "importance"), ("#weight-table", "plan"), ("#history-table", "probe")):
            page.locator(section).scroll_into_view_if_needed()
            page.screenshot(path=str(SHOTS / f"app-{name}.png"))


def _layer_of(page, elem: str) -> str:
    import re

    label = page.locator(f"#{elem}").inner_text()
    return re.search(r"layer (\S+) ·", label).group(1)


def _merged_recipe(page, expect) -> dict:
    """The recipe of the last merge, as the downloaded history file holds it."""
    page.get_by_role("button", name="Download history (JSON)").click()
    link = page.locator("#history-file a").first
    expect(link).to_be_visible(timeout=60_000)
    return page.request.get(link.get_attribute("href")).json()["merges"][-1]["recipe"]


def _recipe_value(recipe: dict, expert: str, key: str, layer: str) -> float:
    entry = next(e for e in recipe["experts"] if e["name"] == expert)
    value = entry["parameters"][key]
    return float(value[layer] if isinstance(value, dict) else value)


def test_every_slider_input_reaches_the_plan_and_the_merge(app_url, real_zoo):
    """Arrow keys and End on a layer slider, a number typed into its box + Enter, and a table edit each reach the
    overrides, the tables and the next merge's recipe; switching the expert shown records nothing."""
    from playwright.sync_api import expect

    zoo = real_zoo[0]
    first, second = zoo.tasks[0], zoo.tasks[1]
    with browser_page(failure_shot=SHOTS / "sliders-failure.png") as page:
        page.goto(app_url)
        load_and_compute(page, expect)
        expect(page.locator("#overrides")).to_contain_text("No overrides", timeout=30_000)  # the APL prefill moved the sliders: no override
        # 1. arrow keys (the range input's own step, 0.001)
        track = page.locator("#drop-1 input[type=range]")
        track.scroll_into_view_if_needed()
        track.focus()
        start = float(track.input_value())
        for _ in range(3):
            page.keyboard.press("ArrowRight")
        moved = round(start + 0.003, 3)
        drop_layer = _layer_of(page, "drop-1")
        expect(page.locator("#drop-1")).to_contain_text("✎", timeout=30_000)
        expect(page.locator("body")).to_contain_text(f"layer {drop_layer} drop ratio: {moved:.3f}",
                                                     timeout=30_000)
        expect(page.locator("#drop-table")).to_contain_text(f"{moved:g}", timeout=30_000)
        # End (like Home and PageUp) is a key of the range input too
        end_track = page.locator("#weight-1 input[type=range]")
        end_track.focus()
        page.keyboard.press("End")
        top = float(end_track.get_attribute("max"))
        end_layer = _layer_of(page, "weight-1")
        expect(page.locator("#weight-1")).to_contain_text("✎", timeout=30_000)
        expect(page.locator("#overrides")).to_contain_text(f"layer {end_layer} weight: {top:.3f}",
                                                          timeout=30_000)
        # 2. a number typed into the slider's box, then Enter
        box = page.locator("#weight-2 input[type=number]")
        box.scroll_into_view_if_needed()
        box.click()
        box.press("Control+A")
        box.type("0.7")
        box.press("Enter")
        weight_layer = _layer_of(page, "weight-2")
        expect(page.locator("#weight-2")).to_contain_text("✎", timeout=30_000)
        expect(page.locator("body")).to_contain_text(f"layer {weight_layer} weight: 0.700", timeout=30_000)
        # 3. a table cell edited: the slider moves to it
        table = page.locator("#drop-table")
        table.scroll_into_view_if_needed()
        head = table.locator("th").nth(4).bounding_box()
        row = table.get_by_text(first, exact=True).first.bounding_box()
        page.mouse.dblclick(head["x"] + head["width"] / 2, row["y"] + row["height"] / 2)
        page.keyboard.press("Control+A")
        page.keyboard.type("0.25")
        page.keyboard.press("Enter")
        table_layer = _layer_of(page, "drop-3")
        expect(page.locator("#drop-3 input[type=number]")).to_have_value("0.25", timeout=30_000)
        expect(page.locator("#drop-3")).to_contain_text("✎", timeout=30_000)
        expect(page.locator("body")).to_contain_text(f"layer {table_layer} drop ratio: 0.250", timeout=30_000)
        listed = page.locator("#overrides").inner_text()
        # 4. the other expert shown: its sliders move, nothing new is recorded
        page.locator("#plan-expert input").click()
        page.get_by_role("option", name=second, exact=True).click()
        expect(page.locator("#drop-1")).not_to_contain_text("✎", timeout=30_000)
        page.wait_for_timeout(1500)
        assert page.locator("#overrides").inner_text() == listed
        page.locator("#plan-expert input").click()
        page.get_by_role("option", name=first, exact=True).click()
        expect(page.locator("#drop-1")).to_contain_text("✎", timeout=30_000)
        # the next merge uses all three
        button(page, "Merge").click()
        expect(page.locator("#merge-status")).to_contain_text("done", timeout=180_000)
        recipe = _merged_recipe(page, expect)
        assert _recipe_value(recipe, first, "drop_ratio", drop_layer) == pytest.approx(moved, abs=1e-6)
        assert _recipe_value(recipe, first, "weight", weight_layer) == pytest.approx(0.7, abs=1e-6)
        assert _recipe_value(recipe, first, "drop_ratio", table_layer) == pytest.approx(0.25, abs=1e-6)
        assert _recipe_value(recipe, first, "weight", end_layer) == pytest.approx(top, abs=1e-6)
        recorded = {(o["expert"], o["key"], o["layer"]) for o in recipe["suggested"]["overrides"]}
        assert recorded == {(first, "drop_ratio", drop_layer), (first, "weight", weight_layer),
                            (first, "drop_ratio", table_layer), (first, "weight", end_layer)}


def test_buttons_work_again_after_an_error(app_url, real_zoo):
    """Merge before Load experts fails with a toast; Merge and Compute importance are usable again after
    a successful load, and no output is left with a bare red "Error" pill."""
    from playwright.sync_api import expect

    with browser_page(failure_shot=SHOTS / "errors-failure.png") as page:
        page.goto(app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
        merge = button(page, "Merge")
        merge.scroll_into_view_if_needed()
        merge.click()
        # the first thing missing, in words, and what to do
        expect(page.locator("[data-testid=toast-body]").first).to_contain_text("press Load experts",
                                                                               timeout=30_000)
        expect(merge).to_be_enabled(timeout=30_000)
        merge.click()  # the same error again: one message, not two
        page.wait_for_timeout(1500)
        texts = [t.strip() for t in page.locator("[data-testid=toast-text]:visible").all_inner_texts()]
        assert len(texts) == len(set(texts)) >= 1, texts
        assert page.locator("[data-testid=status-tracker] span.error:visible").count() == 0
        load_and_compute(page, expect)
        expect(button(page, "Compute importance")).to_be_enabled(timeout=30_000)
        expect(merge).to_be_enabled(timeout=30_000)
        merge.click()
        expect(page.locator("#merge-status")).to_contain_text("done", timeout=180_000)
