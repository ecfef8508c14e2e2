"""Plotly figure builders: pure functions data → ``go.Figure`` (and one-line summaries from the numbers).

Colour-blind-safe scales only (Viridis / Cividis sequential, RdBu / PuOr diverging around 0),
explicit heights, transparent backgrounds so the page's light or dark theme shows through, and
every heatmap kept under :data:`MAX_CELLS` cells.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from merging.apl.fidelity import spearman  # the one Spearman (average ranks for ties), shown in captions

MAX_CELLS = 50_000
SEQUENTIAL = "Viridis"
SEQUENTIAL_ALT = "Cividis"
DIVERGING = "RdBu"
DIVERGING_ALT = "PuOr"
# Okabe–Ito: distinguishable under the common colour-vision deficiencies
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
FONT = dict(size=12)
GREYS = ["#444444", "#8C8C8C", "#C4C4C4"]  # series that are not experts (metrics, before/after): never an expert's
BASE_COLOUR = "#7F7F7F"  # the base model: neutral grey in every chart
MERGE_COLOURS = ["#332288", "#882255", "#44AA99", "#999933", "#AA4499", "#117733", "#88CCEE", "#DDCC77"]  # Tol


def colour_map(experts: Sequence[str], merges: Sequence[str] = ()) -> dict[str, str]:
    """One colour per expert, the same in every chart: the expert's place in the session's expert list picks
    it from the Okabe–Ito palette (so "topic" keeps its colour whether a chart shows it alone or beside
    merges); the base is grey and merges take Tol's colours, never an expert's."""
    colours = {e: PALETTE[i % len(PALETTE)] for i, e in enumerate(experts)}
    colours["base"] = BASE_COLOUR
    for i, name in enumerate(m for m in merges if m not in colours):
        colours[name] = MERGE_COLOURS[i % len(MERGE_COLOURS)]
    return colours


def _style(fig: go.Figure, height: int, title: str | None = None) -> go.Figure:
    # Subplot titles sit just above the plots: a legend there would cover them, so it moves up a row.
    titled = bool(fig.layout.annotations) and any(a.yref == "paper" and (a.y or 0) >= 0.99 for a in fig.layout.annotations)
    top = (50 if title else 20) + (35 if titled else 0)
    fig.update_layout(height=height, margin=dict(l=60, r=20, t=top, b=50), title=title,
                      paper_bgcolor="rgba(0,0,0,0)", plot_bgcolor="rgba(127,127,127,0.06)", font=FONT,
                      legend=dict(orientation="h", yanchor="bottom", y=1.09 if titled else 1.02, x=0))
    fig.update_xaxes(gridcolor="rgba(127,127,127,0.25)", zerolinecolor="rgba(127,127,127,0.4)")
    fig.update_yaxes(gridcolor="rgba(127,127,127,0.25)", zerolinecolor="rgba(127,127,127,0.4)")
    return _category_axes(fig)


def _category_axes(fig: go.Figure) -> go.Figure:
    """Axes that name things (layers "embeddings", "0" … "5", "head") are category axes, said explicitly:
    plotly guesses an axis's type from its values, and with more numeric-looking names than words it picks
    a linear axis, on which the words have no place — "embeddings" and "head" vanish, and re-laying the
    chart out for a phone fails ("Something went wrong with axis scaling")."""
    for trace in fig.data:
        for letter in ("x", "y"):
            values = getattr(trace, letter, None)
            if values is None or not any(isinstance(v, str) for v in values):
                continue
            ref = getattr(trace, f"{letter}axis", None) or letter
            axis = f"{letter}axis{ref[1:]}"
            fig.layout[axis].type = "category"
    return fig


NARROW_PANEL_GAP = 95  # px between stacked panels: the upper panel's slanted tick labels and the next title


def stack_when_narrow(fig: go.Figure, panel_heights: Sequence[int], top: int = 45, bottom: int = 95,
                      colorbar: str | None = None, narrow_extra: Mapping[str, object] | None = None,
                      category_ticks: bool = False) -> go.Figure:
    """Give a one-row subplot figure a second, stacked layout for narrow screens (a phone): each panel the
    full width, one under the other, its own y tick labels and title. Side by side, four panels on a
    390-px screen are four 25-px slivers; stacked, each keeps the screen's width.

    Both layouts travel in ``layout.meta.ml_layouts`` as flat updates ({"wide": …, "narrow": …}, plotly's
    attribute paths); the page's script (assets/head.html) applies the one that fits the chart's width.
    ``colorbar`` names a layout colour axis whose bar, stacked, shrinks to a thin one beside the first panel
    (full height it would take a quarter of a phone's width); ``narrow_extra`` are more narrow-only settings;
    ``category_ticks``: the x axes name categories (module kinds), each of which must stay labelled."""
    n = len(panel_heights)
    paper = sum(panel_heights) + NARROW_PANEL_GAP * (n - 1)
    narrow: dict = {"height": top + paper + bottom, "margin.t": top, "margin.b": bottom, "margin.r": 12}
    titles = [a for a in fig.layout.annotations if a.yref == "paper" and a.xref == "paper"]
    shared_y = n > 1 and fig.layout.yaxis2.matches == "y"
    y_top = paper
    for i, height in enumerate(panel_heights):
        suffix = "" if i == 0 else str(i + 1)
        domain = [round((y_top - height) / paper, 4), round(y_top / paper, 4)]
        narrow[f"xaxis{suffix}.domain"] = [0.0, 1.0]
        narrow[f"yaxis{suffix}.domain"] = domain
        narrow[f"yaxis{suffix}.showticklabels"] = True
        if shared_y:  # the heatmaps' layers: the tick labels say it, and a phone's width goes to the cells
            narrow[f"yaxis{suffix}.title.text"] = None
        if category_ticks:  # every column named, upright and small, so none is skipped for lack of room
            narrow[f"xaxis{suffix}.tickangle"] = -90
            narrow[f"xaxis{suffix}.tickfont.size"] = 10
        if i < len(titles):
            narrow[f"annotations[{i}].x"], narrow[f"annotations[{i}].y"] = 0.5, domain[1]
        y_top -= height + NARROW_PANEL_GAP
    if colorbar:
        bar = f"{colorbar}.colorbar"
        narrow.update({f"{bar}.len": round(panel_heights[0] / paper, 4), f"{bar}.y": 1.0, f"{bar}.yanchor": "top",
                       f"{bar}.thickness": 8, f"{bar}.xpad": 4, f"{bar}.title.side": "top",
                       f"{bar}.tickfont.size": 10})
    narrow.update(narrow_extra or {})
    return with_narrow_layout(fig, narrow)


def with_narrow_layout(fig: go.Figure, narrow: Mapping[str, object]) -> go.Figure:
    """Store ``narrow`` (plotly attribute paths → values) as the figure's phone layout and the figure's own
    values at those paths as its wide one, in ``layout.meta.ml_layouts``: the page's script switches between
    them by the chart's width."""
    current = fig.layout.to_plotly_json()
    wide = {path: _layout_value(current, path) for path in narrow}
    fig.update_layout(meta={"ml_layouts": {"wide": wide, "narrow": dict(narrow)}})
    return fig


def _layout_value(layout: Mapping, path: str):
    """The value at a plotly attribute path ("annotations[1].y", "yaxis2.title.text") of a layout dict; None
    where it is unset (plotly then takes its default, as the figure did)."""
    node: object = layout
    for part in path.replace("[", ".").replace("]", "").split("."):
        if isinstance(node, Mapping):
            node = node.get(part)
        elif isinstance(node, (list, tuple)) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return None
        if node is None:
            return None
    return node.to_plotly_json() if hasattr(node, "to_plotly_json") else node


def empty_figure(message: str, height: int = 260) -> go.Figure:
    """A chart's placeholder: says what fills it (wrapped short enough for a phone's width)."""
    fig = go.Figure()
    message = "<br>".join(textwrap.wrap(message, 40)) or message  # plotly does not wrap annotations
    fig.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font=dict(size=14))
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _style(fig, height)


def _ranks(values: np.ndarray) -> np.ndarray:
    """Rank 1 = largest; NaN stays NaN."""
    flat = values.ravel()
    out = np.full(flat.shape, np.nan)
    ok = np.where(np.isfinite(flat))[0]
    order = ok[np.argsort(-flat[ok], kind="stable")]
    out[order] = np.arange(1, len(order) + 1)
    return out.reshape(values.shape)


# ============================================================================ importance


LOG_DECADES = 4  # the log colour scale spans this many decades below the largest cell; smaller cells sit at the floor


def log_floor(values: np.ndarray, decades: int = LOG_DECADES) -> float:
    """The floor of the shared log scale: ``decades`` below the largest |value| (or the smallest positive
    value, if that is higher)."""
    v = np.abs(np.asarray(values, float))
    pos = v[np.isfinite(v) & (v > 0)]
    if not pos.size:
        return 1e-12
    return float(max(pos.max() * 10.0 ** -decades, pos.min()))


def importance_heatmaps(maps: Mapping[str, tuple[list[str], list[str], np.ndarray]],
                        drop: Mapping[str, Mapping[str, float]] | None = None) -> go.Figure:
    """One layer × module heatmap per expert on one shared LOG colour scale: colour = log10 |ΔL| (cells
    below the floor get the floor's colour), so one dominant cell (often the pooler) does not paint
    every other cell the same dark colour. Exact zeros are left blank: the expert did not change that
    part (e.g. frozen embeddings), which is not the same as a change that barely matters. Hover keeps
    the raw value, its rank within the expert and the layer's drop ratio.

    ``maps[expert] = (rows = layers, cols = module kinds, values)``; ``drop[expert][layer]`` is the
    resulting drop ratio shown on hover.
    """
    experts = list(maps)
    if not experts:
        return empty_figure("No importance yet: press Compute importance.")
    everything = np.concatenate([np.abs(np.asarray(v, float)).ravel() for _, _, v in maps.values()])
    floor = log_floor(everything)
    finite = everything[np.isfinite(everything)]
    top = float(finite.max()) if finite.size and finite.max() > 0 else floor * 10
    zmin, zmax = math.log10(floor), math.log10(max(top, floor * 10))
    fig = make_subplots(rows=1, cols=len(experts), subplot_titles=experts, shared_yaxes=True,
                        horizontal_spacing=0.04)
    for i, expert in enumerate(experts):
        rows, cols, values = maps[expert]
        values = np.abs(np.asarray(values, float))
        ranks = _ranks(values)
        drops = np.array([[(drop or {}).get(expert, {}).get(r, np.nan) for _ in cols] for r in rows], float)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.where(np.isfinite(values) & (values > 0), np.log10(np.maximum(values, floor)), np.nan)
        custom = np.dstack([values, ranks, drops])
        fig.add_trace(go.Heatmap(
            z=z, x=cols, y=rows, coloraxis="coloraxis", customdata=custom, xgap=1, ygap=1,
            hovertemplate=(f"<b>{expert}</b><br>layer %{{y}}, %{{x}}<br>importance |ΔL| %{{customdata[0]:.3g}}<br>"
                           "rank %{customdata[1]:.0f}<br>layer drop ratio %{customdata[2]:.2f}<extra></extra>")),
            row=1, col=i + 1)
    decades = list(range(math.ceil(zmin), math.floor(zmax) + 1)) or [round(zmin)]
    fig.update_layout(coloraxis=dict(colorscale=SEQUENTIAL, cmin=zmin, cmax=zmax,
                                     colorbar=dict(title="|ΔL| (log)", thickness=12, tickvals=decades,
                                                   ticktext=[f"1e{d}" for d in decades])))
    fig.update_yaxes(autorange="reversed")
    fig.update_yaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(tickangle=-45)
    n_rows = max(len(m[0]) for m in maps.values())
    fig = _style(fig, max(380, 120 + 34 * n_rows))
    fig.update_layout(margin=dict(l=70, r=20, t=50, b=90))
    return stack_when_narrow(fig, [max(150, 26 * n_rows)] * len(experts), colorbar="coloraxis", category_ticks=True)


def heatmap_summary(maps: Mapping[str, tuple[list[str], list[str], np.ndarray]]) -> str:
    parts = []
    for expert, (rows, cols, values) in maps.items():
        values = np.asarray(values, float)
        if not np.isfinite(values).any() or np.nanmax(values) <= 0:
            parts.append(f"**{expert}**: no measurable importance")
            continue
        r, c = np.unravel_index(np.nanargmax(values), values.shape)
        total = np.nansum(values)
        layer_sums = np.nansum(values, axis=1)
        top_layer = rows[int(np.argmax(layer_sums))]
        parts.append(f"**{expert}**: most important module {rows[r]}/{cols[c]} ({values[r, c] / total:.0%} of the "
                     f"total); layer {top_layer}'s modules add up to {layer_sums.max() / total:.0%}")
    blank = any((np.asarray(v, float) == 0).any() for _, _, v in maps.values())
    return ("; ".join(parts) + "." + (" Blank cells: parts the expert did not change (zero importance)." if blank else "")
            + " Which layer matters most as a whole (what APL's drop ratios use) is the chart beside.")


def layer_importance_figure(layers: Sequence[str], layer: Mapping[str, Sequence[float]],
                            modules: Mapping[str, Sequence[float]]) -> go.Figure:
    """Per expert (its own colour), the layer-level intervention's share of each layer (bars: what APL's drop
    ratios use) and the heatmap's summed module scores per layer (dotted line, same colour): where they part,
    modules' effects inside the layer cancel."""
    if not layers:
        return empty_figure("Compute importance to see which layer matters most.")
    colours = colour_map(list(layer))
    fig = go.Figure()
    for expert, shares in layer.items():
        fig.add_trace(go.Bar(x=list(layers), y=list(shares), name=f"{expert} · layer", legendgroup=expert,
                             marker_color=colours[expert],
                             hovertemplate=f"{expert}<br>layer %{{x}}: %{{y:.0%}} (whole layer switched)"
                                           "<extra></extra>"))
        if expert in modules:
            fig.add_trace(go.Scatter(x=list(layers), y=list(modules[expert]), name=f"{expert} · Σ modules",
                                     legendgroup=expert, mode="lines+markers",
                                     line=dict(color=colours[expert], dash="dot", width=2),
                                     marker=dict(symbol="diamond", size=7),
                                     hovertemplate=f"{expert}<br>layer %{{x}}: %{{y:.0%}} (modules summed)"
                                                   "<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="share of the expert's total", tickformat=".0%", rangemode="tozero")
    fig.update_xaxes(title_text="layer", type="category")
    _style(fig, 380)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.25, x=0), margin=dict(t=20, b=110))
    # on a phone the layer names stand upright (plotly's own slant ran "embeddings" into the legend) and the
    # legend, a row per entry there (two per expert), gets its own room below them and the axis title
    rows = 2 * len(layer)
    return with_narrow_layout(fig, {"height": 480 + 24 * rows, "margin.b": 140 + 24 * rows, "xaxis.tickangle": -90,
                                    "legend.y": -0.42})


def fidelity_by_expert_text(intervention: str, table: Mapping[str, Mapping[str, float]]) -> str:
    """"Gradient vs exact (restore), Spearman ρ per expert — topic: module 0.81, layer 0.60; …"."""
    def rho(value) -> str:
        return "n/a" if value is None or not np.isfinite(value) else f"{value:.2f}"

    names = list(dict.fromkeys(e for values in table.values() for e in values))
    parts = [f"**{e}**: " + ", ".join(f"{lv} {rho(table[lv].get(e))}" for lv in ("module", "layer") if lv in table)
             for e in names]
    return (f"Gradient vs exact ({intervention}), Spearman ρ per expert — " + "; ".join(parts)
            + ". (n/a: fewer than 3 changed parts, or all scores equal.)")


def hidden_state_figure(unit_scores: np.ndarray, binned: np.ndarray, layers: Sequence[str], title: str,
                        top: int = 10, colour: str = GREYS[0]) -> go.Figure:
    """Left: one module's unit scores sorted (largest first). Right: layer × unit-bin heatmap of the
    same module kind across layers (bins keep it under the cell budget)."""
    scores = np.asarray(unit_scores, float)
    order = np.argsort(-np.nan_to_num(scores, nan=-np.inf))
    sorted_scores = scores[order]
    # short titles (the module's full name is in the summary under the chart): long ones ran into each other
    fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                        subplot_titles=["this module's units, most important first",
                                        "same module in every layer"])
    fig.add_trace(go.Scatter(x=np.arange(1, len(sorted_scores) + 1), y=sorted_scores, mode="lines",
                             line=dict(color=colour), customdata=order,
                             hovertemplate="rank %{x}<br>unit %{customdata}<br>importance %{y:.3g}<extra></extra>",
                             name="units"), row=1, col=1)
    k = min(top, len(order))
    fig.add_trace(go.Scatter(x=np.arange(1, k + 1), y=sorted_scores[:k], mode="markers",  # ids: hover + list below
                             text=[str(u) for u in order[:k]],
                             marker=dict(color="black", size=7, symbol="circle-open"), name=f"top {k} units",
                             hovertemplate="unit %{text}: %{y:.3g}<extra></extra>"), row=1, col=1)
    binned = np.asarray(binned, float)
    assert binned.size < MAX_CELLS
    fig.add_trace(go.Heatmap(z=binned, y=list(layers), x=np.arange(binned.shape[1]) if binned.ndim == 2 else None,
                             coloraxis="coloraxis",
                             hovertemplate="layer %{y}, bin %{x}<br>mean %{z:.3g}<extra></extra>"), row=1, col=2)
    fig.update_layout(coloraxis=dict(colorscale=SEQUENTIAL_ALT, colorbar=dict(title="mean |ΔL|", thickness=12)))
    fig.update_xaxes(title_text="rank", row=1, col=1)
    fig.update_yaxes(title_text="importance", type="log" if np.nanmin(sorted_scores[sorted_scores > 0], initial=1) > 0
                     and np.nanmax(sorted_scores, initial=0) > 0 else "linear", row=1, col=1)
    fig.update_xaxes(title_text="unit bin", row=1, col=2)
    fig.update_yaxes(autorange="reversed", row=1, col=2)
    _style(fig, 360)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.2, x=0), margin=dict(t=60, b=80))
    # stacked, the legend sits in the sorted curve's empty top-right corner (under the chart: the colour bar)
    inside = {"legend.x": 0.99, "legend.xanchor": "right", "legend.y": 0.99, "legend.yanchor": "top",
              "legend.orientation": "v", "legend.bgcolor": "rgba(255,255,255,0.7)"}
    return stack_when_narrow(fig, [220, max(150, 24 * len(layers))], bottom=80, colorbar="coloraxis",
                             narrow_extra=inside)


def bin_units(rows: Sequence[np.ndarray], max_bins: int = 64) -> np.ndarray:
    """Mean of equal-width unit bins for each row (rows may differ in length: each is binned alone)."""
    out = []
    for row in rows:
        row = np.abs(np.asarray(row, float))
        bins = np.array_split(row, min(max_bins, max(1, len(row))))
        out.append([float(np.nanmean(b)) if np.isfinite(b).any() else np.nan for b in bins])
    width = max(len(r) for r in out) if out else 0
    return np.array([r + [np.nan] * (width - len(r)) for r in out], float)


def hidden_summary(unit_scores: np.ndarray, name: str) -> str:
    scores = np.abs(np.asarray(unit_scores, float))
    scores = scores[np.isfinite(scores)]
    if not scores.size or scores.sum() == 0:
        return f"{name}: no hidden-state scores."
    share = np.sort(scores)[::-1]
    k = max(1, int(math.ceil(0.1 * len(share))))
    return (f"{name}: the top 10% of its {len(scores)} units ({k}) hold {share[:k].sum() / share.sum():.0%} of the "
            f"importance (an even spread would be 10%).")


def fidelity_figure(exact: Sequence[float], gradient: Sequence[float], labels: Sequence[str], level: str) -> go.Figure:
    """Exact vs gradient importance of the same partitions, log–log, with the diagonal."""
    x, y = np.abs(np.asarray(exact, float)), np.abs(np.asarray(gradient, float))
    rho = spearman(x, y)
    owners = [str(label).split(": ", 1)[0] for label in labels]  # "expert: partition"
    colours = colour_map(list(dict.fromkeys(owners)))
    fig = go.Figure()
    for expert in dict.fromkeys(owners):
        mine = [i for i, o in enumerate(owners) if o == expert]
        fig.add_trace(go.Scatter(x=x[mine], y=y[mine], mode="markers", text=[labels[i] for i in mine],
                                 marker=dict(color=colours[expert], size=7), name=expert,
                                 hovertemplate="%{text}<br>exact %{x:.3g}<br>gradient %{y:.3g}<extra></extra>"))
    pos = np.concatenate([x[x > 0], y[y > 0]])
    if pos.size:
        lo, hi = float(pos.min()), float(pos.max())
        fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(dash="dot", color="gray"),
                                 name="equal", hoverinfo="skip"))
        fig.update_xaxes(type="log")
        fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="exact |ΔL|")
    fig.update_yaxes(title_text="gradient |⟨g, Δ⟩|")
    return _style(fig, 340, f"{level} level: Spearman ρ = {rho:.2f}")


def magnitude_figure(layers: Sequence[str], importance: Mapping[str, Sequence[float]],
                     norms: Mapping[str, Sequence[float]]) -> go.Figure:
    """Importance vs delta norm per layer, one marker series per expert (labels = layers)."""
    fig = go.Figure()
    colours = colour_map(list(importance))
    for expert in importance:
        # layers the expert (almost) did not change pile up at 0: labelled on hover only
        biggest = max((abs(n) for n in norms[expert]), default=0.0)
        labels = [layer if abs(norm) > 0.05 * biggest else "" for layer, norm in zip(layers, norms[expert])]
        fig.add_trace(go.Scatter(x=list(norms[expert]), y=list(importance[expert]), mode="markers+text",
                                 text=labels, customdata=list(layers), textposition="top center", name=expert,
                                 cliponaxis=False,
                                 marker=dict(color=colours[expert], size=8),
                                 hovertemplate=f"{expert}<br>layer %{{customdata}}<br>‖Δ‖ %{{x:.3g}}<br>"
                                               "importance %{y:.3g}<extra></extra>"))
    fig.update_xaxes(title_text="delta norm ‖Δ‖ of the layer")
    fig.update_yaxes(title_text="layer importance |ΔL|")
    return _style(fig, 340)


def magnitude_summary(importance: Mapping[str, Sequence[float]], norms: Mapping[str, Sequence[float]]) -> str:
    parts = [f"{e}: ρ = {spearman(importance[e], norms[e]):.2f}" for e in importance]
    return ("Rank correlation between a layer's importance and its delta norm — " + ", ".join(parts)
            + " (1 = importance just follows size; low = the data sees something the weights alone do not).")


def comparison_figure(layers: Sequence[str], restore: Mapping[str, Sequence[float]],
                      ablate: Mapping[str, Sequence[float]], agreement: Mapping[str, float],
                      stability: Mapping[str, Mapping[str, float]]) -> go.Figure:
    """Left: each expert's layer importance (share of its total) under restore (solid) and ablate (dotted).
    Right: per expert, restore-vs-ablate rank agreement and each intervention's rank stability over draws."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.6, 0.4], horizontal_spacing=0.1,
                        subplot_titles=["layer importance (share of the expert's total)",
                                        "rank agreement and stability (Spearman ρ)"])
    colours = colour_map(list(restore))
    for expert in restore:
        color = colours[expert]
        for name, values, dash in (("restore", restore[expert], "solid"), ("ablate", ablate[expert], "dot")):
            v = np.abs(np.asarray(values, float))
            share = v / v.sum() if np.nansum(v) > 0 else v
            fig.add_trace(go.Scatter(x=list(layers), y=share, mode="lines+markers", name=f"{expert} · {name}",
                                     legendgroup=expert, line=dict(color=color, dash=dash),
                                     hovertemplate=f"{expert} ({name})<br>layer %{{x}}: %{{y:.1%}}<extra></extra>"),
                          row=1, col=1)
    experts = list(restore)
    bars = [("restore vs ablate", [agreement.get(e) for e in experts], GREYS[0]),
            ("stability: restore", [stability.get("restore", {}).get(e) for e in experts], GREYS[1]),
            ("stability: ablate", [stability.get("ablate", {}).get(e) for e in experts], GREYS[2])]
    for name, ys, color in bars:
        fig.add_trace(go.Bar(x=experts, y=[None if y is None or not np.isfinite(y) else y for y in ys], name=name,
                             marker_color=color, hovertemplate=f"{name}<br>%{{x}}: ρ = %{{y:.2f}}<extra></extra>"),
                      row=1, col=2)
    fig.update_layout(barmode="group")
    fig.update_yaxes(tickformat=".0%", row=1, col=1)
    fig.update_yaxes(range=[-1, 1], row=1, col=2)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    _style(fig, 380)
    fig.update_layout(legend=dict(orientation="h", yanchor="top", y=-0.22, x=0), margin=dict(t=50, b=110))
    return stack_when_narrow(fig, [220, 200], bottom=160)


def comparison_summary(agreement: Mapping[str, float], stability: Mapping[str, Mapping[str, float]],
                       draws: int, draw_size: int) -> str:
    """One line from the measured numbers: agreement of the two interventions, and which is steadier."""
    def mean(values) -> float:
        finite = [v for v in values if v is not None and np.isfinite(v)]
        return float(np.mean(finite)) if finite else float("nan")

    agree = mean(agreement.values())
    stab = {iv: mean(stability.get(iv, {}).values()) for iv in ("restore", "ablate")}
    if np.isfinite(stab["restore"]) and np.isfinite(stab["ablate"]) and abs(stab["restore"] - stab["ablate"]) >= 0.05:
        steadier = max(stab, key=stab.get)
        verdict = f"{steadier} ranks layers more consistently here"
    else:
        verdict = "both rank layers about equally consistently here"
    return (f"Restore and ablate agree on the layer ranking with mean Spearman ρ = {agree:.2f} over "
            f"{len(agreement)} expert(s); over {draws} few-shot draws of {draw_size} examples the ranking's "
            f"stability is ρ = {stab['restore']:.2f} (restore) and {stab['ablate']:.2f} (ablate): {verdict}.")


# ============================================================================ merge plan


def layer_profile_figure(layers: Sequence[str], values: Mapping[str, Mapping[str, Mapping[str, float]]],
                         overridden: Mapping[str, Mapping[str, set]] | None = None,
                         keys: Sequence[str] = ("drop_ratio", "weight")) -> go.Figure:
    """Drop ratio and weight vs depth, one line per expert; overridden points drawn as large diamonds."""
    fig = make_subplots(rows=len(keys), cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        subplot_titles=[k.replace("_", " ") for k in keys])
    overridden = overridden or {}
    for r, key in enumerate(keys):
        for i, expert in enumerate(values):
            ys = [values[expert][key].get(k) for k in layers]
            marks = overridden.get(expert, {}).get(key, set())
            fig.add_trace(go.Scatter(
                x=list(layers), y=ys, mode="lines+markers", name=expert, legendgroup=expert, showlegend=r == 0,
                line=dict(color=colour_map(list(values))[expert], dash="solid" if i % 2 == 0 else "dash"),
                marker=dict(size=[13 if k in marks else 6 for k in layers],
                            symbol=["diamond" if k in marks else "circle" for k in layers],
                            line=dict(width=[2 if k in marks else 0 for k in layers], color="black")),
                customdata=["override" if k in marks else "suggested" for k in layers],
                hovertemplate=f"{expert}<br>layer %{{x}}<br>{key} %{{y:.3f}} (%{{customdata}})<extra></extra>"),
                row=r + 1, col=1)
    fig.update_yaxes(range=[0, 1], row=1, col=1)
    fig.update_xaxes(title_text="layer (depth →)", row=len(keys), col=1)
    return _style(fig, 380)


def profile_summary(layers: Sequence[str], values: Mapping[str, Mapping[str, Mapping[str, float]]],
                    n_overrides: int) -> str:
    parts = []
    for expert, keys in values.items():
        drops = keys["drop_ratio"]
        hi = max(layers, key=lambda k: drops[k])
        lo = min(layers, key=lambda k: drops[k])
        if math.isclose(drops[hi], drops[lo], abs_tol=5e-3):  # "most at X (0.50) and least at X (0.50)" says nothing
            parts.append(f"{expert} drops {drops[hi]:.2f} of its change at every layer")
        else:
            parts.append(f"{expert} drops most at layer {hi} ({drops[hi]:.2f}) and least at layer {lo} "
                         f"({drops[lo]:.2f})")
    return "; ".join(parts) + f". {n_overrides} cell(s) overridden by you (diamonds)."


def conflict_figure(layers: Sequence[str], before: Sequence[float], after: Sequence[float]) -> go.Figure:
    """Sign-conflict rate per layer before and (expected) after dropping."""
    fig = go.Figure([
        go.Bar(x=list(layers), y=list(before), name="before dropping", marker_color=GREYS[0]),
        go.Bar(x=list(layers), y=list(after), name="after dropping (expected)", marker_color=GREYS[2]),
    ])
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text="sign conflict", tickformat=".0%")
    fig.update_xaxes(title_text="layer")
    return _style(fig, 300)


def cosine_figure(experts: Sequence[str], matrix: Sequence[Sequence[float]]) -> go.Figure:
    """Pairwise task-vector cosine, diverging around 0."""
    z = np.asarray(matrix, float)
    fig = go.Figure(go.Heatmap(z=z, x=list(experts), y=list(experts), zmin=-1, zmax=1, zmid=0,
                               colorscale=DIVERGING, text=np.round(z, 3), texttemplate="%{text}",
                               colorbar=dict(title="cos", thickness=12),
                               hovertemplate="%{y} · %{x}: %{z:.3f}<extra></extra>"))
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(coloraxis_showscale=False)
    return _style(fig, max(260, 160 + 50 * len(experts)))


# ============================================================================ probe


def probe_bars(tasks: Sequence[str], rows: Sequence[tuple[str, Mapping[str, float]]], metric: str = "accuracy",
               experts: Sequence[str] | None = None) -> go.Figure:
    """Grouped bars: x = task, one bar per evaluated model (base, experts, each merge), each expert in its
    colour of every other chart (``experts``: the session's order; the tasks by default)."""
    fig = go.Figure()
    colours = colour_map(list(experts if experts is not None else tasks), [name for name, _ in rows])
    for name, values in rows:
        fig.add_trace(go.Bar(x=list(tasks), y=[values.get(t) for t in tasks], name=name,
                             marker_color=colours[name],
                             hovertemplate=f"{name}<br>%{{x}}: %{{y:.3f}}<extra></extra>"))
    fig.update_layout(barmode="group")
    fig.update_yaxes(title_text=metric, range=[0, 1] if metric == "accuracy" else None)
    return _style(fig, 340)


def probe_summary(tasks: Sequence[str], rows: Sequence[tuple[str, Mapping[str, float]]],
                  metric: str = "accuracy") -> str:
    """The last merge's mean against the base and the best single expert; for perplexity (causal-LM experts)
    lower is better, so the best expert is the lowest."""
    if not rows:
        return ""
    means = {name: float(np.mean([np.nan if v.get(t) is None else v[t] for t in tasks])) for name, v in rows}
    last = rows[-1][0]
    base = means.get("base", float("nan"))
    experts = [n for n, _ in rows if n in tasks]
    best = min if metric == "perplexity" else max
    best_expert = best((means[n] for n in experts), default=float("nan"))
    text = (f"{last}: mean {metric} {means[last]:.3f} (base {base:.3f}, best single expert {best_expert:.3f}, "
            f"each on every task)")
    return text + (": lower is better." if metric == "perplexity" else ".")


def sweep_figure(ratios: Sequence[float], results: Mapping[str, Sequence[float]]) -> go.Figure:
    fig = go.Figure()
    for i, (method, ys) in enumerate(results.items()):
        fig.add_trace(go.Scatter(x=list(ratios), y=list(ys), mode="lines+markers", name=method,
                                 line=dict(color=MERGE_COLOURS[i % len(MERGE_COLOURS)])))
    fig.update_xaxes(title_text="drop ratio (mean)")
    fig.update_yaxes(title_text="mean probe accuracy")
    return _style(fig, 320)


def sweep_summary(ratios: Sequence[float], results: Mapping[str, Sequence[float]]) -> str:
    parts = []
    for method, ys in results.items():
        ys = list(ys)
        if ys:
            parts.append(f"{method} {ys[0]:.3f} → {ys[-1]:.3f}")
    return f"Mean accuracy from drop {ratios[0]} to {ratios[-1]}: " + ", ".join(parts) + "."


# ---------------------------------------------------------------- seed band and pruning curves

def seed_band_figure(band, experts: Sequence[str] | None = None) -> go.Figure:
    """One bar per task at the mean over seeds with a min–max error bar, and each seed's score as a dot on
    it: how far one run of a randomised merge can be from the next (``band``: a workbench SeedBand)."""
    tasks = list(band.tasks)
    colours = colour_map(list(experts if experts is not None else tasks))
    means = [band.mean(t) for t in tasks]
    fig = go.Figure(go.Bar(
        x=tasks, y=means, name=f"mean of {len(band.seeds)} seeds",
        marker_color=[colours.get(t, GREYS[1]) for t in tasks],
        error_y=dict(type="data", symmetric=False, array=[band.high(t) - m for t, m in zip(tasks, means)],
                     arrayminus=[m - band.low(t) for t, m in zip(tasks, means)], color="#444444", thickness=2),
        hovertemplate="%{x}: mean %{y:.3f}<extra></extra>"))
    for i, seed in enumerate(band.seeds):
        fig.add_trace(go.Scatter(x=tasks, y=[band.scores[t][i] for t in tasks], mode="markers", name=f"seed {seed}",
                                 marker=dict(color=GREYS[i % len(GREYS)], size=8, symbol=["circle", "diamond",
                                                                                          "square"][i % 3],
                                             line=dict(color="#000000", width=1)),
                                 hovertemplate=f"seed {seed}<br>%{{x}}: %{{y:.3f}}<extra></extra>"))
    fig.update_yaxes(title_text=band.metric, range=[0, 1] if band.metric == "accuracy" else None)
    fig.update_xaxes(title_text="task")
    return _legend_below_when_narrow(_style(fig, 340), plot=240, legend_rows=len(band.seeds) + 1)


def _legend_below_when_narrow(fig: go.Figure, plot: int, legend_rows: int) -> go.Figure:
    """On a phone a horizontal legend above the plot wraps into a column that covers it: there it moves
    under the x axis title, one entry a row, and the chart grows to hold it."""
    bottom = 90 + 22 * legend_rows
    return stack_when_narrow(fig, [plot], top=30, bottom=bottom,
                             narrow_extra={"legend.y": round(-70 / plot, 3), "legend.yanchor": "top"})


def strategy_colours(strategy_ids: Sequence[str]) -> dict[str, str]:
    """One colour per pruning strategy, by its place in ``merging.apl.pruning.STRATEGIES`` (Tol's colours,
    never an expert's), so a strategy keeps its colour in every curve."""
    from merging.apl.pruning import STRATEGIES

    order = [s.id for s in STRATEGIES] + [s for s in strategy_ids if s not in {x.id for x in STRATEGIES}]
    return {sid: MERGE_COLOURS[order.index(sid) % len(MERGE_COLOURS)] for sid in strategy_ids}


def strategy_name(strategy_id: str, short: bool = False) -> str:
    """The strategy's label for a chart; ``short``: the words a sentence uses ("DARE", "magnitude",
    "APL per-layer rates")."""
    from merging.apl.pruning import STRATEGIES

    label = next((s.label for s in STRATEGIES if s.id == strategy_id), strategy_id)
    if not short:
        return label
    if label.endswith(")") and " (" in label and label.rsplit(" (", 1)[1][:-1].isupper():
        return label.rsplit(" (", 1)[1][:-1]  # "random drop + rescale (DARE)" → "DARE"
    return label.split(" (", 1)[0]


def _hex_rgba(colour: str, alpha: float) -> str:
    colour = colour.lstrip("#")
    r, g, b = (int(colour[i:i + 2], 16) for i in (0, 2, 4))
    return f"rgba({r},{g},{b},{alpha})"


def pruning_figure(curve, expert_colour: str | None = None) -> go.Figure:
    """The pruning curve of one expert: its own-task score against the share p of its delta dropped, one line
    per strategy (mean over seeds) in a min–max band of its colour, with the base and the unpruned expert
    as dashed reference lines (``curve``: a ``merging.apl.pruning.PruningCurve``)."""
    fig = go.Figure()
    fractions = list(curve.fractions)
    place = {p: _kept_axis(p) for p in fractions}
    ids = list(curve.strategies())
    colours = strategy_colours(ids)
    for sid in ids:
        points = [(p, curve.at(sid, p)) for p in fractions if curve.scores(sid, p)]
        xs = [place[p] for p, _ in points]
        means, lows, highs = ([v[k] for _, v in points] for k in range(3))
        name = strategy_name(sid)
        if any(hi > lo for lo, hi in zip(lows, highs)):
            fig.add_trace(go.Scatter(x=xs + xs[::-1], y=highs + lows[::-1], fill="toself", mode="lines",
                                     line=dict(width=0), fillcolor=_hex_rgba(colours[sid], 0.18), hoverinfo="skip",
                                     showlegend=False, legendgroup=sid, name=f"{name} range"))
        fig.add_trace(go.Scatter(x=xs, y=means, mode="lines+markers", name=name, legendgroup=sid,
                                 line=dict(color=colours[sid], width=2),
                                 customdata=[(p, lo, hi) for (p, _), lo, hi in zip(points, lows, highs)],
                                 hovertemplate=f"{name}<br>p = %{{customdata[0]:g}}: %{{y:.3f}} (range "
                                               f"%{{customdata[1]:.3f}}–%{{customdata[2]:.3f}})<extra></extra>"))
    x0, x1 = (min(place.values()), max(place.values())) if fractions else (0.0, 1.0)
    for value, name, colour in ((curve.base_score, "base", BASE_COLOUR),
                                (curve.expert_score, f"expert {curve.expert} (unpruned)", expert_colour or GREYS[0])):
        fig.add_trace(go.Scatter(x=[x0, x1], y=[value, value], mode="lines", name=name,
                                 line=dict(color=colour, dash="dash", width=1.5),
                                 hovertemplate=f"{name}: {value:.3f}<extra></extra>"))
    better = "higher is better" if curve.higher_is_better else "lower is better"
    fig.update_xaxes(title_text="p, share of the expert's change dropped",
                     tickvals=[place[p] for p in fractions], ticktext=[f"{p:g}" for p in fractions])
    if _perplexity_like(curve):  # one strategy's blow-up (a ratio of millions) would flatten every other line
        fig.update_yaxes(title_text=f"{curve.task} {curve.metric} ({better}; log)", type="log")
    else:
        fig.update_yaxes(title_text=f"{curve.task} {curve.metric} ({better})",
                         range=[0, 1] if curve.metric == "accuracy" else None)
    return _legend_below_when_narrow(_style(fig, 380), plot=280, legend_rows=len(ids) + 2)


def _perplexity_like(curve) -> bool:
    """A lower-is-better score that is a ratio (perplexity / the base's): read on a log axis, where a doubling
    looks the same at every height, as long as every plotted value is positive."""
    values = [curve.base_score, curve.expert_score, *(pt.score for pt in curve.points)]
    return not curve.higher_is_better and all(v is not None and v > 0 for v in values)


def _kept_axis(p: float) -> float:
    """Where drop fraction p sits on the pruning chart's x axis: −log10 of the share kept, so 0.9, 0.95 and
    0.99 (a tenth, a twentieth, a hundredth kept) are as far apart as what they keep differs."""
    return -math.log10(max(1.0 - float(p), 1e-6))


def pruning_text_fraction(curve) -> float | None:
    """The p the text twin quotes: 0.95 when measured (the paper's headline), else the measured p where the
    strategies' means lie furthest apart."""
    fractions = list(curve.fractions)
    if not fractions:
        return None
    if any(abs(p - 0.95) < 1e-9 for p in fractions):
        return next(p for p in fractions if abs(p - 0.95) < 1e-9)

    def spread(p):
        means = [curve.at(s, p)[0] for s in curve.strategies() if curve.scores(s, p)]
        return max(means) - min(means) if means else -1.0

    return max(fractions, key=spread)


def pruning_summary(curve) -> str:
    """The pruning chart's text twin from the measured numbers: at one p, every strategy's mean score (best
    first), the seeds and the range of the randomised ones, and the base and unpruned expert beside them."""
    p = pruning_text_fraction(curve)
    ids = [s for s in curve.strategies() if p is not None and curve.scores(s, p)]
    if not ids:
        return f"No pruning point was measured for expert {curve.expert}."
    sign = 1 if curve.higher_is_better else -1
    ids.sort(key=lambda s: -sign * curve.at(s, p)[0])
    verb = "keep" if curve.higher_is_better else "reach"
    parts = []
    for i, sid in enumerate(ids):
        mean, low, high = curve.at(sid, p)
        n = len(curve.scores(sid, p))
        spread = "" if n < 2 else f" ({n} seeds, range {low:.2f}–{high:.2f})" if high > low else f" ({n} seeds, all equal)"
        head = f"{strategy_name(sid, short=True)} {verb} {mean:.2f} {curve.metric}" if i == 0 else \
            f"{strategy_name(sid, short=True)} {mean:.2f}"
        parts.append(head + spread)
    better = "" if curve.higher_is_better else " (lower is better)"
    return (f"Expert {curve.expert} on its task {curve.task}: at p = {p:g}, " + ", ".join(parts)
            + f"{better}. For reference the unpruned expert scores {curve.expert_score:.2f} and the base "
            f"{curve.base_score:.2f}.")
