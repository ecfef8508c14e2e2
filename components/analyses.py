"""Where APL helps, on the page: the benchmark's honest verdict and the seed band in the Probe section, and the
Analyses section after it (the stored APL analyses and a quick pruning curve of the selected expert).

Builders make components only; ``wire_analyses`` connects them (called from ``components.layout.build_demo``).
The view functions (``*_views``, ``findings_line``, ``band_hint``) are plain functions of the session, so the
tests call them without a browser. Every chart has its text twin beside it, written from the measured numbers.
"""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import gradio as gr

from components import figures as fg
from components import handlers as h
from merging import workbench as wb
from merging.workbench import estimates as est
from merging.workbench import findings as fd
from merging.workbench import seeds as sb

#: the quick pruning curve the page runs (the benchmark runs the full one: 7 fractions, 3 seeds)
QUICK_FRACTIONS = (0.9, 0.95, 0.99)  # where the strategies part (at 0.5 they all keep the expert's score)
QUICK_SEEDS = (0, 1)  # 24 merges: about 12 min on the default zoo on a loaded 2-core machine (44 took 24)
BAND_EMPTY = "Press Run over 3 seeds to fill this."
PRUNING_EMPTY = "Press Pruning curve (quick) to fill this."

WHAT_BAND = (
    "A randomised merge (DARE's random drop, DELLA, APL with the random drop) is a different model for every "
    "seed. Each bar is a task's probe score averaged over the seeds; the whisker runs from the worst to the best "
    "seed, and each seed's own score is a dot on it. A wide whisker means one run's number says little: compare "
    "merges by their means and ranges, not by one seed.")
WHAT_PRUNING = (
    "One expert alone, no merging: drop a share p of its change (its weights minus the base's) and score it on "
    "its own task. Each line is a way to choose what to drop: at random with rescale (DARE), the smallest "
    "changes first (magnitude), or by APL's measured importance. A shaded band is the range over seeds of a "
    "random strategy. The dashed lines are the unpruned expert (the best to hope for) and the base (what is "
    "left when everything is dropped). A strategy whose line stays up at large p has found the part of the "
    "change the task needs. The p axis is spaced by the share kept, 1 − p: 0.9, 0.95 and 0.99 keep a tenth, a "
    "twentieth and a hundredth, so they are spread apart.")


# ====================================================================== builders (components only)

def seed_band_area() -> SimpleNamespace:
    """Inside the Probe section: the benchmark's line for this zoo, then the seed band."""
    findings_md = gr.Markdown(elem_id="probe-findings")
    with gr.Row():
        band_btn = gr.Button("Run over 3 seeds", variant="secondary", elem_id="btn-band", scale=0, min_width=220,
                             elem_classes=["ml-btn"])
        band_stop = gr.Button("Stop seeds", variant="stop", scale=0, min_width=160, elem_id="btn-band-stop")
    band_eta = gr.Markdown(elem_id="band-eta", elem_classes=["ml-eta"])
    band_progress = gr.Markdown(elem_id="band-progress", elem_classes=["ml-progress"])
    band_df = gr.Dataframe(value=h.placeholder_table(BAND_EMPTY), label="Seed band: each seed, mean and range",
                           interactive=False, elem_id="band-table", elem_classes=["ml-wide-table"])
    band_plot = gr.Plot(fg.empty_figure(BAND_EMPTY), label="Seed band: mean and min–max over seeds per task")
    band_md = gr.Markdown(elem_id="band-status")
    with gr.Accordion("What am I looking at?", open=False):
        gr.Markdown(WHAT_BAND)
    return SimpleNamespace(findings_md=findings_md, band_btn=band_btn, band_stop=band_stop, band_eta=band_eta,
                           band_progress=band_progress, band_df=band_df, band_plot=band_plot, band_md=band_md)


def analyses_section() -> SimpleNamespace:
    """A collapsible section after Probe: the stored APL analyses of this zoo and a quick pruning curve."""
    with gr.Accordion("Analyses · where APL helps", open=False, elem_id="analyses", elem_classes=["ml-section"]):
        gr.Markdown("The APL paper's analyses, measured on these experts. **Stored results** are what "
                    "`benchmarks/bench_apl_analyses.py` measured on this zoo; **Pruning curve** reruns a quick "
                    "version of the first analysis for one expert, here.")
        gr.Markdown("### Stored results")
        stored_md = gr.Markdown("Load experts to see the stored results of their zoo.", elem_id="analyses-stored")
        stored_plot = gr.Plot(label="Stored pruning curve", visible=False)
        stored_plot_md = gr.Markdown(elem_id="analyses-stored-curve")
        stored_pick = gr.Dropdown(choices=[], label="Stored table", elem_id="analyses-table-pick", visible=False)
        stored_table = gr.Dataframe(label="Stored analysis table", interactive=False, elem_id="analyses-table",
                                    elem_classes=["ml-wide-table"], visible=False)
        gr.Markdown("### Pruning curve of the selected expert")
        expert = gr.Dropdown(choices=[], label="Expert to prune", elem_id="pruning-expert")
        with gr.Row():
            prune_btn = gr.Button("Pruning curve (quick)", elem_id="btn-pruning", scale=0, min_width=200,
                                  elem_classes=["ml-btn"])
            prune_stop = gr.Button("Stop pruning", variant="stop", scale=0, min_width=170,
                                   elem_id="btn-pruning-stop")
        prune_eta = gr.Markdown(elem_id="pruning-eta", elem_classes=["ml-eta"])
        prune_progress = gr.Markdown(elem_id="pruning-progress", elem_classes=["ml-progress"])
        prune_plot = gr.Plot(fg.empty_figure(PRUNING_EMPTY), label="Pruning curve: own-task score vs share dropped")
        prune_md = gr.Markdown(elem_id="pruning-status")
        with gr.Accordion("What am I looking at?", open=False):
            gr.Markdown(WHAT_PRUNING)
    return SimpleNamespace(stored_md=stored_md, stored_plot=stored_plot, stored_plot_md=stored_plot_md,
                           stored_pick=stored_pick, stored_table=stored_table, expert=expert, prune_btn=prune_btn,
                           prune_stop=prune_stop, prune_eta=prune_eta, prune_progress=prune_progress,
                           prune_plot=prune_plot, prune_md=prune_md)


# ====================================================================== views (plain functions of the session)

def findings_line(state) -> str:
    """The Probe section's benchmark line for the loaded zoo (empty before anything is loaded)."""
    session = h.session_of(state)
    return fd.probe_findings(session) if session.refs else ""


def band_hint(state, method: str, seed, values) -> str:
    """Under Run over 3 seeds: the time it takes and the seeds, or why this method has no spread to show."""
    session = h.session_of(state)
    if not session.refs or not method:
        return ""
    try:
        shared = h.shared_values(method, values)
        seeds = sb.band_seeds(int(seed or 0))
    except wb.MergeLabError as exc:
        return f"Run over 3 seeds: {exc}"
    why = sb.seed_dependence(method, shared)
    name = wb.method_spec(method).pretty_name
    if why is None:
        return (f"**Run over 3 seeds** is for randomised merges (DARE, DELLA, APL with the random drop): {name} "
                "gives the same merge at every seed at these settings.")
    estimate = est.sweep_estimate(session, len(seeds)).text()
    return (f"**Time** · {name} with seeds {', '.join(map(str, seeds))} ({why}): {estimate}. The page keeps the "
            f"seed-{seeds[0]} merge for Export and Try a sentence.")


def band_views(session: wb.Session, band: sb.SeedBand) -> tuple[dict, object, str]:
    headers, rows = band.table()
    return ({"headers": headers, "data": rows}, fg.seed_band_figure(band, session.experts),
            sb.band_summary(band))


def pruning_steps(fractions=QUICK_FRACTIONS, seeds=QUICK_SEEDS) -> int:
    """Merges (and one-task probes) of a pruning curve: each strategy at each p, once per seed if random."""
    from merging.apl.pruning import STRATEGIES

    return sum(len(seeds) if s.randomised else 1 for s in STRATEGIES) * len(fractions)


def pruning_hint(state) -> str:
    session = h.session_of(state)
    if not session.refs:
        return ""
    steps = pruning_steps()
    estimate = est.sweep_estimate(session, steps).text()
    return (f"**Time** · quick pruning curve (p = {', '.join(f'{p:g}' for p in QUICK_FRACTIONS)}, "
            f"{len(QUICK_SEEDS)} seeds for the random strategies): {estimate} — an upper bound, since each merge "
            "here probes one task only; plus the expert's APL importance, once.")


def run_pruning(session: wb.Session, expert: str, progress=None):
    """The quick pruning curve of ``expert`` through the workbench's analysis."""
    import importlib.util

    if importlib.util.find_spec("merging.workbench.analyses") is None:
        raise wb.MergeLabError("the pruning analysis (merging.workbench.analyses) is not part of this build")
    from merging.cancel import current_token
    from merging.workbench import analyses as wa

    if not session.refs:
        raise wb.MergeLabError("load experts first, then pick the expert to prune")
    if expert not in session.refs:
        raise wb.MergeLabError(f"pick one of the loaded experts to prune ({', '.join(session.refs)}), not {expert!r}",
                               field="expert")
    started = time.perf_counter()
    curve = wa.pruning_curve(session, expert, fractions=QUICK_FRACTIONS, seeds=QUICK_SEEDS, progress=progress,
                             cancel=current_token())  # the page's Stop reaches it
    est.record("sweep", time.perf_counter() - started, len(curve.points), "the last pruning curve")
    return curve


def pruning_views(session: wb.Session, curve) -> tuple[object, str]:
    colour = fg.colour_map(session.experts or [curve.expert]).get(curve.expert)
    return fg.pruning_figure(curve, colour), fg.pruning_summary(curve)


def _cell(value):
    if isinstance(value, bool) or value is None:
        return "" if value is None else str(value)
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, (int, str)):
        return value
    return json.dumps(value)[:120]


def records_table(value) -> dict | None:
    """A stored result (a list of records, a mapping of records or of values) as a table, or None."""
    if isinstance(value, list) and value and all(isinstance(r, dict) for r in value):
        headers = list(dict.fromkeys(k for r in value for k in r))
        return {"headers": headers, "data": [[_cell(r.get(k)) for k in headers] for r in value]}
    if isinstance(value, dict) and value:
        if all(isinstance(v, dict) for v in value.values()):
            keys = list(dict.fromkeys(k for v in value.values() for k in v))
            return {"headers": ["name", *keys], "data": [[name, *[_cell(v.get(k)) for k in keys]]
                                                          for name, v in value.items()]}
        return {"headers": ["what", "value"], "data": [[k, _cell(v)] for k, v in value.items()]}
    return None


STORED_TABLES = ("drop_range", "fewshot_size", "taus", "ablation", "out_of_domain")


def stored_curve(data: dict, expert: str | None):
    """The stored pruning curve of ``expert`` (else the first stored), or None."""
    from merging.apl.pruning import PruningCurve

    curves = [PruningCurve.from_json(c) for c in data.get("pruning") or [] if isinstance(c, dict)]
    return next((c for c in curves if c.expert == expert), curves[0] if curves else None)


def stored_views(state, expert: str | None = None, table: str | None = None):
    """(text, curve chart, its twin, table choices, table) of the stored analyses of the loaded zoo; the chart,
    the choice and the table are hidden when there is nothing stored for these experts."""
    session = h.session_of(state)
    if not session.refs:
        return _no_stored("Load experts to see the stored results of their zoo.")
    try:
        data, why = fd.analyses_for(fd.loaded_zoo(session))
    except wb.MergeLabError as exc:
        data, why = None, f"The stored APL analyses could not be read: {exc}"
    if data is None:
        return _no_stored(why)
    names = [k for k in STORED_TABLES if records_table(data.get(k)) is not None]
    text = str(data.get("summary") or "The stored analyses have no summary.")
    text += measured_line(data)
    try:
        curve = stored_curve(data, expert)
    except wb.MergeLabError as exc:
        curve, text = None, text + f"\n\nThe stored pruning curves could not be read: {exc}"
    fig, twin = pruning_views(session, curve) if curve is not None else (None, "")
    if curve is not None and expert and curve.expert != expert:
        twin = f"(No stored curve of {expert}; showing {curve.expert}'s.) " + twin
    pick = table if table in names else (names[0] if names else None)
    return (text, gr.update(value=fig, visible=fig is not None), twin,
            gr.update(choices=names, value=pick, visible=bool(names)),
            gr.update(value=records_table(data.get(pick)) if pick else None, visible=bool(pick)))


def measured_line(data: dict) -> str:
    """How the stored analyses were measured, in words: the runs' own commands name scratch files of the machine
    that ran them (checkpoints, parts being combined), which a reader of the page cannot open, so the page counts
    the runs whose rows it shows (a combined file's parts) and points to the results file in the repository that
    lists each with its machine and load."""
    commands = [c for c in data.get("commands") or [] if isinstance(c, str)]
    meta = data.get("meta")
    parts = meta.get("parts") if isinstance(meta, dict) else None
    runs = list(parts) if parts else [c for c in commands if "--combine" not in c]  # parts: the runs shown
    if not runs:
        return ""
    combined = any("--combine" in c for c in commands)
    how = f"{len(runs)} run{'s' if len(runs) != 1 else ''} of `benchmarks/bench_apl_analyses.py`"
    if combined:
        how += ", joined with its `--combine`"
    return (f"\n\nMeasured by {how}; `benchmarks/RESULTS-apl-analyses.md` lists each run's command, machine "
            "and load.")


def _no_stored(text: str) -> tuple:
    return (text, gr.update(visible=False), "", gr.update(choices=[], value=None, visible=False),
            gr.update(visible=False))


# ====================================================================== wiring

def wire_analyses(page) -> None:
    """The seed band (Probe section) and the Analyses section; refreshed after each load, merge and probe."""
    from components.layout import long_step  # lazy: layout imports this module

    probe, band, an, merge = page.probe, page.probe.band, page.analyses, page.merge
    band_inputs = [page.state, merge.method, merge.seed, *merge.param_boxes]

    @h.safe
    def on_band(session, method_value, seed_value, *values, progress=gr.Progress()):
        session = h.session_of(session)
        if not session.refs:
            raise wb.MergeLabError("load experts first, then run a randomised merge over 3 seeds")
        shared = h.shared_values(method_value, values)
        result, report = sb.run_seed_band(session, method_value, shared, int(seed_value or 0),
                                          progress=h.progress_sink(progress))
        return (session, *band_views(session, result), *h.probe_views(session, report))

    done = long_step(band.band_btn, band.band_stop, on_band, band_inputs,
                     [page.state, band.band_df, band.band_plot, band.band_md, probe.probe_df, probe.probe_plot,
                      probe.probe_md, probe.history_df], "seed_band", progress_on=band.band_progress,
                     announce_id="band-status")
    done.then(lambda s: (h.merge_in_use(s),) * 2, [page.state], [page.export.export_uses, probe.predict_uses],
              api_visibility="private")

    hint = h.safe(lambda s, m, seed, *v: band_hint(s, m, seed, v))
    for event in (page.done["load"], page.done["merge"], page.done["probe"], done):
        event.then(hint, band_inputs, band.band_eta, api_visibility="private", show_progress="hidden")
    for change in (merge.method.change, merge.seed.change):
        change(hint, band_inputs, band.band_eta, api_visibility="private", show_progress="hidden")

    line = h.safe(findings_line)
    for event in (page.done["load"], page.done["probe"]):
        event.then(line, [page.state], band.findings_md, api_visibility="private", show_progress="hidden")

    stored = h.safe(stored_views)
    stored_out = [an.stored_md, an.stored_plot, an.stored_plot_md, an.stored_pick, an.stored_table]

    def fill_experts(session, current):
        session = h.session_of(session)
        experts = session.experts
        value = current if current in experts else (experts[0] if experts else None)
        return gr.update(choices=experts, value=value), pruning_hint(session)

    # after a load, and after a merge (a recipe import loads its own experts, then merges)
    for event in (page.done["load"], page.done["merge"]):
        event.then(h.safe(fill_experts), [page.state, an.expert], [an.expert, an.prune_eta],
                   api_visibility="private").then(
            stored, [page.state, an.expert, an.stored_pick], stored_out, api_visibility="private")
    an.expert.input(stored, [page.state, an.expert, an.stored_pick], stored_out, api_visibility="private")
    an.stored_pick.input(stored, [page.state, an.expert, an.stored_pick], stored_out, api_visibility="private")

    @h.safe
    def on_pruning(session, expert, progress=gr.Progress()):
        session = h.session_of(session)
        curve = run_pruning(session, expert, progress=h.progress_sink(progress))
        return (*pruning_views(session, curve), pruning_hint(session))

    long_step(an.prune_btn, an.prune_stop, on_pruning, [page.state, an.expert],
              [an.prune_plot, an.prune_md, an.prune_eta], "pruning_curve", progress_on=an.prune_progress,
              announce_id="pruning-status")
