"""Gradio input controls whose server-side checks name the field.

Gradio already refuses a slider value outside its range, or a radio value outside its choices, on the
server — but its message ("Value 1000 is greater than maximum value 128.") does not say *which* control,
and an API caller sees only that. These subclasses keep gradio's checks and put the control's label in
front. They keep gradio's class names, so the browser renders them with gradio's own components.
Handlers check every number again themselves (merging.workbench.check_*), since a value may also
arrive through an endpoint whose control has no range.
"""

from __future__ import annotations

import math

import gradio as gr


def _named(component, payload, preprocess):
    label = component.label or component.elem_id or "a field"
    if isinstance(payload, float) and not math.isfinite(payload):
        raise gr.Error(f"{label} must be a finite number, got {payload!r}", print_exception=False)
    try:
        return preprocess(payload)
    except gr.Error as exc:
        raise gr.Error(f"{label}: {exc.message}", print_exception=False) from None
    except (TypeError, ValueError) as exc:
        raise gr.Error(f"{label}: invalid value {payload!r} ({exc})", print_exception=False) from None


class Slider(gr.Slider):
    def preprocess(self, payload):
        if payload is None:  # an API caller left it out: the handler applies the default
            return None
        return _named(self, payload, super().preprocess)


class Number(gr.Number):
    def preprocess(self, payload):
        return _named(self, payload, super().preprocess)


class Radio(gr.Radio):
    def preprocess(self, payload):
        return _named(self, payload, super().preprocess)


class Dropdown(gr.Dropdown):
    def preprocess(self, payload):
        return _named(self, payload, super().preprocess)
