"""Composes the page. For now: the intro and the method catalogue, built from the method registry."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from merging.methods import all_specs

ASSETS = Path(__file__).resolve().parent.parent / "assets"


def methods_table() -> list[list[str]]:
    """One row per registered method: id, name, parameters with defaults, paper."""
    rows = []
    for spec in all_specs():
        params = ", ".join(f"{p.name}={p.default}" for p in spec.params)
        rows.append([spec.name, spec.pretty_name, params, spec.summary, spec.paper_url])
    return rows


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="Merge Lab") as demo:
        gr.Markdown((ASSETS / "intro.md").read_text(encoding="utf-8"))
        gr.Dataframe(value=methods_table(), headers=["id", "method", "parameters", "what it does", "paper"],
                     label="Merge methods", interactive=False, wrap=True)
    return demo
