"""Causal-LM experts on the page in headless Chromium: tiny Llama folders loaded as local experts, their task
text attached (a .txt file and JSONL prompt/completion rows), importance, a merge, a perplexity probe table
and chart, and Try a prompt's three continuations side by side. Screenshot at 1366 px in /tmp/merge-lab-lm/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models as tm
from browser import browser_page, button

# Chromium + a served page: tens of seconds each, so part of the full run (CI) but not the fast inner loop
pytestmark = [pytest.mark.browser, pytest.mark.slow]
SHOTS = Path("/tmp/merge-lab-lm")


def _pick(page, elem: str, value: str) -> None:
    box = page.locator(f"#{elem} input")
    box.click()
    box.fill(value)
    box.press("Enter")


def test_lm_experts_text_probe_and_prompt(fake_app_url, tmp_path):
    from playwright.sync_api import expect

    base, experts, data = tm.lm_family(tmp_path, "llama")
    txt = tmp_path / "count.txt"
    txt.write_text("".join(json.loads(line)["text"] + "\n" for line in data["count"].read_text().splitlines()),
                   encoding="utf-8")
    SHOTS.mkdir(exist_ok=True)
    with browser_page(1366, 900, failure_shot=SHOTS / "lm-failure.png") as page:
        page.goto(fake_app_url)
        expect(page.locator("#zoo-status")).to_contain_text("ready", timeout=60_000)
        pick = page.locator("#zoo-pick input")  # the demo zoo's experts come preselected: clear them
        pick.click()
        for _ in range(8):
            pick.press("Backspace")
        page.get_by_label("Base model").fill(str(base))
        page.get_by_label("More experts", exact=False).fill(
            "\n".join(f"{t}={p}" for t, p in experts.items()))
        button(page, "Load experts").click()
        expect(page.locator("#load-status")).to_contain_text("Loaded 2 experts", timeout=60_000)
        expect(page.locator("#try-prompt")).to_be_visible(timeout=30_000)  # an LM session tries prompts
        expect(page.locator("#try-sentence")).to_be_hidden()

        page.get_by_text("Attach task data to an expert").click()
        expect(page.locator("#task-file-formats")).to_contain_text("one example per line")
        for expert, file in (("count", txt), ("echo", data["echo"])):
            _pick(page, "attach-expert", expert)
            clear = page.locator("#attach-file button[aria-label*='lear']")
            if clear.count():  # the previous file is still shown: remove it first
                clear.first.click()
            page.locator("#attach-file input[type=file]").set_input_files(str(file))
            expect(page.locator("#attach-file")).to_contain_text(file.name, timeout=30_000)
            button(page, "Attach task data").click()
            expect(page.locator("body")).to_contain_text(f"probe examples ({file.name})", timeout=60_000)

        button(page, "Compute importance").click()
        expect(page.locator("#heatmap .js-plotly-plot")).to_be_visible(timeout=90_000)
        button(page, "Merge").click()
        expect(page.locator("#merge-status")).to_contain_text("done", timeout=90_000)
        button(page, "Run probe").click()
        table = page.locator("#probe-table")
        expect(table).to_contain_text("count ppl", timeout=90_000)
        expect(table).to_contain_text("mean ppl")
        expect(page.get_by_text("lower is better").first).to_be_visible()
        expect(page.locator("#history-table")).to_contain_text("mean perplexity")

        page.locator("#prompt-text textarea").fill("w3 w4 w5")
        button(page, "Continue the prompt").click()
        for i in range(3):
            expect(page.locator(f"#continuation-{i} textarea")).not_to_have_value("", timeout=60_000)
        expect(page.locator("#continuation-2")).to_contain_text("#1 apl", timeout=30_000)  # the merge it shows
        words = page.locator("#continuation-1 textarea").input_value().split()
        assert words and all(w.startswith("w") for w in words)
        expect(page.locator("#predict-uses")).to_contain_text("Try a prompt")
        toasts = page.locator("[data-testid=toast-body]").all_inner_texts()
        assert not [t for t in toasts if "went wrong" in t], toasts  # no step failed behind the scenes
        page.locator("#try-prompt").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "lm-prompt.png"))
        table.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "lm-probe.png"))
