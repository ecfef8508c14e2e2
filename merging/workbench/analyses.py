"""The "Where does APL help?" analyses for a session: one expert's pruning curve.

The page asks the APL paper's first question of the session's own models: if one expert alone loses a
fraction p of its delta, does dropping guided by importance keep its own task better than random or
magnitude dropping? Each point is a registered method merged by the engine on that expert alone
(:mod:`merging.apl.pruning`) and scored by the session's probe on the expert's own task.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from ..apl.pruning import DEFAULT_FRACTIONS, PruningCurve, check_grid, measure_curve, needs_importance, one_expert_set
from ..cancel import CancelToken, cancellable, current_token
from ..errors import MergeLabError
from .cache import CACHE, RESULTS, Models, content_hash
from .experts import models_for, tokenizer_for
from .limits import Progress, no_progress
from .session import Session

#: importance for the curve: gradient (one backward pass gives the layer level the calibration reads and the
#: hidden-unit level the within-layer rates read), restore, as the page's default importance run
_IMPORTANCE_LEVELS = ["model", "layer", "module", "hidden"]


def pruning_curve(session: Session, expert: str, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  strategies: Sequence[str] | None = None, seeds: Sequence[int] = (0, 1, 2),
                  progress: Progress | None = None, cancel: CancelToken | None = None) -> PruningCurve:
    """``expert``'s own-task probe score after dropping each fraction of its delta, per strategy and seed.

    Uses the session's loaded base and experts, the expert's few-shot data (APL's importance, drawn with
    the session's seed and computed once per expert and draw, cached like the page's importance) and its
    probe data. Classifier experts are scored by accuracy, causal LMs by perplexity (lower is better)."""
    progress = progress or no_progress
    fr, sd, chosen = check_grid(fractions, seeds, strategies)
    if expert not in session.refs:
        raise MergeLabError(f"no expert '{expert}' is loaded: choose one of {', '.join(session.refs) or '(none)'}",
                            field="expert")
    data = session.data.get(expert)
    if data is None or not data.probe or not data.fewshot:
        raise MergeLabError(f"expert '{expert}' needs task data with few-shot and held-out rows for its pruning "
                            "curve: attach a task file to it first", field="expert")
    models = models_for(session)
    one = one_expert_set(models.expert_set, expert)
    with cancellable(cancel or current_token() or CancelToken()), models.lock:  # the page's Stop reaches it
        score, metric, higher, base_score, expert_score = _scorer(session, models, one, expert)
        importance = None
        if any(needs_importance(s) for s in chosen):
            progress(0.02, f"importance of {expert} (gradient, once per expert and few-shot draw)")
            importance = _importance(session, models, one, expert)
        return measure_curve(one, expert, session.tasks.get(expert) or expert, score, metric=metric,
                             higher_is_better=higher, base_score=base_score, expert_score=expert_score,
                             fractions=fr, seeds=sd, strategies=[s.id for s in chosen],
                             importance_for=(lambda _seed: importance) if importance is not None else None,
                             progress=lambda f, m: progress(0.05 + 0.95 * f, m))


def _importance(session: Session, models: Models, one, expert: str):
    """Gradient importance of the expert alone on its seeded few-shot draw, cached across sessions."""
    from ..apl.importance import compute_importance, draw_fewshot

    examples, indices = draw_fewshot(session.data[expert].fewshot, int(session.fewshot_n), session.seed)
    key = content_hash("pruning-importance", models.fingerprint, expert, examples, _IMPORTANCE_LEVELS, session.seed)

    def compute():
        return compute_importance(one, {expert: examples}, tokenizer_for(models), mode="gradient",
                                  level=_IMPORTANCE_LEVELS, seed=session.seed, fewshot_indices={expert: indices})

    result, _ = RESULTS.get_or_compute("importance", key, compute)
    CACHE.trim()
    return result


def _scorer(session: Session, models: Models, one, expert: str):
    """(score of a body, metric, higher is better, base score, expert score) on the expert's own probe data."""
    from .lm import is_lm_session

    probe = list(session.data[expert].probe)
    if is_lm_session(session):
        from ..lm.probe import LMProber

        prober = LMProber(one, {expert: probe}, tokenizer_for(models))
        reference = prober.reference()
        return ((lambda body: float(prober.probe_body(body)[expert]["perplexity"])), "perplexity", False,
                float(reference.row("base")[expert]["perplexity"]), float(reference.row(expert)[expert]["perplexity"]))
    from ..zoo.probe import Prober

    base_root = getattr(models.expert_set.base, "root", None)
    folder = session.folders.get(expert)
    if base_root is None or not folder or not (Path(folder) / "model.safetensors").is_file():
        raise MergeLabError(f"expert '{expert}' cannot be probed: its pruning curve needs the base and the expert "
                            "as model folders (model.safetensors and, for the expert, its classifier head)",
                            field="expert")
    prober = Prober(Path(base_root), {expert: Path(folder)}, {expert: probe})
    reference = prober.reference()
    return ((lambda body: float(prober.probe_body(body).metrics[expert]["accuracy"])), "accuracy", True,
            float(reference.row("base").metrics[expert]["accuracy"]),
            float(reference.row(expert).metrics[expert]["accuracy"]))
