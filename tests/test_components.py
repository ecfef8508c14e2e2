"""Figures (shapes, labels, colour scales, cell budget) and handler glue, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from components import figures as fg
from components import handlers as h
from merging import workbench as wb


@pytest.fixture()
def session(app_zoo):
    zoo, _ = app_zoo
    base, refs = wb.zoo_refs(zoo)
    s = wb.load_experts(wb.Session(), base, refs, zoo=zoo)
    wb.compute_importance(s, n_fewshot=8)
    return s


def test_heatmaps_share_one_colour_range(session):
    maps = wb.importance_maps(session)
    drops = {e: v["drop_ratio"] for e, v in wb.plan(session, "apl").items()}
    fig = fg.importance_heatmaps(maps, drops)
    heats = [t for t in fig.data if t.type == "heatmap"]
    assert len(heats) == len(session.experts)
    assert all(t.coloraxis == "coloraxis" for t in heats)
    rows, cols, values = maps[session.experts[0]]
    assert list(heats[0].y) == rows and list(heats[0].x) == cols
    assert "rank" in heats[0].hovertemplate and "drop ratio" in heats[0].hovertemplate
    # one shared LOG scale: log10 |ΔL| from a floor LOG_DECADES below the largest cell of any expert
    top = max(np.nanmax(np.abs(m[2])) for m in maps.values())
    assert fig.layout.coloraxis.cmax == pytest.approx(np.log10(top))
    assert fig.layout.coloraxis.cmin >= np.log10(top) - fg.LOG_DECADES - 1e-9
    # hover keeps the raw value (customdata[0]) beside rank and drop ratio
    raw = np.asarray(heats[0].customdata)[..., 0]
    assert np.allclose(raw, np.abs(values), equal_nan=True) and "%{customdata[0]" in heats[0].hovertemplate
    assert sum(np.asarray(t.z).size for t in heats) < fg.MAX_CELLS
    assert fig.layout.height >= 380 and "most important module" in fg.heatmap_summary(maps)


def test_log_heatmap_separates_cells_under_a_dominant_one():
    """The screenshot bug: one huge pooler cell made every other cell the same dark colour."""
    rows, cols = ["0", "1", "head"], ["q", "k"]
    values = np.array([[1e-3, 3e-3], [1e-2, 2e-2], [5.0, 0.0]])
    fig = fg.importance_heatmaps({"a": (rows, cols, values)})
    z = np.asarray(fig.data[0].z, float)
    span = fig.layout.coloraxis.cmax - fig.layout.coloraxis.cmin
    # the four small cells spread over more than a quarter of the colour range (linear: < 0.1%)
    assert (z[:2].max() - z[:2].min()) / span > 0.25
    assert np.isnan(z[2, 1])  # an exact zero (a part the expert did not change) is blank, not the floor colour
    assert np.isfinite(np.delete(z.ravel(), 5)).all()
    tiny = fg.importance_heatmaps({"a": (rows, cols, np.where(values == 0, 1e-30, values))})
    assert np.asarray(tiny.data[0].z, float)[2, 1] == pytest.approx(tiny.layout.coloraxis.cmin)  # tiny: the floor
    assert "Blank cells" in fg.heatmap_summary({"a": (rows, cols, values)})
    assert "Blank cells" not in fg.heatmap_summary({"a": (rows, cols, values + 1e-9)})


def test_comparison_figure_and_summary_follow_the_numbers():
    layers = ["embeddings", "0", "1", "head"]
    restore = {"a": [1, 2, 3, 4], "b": [4, 3, 2, 1]}
    ablate = {"a": [1, 2, 4, 3], "b": [1, 2, 3, 4]}
    agreement = {"a": 0.8, "b": -1.0}
    stability = {"restore": {"a": 0.9, "b": 0.95}, "ablate": {"a": 0.3, "b": 0.5}}
    fig = fg.comparison_figure(layers, restore, ablate, agreement, stability)
    assert len([t for t in fig.data if t.type == "bar"]) == 3 and fig.layout.height
    text = fg.comparison_summary(agreement, stability, 3, 16)
    assert "ρ = -0.10" in text and "0.93 (restore)" in text and "0.40 (ablate)" in text
    assert "restore ranks layers more consistently" in text


def test_hidden_view_and_magnitude(session):
    layers, layer, modules, module = h.hidden_choices(session)
    assert layer in layers and module in modules
    fig, text = h.hidden_figure(session, session.experts[0], module)
    heat = [t for t in fig.data if t.type == "heatmap"][0]
    assert np.asarray(heat.z).size < fg.MAX_CELLS and "top 10%" in text
    views = h.importance_views(session, "apl", [None] * len(h.PARAM_NAMES))
    assert len(views) == 6 and "ρ" in views[5]


def test_fidelity_needs_both_modes(session):
    assert wb.fidelity_data(session) is None
    wb.compute_importance(session, n_fewshot=8, mode="exact", level="layer", sample=None)
    x, y, labels = wb.fidelity_data(session, "layer")
    assert len(x) == len(y) == len(labels)
    fig = fg.fidelity_figure(x, y, labels, "layer")
    assert "Spearman" in fig.layout.title.text


def test_figures_use_the_one_spearman():
    from merging.apl.fidelity import spearman

    assert fg.spearman is spearman  # captions and fidelity reports cannot disagree (ties: average ranks)


def test_slider_change_updates_recipe_and_marks_override(session):
    shared = {"drop_ratio": 0.5}
    before = h.slider_updates(session, session.experts[0], "apl", shared)
    assert len(before) == 3 * h.MAX_LAYER_ROWS
    n = len(session.layers)
    assert all(u.get("visible") for u in before[:n]) and not any(u.get("visible") for u in before[n:h.MAX_LAYER_ROWS])
    wb.set_cell(session, session.experts[0], session.layers[1], "drop_ratio", 0.77)
    after = h.slider_updates(session, session.experts[0], "apl", shared)
    drop_update = after[h.MAX_LAYER_ROWS + 1]
    assert drop_update["value"] == 0.77 and "✎" in drop_update["label"]
    drop_df, weight_df, profile, profile_md, over_md, conflict, conflict_md = h.plan_views(session, "apl", shared)
    assert drop_df["data"][0][2] == 0.77 and "✎" in over_md
    diamonds = [t for t in profile.data if "diamond" in list(t.marker.symbol)]
    assert diamonds and "1 cell(s) overridden" in profile_md
    recipe = wb.build_recipe(session, "apl", shared)
    assert recipe.experts[0].parameters["drop_ratio"][session.layers[1]] == 0.77


def test_param_controls_follow_method():
    updates = h.param_updates("ties")
    shown = {name for name, u in zip(h.PARAM_NAMES, updates) if u.get("visible")}
    assert shown == {"lambda", "drop_ratio", "trim_scope", "normalize"}
    della = dict(zip(h.PARAM_NAMES, h.param_updates("della")))
    assert della["epsilon"]["value"] == 0.1
    fisher = dict(zip(h.PARAM_NAMES, h.param_updates("fisher")))
    assert fisher["epsilon"]["value"] == 1e-8
    assert {"apl", "slerp", "fisher", "ties"} <= {v for _, v in h.method_choices()}


def test_profile_conflict_cosine_probe_figures(session):
    values = wb.plan(session, "apl")
    fig = fg.layer_profile_figure(session.layers, values)
    assert len(fig.data) == 2 * len(session.experts) and fig.layout.height
    layers, before, after = wb.conflict_data(session, "apl")
    assert all(a <= b + 1e-12 for a, b in zip(after, before))
    experts, matrix = wb.cosine_data(session)
    cos = fg.cosine_figure(experts, matrix)
    assert cos.data[0].zmid == 0 and cos.data[0].zmin == -1
    bars = fg.probe_bars(["a", "b"], [("base", {"a": 0.5, "b": 0.6}), ("#1 apl", {"a": 0.7, "b": 0.8})])
    assert [t.name for t in bars.data] == ["base", "#1 apl"] and bars.layout.barmode == "group"
    assert "#1 apl: mean accuracy 0.750" in fg.probe_summary(["a", "b"], [("base", {"a": 0.5, "b": 0.6}),
                                                                         ("#1 apl", {"a": 0.7, "b": 0.8})])


def test_errors_become_short_messages():
    import gradio as gr

    @h.safe
    def boom():
        raise ValueError("x" * 1000)

    with pytest.raises(gr.Error) as info:
        boom()
    assert "Something went wrong" in str(info.value) and len(str(info.value)) < 400

    @h.safe
    def readable():
        raise wb.MergeLabError("pick at least two experts")

    with pytest.raises(gr.Error, match="pick at least two"):
        readable()


def test_page_has_each_main_label_exactly_once():
    import app

    labels = [b.value for b in app.demo.blocks.values() if b.__class__.__name__ == "Button"]
    for label in ("Load experts", "Compute importance", "Merge", "Run probe", "Export"):
        assert labels.count(label) == 1, label


def test_plan_handlers_tolerate_a_tab_with_no_session():
    """A tab that loaded nothing (state None) redraws its empty plan instead of failing on `None.refs`."""
    from components import layout

    out = layout.refresh_plan(None, None, wb.DEFAULT_METHOD, *[None] * len(h.PARAM_NAMES))
    assert len(out) == 7 + 3 * h.MAX_LAYER_ROWS
    assert out[0] == h.placeholder_table("Press Load experts to fill this.")  # says what fills it, not "1 2 3"
    assert "Press Load experts" in str(out[2].layout.annotations[0].text)


def test_slider_handler_records_changes_only(session):
    """A slider event whose value is the plan's (a release or blur after a programmatic update) records no
    override; a changed value does, with the ✎ label."""
    from components import layout

    expert, layer = session.experts[0], session.layers[1]
    values = [None] * len(h.PARAM_NAMES)
    handler = layout._slider_handler(1, wb.DROP, 8)
    current = wb.plan(session, "apl", h.shared_values("apl", values))[expert][wb.DROP][layer]
    out = handler(session, expert, round(current, 4), "apl", *values)
    assert not session.overrides and out[-1] == {"__type__": "update"}
    out = handler(session, expert, round(current, 4) + 0.003, "apl", *values)
    assert wb.is_overridden(session, expert, wb.DROP, layer) and "✎" in out[-1]["label"]
