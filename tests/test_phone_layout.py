"""The charts' narrow (phone) layout and the page's plain-words summaries, without a browser.

``figures.stack_when_narrow`` stores two layouts per chart: "narrow" must put every panel at the full width,
one under the other, each exactly as tall as asked (in pixels, from the figure's own height and margins),
and "wide" must be the figure as drawn, so switching back changes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from components import figures as fg


def _maps(n_experts: int, rows=("embeddings", "0", "1", "head"), cols=("embed1", "q", "k", "pooler")):
    rng = np.random.default_rng(0)
    return {f"e{i}": (list(rows), list(cols), rng.random((len(rows), len(cols)))) for i in range(n_experts)}


def _apply(layout: dict, updates: dict) -> dict:
    """Plotly's flat attribute paths applied to a layout dict (None removes), as assets/head.html does."""
    import copy

    out = copy.deepcopy(layout)
    for path, value in updates.items():
        parts = path.replace("[", ".").replace("]", "").split(".")
        node = out
        for part in parts[:-1]:
            key = int(part) if isinstance(node, list) else part
            if isinstance(node, dict) and key not in node:
                node[key] = {}
            node = node[key]
        key = int(parts[-1]) if isinstance(node, list) else parts[-1]
        if value is None:
            node.pop(key, None) if isinstance(node, dict) else None
        else:
            node[key] = value
    return out


@pytest.mark.parametrize("n", [2, 4])
def test_heatmaps_stack_full_width_at_the_asked_heights(n):
    fig = fg.importance_heatmaps(_maps(n))
    narrow = fig.layout.meta["ml_layouts"]["narrow"]
    paper = narrow["height"] - narrow["margin.t"] - narrow["margin.b"]
    panel = max(150, 26 * 4)  # what importance_heatmaps asks for four layer rows
    domains = []
    for i in range(n):
        suffix = "" if i == 0 else str(i + 1)
        assert narrow[f"xaxis{suffix}.domain"] == [0.0, 1.0]
        assert narrow[f"yaxis{suffix}.showticklabels"] is True
        low, high = narrow[f"yaxis{suffix}.domain"]
        assert (high - low) * paper == pytest.approx(panel, abs=0.1)
        assert narrow[f"annotations[{i}].y"] == high  # each expert's title sits on its own panel
        domains.append((low, high))
    # top to bottom, a gap (for the slanted column names) between neighbours, nothing outside the plot area
    assert domains[0][1] == 1.0 and domains[-1][0] == pytest.approx(0.0, abs=1e-3)
    for (low, _), (_, high) in zip(domains, domains[1:]):
        assert (low - high) * paper == pytest.approx(fg.NARROW_PANEL_GAP, abs=0.1)


def test_the_wide_layout_is_the_figure_as_drawn():
    for fig in (fg.importance_heatmaps(_maps(3)),
                fg.hidden_state_figure(np.arange(16.0), np.ones((3, 8)), ["0", "1", "2"], "m"),
                fg.comparison_figure(["0", "1"], {"a": [1, 2]}, {"a": [2, 1]}, {"a": 0.5}, {}),
                _layer_figure(4)):
        layouts = fig.layout.meta["ml_layouts"]
        drawn = fig.layout.to_plotly_json()
        drawn.pop("meta")
        back = _apply(_apply(drawn, layouts["narrow"]), layouts["wide"])
        assert _pruned(back) == _pruned(drawn)


def _layer_figure(n_experts: int):
    layers = ["embeddings", "0", "1", "2", "3", "4", "5", "head"]
    shares = {f"expert{i}": list(np.linspace(0.05, 0.2, len(layers))) for i in range(n_experts)}
    return fg.layer_importance_figure(layers, shares, shares)


def test_the_layer_chart_on_a_phone_keeps_its_legend_below_upright_layer_names():
    """Narrow, the layer names stand upright and the legend (two entries per expert, a row each on a phone)
    starts below the longest name and the axis title and ends inside the figure: nothing runs into anything."""
    narrow = _layer_figure(4).layout.meta["ml_layouts"]["narrow"]
    plot = narrow["height"] - 20 - narrow["margin.b"]  # margin.t 20, as drawn wide
    name_and_title = 12 * 0.6 * len("embeddings") + 45  # upright 12-px label plus the axis title, in pixels
    legend_top = -narrow["legend.y"] * plot
    assert narrow["xaxis.tickangle"] == -90 and legend_top >= name_and_title
    assert narrow["margin.b"] - legend_top >= 8 * 24  # eight legend rows of about 24 px


def _pruned(value):
    """Empty objects left where a narrow-only setting was removed mean "plotly's default", like absent ones."""
    if isinstance(value, dict):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v != {}}
    if isinstance(value, list):
        return [_pruned(v) for v in value]
    return value


def test_placeholders_and_summaries_say_something():
    msg = fg.empty_figure("Press Compute importance in both modes to fill this.").layout.annotations[0].text
    assert all(len(line) <= 40 for line in msg.split("<br>"))  # fits a phone's chart
    layers = ["embeddings", "0", "head"]
    flat = {"a": {"drop_ratio": {k: 0.5 for k in layers}, "weight": {k: 1.0 for k in layers}}}
    text = fg.profile_summary(layers, flat, 0)
    assert "drops 0.50 of its change at every layer" in text and "most" not in text
    varied = {"a": {"drop_ratio": {"embeddings": 0.2, "0": 0.5, "head": 0.7}, "weight": {k: 1.0 for k in layers}}}
    assert "most at layer head (0.70) and least at layer embeddings (0.20)" in fg.profile_summary(layers, varied, 0)


def test_the_base_model_is_named_by_what_it_is(tmp_path):
    from merging.paths import packaged_base_path
    from merging.workbench.views import base_model_name

    assert base_model_name(packaged_base_path()) == "all-MiniLM-L6-v2"
    assert base_model_name(tmp_path / "bert-tiny" / "model") == "bert-tiny"  # a generic folder: its parent
    assert base_model_name(tmp_path / "my-base") == "my-base"
