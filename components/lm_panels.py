"""The page's causal-LM parts that are not Try a prompt: the demo-zoo switch (classifiers | language models),
layer swapping beside APL's layer importance, and the LM export and tokenizer choices.

Builders make components (layout.py places them in its sections); :func:`wire_lm` wires their events once
the page is composed. The work happens in ``merging.workbench`` (``zoo_build``, ``lm``); choices come from
the library's declarations (``io.vocab`` for tokenizers, ``io.recipe`` for ``configs_from``), never typed here.
"""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr

from components import controls as ui
from components import handlers as h
from merging import workbench as wb

AUTO_TOKENIZER = "auto"  # no alignment: every model has the base's vocabulary (the homology check says so)

SWAP_EXPLAINED = (
    "**Layer swapping, guided by importance.** Layer swapping copies each layer whole from one of two experts. "
    "APL's layer importance is the evidence for which: a layer whose change matters much to one expert's own "
    "task (its loss rises most when that layer's change is removed) should come from that expert. The table "
    "shows each expert's share of its own layer-level importance, in %, next to the layer's choice (**take**: an "
    "expert's name, *blend*, *base*, or *shape*: the method's bottom / top / transition shape). **Suggest from "
    "importance** fills every layer from the expert with the larger share; edit any take cell to override. The "
    "choice reaches the merge and its recipe when the method is Layer swapping.")


def zoo_switch() -> gr.Radio:
    """The demo zoo the page's zoo picks come from: the classifier zoo (built from server start-up) or the LM
    zoo (built on first use, when this switches to it)."""
    choices = wb.demo_zoos()
    return ui.Radio(choices, value=choices[0][1], label="Demo zoo", elem_id="zoo-kind",
                    info="language models: a small Llama and its language/domain experts, built here the first "
                         "time you switch to it (about 15 minutes; the line above shows its progress)")


def zoo_of_ref(ref) -> str | None:
    """The demo zoo a ``zoo:NAME/…`` reference names, when it is one of the page's two (else None: the
    classifier zoo's status is used, and no other zoo is ever built from a typed name)."""
    text = (ref or "").strip() if isinstance(ref, str) else ""
    if not text.startswith("zoo:"):
        return None
    name = text[4:].split("/", 1)[0]
    return name if name in {zoo for _, zoo in wb.demo_zoos()} else None


def demo_zoo_status(name: str | None) -> wb.ZooStatus:
    """Where demo zoo ``name`` (one of the switch's; None or another: the classifier zoo) stands — asking for
    the LM zoo starts its build, once per server, the first time."""
    names = {zoo for _, zoo in wb.demo_zoos()}
    return wb.zoo_status(name if name in names else None)


def tokenizer_choice() -> gr.Dropdown:
    """Experts whose tokenizers added tokens: whose vocabulary the merge uses (the library's choices)."""
    from merging.io.vocab import BASE, UNION

    return ui.Dropdown([("the models' own (one vocabulary)", AUTO_TOKENIZER), BASE, UNION], value=AUTO_TOKENIZER,
                       label="Tokenizer (causal LMs whose vocabularies differ)", allow_custom_value=True,
                       elem_id="tokenizer-choice",
                       info="base: the base's vocabulary; union: the base's plus every token an expert added; or "
                            "type an expert's name for its vocabulary. Embedding and LM-head rows are aligned by "
                            "token; the recipe and the export record the choice")


def tokenizer_of(value) -> str | None:
    """The session's tokenizer choice from the control (None: no alignment)."""
    value = (value or "").strip() if isinstance(value, str) else value
    return None if not value or value == AUTO_TOKENIZER else str(value)


def configs_from_choice() -> gr.Dropdown:
    from merging.io.recipe import CONFIGS_FROM_BASE

    return ui.Dropdown([CONFIGS_FROM_BASE], value=CONFIGS_FROM_BASE, label="Generation config and chat template from",
                       allow_custom_value=True, elem_id="configs-from", visible=False,
                       info="the model whose generation_config.json (stop tokens, sampling defaults) and chat "
                            "template the exported LM keeps: the base or one expert")


def layer_swap_panel() -> SimpleNamespace:
    """Per layer: each expert's APL layer importance beside layer swapping's choice (shown for LM experts)."""
    with gr.Column(visible=False, elem_id="layer-swap-panel") as box:
        gr.Markdown(SWAP_EXPLAINED)
        with gr.Row():
            suggest = gr.Button("Suggest from importance", variant="secondary", size="sm", scale=0, min_width=220,
                                elem_classes=["ml-btn"], elem_id="btn-suggest-swap")
        table = gr.Dataframe(value=h.placeholder_table("Load two LM experts and compute importance to fill this."),
                             label="Layer importance per expert (%) and the layer each expert gives (take: editable)",
                             interactive=True, elem_id="layer-swap-table", elem_classes=["ml-wide-table"])
        note = gr.Markdown(elem_id="layer-swap-status")
    return SimpleNamespace(box=box, suggest=suggest, table=table, note=note)


# ====================================================================== wiring

def swap_table(session) -> dict:
    headers, rows = wb.layer_swap_rows(session)
    return {"headers": headers, "data": rows}


@h.safe
def swap_views(state):
    """After a load or an importance run: the panel (LM sessions only) and its table."""
    session = h.session_of(state)
    lm = bool(session.refs) and wb.is_lm_session(session)
    if not lm:
        return gr.update(visible=False), gr.update(), ""
    note = "" if len(session.refs) == 2 else (f"Layer swapping composes exactly two experts; {len(session.refs)} "
                                                "are loaded: load two to merge them layer by layer.")
    return gr.update(visible=True), swap_table(session), note


@h.safe
def on_suggest(state):
    session = h.session_of(state)
    if not session.refs:
        raise wb.MergeLabError("load two experts first, then compute importance")
    note = wb.suggest_layer_swap(session)
    return session, swap_table(session), note


@h.safe
def on_swap_edit(state, table):
    session = h.session_of(state)
    if not session.refs:
        return session, gr.update(), ""
    wb.set_layer_swap(session, h.table_rows(table))
    chosen = ", ".join(f"{k}: {v}" for k, v in session.layer_take.items()) or "every layer follows the shape"
    return session, swap_table(session), f"Layer swap choice: {chosen}."


@h.safe
def export_choices(state):
    """After a load: the configs-from choices (base and the experts), shown for an LM merge only."""
    from merging.io.recipe import CONFIGS_FROM_BASE

    session = h.session_of(state)
    lm = bool(session.refs) and wb.is_lm_session(session)
    return gr.update(choices=[CONFIGS_FROM_BASE, *session.experts], value=CONFIGS_FROM_BASE, visible=lm)


def wire_lm(page) -> None:
    """Events of the layer-swap panel and the export choices (the zoo switch is wired with the start-up)."""
    swap, state = page.merge.swap_panel, page.state
    page.done["load"].then(swap_views, [state], [swap.box, swap.table, swap.note], api_visibility="private")
    page.done["load"].then(export_choices, [state], [page.export.configs_from], api_visibility="private")
    page.done["importance"].then(swap_views, [state], [swap.box, swap.table, swap.note], api_visibility="private")
    swap.suggest.click(on_suggest, [state], [state, swap.table, swap.note], api_name="suggest_layer_swap")
    swap.table.input(on_swap_edit, [state, swap.table], [state, swap.table, swap.note], api_visibility="private",
                     trigger_mode="always_last")
