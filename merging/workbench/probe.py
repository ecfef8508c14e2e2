"""The Probe step: base, experts and merges on every task; the drop sweep; trying one sentence."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..errors import MergeLabError
from .budget import check_memory
from .cache import CACHE, RESULTS, Models, content_hash
from .estimates import record, time_left
from .experts import models_for, tokenizer_for
from .limits import DROP, MAX_SENTENCE_CHARS, SWEEP_METHODS, Progress, no_progress
from .merge import merged_result, method_available, settings_for
from .prepare import snapshot
from .session import Session


def _probe_inputs(session: Session, models: Models) -> tuple[Path, dict[str, Path], dict[str, list], list[str]]:
    """(base folder, expert folders, probe sets, experts left out) of the session's experts that have a
    folder with weights and probe data: what the prober takes."""
    base_root = getattr(models.expert_set.base, "root", None)
    if base_root is None or not Path(base_root).is_dir():
        raise MergeLabError("the probe needs the base as a model folder (config.json + model.safetensors)")
    experts, sets, unavailable = {}, {}, []
    for name in session.refs:
        folder = session.folders.get(name)
        if folder and (Path(folder) / "model.safetensors").is_file() and name in session.data \
                and session.data[name].probe:
            experts[name], sets[name] = Path(folder), list(session.data[name].probe)
        else:
            unavailable.append(name)
    if not experts:
        raise MergeLabError("no expert can be probed: the probe needs each expert as a folder with "
                            "model.safetensors and a classifier head, plus task data")
    return Path(base_root), experts, sets, unavailable


def _probe_key(experts: dict[str, Path], sets: dict[str, list]) -> list:
    return [sorted((t, str(p)) for t, p in experts.items()), sets]


def prober_for(session: Session, models: Models):
    """The selection's prober, built once: reference rows come from the experts' zoo when it wrote them at
    build (:func:`merging.zoo.probe.write_zoo_reference`), else from this machine's probe cache, else are
    computed (and cached there)."""
    from ..zoo.probe import Prober, zoo_reference_dir
    from ..zoo.zoo import zoo_root_of

    base, experts, sets, unavailable = _probe_inputs(session, models)
    key = content_hash(*_probe_key(experts, sets))
    with models.lock:
        if models.prober is None or models.prober_key != key:
            cache_dir = Path(tempfile.gettempdir()) / "merge-lab-probe" / "probe_cache"
            zoos = {root for root in map(zoo_root_of, experts.values()) if root is not None}
            models.prober = Prober(base, experts, sets, cache_dir=cache_dir,
                                   read_dirs=sorted(map(zoo_reference_dir, zoos)), first_look=first_look_positions(sets))
            models.prober_key = key
    return models.prober, unavailable


FIRST_LOOK_ROWS = 64  # probe examples per task the merged model is scored on first, shown while the rest run
FIRST_LOOK_SEED = 0  # the seed of their draw: fixed, so every merge of a selection gets the same first look


def first_look_positions(sets: dict[str, list]) -> dict[str, list[int]]:
    """Each task's first-look examples: a seeded draw of :data:`FIRST_LOOK_ROWS` (none when the set is no
    larger — then the full probe is as quick). A step of a slider changes the merge a little; the first look
    tells, in a third of the probe's time, which way the merge moved on the same texts, before the full probe
    says by how much."""
    from ..io.taskdata import draw_fewshot

    return {t: draw_fewshot(rows, FIRST_LOOK_ROWS, FIRST_LOOK_SEED)[1] for t, rows in sets.items()
            if len(rows) > FIRST_LOOK_ROWS}


def first_look_line(session: Session, metrics: dict[str, dict[str, float]]) -> str:
    """The progress line of a first look: mean accuracy on the first-look texts and the change from the
    session's last probed merge on the same texts, where that probe had a first look too."""
    n = len(metrics)
    mean = 100 * sum(m["accuracy"] for m in metrics.values()) / max(n, 1)
    line = (f"first look, {FIRST_LOOK_ROWS} examples per task (seed {FIRST_LOOK_SEED}): mean accuracy "
            f"{mean:.1f}")
    label, previous = _last_probed_first_look(session)
    if previous is not None and set(previous) == set(metrics):
        before = 100 * sum(previous[t]["accuracy"] for t in metrics) / max(n, 1)
        line += f", {mean - before:+.1f} points on the same texts since {label}"
    return line + "; the full probe is running"


def _last_probed_first_look(session: Session) -> tuple[str | None, dict | None]:
    """(label, first-look metrics) of the newest earlier merge of this session that was probed; no metrics
    where its probe had no first look (its result came from the cache), so nothing older stands in for it."""
    for item in reversed(session.history):
        key = item.get("key")
        if key != session.merge_key and (item.get("metrics") or key in session.first_looks):
            return item.get("label"), session.first_looks.get(key)
    return None, None


def reference_ready(session: Session) -> bool:
    """Whether the first probe finds base and expert rows done (in this process, or on disk from the zoo's build
    or an earlier run), so that only the merge runs."""
    from .lm import is_lm_session

    if not session.refs or is_lm_session(session):
        return False
    try:
        models = models_for(session)
        prober, _ = prober_for(session, models)
    except MergeLabError:
        return False
    return prober._reference is not None or prober.reference_file() is not None


def run_probe(session: Session, progress: Progress | None = None):
    """Probe base, experts and the latest merge; returns the report with every merge of the session.

    The merged row is a pure function of (merge, probe sets): cached across sessions by content hash.
    Causal-LM experts get loss and perplexity per task instead (:func:`.lm.run_lm_probe`), so the page,
    the history and every caller of this one step see perplexity rows for an LM session."""
    from ..zoo.probe import ProbeReport, ProbeRow
    from .lm import is_lm_session, run_lm_probe

    if is_lm_session(session):
        return run_lm_probe(session, progress)
    progress = progress or no_progress
    models = models_for(session)
    if session.merge_key is None:
        raise MergeLabError("no merge yet in this session: press Merge first")
    check_memory(models, "probe")
    _, experts, sets, _ = _probe_inputs(session, models)
    probe_key = content_hash("probe", session.merge_key, *_probe_key(experts, sets))
    prober, unavailable = prober_for(session, models)
    progress(0.1, "base and experts (computed once, then cached)")

    def first_look(row) -> None:
        session.first_looks[session.merge_key] = row.metrics
        progress(0.5, first_look_line(session, row.metrics))

    def probe_merge():
        result = merged_result(session)
        name = session.last_label or "merged"
        with models.lock:
            progress(0.3, "the merged model")
            if result.task_bodies:  # one body per task (EMR): each task scored on its own body
                return dict(prober.probe_task_bodies(result.task_bodies, name=name).metrics)
            return dict(prober.probe_body(result.tensors, name=name, on_first_look=first_look).metrics)

    clock = time.perf_counter()
    with models.lock:
        computed_before = prober.reference_computed
        reference = prober.reference()
        computed = prober.reference_computed and not computed_before
    if session.reference is None and computed:  # base and experts on every probe set: this machine's probe rate
        record("example", time.perf_counter() - clock, sum(len(s) for s in sets.values()) * (1 + len(experts)),
               "the last first probe")
    clock = time.perf_counter()
    metrics, hit = RESULTS.get_or_compute("probe", probe_key, probe_merge)
    if session.reference is None and not computed and not hit:  # the rows were read: the merge alone ran in full
        record("example", time.perf_counter() - clock, sum(len(s) for s in sets.values()), "the last first probe")
    session.reference = reference
    for item in reversed(session.history):
        if item.get("key") == session.merge_key or "key" not in item:
            item["metrics"] = metrics
            break
    report = ProbeReport(tasks=list(reference.tasks), rows=list(reference.rows), meta=dict(reference.meta))
    for item in session.history:
        if item.get("metrics") and set(item["metrics"]) <= set(reference.tasks):
            report.add(ProbeRow(name=item["label"], metrics=item["metrics"]))
    report.meta["unavailable"] = unavailable
    CACHE.trim()
    progress(1.0, "probe done")
    return report


def history_rows(session: Session) -> tuple[list[str], list[list]]:
    """The session's merges side by side (see :func:`.history.history_table`)."""
    from .history import history_table

    return history_table(session)


SWEEP_PROBE_ROWS = 64  # probe examples per task each sweep point is scored on (a seeded draw of the probe set)


def sweep_prober(session: Session, models: Models):
    """A prober of the session's experts on at most :data:`SWEEP_PROBE_ROWS` probe examples per task (drawn with
    the session's seed), built once per selection: a sweep point changes every layer, so its probe is a full
    forward over every text, and the sweep runs fifteen of them — on a third of the texts it is a curve in under
    a minute instead of several, each point still scored on the same examples."""
    from ..io.taskdata import draw_fewshot
    from ..zoo.probe import Prober

    base, experts, sets, _ = _probe_inputs(session, models)
    subsets = {t: draw_fewshot(rows, SWEEP_PROBE_ROWS, session.seed)[0] for t, rows in sets.items()}
    key = content_hash("sweep", *_probe_key(experts, subsets))
    with models.lock:  # kept beside the selection's models (and gone with them when the cache drops them)
        found = getattr(models, "sweep_prober", None)
        if found is None or found[0] != key:
            found = models.sweep_prober = (key, Prober(base, experts, subsets))
    return found[1]


def drop_sweep(session: Session, ratios: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
               methods: Sequence[str] = SWEEP_METHODS, progress: Progress | None = None) -> dict[str, list[float]]:
    """Mean probe accuracy vs drop ratio for a few sparsifying methods (no overrides; methods with a
    ``prepare`` prepared again at each ratio), each point on the same :data:`SWEEP_PROBE_ROWS` probe examples
    per task (:func:`sweep_prober`)."""
    from .lm import is_lm_session

    if is_lm_session(session):
        raise MergeLabError("the drop sweep plots probe accuracy of classifier experts; for causal-LM experts, merge "
                            "at a few drop ratios and compare their perplexity in the session history")
    progress = progress or no_progress
    models = models_for(session)
    prober = sweep_prober(session, models)
    methods = [m for m in methods if method_available(session, m) is None]
    out: dict[str, list[float]] = {}
    total = max(1, len(methods) * len(ratios))
    done = 0
    from ..engine import MergeEngine

    engine = MergeEngine(models.expert_set, cache=False, device=models.engine.device)  # the page's merge device
    started = time.perf_counter()
    for method in methods:
        out[method] = []
        for ratio in ratios:
            progress(done / total, f"sweep · {method} at drop ratio {ratio} ({done + 1} of {total})"
                     + time_left(started, done, total))
            # no overrides; a method with a prepare (APL) prepares again at this drop ratio
            snap = snapshot(session, method, {DROP: float(ratio)}, session.seed, overrides={})
            settings, _ = settings_for(session, snap)
            with models.lock:
                result = engine.merge(settings)
                row = prober.probe_body(result.tensors, name=f"sweep {method} {ratio}")
            out[method].append(row.mean("accuracy"))
            done += 1
    record("sweep", time.perf_counter() - started, done, "the last sweep")
    progress(1.0, "sweep done")
    return out




def predict(session: Session, text: str, expert: str | None = None) -> list[list]:
    """Rows (task, model, predicted label, confidence) for base, the task's expert and the merge."""
    from transformers import AutoModel

    text = (text or "").strip()
    if not text:
        raise MergeLabError("type a sentence first")
    if len(text) > MAX_SENTENCE_CHARS:
        raise MergeLabError(f"Try a sentence: at most {MAX_SENTENCE_CHARS} characters, got {len(text)}")
    from .lm import is_lm_session

    if is_lm_session(session):
        raise MergeLabError("these experts are causal LMs: they continue text, they do not label it — use "
                            "Try a prompt")
    models = models_for(session)
    tokenizer = tokenizer_for(models)
    base_root = getattr(models.expert_set.base, "root", None)
    if base_root is None:
        raise MergeLabError("predictions need the base as a model folder")
    result = merged_result(session)
    tasks = [expert] if expert else list(session.refs)
    rows = []
    with models.lock:
        if models.predictor is None:
            models.predictor = AutoModel.from_pretrained(str(base_root)).eval()
        model = models.predictor
        names = dict(model.state_dict())
        encoded = tokenizer([text], return_tensors="pt", truncation=True, max_length=64)
        encoded = {k: v for k, v in encoded.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

        def pooled(state: Mapping[str, torch.Tensor]) -> torch.Tensor:
            with torch.no_grad():
                for name, tensor in names.items():
                    if name in state:
                        tensor.copy_(state[name].to(tensor.dtype))
                out = model(**encoded)
                return out.pooler_output if getattr(out, "pooler_output", None) is not None \
                    else out.last_hidden_state[:, 0]

        base_state = {n: models.expert_set.base.get(n) for n in names if n in models.expert_set.base.tensors}
        bodies = {"base": base_state, "merged": result.tensors}
        pools = {"base": pooled(base_state)}
        if not result.task_bodies:
            pools["merged"] = pooled(result.tensors)
        for task in tasks:
            expert_obj = models.expert_set.experts[task]
            head = expert_obj.head()
            weight = next((v for k, v in head.items() if k.endswith("weight")), None)
            bias = next((v for k, v in head.items() if k.endswith("bias")), None)
            if weight is None or weight.dim() != 2:
                rows.append([task, "—", "no classifier head", None])
                continue
            own = {n: expert_obj.get(n) for n in names if n in models.expert_set.layout.tensors}
            pools[task] = pooled(own)
            if result.task_bodies:  # one body per task: the task's "merged" prediction is its own body's
                pools["merged"] = pooled(result.body_for(task))
            labels = session.data[task].labels if task in session.data else []
            for which in ("base", task, "merged"):
                logits = pools[which] @ weight.float().T + (bias.float() if bias is not None else 0)
                prob = torch.softmax(logits, -1)[0]
                k = int(prob.argmax())
                label = labels[k] if k < len(labels) else f"label {k}"
                rows.append([task, "expert" if which == task else which, label, round(float(prob[k]), 3)])
        del bodies
    return rows


