"""The phone layout of the importance heatmaps on a real zoo's shape, in headless Chromium: four experts,
layers named "embeddings", "0" … "5", "head" (more numeric-looking names than words, which plotly alone
would put on a linear axis). At 390 px the page's script (assets/head.html) must switch the chart to its
stacked layout — each panel the full width, one under another — and every layer keeps its tick label.
Served by a minimal Blocks with the app's own head script and CSS, so the test needs no zoo."""

from __future__ import annotations

import numpy as np
import pytest
from browser import SHOTS, browser_page
from served_app import free_port

pytestmark = pytest.mark.browser

LAYERS = ["embeddings", "0", "1", "2", "3", "4", "5", "head"]
MODULES = ["embed1", "embed2", "embed3", "q", "k", "v", "o", "ffn_in", "ffn_out", "norm1", "norm2", "pooler"]
EXPERTS = ["topic", "sentiment", "language", "subjectivity"]

STATE_JS = """() => { const gd = document.querySelector('#heat .js-plotly-plot'); const L = gd._fullLayout;
  const axes = Object.keys(L).filter(k => /^yaxis\\d*$/.test(k));
  return {applied: (gd.layout.meta || {}).ml_applied, types: axes.map(k => L[k].type),
          panels: axes.map(k => ({x: L[k.replace('y', 'x')].domain, y: L[k].domain,
                                  width: L[k.replace('y', 'x')]._length, height: L[k]._length})),
          ticks: [...gd.querySelectorAll('.yaxislayer-above text')].map(t => t.textContent)}; }"""


def _heatmaps():
    from components import figures

    rng = np.random.default_rng(0)
    maps = {e: (LAYERS, MODULES, rng.random((len(LAYERS), len(MODULES))) * 10.0 ** rng.uniform(-4, 0, (8, 12)))
            for e in EXPERTS}
    for _, _, values in maps.values():
        values[0, 3:] = 0.0  # the embeddings row has only embedding modules, as on the real zoo
    return figures.importance_heatmaps(maps)


@pytest.fixture(scope="module")
def heatmap_url():
    import gradio as gr

    import app as app_module

    with gr.Blocks() as demo:
        gr.Plot(_heatmaps(), elem_id="heat", label="importance heatmaps")
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                head=app_module.HEAD, css=app_module.CSS)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


# the phone width stays in the fast inner loop: the one quick check that Chromium, playwright and a served page
# still work (a few seconds); the desktop width runs with the other browser tests in the full run
@pytest.mark.parametrize("width", [390, pytest.param(1366, marks=pytest.mark.slow)])
def test_real_zoo_heatmaps_stack_on_a_phone_and_keep_every_layer(heatmap_url, width):
    SHOTS.mkdir(exist_ok=True)
    with browser_page(width, 900, failure_shot=SHOTS / f"heatmap-real-shape-{width}-failure.png") as page:
        errors: list[str] = []
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.goto(heatmap_url)
        page.wait_for_selector("#heat .js-plotly-plot", timeout=60_000)
        # drawn in the layout that fits: stacked panels span the width, side-by-side ones a quarter of it
        want = "narrow" if width < 600 else "wide"
        page.wait_for_function("(narrow) => { const gd = document.querySelector('#heat .js-plotly-plot');"
                               " const d = gd._fullLayout.xaxis.domain; return (d[1] - d[0] > 0.9) === narrow; }",
                               arg=want == "narrow", timeout=30_000)
        page.wait_for_timeout(500)
        state = page.evaluate(STATE_JS)
        page.locator("#heat").screenshot(path=str(SHOTS / f"heatmap-real-shape-{width}.png"))
        assert state["types"] == ["category"] * len(EXPERTS), state["types"]
        for layer in LAYERS:  # each panel labels every layer, words and numbers alike
            assert state["ticks"].count(layer) == (len(EXPERTS) if width < 600 else 1), (layer, state["ticks"])
        panels = state["panels"]
        if width < 600:
            assert all(p["x"] == [0, 1] and p["width"] >= 150 and p["height"] >= 120 for p in panels), panels
            tops = sorted(p["y"] for p in panels)
            assert all(upper[0] >= lower[1] for lower, upper in zip(tops, tops[1:])), tops  # one under another
        else:
            assert all(p["width"] >= 150 for p in panels), panels
        assert not [e for e in errors if "axis scaling" in e], errors
