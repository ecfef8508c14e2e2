"""Thin glue between Gradio events and merging.workbench: UI values in, component values out.

Every function here is a plain function (no Gradio event context needed) so tests can call
them directly. Errors: :func:`safe` turns a MergeLabError into a readable ``gr.Error`` and any
other exception into a short message (the traceback goes to the server log, never the page).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from components import figures as fg
from merging import workbench as wb
from merging.errors import MergeLabError
from merging.methods import all_specs

log = logging.getLogger("merge_lab.app")

MAX_LAYER_ROWS = 48
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Every event that touches models runs in one concurrency group of size 1: on a 2-core Space two heavy jobs at
# once only slow both down. Others wait in gradio's queue and see their position (show_progress stays on).
HEAVY = dict(concurrency_limit=1, concurrency_id="model-work", show_progress="full")
STATE_TTL = 6 * 3600  # seconds a tab's state lives without being updated (download the history to keep it)


# ---------------------------------------------------------------- session lifetime


def release_state(value) -> None:
    """gr.State delete_callback: free what the session kept in the shared caches."""
    if isinstance(value, wb.Session):
        wb.release_session(value)


def register_client(request, session: wb.Session) -> None:
    """Remember which browser connection shows which session, so closing the tab can free its merges."""
    hash_ = getattr(request, "session_hash", None) if request is not None else None
    if hash_:
        wb.CLIENTS[hash_] = session.id


def on_unload(request: gr.Request):
    """demo.unload: the tab closed; release its merged bodies now (the State itself goes an hour later)."""
    hash_ = getattr(request, "session_hash", None)
    sid = wb.CLIENTS.pop(hash_, None) if hash_ else None
    if sid:
        wb.release_session(sid)


def upload_limit_text() -> str:
    mb = wb.max_upload_bytes() / 1024**2
    return f"{mb / 1024:g} GB" if mb >= 1024 else f"{mb:g} MB"


def launch_max_file_size() -> int:
    """gradio's own upload cap (bytes), the same as the app's."""
    return wb.max_upload_bytes()


def dtype_of(value) -> str:
    if value in DTYPES:
        return DTYPES[value]
    if value in DTYPES.values():
        return value
    raise MergeLabError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}", field="dtype")


def placeholder_table(text: str) -> dict:
    """An empty table's value: one cell saying what fills it (an empty Dataframe shows "1 2 3" headers)."""
    return {"headers": ["nothing here yet"], "data": [[text]]}


PREDICT_HEADERS = ["task", "model", "prediction", "confidence"]


def table_rows(table) -> list:
    """Rows of a Dataframe value (pandas frame, {"data": rows} or a list of rows)."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):
        return table.values.tolist()
    if isinstance(table, dict):
        return list(table.get("data") or [])
    if isinstance(table, (list, tuple)):
        return list(table)
    raise MergeLabError("the table edit could not be read: expected rows of numbers")


# ---------------------------------------------------------------- errors and progress


def safe(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except MergeLabError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # noqa: BLE001 - the page gets a short message, the log the traceback
            log.exception("unexpected error in %s", fn.__name__)
            raise gr.Error(f"Something went wrong ({type(exc).__name__}: {str(exc)[:200]}). "
                           "The details are in the server log.", print_exception=False) from None
    return wrapper


_WORK_LOCK = threading.Lock()  # one model job's thread at a time, even one whose request was already cancelled


def heavy(fn: Callable) -> Callable:
    """Run a model handler so that Stop (or a client's cancel) stops the computation, not just the request.

    Gradio cancels an event by cancelling its asyncio task; a plain function keeps running in its worker
    thread to the end. Here the handler runs in a thread under a :class:`merging.cancel.CancelToken`; when the
    task is cancelled the token is set and the long loops stop at their next checkpoint. The next model job
    waits for that thread to let go (``_WORK_LOCK``), so a cancelled job never runs beside a new one."""
    from merging.cancel import CancelToken, cancellable

    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        if _newer_request_queued(wrapper):
            raise gr.Error("this tab sent the same request again while this one waited in the queue: only the "
                           "newest one runs", print_exception=False)
        token = CancelToken()
        context = contextvars.copy_context()  # gradio's progress and request context live in contextvars

        def work():
            with _WORK_LOCK, cancellable(token):
                token_checkpoint(token)
                return fn(*args, **kwargs)

        future = asyncio.get_running_loop().run_in_executor(None, context.run, work)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())  # a cancelled job's error is expected
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            token.cancel()
            raise
    return wrapper


def _newer_request_queued(wrapper) -> bool:
    """Whether the same tab (session) already queued this same model job again behind this one.

    At most one queued job per tab and endpoint does real work: a client sending /merge a hundred times gets
    the newest one computed and the others answered at once, instead of holding the one model-work slot of the
    machine for everyone else. (The page itself disables the button while its job runs.) Reads gradio's queue;
    if that ever changes shape, every job simply runs."""
    try:
        from gradio.context import LocalContext

        request, blocks = LocalContext.request.get(None), LocalContext.blocks.get(None)
        session = getattr(request, "session_hash", None)
        queue = getattr(getattr(blocks, "_queue", None), "event_queue_per_concurrency_id", {}).get(
            HEAVY["concurrency_id"])
        if not session or queue is None:
            return False
        return any(e.session_hash == session and getattr(e.fn, "fn", None) is wrapper for e in list(queue.queue))
    except Exception:  # noqa: BLE001 - a guard against abuse must never break the job itself
        return False


def token_checkpoint(token) -> None:
    """A job cancelled while it waited for the previous one's thread never starts."""
    if token.cancelled:
        from merging.cancel import Cancelled

        raise Cancelled()


def progress_sink(progress) -> Callable[[float, str], None]:
    if progress is None:
        return lambda f, m: None

    def sink(fraction: float, message: str) -> None:
        try:
            progress(max(0.0, min(1.0, float(fraction))), desc=message)
        except Exception:  # noqa: BLE001 - a progress bar must never break the work
            pass
    return sink


def session_of(state) -> wb.Session:
    return state if isinstance(state, wb.Session) else wb.Session()


# ---------------------------------------------------------------- methods and parameters


def method_choices() -> list[tuple[str, str]]:
    """(label, id) per method; the id (what recipes and the CLI use) follows the name unless the name spells it."""
    def label(spec) -> str:
        return spec.pretty_name if spec.pretty_name.lower().startswith(spec.name.replace("_", " ")) \
            else f"{spec.pretty_name} · {spec.name}"
    return [(label(s), s.name) for s in all_specs()]


def shared_param_specs() -> list:
    """One control per distinct declared parameter name (per-layer ``weight`` lives in the sliders);
    the first declaration found gives the control's kind."""
    seen: dict[str, Any] = {}
    for spec in all_specs():
        for p in spec.params:
            if p.name != wb.WEIGHT and p.name not in seen:
                seen[p.name] = p
    return list(seen.values())


PARAMS = shared_param_specs()
PARAM_NAMES = [p.name for p in PARAMS]


def shared_values(method: str, values: Sequence[Any]) -> dict[str, Any]:
    """The declared parameters of ``method`` from the controls' values (in PARAM_NAMES order), each checked
    against its declared range on the server (API callers bypass the browser's slider limits)."""
    spec = wb.method_spec(wb.check_method(method))
    declared = {p.name for p in spec.params}
    raw = {name: value for name, value in zip(PARAM_NAMES, values) if name in declared and value is not None}
    return wb.check_shared(method, raw)


def param_updates(method: str) -> list[dict]:
    """Show the method's controls (with its own default, range and help), hide the rest."""
    spec = wb.method_spec(method)
    own = {p.name: p for p in spec.params}
    out = []
    for p in PARAMS:
        mine = own.get(p.name)
        if mine is None:
            out.append(gr.update(visible=False))
            continue
        update: dict[str, Any] = dict(visible=True, value=mine.default, info=mine.help)
        if mine.kind in ("float", "int") and _slider_range(mine):
            update.update(minimum=mine.low, maximum=mine.high)
        out.append(gr.update(**update))
    return out


def _slider_range(p) -> bool:
    return p.low is not None and p.high is not None and p.high - p.low <= 10


def cell_slider(key: str) -> dict[str, Any]:
    """Range and step of the per-layer ``key`` sliders, from the declaration the server checks cells
    against (so a calibrated value — APL's weights exceed 2 with four experts — always fits)."""
    spec = wb.cell_param(key)
    return dict(minimum=spec.low, maximum=spec.high, step=0.001 if spec.high - spec.low <= 1 else 0.01)


def method_info(session: wb.Session, method: str) -> str:
    spec = wb.method_spec(method)
    why = wb.method_available(session, method) if session.refs else None
    text = f"**{spec.pretty_name}** — {spec.summary} [paper]({spec.paper_url})"
    if spec.explanation:
        text += f"\n\n{spec.explanation}"
    if why:
        text += f"\n\n⚠️ Not available now: {why}."
    layer_keys = [k for k in wb.PER_LAYER_KEYS if k in {p.name for p in spec.params}]
    text += ("\n\nPer-layer sliders set: " + ", ".join(k.replace("_", " ") for k in layer_keys) if layer_keys
             else "\n\nThis method has no per-layer drop ratio or weight: the sliders are ignored.")
    return text


# ---------------------------------------------------------------- experts


def upload_refs(uploads) -> dict[str, str]:
    """Uploaded expert files → {name: path under the cache root}, each checked (.safetensors, size cap,
    consistent header) before anything opens it."""
    refs: dict[str, str] = {}
    for upload in uploads or []:
        path = Path(getattr(upload, "name", None) or getattr(upload, "path", None) or upload)
        name = wb.derive_name(path.stem)  # a file name is not typed as a name: make it an identifier
        while name in refs:
            name += "-2"
        refs[name] = wb.accept_upload(path, path.name)
    return refs


def load(state, base_ref: str, zoo_tasks: Sequence[str] | None, extra: str, uploads, zoo, progress=None,
         zoo_waiting: str | None = None, tokenizer: str | None = None):
    """``zoo_waiting``: why the demo zoo cannot be used yet (it is still being built), said when the
    request needs it (zoo picks, or nothing given at all). ``tokenizer``: see ``wb.load_experts``."""
    session = session_of(state)
    if zoo is None and zoo_waiting and (zoo_tasks or not ((base_ref or "").strip() or (extra or "").strip()
                                                        or uploads)):
        raise MergeLabError(zoo_waiting)
    refs: dict[str, str] = {}
    if zoo is not None:
        for task in zoo_tasks or []:
            if task in getattr(zoo, "damaged", {}):
                raise MergeLabError(f"Experts from the demo zoo: expert {task!r} is damaged ({zoo.damaged[task]}); "
                                    f"pick the others, or rebuild it with `python -m merging zoo build --name "
                                    f"{zoo.name}`")
            if task not in zoo.experts:
                raise MergeLabError(f"Experts from the demo zoo: zoo '{zoo.name}' has no expert {task!r} "
                                    f"(it has: {', '.join(zoo.tasks)})")
            refs[task] = f"zoo:{zoo.name}/{task}"
    elif zoo_tasks:
        raise MergeLabError("the demo zoo is not ready yet: wait for it, or give experts as paths")
    refs.update(wb.parse_extra_refs(extra))
    refs.update(upload_refs(uploads))
    session = wb.load_experts(session, (base_ref or "").strip(), refs, zoo=zoo, progress=progress_sink(progress),
                              tokenizer=tokenizer)
    note = f"Loaded {len(session.refs)} experts of base `{session.base_ref}`: homology check passed " \
           f"({len(session.layers)} layers: {', '.join(session.layers)})."
    warnings = wb.load_warnings(session)
    if warnings:
        note += "\n\n" + "\n".join(f"⚠️ {w}" for w in warnings)
    return session, session.summary, note, wb.data_status(session)


def attach(state, expert: str, upload, n_fewshot: int):
    session = session_of(state)
    if not upload:
        raise MergeLabError("choose a task file first: CSV or JSONL with `text` and `label` for a classifier, "
                            ".txt or JSONL text for a causal LM")
    path = getattr(upload, "name", upload)
    wb.attach_data(session, expert, path, n_fewshot=wb.check_fewshot(n_fewshot))  # text for LMs, labels otherwise
    models = wb.models_for(session)
    session.summary = wb.expert_rows(session, models, wb.task_vector_stats(models))
    return session, session.summary, wb.data_status(session)


# ---------------------------------------------------------------- importance views


def importance_views(session: wb.Session, method: str, values: Sequence[Any]):
    maps = wb.importance_maps(session)
    drops = wb.plan(session, method, shared_values(method, values)) if session.refs else {}
    heat = fg.importance_heatmaps(maps, {e: v[wb.DROP] for e, v in drops.items()})
    heat_md = fg.heatmap_summary(maps) if maps else "No importance yet."
    level = "module"
    fid = wb.fidelity_data(session, level)
    if fid is None:
        level = "layer"
        fid = wb.fidelity_data(session, level)
    if fid:
        fid_fig = fg.fidelity_figure(fid[0], fid[1], fid[2], level)
        fid_md = (f"Gradient vs exact at {level} level: Spearman ρ = {fg.spearman(fid[0], fid[1]):.2f} over "
                  f"{len(fid[0])} {level}s (1 = the cheap gradient ranks parts exactly like the intervention).")
        per_expert = wb.fidelity_by_expert(session)
        if per_expert:
            fid_md += "\n\n" + fg.fidelity_by_expert_text(*per_expert)
    else:
        fid_fig = fg.empty_figure("Compute importance in both modes (gradient and exact, same intervention) "
                                  "to compare them.")
        fid_md = "Needs both an exact and a gradient run with the same intervention."
    if session.importance is not None and "layer" in session.importance.signed:
        layers, imp, norms = wb.magnitude_data(session)
        mag_fig, mag_md = fg.magnitude_figure(layers, imp, norms), fg.magnitude_summary(imp, norms)
    else:
        mag_fig, mag_md = fg.empty_figure("No importance yet."), ""
    return heat, heat_md, fid_fig, fid_md, mag_fig, mag_md


def layer_views(state):
    """(per-expert layer chart, its answer in words) beside the heatmap: which layer matters most."""
    session = session_of(state)
    layers, layer, modules = wb.layer_importance(session)
    return fg.layer_importance_figure(layers, layer, modules), wb.layer_answer(session)


def estimate_lines(state, mode: str, scope: str | None, n_fewshot=None) -> tuple[str, str, str, str]:
    """(importance, compare, probe, sweep) time estimates for this machine, shown under their buttons.

    Measures a calibration pass first when this process has no rate yet (about a second of model work: call
    it from a model-work event)."""
    session = session_of(state)
    n = wb.check_fewshot(n_fewshot if n_fewshot is not None else wb.DEFAULT_FEWSHOT)
    if session.refs and not session.missing_data():
        wb.calibrate(session, n)
    lines = wb.step_estimates(session, mode or "gradient", scope, n=n)
    return lines["importance"], lines["compare"], lines["probe"], lines["sweep"]


def merge_in_use(state) -> str:
    """Which merge Export and Try a sentence use (the last one), with its settings."""
    session = session_of(state)
    if not session.last_label:
        return "Export and **Try a sentence** use the last merge: none yet (press **Merge**)."
    settings = session.history[-1]["settings"] if session.history else ""
    tries = "Try a prompt" if wb.is_lm_session(session) else "Try a sentence"
    return f"Export and **{tries}** use **{session.last_label}**, the last merge ({settings})."


def export_note(session: wb.Session, path) -> str:
    """The export line: which merge, and the size the download box shows for the same file."""
    size = wb.size_text(Path(path).stat().st_size)
    return (f"Exported **{session.last_label}** as `{Path(path).name}` ({size}, stored zip). "
            "Old exports are deleted after an hour.")


GUIDE_CLASSES = ["ml-next"]


def guide_views(state, done: str | None) -> list:
    """The guide's line after step ``done`` and the five buttons' highlight (the next one only). While the walk
    runs the line floats at the bottom of the window, so "what you just saw" is read where the step was."""
    session = session_of(state)
    upcoming = wb.next_step(done)
    buttons = [gr.update(elem_classes=GUIDE_CLASSES if step == upcoming else []) for step in wb.GUIDE_STEPS]
    line = gr.update(value=wb.guide_line(session, done), elem_classes=["ml-guide-on"] if upcoming else [])
    return [line, *buttons]


def hidden_choices(session: wb.Session):
    by_layer = wb.unit_module_choices(session)
    layers = [k for k in session.layers if k in by_layer]
    layer = layers[len(layers) // 2] if layers else None
    modules = by_layer.get(layer, [])
    return layers, layer, modules, (modules[0] if modules else None)


def hidden_figure(state, expert: str | None, module: str | None):
    session = session_of(state)
    if session.importance is None or not module or not expert:
        return fg.empty_figure("Compute importance to see hidden-state units."), ""
    if expert not in session.importance.experts:
        raise MergeLabError(f"Expert: no importance for {expert!r} (experts: {', '.join(session.importance.experts)})")
    scores, layers, rows = wb.hidden_view(session, expert, module)
    binned = fg.bin_units(rows)
    colour = fg.colour_map(session.experts or list(session.importance.experts)).get(expert, fg.GREYS[0])
    return (fg.hidden_state_figure(np.abs(scores), binned, layers, module, colour=colour),
            fg.hidden_summary(scores, f"{expert} · {module}"))


# ---------------------------------------------------------------- merge plan views


def slider_updates(session: wb.Session, expert: str | None, method: str, shared: dict) -> list[dict]:
    """Updates for the MAX_LAYER_ROWS row groups, then drop sliders, then weight sliders."""
    layers = session.layers
    values = wb.plan(session, method, shared) if session.refs else {}
    rows, drops, weights = [], [], []
    for i in range(MAX_LAYER_ROWS):
        if i < len(layers) and expert in values:
            layer = layers[i]
            mark_d = " ✎" if wb.is_overridden(session, expert, wb.DROP, layer) else ""
            mark_w = " ✎" if wb.is_overridden(session, expert, wb.WEIGHT, layer) else ""
            rows.append(gr.update(visible=True))
            drops.append(gr.update(value=round(values[expert][wb.DROP][layer], 4),
                                   label=f"layer {layer} · drop ratio{mark_d}"))
            weights.append(gr.update(value=round(values[expert][wb.WEIGHT][layer], 4),
                                     label=f"layer {layer} · weight{mark_w}"))
        else:
            rows.append(gr.update(visible=False))
            drops.append(gr.update())
            weights.append(gr.update())
    return rows + drops + weights


def plan_views(session: wb.Session, method: str, shared: dict):
    """(drop table, weight table, profile figure, profile summary, overrides markdown, conflict fig, conflict md)."""
    if not session.refs:
        empty = fg.empty_figure("Press Load experts to fill this.")
        table = placeholder_table("Press Load experts to fill this.")
        return table, table, empty, "", "", empty, ""
    _, drop_rows = wb.table_rows(session, wb.DROP, method, shared)
    _, weight_rows = wb.table_rows(session, wb.WEIGHT, method, shared)
    values = wb.plan(session, method, shared)
    marks = {e: {k: set(ls) for k, ls in keys.items()} for e, keys in session.overrides.items()}
    overrides = wb.override_list(session, method, shared)
    profile = fg.layer_profile_figure(session.layers, values, marks)
    profile_md = fg.profile_summary(session.layers, values, len(overrides))
    if overrides:
        lines = [f"- ✎ **{o['expert']}** layer {o['layer']} {o['key'].replace('_', ' ')}: {o['value']:.3f}"
                 + (f" (suggested {o['suggested']:.3f})" if o["suggested"] is not None else "") for o in overrides[:40]]
        if len(overrides) > 40:
            lines.append(f"- … and {len(overrides) - 40} more")
        over_md = "**Your overrides** (recorded in the recipe beside the suggestion):\n" + "\n".join(lines)
    else:
        over_md = f"No overrides: every cell follows {wb.suggestion_source(session, method, shared)}."
    layers, before, after = wb.conflict_data(session, method, shared)
    conflict = fg.conflict_figure(layers, before, after)
    if before:
        worst = int(np.argmax(before))
        conflict_md = (f"Highest sign conflict at layer {layers[worst]}: {before[worst]:.0%} of entries before "
                       f"dropping, about {after[worst]:.0%} expected after.")
    else:
        conflict_md = ""
    drop_df = {"headers": ["expert", *session.layers], "data": drop_rows}
    weight_df = {"headers": ["expert", *session.layers], "data": weight_rows}
    return drop_df, weight_df, profile, profile_md, over_md, conflict, conflict_md


# ---------------------------------------------------------------- probe views


def _base_metrics(report) -> dict | None:
    return next((dict(r.metrics) for r in report.rows if r.name == "base"), None)


def comparison_views(result: wb.Comparison):
    """(figure, one-line summary) of a :func:`wb.compare_interventions` result."""
    fig = fg.comparison_figure(result.layers, result.restore, result.ablate, result.agreement, result.stability)
    text = fg.comparison_summary(result.agreement, result.stability, result.draws, result.draw_size)
    text += f" ({result.seconds:.1f} s{', partly from cache' if result.hits else ''}.)"
    return fig, text


PROBE_LABELS = {"accuracy": ("Probe results", "Probe accuracy"),
                "perplexity": ("Probe results: loss and perplexity per task on its held-out text — lower is better",
                               "Probe perplexity per task (lower is better)")}


@safe
def try_area(state):
    """After a load: Try a prompt for causal-LM experts, Try a sentence for classifiers (visibility of each,
    the prompt's expert choices), and the probe table's and chart's labels for the metric those experts get."""
    session = session_of(state)
    lm = bool(session.refs) and wb.is_lm_session(session)
    experts = session.experts
    table, chart = PROBE_LABELS["perplexity" if lm else "accuracy"]
    return (gr.update(visible=not lm), gr.update(visible=lm),
            gr.update(choices=experts, value=experts[0] if experts else None),
            gr.update(label=table), gr.update(label=chart))


def probe_views(session: wb.Session, report):
    headers, rows = report.table()
    tasks = list(report.tasks)
    metric = "perplexity" if report.kind == "causal_lm" else "accuracy"
    bars_rows = [(r.name, {t: r.metrics.get(t, {}).get(metric) for t in tasks}) for r in report.rows]
    fig = fg.probe_bars(tasks, bars_rows, metric=metric, experts=session.experts or tasks)
    summary = fg.probe_summary(tasks, bars_rows, metric=metric)
    last = session.history[-1] if session.history else None
    flags = wb.below_base(last.get("metrics"), _base_metrics(report)) if last else []
    if flags and metric == "perplexity":
        summary += " " + "; ".join(f"⚠ **{t}** perplexity {v:.3f} is above the base {b:.3f}" for t, v, b in flags) + \
            " (a mean over tasks hides this)."
    elif flags:
        summary += " " + "; ".join(f"⚠ **{t}** {acc:.3f} is below the base {b:.3f}" for t, acc, b in flags) + \
            " (a mean over tasks hides this)."
    if report.meta.get("unavailable"):
        summary += f" Not probed (no folder or task data): {', '.join(report.meta['unavailable'])}."
    h_headers, h_rows = wb.history_rows(session)
    return {"headers": headers, "data": rows}, fig, summary, {"headers": h_headers, "data": h_rows}


# ---------------------------------------------------------------- recipe import (ours or a mergekit config)

MAX_RECIPE_BYTES = 1 << 20  # a recipe is a page of YAML; anything larger is the wrong file


def recipe_file_text(upload) -> str:
    """The text of an uploaded recipe file (.yaml / .yml), checked for size before it is read."""
    from merging.io.recipe import read_recipe_text

    if not upload:
        return ""
    path = Path(getattr(upload, "name", None) or getattr(upload, "path", None) or upload)
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise MergeLabError(f"recipe file {path.name} is larger than {MAX_RECIPE_BYTES // 1024} KB: a recipe is a "
                            "short YAML file (recipe.yaml from an export, or a mergekit config)", field="recipe")
    return read_recipe_text(path)


def parse_recipe(text: str, zoo=None):
    """A pasted recipe — Merge Lab's own (``method:``) or a mergekit config (``merge_method:``) — as a Recipe.

    A mergekit gradient needs the model's layers: the base and experts it names are opened (and homology
    checked) to find them. Errors keep the field and YAML line the library found."""
    from merging.io.mergekit_import import from_mergekit_yaml, is_mergekit_yaml
    from merging.io.recipe import Recipe

    text = text or ""
    if not text.strip():
        raise MergeLabError("paste a recipe into the box (or upload recipe.yaml / a mergekit config) first",
                            field="recipe")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_RECIPE_BYTES:
        raise MergeLabError(f"the recipe is larger than {MAX_RECIPE_BYTES // 1024} KB: is this the right text?",
                            field="recipe")
    if is_mergekit_yaml(text):
        def layers(draft):
            opened = wb.load_experts(wb.Session(), draft.base, {e.name: e.model for e in draft.experts}, zoo=zoo)
            return opened.layers
        return from_mergekit_yaml(text, layers=layers)
    return Recipe.from_yaml(text)


def recipe_error(exc: MergeLabError) -> MergeLabError:
    """The library's message with where it is: "The recipe cannot be used (field experts[1].parameters): …
    (line 4)" — the field named once, the YAML line last (MergeLabError's own form)."""
    message = super(MergeLabError, exc).__str__()
    field = f" (field {exc.field})" if exc.field and exc.field not in message else ""
    return MergeLabError(f"The recipe cannot be used{field}: {message}", field=exc.field, line=exc.line,
                         kind=exc.kind)


def recipe_page_values(recipe) -> dict[str, Any]:
    """The page's shared controls for a recipe: one value per declared parameter (per-layer drop ratio and
    weight go to the cells instead). A value the page can only show as one number, given per layer or per
    expert, is refused with the field and the way to merge it anyway (the command line)."""
    spec = wb.method_spec(recipe.method)
    cli = "merge it with `python -m merging merge recipe.yaml --out DIR`, which takes every form"
    shared: dict[str, Any] = {}
    for p in spec.params:
        if p.name not in recipe.parameters or p.name == wb.WEIGHT:
            continue
        value = recipe.parameters[p.name]
        if isinstance(value, (dict, list)):
            if p.name not in wb.PER_LAYER_KEYS:
                raise MergeLabError(f"the page sets {p.name.replace('_', ' ')} as one value for every layer; this "
                                    f"recipe gives it per layer: {cli}", field=f"parameters.{p.name}")
            value = value.get("default", p.default) if isinstance(value, dict) else p.default
        shared[p.name] = value
    for index, expert in enumerate(recipe.experts):
        for key in expert.parameters:
            if key not in wb.PER_LAYER_KEYS:
                raise MergeLabError(f"the page sets {key.replace('_', ' ')} once for all experts; this recipe gives "
                                    f"expert {expert.name!r} its own: {cli}", field=f"experts[{index}].parameters.{key}")
    return wb.check_shared(recipe.method, shared)


def apply_recipe(session: wb.Session, recipe, shared: dict[str, Any]) -> wb.Session:
    """Lay the recipe's per-layer drop ratios and weights over the page's suggestion as cell overrides, so
    every slider and table shows the recipe's value and the plan equals the recipe's."""
    spec = wb.method_spec(recipe.method)
    declared = {p.name for p in spec.params}
    wanted = wb.layer_values(recipe.method, session.experts, session.layers,
                             {k: v for k, v in recipe.parameters.items() if k in declared}, recipe.expert_params())
    shown = wb.suggestion(session, recipe.method, shared)
    session.overrides = {}
    for expert in session.experts:
        for key in wb.PER_LAYER_KEYS:
            if key not in declared:
                continue
            for layer in session.layers:
                value = wanted[expert][key][layer]
                if abs(value - shown[expert][key][layer]) > 1e-9:
                    wb.set_cell(session, expert, layer, key, value, recipe.method)
    session.method, session.shared, session.seed = recipe.method, dict(shared), recipe.seed
    return session


def import_recipe(state, text: str, zoo=None, progress=None):
    """Paste → page: parse the recipe, open the models it names (every one must resolve: ``zoo:``, a folder,
    a .safetensors file), and fill the session with its method, values and seed.
    Returns (session, recipe, shared values for the page's controls)."""
    try:
        recipe = parse_recipe(text, zoo)
        shared = recipe_page_values(recipe)
    except MergeLabError as exc:
        raise recipe_error(exc) from None
    refs = {e.name: e.model for e in recipe.experts}
    try:
        session = wb.load_experts(session_of(state), recipe.base, refs, zoo=zoo, progress=progress_sink(progress))
    except MergeLabError as exc:
        named = ", ".join(f"{name} = {ref}" for name, ref in [("base", recipe.base), *refs.items()])
        ours = f"this server's are zoo:{zoo.name}/TASK" if zoo is not None else "zoo:NAME/TASK"
        raise MergeLabError(f"The models this recipe names could not all be opened: {str(exc).rstrip('.')}. It "
                            f"names {named}; each must be a demo zoo model ({ours}), a folder or a .safetensors "
                            "file this server can read.", field=exc.field) from None
    return apply_recipe(session, recipe, shared), recipe, shared


def recipe_param_updates(method: str, shared: dict[str, Any]) -> list[dict]:
    """The method's controls (visible, with its ranges) showing the recipe's values."""
    updates = param_updates(method)
    for update, name in zip(updates, PARAM_NAMES):
        if name in shared:
            update["value"] = shared[name]
    return updates


def dtype_label(dtype: str) -> str:
    return next((label for label, name in DTYPES.items() if name == dtype), "fp32")
