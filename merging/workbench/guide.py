"""Guided first merge: the five steps walked one at a time, each followed by one line of what it showed.

The page highlights the next button; after each step :func:`what_you_saw` says in one line what the step
just produced, written from the session's own numbers (so a class sees a result, not a promise).
"""

from __future__ import annotations

from .session import Session

STEPS = ("load", "importance", "merge", "probe", "export")
LABELS = {"load": "Load experts", "importance": "Compute importance", "merge": "Merge", "probe": "Run probe",
          "export": "Export"}


def next_step(done: str | None) -> str | None:
    """The step after ``done`` (None: the walk starts at the first; after the last, None)."""
    if done is None:
        return STEPS[0]
    index = STEPS.index(done) + 1
    return STEPS[index] if index < len(STEPS) else None


def what_you_saw(session: Session, step: str) -> str:
    """One line on what ``step`` just produced, from the session's numbers."""
    if step == "load":
        return (f"{len(session.refs)} experts ({', '.join(session.refs)}) of one base passed the homology check: "
                f"same architecture, {len(session.layers)} layers.")
    if step == "importance":
        from .views import layer_importance

        layers, shares, _ = layer_importance(session)
        if not layers:
            return "importance is computed for every expert."
        tops = [f"layer {layers[max(range(len(layers)), key=s.__getitem__)]} for {e}" for e, s in shares.items()]
        return "the part of each expert's change that matters most for its own task: " + ", ".join(tops) + "."
    if step == "merge":
        item = session.history[-1] if session.history else {}
        return f"{item.get('label', 'the merge')} is built ({item.get('settings', '')})."
    if step == "probe":
        from .history import base_metrics, below_base, below_base_text, metric_of, scores

        item = session.history[-1] if session.history else {}
        metric = metric_of(item.get("metrics"))
        values = scores(item.get("metrics"), metric)
        if not values:
            return "base, experts and the merge are probed."
        flags = below_base(item.get("metrics"), base_metrics(session))
        text = (f"{item['label']} reaches mean {metric} {sum(values.values()) / len(values):.3f} over "
                f"{len(values)} tasks")
        return text + (f"; {below_base_text(flags, metric)}." if flags else "; no task is below the base.")
    if step == "export":
        return f"the zip holds {session.last_label or 'the last merge'}, its recipe and model card."
    raise ValueError(f"unknown step {step!r}")


def guide_line(session: Session, done: str | None) -> str:
    """The guide's one line after ``done`` (None: the start)."""
    upcoming = next_step(done)
    saw = f"✓ What you just saw: {what_you_saw(session, done)} " if done else ""
    if upcoming is None:
        return saw + "That is the whole loop: change a slider or the method, Merge again and compare in the history."
    number = STEPS.index(upcoming) + 1
    return saw + f"**Step {number} of {len(STEPS)}**: press **{LABELS[upcoming]}** (highlighted)."
