"""Composes the page, in the order a person works: Experts → Importance → Merge → Probe → Export.

Thin: the work happens in merging.workbench, the glue in components/handlers.py, the charts
in components/figures.py. The five main buttons carry exactly the labels ``Load experts``,
``Compute importance``, ``Merge``, ``Run probe`` and ``Export`` (tests and users rely on them).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from components import analyses as an
from components import controls as ui
from components import figures as fg
from components import handlers as h
from components import lm_panels as lmp
from merging import workbench as wb

ASSETS = Path(__file__).resolve().parent.parent / "assets"

WHAT_HEATMAP = (
    "Each cell is one module (a weight matrix with its bias, or a norm) of one layer. Its colour is how much the "
    "few-shot loss of the expert's own task changes when that module's fine-tuning is switched on alone "
    "(*restore*) or removed alone (*ablate*). All experts share one colour range, so colours compare across "
    "experts. Hover shows the value, its rank within the expert, and the drop ratio APL gives the layer.\n\n"
    "The columns are the parts of a layer: **embed1…embed3** the embedding tables (word, position, segment) of "
    "the *embeddings* row; **q**, **k**, **v** the attention's query, key and value matrices (**qkv** when "
    "they are one matrix, as in GPT-2) and **o** its output; **norm1**, **norm2** the two normalisations; **ffn_in**, **ffn_out** the feed-forward "
    "network's two matrices; **pooler** the layer that sums a sentence up into one vector for the task's "
    "classifier (**lm_head**, in a language model, the layer that picks the next word). A blank cell is a part "
    "the expert did not change.")
WHAT_HIDDEN = (
    "A hidden state (unit) is one output row of a matrix: its weights plus its bias. Left: this module's units "
    "sorted by importance — a steep start means a few units carry the task. Right: the same kind of module in "
    "every layer, units averaged in bins, so you can see at which depth the important units sit.")
WHAT_FIDELITY = (
    "The gradient mode estimates each intervention with one backward pass (first-order Taylor). Each dot is one "
    "module: exact effect on the x axis, gradient estimate on the y axis. Dots on the diagonal mean the cheap "
    "estimate is right; the Spearman ρ says whether it at least ranks modules the same way.")
WHAT_MAGNITUDE = (
    "Is a layer important just because its weights moved a lot? Each dot is a layer: how far its weights moved "
    "during fine-tuning (the *delta norm*: the size of the change, expert minus base, as one number) against its "
    "measured importance. Dots far from a rising line are where the data tells you something the weights alone "
    "cannot.")
WHAT_COMPARE = (
    "Two questions are worth asking of any importance ranking. Do the two interventions agree? *restore* asks what a "
    "part's fine-tuning does on its own, *ablate* what the expert loses without it — they can rank layers "
    "differently. And is the ranking stable, or an accident of which few examples were drawn? The button scores "
    "every layer with the gradient approximation for both interventions on three seeded few-shot draws (each "
    "half the size of the smallest pool, so the draws differ) and reports Spearman ρ: between the interventions "
    "on the first draw, and between draws for each intervention (mean over pairs).")
WHAT_LAYERS = (
    "APL's drop ratios come from switching a whole layer's fine-tuning at once (bars: each layer's share of the "
    "expert's total |ΔL|). The dotted line adds up the heatmap's row instead: each module switched alone. The two "
    "can disagree, because modules inside a layer act together: one module's change may raise the loss and "
    "another's lower it, so they cancel when the layer is switched as a whole, while the sum counts both. Each "
    "expert keeps its colour in every chart of the page.")
WHAT_PROFILE = (
    "The merge plan over depth: for each expert, the fraction of its change dropped at each layer (top) and the "
    "weight of what is kept (bottom). Diamonds are cells you overrode; circles follow the suggestion.")
WHAT_CONFLICT = (
    "Where two experts push the same weight in opposite directions, adding them cancels both. Bars show the share "
    "of entries with a sign disagreement, and the share expected to remain after the planned random drop.")


GLOSSARY = (
    "- **Expert**: a copy of the base model fine-tuned on one task (here: topic, sentiment, …).\n"
    "- **Task vector / delta**: what fine-tuning changed — the expert's weights minus the base's.\n"
    "- **Homology check**: before merging, the page checks that every expert has exactly the base's layers and "
    "tensor shapes; only then can their changes be added.\n"
    "- **Delta norm**: the size of that change as one number (0 = the expert did not change it).\n"
    "- **Importance**: how much the expert's own task gets worse or better when one part of its change is "
    "switched on or off, measured on a few labelled examples.\n"
    "- **Restore / ablate**: the two ways to switch a part. *Restore* puts only that part of the change onto "
    "the base (what does it do alone?); *ablate* removes only that part from the expert (what is lost without "
    "it?).\n"
    "- **Drop ratio**: the share of a change's numbers set to zero before adding (the rest are scaled up so the "
    "total stays about the same). **Weight**: how strongly an expert's kept change counts.\n"
    "- **DARE**: drop a random share of each change and rescale the rest. **TIES**: keep only the largest "
    "numbers and, where experts disagree in sign, only the side with more weight.\n"
    "- **τ1, τ2** (tau): how sharply APL follows importance — small: important layers keep much more (τ1) or get "
    "much more weight (τ2); very large: every layer the same (plain DARE / averaging).\n"
    "- **p̄** (p-bar): the average drop ratio over all numbers; **q_min**: the smallest share any layer or unit "
    "may keep.\n"
    "- **Probe**: a test on held-out examples of every task, for the base, each expert and each merge.")


def _intro() -> str:
    return (ASSETS / "intro.md").read_text(encoding="utf-8")


def explained_plot(what: str, label: str, empty: str | None = None, summary_id: str | None = None,
                   **plot_kwargs) -> tuple[gr.Plot, gr.Markdown]:
    """A chart, its one-line summary (written from the numbers by the handlers) and a folded
    "What am I looking at?" with the lesson ``what``: every chart of the page teaches the same way.
    ``empty`` is what the chart says before anything fills it (which button does), instead of an icon."""
    plot = gr.Plot(value=fg.empty_figure(empty) if empty else None, label=label, **plot_kwargs)
    summary = gr.Markdown(elem_id=summary_id)
    with gr.Accordion("What am I looking at?", open=False):
        gr.Markdown(what)
    return plot, summary


def announce(event, elem_id: str):
    """After ``event``, the keyboard focus moves to the step's result ``elem_id`` and a screen reader reads it
    (``mlAnnounce`` in assets/head.html): someone who cannot see the page hears that the step is done."""
    return event.then(None, None, None, js=f"() => {{ if (window.mlAnnounce) window.mlAnnounce({elem_id!r}); }}",
                      api_visibility="private")


def long_step(button: gr.Button, stop: gr.Button, fn, inputs, outputs, api_name: str, progress_on=None,
              announce_id: str | None = None):
    """Wire one of the page's long steps: ``button`` is disabled while ``fn`` runs in the model-work queue
    (``api_name`` is its HTTP endpoint) and enabled again after, success or failure; ``stop`` cancels it and re-enables the
    button. ``progress_on``: the one component that shows the progress in words (else every output
    does); ``announce_id`` is the result that gets the focus when it succeeded. Returns the re-enabling event, for
    follow-ups that should run after the step."""
    def enable():
        return gr.update(interactive=True)

    start = button.click(lambda: gr.update(interactive=False), None, button, queue=False, api_visibility="private")
    shown = dict(show_progress_on=[progress_on]) if progress_on is not None else {}
    event = start.then(h.heavy(fn), inputs, outputs, api_name=api_name, **h.HEAVY, **shown)
    done = event.then(enable, None, button, api_visibility="private")
    # gradio runs .then() follow-ups only after a success: a failed step (its message is the toast) must
    # leave its button usable too, or the page is stuck until someone presses Stop
    event.failure(enable, None, button, api_visibility="private")
    stop.click(enable, None, button, cancels=[event], api_visibility="private")
    if announce_id:
        announce(done, announce_id)
    return done


def load_head() -> str:
    """Extra <head> HTML of the page (the toast de-duplication)."""
    path = ASSETS / "head.html"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def load_css() -> str:
    path = ASSETS / "style.css"
    return path.read_text(encoding="utf-8") if path.is_file() else ""


def build_demo() -> gr.Blocks:
    """The page: one builder per section (in the order a person works), then one wiring step per section."""
    # gradio keeps its own copy of every file a handler returns (export zips, history files): the same hour
    # as the app's own copies (wb.retention_sweep), checked every 10 minutes, and all gone on restart.
    with gr.Blocks(title="Merge Lab", delete_cache=(600, int(wb.EXPORT_MAX_AGE))) as demo:
        # Per-tab state (small, no tensors). When gradio drops it (an hour after the tab closed, or after
        # STATE_TTL seconds without use), whatever the session kept in the shared caches is released too.
        state = gr.State(None, delete_callback=h.release_state, time_to_live=h.STATE_TTL)
        page = SimpleNamespace(state=state, done={}, intro=intro_section(), recipe=recipe_section(),
                               experts=experts_section(),
                               importance=importance_section(), merge=merge_section(), probe=probe_section(),
                               analyses=an.analyses_section(), export=export_section(), api=api_inputs())
        page.plan_inputs = [state, page.merge.plan_expert, page.merge.method, *page.merge.param_boxes]
        page.plan_outputs = [page.merge.drop_table, page.merge.weight_table, page.merge.profile_plot,
                             page.merge.profile_md, page.merge.overrides_md, page.merge.conflict_plot,
                             page.merge.conflict_md]
        page.slider_outputs = page.merge.layer_rows + page.merge.drop_sliders + page.merge.weight_sliders
        wire_startup(demo, page)
        wire_experts(page)
        wire_importance(page)
        wire_plan(page)
        wire_merge(page)
        wire_probe(page)
        an.wire_analyses(page)
        wire_export(page)
        wire_guided(page)
        wire_estimates(page)
        wire_recipe(page)
        lmp.wire_lm(page)
        # a closed tab frees its merged bodies at once (gradio drops the small State an hour later)
        demo.unload(h.on_unload)
    return demo


# ====================================================================== sections (components only)

def intro_section() -> SimpleNamespace:
    with gr.Column(elem_classes=["ml-intro"]):
        gr.Markdown(_intro())
        with gr.Row():
            guided_btn = gr.Button("Guided first merge", variant="secondary", scale=0, elem_id="btn-guided")
            gr.Markdown("Walks you through the five steps on the demo zoo: every step gets a good first setting "
                        "(all zoo experts, gradient importance, APL at drop ratio 0.5), the next button is "
                        "highlighted, and after each step one line says what you just saw.")
        guide_md = gr.Markdown(elem_id="guide")
        guide_state = gr.State(None)  # the step the guide waits for (None: the guide is off)
        zoo_md = gr.Markdown("Looking for the demo zoo…", elem_id="zoo-status")
        with gr.Accordion("Words used on this page, in plain words", open=False, elem_id="glossary"):
            gr.Markdown(GLOSSARY)
        # while the zoo builds (from server start-up), the one progress line above is refreshed from here
        zoo_timer = gr.Timer(2.0, active=False)
    return SimpleNamespace(guided_btn=guided_btn, guide_md=guide_md, guide_state=guide_state, zoo_md=zoo_md,
                           zoo_timer=zoo_timer)


RECIPE_PLACEHOLDER = """method: ties
base: zoo:default/base
experts:
  - {name: topic, model: zoo:default/topic}
  - {name: sentiment, model: zoo:default/sentiment}
parameters: {drop_ratio: 0.7, lambda: 1.0}
seed: 0"""


def recipe_section() -> SimpleNamespace:
    """Paste or upload a recipe — recipe.yaml from an export, or a mergekit config — and merge it: the page
    fills the experts, the method, its settings and every per-layer cell from it, then merges."""
    with gr.Group(elem_classes=["ml-section"], elem_id="recipe-import"):
        with gr.Accordion("Import a recipe (Merge Lab recipe.yaml or a mergekit config) and merge it", open=False,
                          elem_id="recipe-accordion"):
            gr.Markdown("A recipe names the base, the experts, the method and its settings. Every model it names "
                        "must be one this server can open: a demo zoo model (`zoo:NAME/TASK`), a folder or a "
                        ".safetensors file. Importing fills steps 1 and 3 below with the recipe's values (every "
                        "slider shows them) and merges; then **Run probe** as usual.")
            recipe_text = gr.Textbox(label="Recipe (YAML)", lines=8, max_lines=30, elem_id="recipe-text",
                                     placeholder=RECIPE_PLACEHOLDER)
            with gr.Row():
                recipe_file = gr.File(label="…or upload a recipe file (.yaml, .yml): its text appears above",
                                      file_types=[".yaml", ".yml"], height=100, elem_id="recipe-file", scale=2)
                import_btn = gr.Button("Import recipe and merge", variant="primary", elem_id="btn-import", scale=1)
            recipe_md = gr.Markdown(elem_id="recipe-status")
    return SimpleNamespace(recipe_text=recipe_text, recipe_file=recipe_file, import_btn=import_btn,
                           recipe_md=recipe_md)


TASK_FILE_FORMATS = (
    "**Classifier experts**: a CSV or JSONL file with a `text` and a `label` column.  \n"
    "**Causal language models** (GPT-2, Llama, Qwen2, Mistral experts): plain text, in one of three shapes — "
    "a `.txt` file with one example per line; JSONL rows `{\"text\": \"…\"}` (every token is scored); or JSONL "
    "rows `{\"prompt\": \"…\", \"completion\": \"…\"}` (only the completion's tokens are scored). "
    "A few rows (the few-shot count, drawn with the seed) feed importance; the rest are held out for the "
    "perplexity probe.")


def experts_section() -> SimpleNamespace:
    with gr.Group(elem_classes=["ml-section"]):
        gr.Markdown("## 1 · Experts\nPick the base model and two or more experts fine-tuned from it. Loading "
                    "runs the *homology check*: every expert must have exactly the base's layers and tensor "
                    "shapes, or their changes cannot be added.")
        zoo_kind = lmp.zoo_switch()
        with gr.Row():
            base_box = gr.Textbox(label="Base model", placeholder="zoo:default/base, a folder, or hf:org/name@rev",
                                  scale=2)
            zoo_pick = ui.Dropdown(label="Experts from the demo zoo", choices=[], multiselect=True,
                                   allow_custom_value=True, scale=3, elem_id="zoo-pick")
        with gr.Row():
            extra_box = gr.Textbox(label="More experts (one per line: name=folder, a .safetensors path, "
                                         "or hf:org/name@rev)", lines=2, scale=3)
            upload = gr.File(label=f"…or upload .safetensors experts (up to {h.upload_limit_text()} each)",
                             file_count="multiple", file_types=[".safetensors"], scale=2, height=110,
                             elem_id="upload")
        tokenizer = lmp.tokenizer_choice()
        load_btn = gr.Button("Load experts", variant="primary", elem_id="btn-load")
        load_md = gr.Markdown(elem_id="load-status")
        experts_df = gr.Dataframe(value=h.placeholder_table("Press Load experts to fill this."),
                                  label="Experts", interactive=False, elem_id="experts-table",
                                  elem_classes=["ml-wide-table"])
        data_md = gr.Markdown()
        with gr.Accordion("Attach task data to an expert (CSV/JSONL with text and label; .txt/JSONL text for "
                          "causal LMs)", open=False):
            gr.Markdown(TASK_FILE_FORMATS, elem_id="task-file-formats")
            with gr.Row():
                attach_expert = ui.Dropdown(label="Expert", choices=[], allow_custom_value=True, scale=1,
                                            elem_id="attach-expert")
                attach_file = gr.File(label="Task file", file_types=[".csv", ".jsonl", ".txt"], scale=2, height=110,
                                      elem_id="attach-file")
                attach_btn = gr.Button("Attach task data", scale=0)
    return SimpleNamespace(zoo_kind=zoo_kind, tokenizer=tokenizer, base_box=base_box, zoo_pick=zoo_pick,
                           extra_box=extra_box, upload=upload,
                           load_btn=load_btn, load_md=load_md, experts_df=experts_df, data_md=data_md,
                           attach_expert=attach_expert, attach_file=attach_file, attach_btn=attach_btn)


def importance_section() -> SimpleNamespace:
    with gr.Group(elem_classes=["ml-section"]):
        gr.Markdown("## 2 · Importance (APL)\nHow much each part of every expert's change matters for its own "
                    "task, measured on a few examples.")
        with gr.Row():
            fewshot = ui.Slider(wb.MIN_FEWSHOT, wb.MAX_FEWSHOT, value=wb.DEFAULT_FEWSHOT, step=4,
                            label="Few-shot examples per expert")
            mode = ui.Radio(list(wb.MODES), value="gradient", label="Mode",
                            info="gradient: a fast estimate from one backward pass (scores every unit); exact: "
                                 "really switches each part and re-runs the examples (slower)")
            intervention = ui.Radio(list(wb.INTERVENTIONS), value="restore", label="Intervention",
                                    info="restore: the base plus only this part's change (what does it do alone?); "
                                         "ablate: the expert without this part's change (what is lost?)")
            scope = ui.Radio(list(wb.EXACT_SCOPES), value=wb.FULL_SCOPE, label="Exact: what to measure",
                             info="layers (quick): one forward pass per layer; with modules: one per module too")
        with gr.Row():
            imp_btn = gr.Button("Compute importance", variant="primary", elem_id="btn-importance")
            imp_stop = gr.Button("Stop", variant="stop", scale=0)
        imp_eta = gr.Markdown(elem_id="importance-eta", elem_classes=["ml-eta"])
        imp_progress = gr.Markdown(elem_id="importance-progress", elem_classes=["ml-progress"])
        with gr.Row(equal_height=False):
            with gr.Column(scale=3, min_width=420):
                heat_plot, heat_md = explained_plot(WHAT_HEATMAP, label="Importance: layer × module, per expert",
                                                    empty="Press Compute importance to fill this.",
                                                    summary_id="heatmap-status", elem_id="heatmap")
            with gr.Column(scale=2, min_width=320):
                layer_plot = gr.Plot(label="Which layer matters most: the whole-layer intervention, per expert",
                                     elem_id="layer-chart")
                layer_md = gr.Markdown(elem_id="layer-answer")
                with gr.Accordion("What am I looking at?", open=False):
                    gr.Markdown(WHAT_LAYERS)
        with gr.Row():
            hid_expert = ui.Dropdown(label="Expert", choices=[], allow_custom_value=True)
            hid_layer = ui.Dropdown(label="Layer", choices=[], allow_custom_value=True)
            hid_module = ui.Dropdown(label="Module", choices=[], allow_custom_value=True)
        hid_plot, hid_md = explained_plot(WHAT_HIDDEN, label="Hidden states",
                                          empty="Press Compute importance to fill this.", elem_id="hidden-plot")
        with gr.Row():
            with gr.Column():
                fid_plot, fid_md = explained_plot(WHAT_FIDELITY, label="Exact vs gradient",
                                                  empty="Compute importance in both modes to fill this.")
            with gr.Column():
                mag_plot, mag_md = explained_plot(WHAT_MAGNITUDE, label="Importance vs delta magnitude",
                                                  empty="Press Compute importance to fill this.")
        with gr.Accordion("Compare interventions and draws", open=False, elem_id="compare"):
            gr.Markdown(WHAT_COMPARE)
            with gr.Row():
                compare_btn = gr.Button("Compare restore and ablate", variant="secondary", size="sm",
                                        elem_classes=["ml-btn"], elem_id="btn-compare")
                compare_stop = gr.Button("Stop", variant="stop", size="sm", scale=0, elem_id="btn-compare-stop")
            compare_eta = gr.Markdown(elem_id="compare-eta", elem_classes=["ml-eta"])
            compare_progress = gr.Markdown(elem_id="compare-progress", elem_classes=["ml-progress"])
            compare_plot = gr.Plot(fg.empty_figure("Press Compare restore and ablate to fill this."),
                                   label="Restore vs ablate, and stability over few-shot draws")
            compare_md = gr.Markdown(elem_id="compare-status")
    return SimpleNamespace(fewshot=fewshot, mode=mode, intervention=intervention, scope=scope, imp_btn=imp_btn,
                           imp_stop=imp_stop, imp_eta=imp_eta, imp_progress=imp_progress,
                           compare_progress=compare_progress, layer_plot=layer_plot, layer_md=layer_md,
                           compare_stop=compare_stop, compare_eta=compare_eta, heat_plot=heat_plot, heat_md=heat_md, hid_expert=hid_expert,
                           hid_layer=hid_layer, hid_module=hid_module, hid_plot=hid_plot, hid_md=hid_md,
                           fid_plot=fid_plot, fid_md=fid_md, mag_plot=mag_plot, mag_md=mag_md,
                           compare_btn=compare_btn, compare_plot=compare_plot, compare_md=compare_md)


def _param_box(p, shown, visible: bool):
    """The control of one declared shared parameter (its declaration for the method shown at start)."""
    label = p.name.replace("_", " ")
    if p.kind == "bool":
        return gr.Checkbox(value=shown.default, label=label, info=shown.help, visible=visible)
    if p.kind == "choice":
        return ui.Dropdown(list(p.choices), value=shown.default, label=label, info=shown.help, visible=visible)
    if h._slider_range(p):
        return ui.Slider(shown.low, shown.high, value=shown.default, step=0.01 if p.kind == "float" else 1,
                         label=label, info=shown.help, visible=visible)
    return ui.Number(value=shown.default, label=label, info=shown.help, visible=visible)


def _layer_sliders() -> tuple[list, list, list]:
    """Pre-created rows of per-layer drop-ratio and weight sliders, hidden beyond the model's depth."""
    layer_rows, drop_sliders, weight_sliders = [], [], []
    with gr.Column(elem_classes=["ml-layers"]):
        for i in range(h.MAX_LAYER_ROWS):
            with gr.Row(visible=False) as row:
                d = ui.Slider(value=0.5, label=f"layer {i} · drop ratio", **h.cell_slider(wb.DROP),
                              elem_id=f"drop-{i}", elem_classes=["ml-drop"])
                w = ui.Slider(value=1.0, label=f"layer {i} · weight", **h.cell_slider(wb.WEIGHT),
                              elem_id=f"weight-{i}", elem_classes=["ml-weight"])
            layer_rows.append(row)
            drop_sliders.append(d)
            weight_sliders.append(w)
    return layer_rows, drop_sliders, weight_sliders


def merge_section() -> SimpleNamespace:
    with gr.Group(elem_classes=["ml-section"]):
        gr.Markdown("## 3 · Merge")
        with gr.Row():
            method = ui.Dropdown(h.method_choices(), value=wb.DEFAULT_METHOD, label="Method", scale=2)
            seed = ui.Number(value=0, precision=0, label="Seed", scale=0, min_width=100)
        method_md = gr.Markdown(h.method_info(wb.Session(), wb.DEFAULT_METHOD))
        with gr.Accordion("What do these settings mean?", open=False):
            gr.Markdown(GLOSSARY)
        with gr.Row(elem_classes=["ml-params"]):
            first = {p.name: p for p in wb.method_spec(wb.DEFAULT_METHOD).params}
            param_boxes = [_param_box(p, first.get(p.name, p), p.name in first) for p in h.PARAMS]
        gr.Markdown("### Per-layer plan\nDrop ratio and weight of the selected expert at every layer. Moving a "
                    "slider overrides that cell (✎); the table below holds every expert × layer cell.")
        with gr.Row():
            plan_expert = ui.Dropdown([], label="Expert shown on the sliders", allow_custom_value=True, scale=3,
                                      elem_id="plan-expert")
            reset_btn = gr.Button("Reset to suggestion", variant="secondary", size="sm", scale=0,
                                  min_width=190, elem_classes=["ml-btn"])
            uniform_btn = gr.Button("Uniform", variant="secondary", size="sm", scale=0, min_width=100,
                                    elem_classes=["ml-btn"])
            swap_btn = gr.Button("Layer swap", variant="secondary", size="sm", scale=0, min_width=110,
                                 elem_classes=["ml-btn"])
        layer_rows, drop_sliders, weight_sliders = _layer_sliders()
        with gr.Row():
            with gr.Column(scale=3):
                profile_plot, profile_md = explained_plot(WHAT_PROFILE, label="Per-layer profile",
                                                          empty="Press Load experts to fill this.")
            with gr.Column(scale=2):
                overrides_md = gr.Markdown(elem_id="overrides")
        with gr.Tabs():
            with gr.Tab("Drop ratio table"):
                drop_table = gr.Dataframe(value=h.placeholder_table("Press Load experts to fill this."),
                                          label="drop ratio: expert × layer (editable: an edit applies at once)",
                                          interactive=True, elem_id="drop-table", elem_classes=["ml-wide-table"])
            with gr.Tab("Weight table"):
                weight_table = gr.Dataframe(value=h.placeholder_table("Press Load experts to fill this."),
                                            label="weight: expert × layer (editable: an edit applies at once)",
                                            interactive=True, elem_id="weight-table",
                                            elem_classes=["ml-wide-table"])
        with gr.Row():
            with gr.Column():
                conflict_plot, conflict_md = explained_plot(WHAT_CONFLICT, label="Sign conflict per layer",
                                                            empty="Press Load experts to fill this.")
            with gr.Column():
                cosine_plot = gr.Plot(fg.empty_figure("Press Load experts to fill this."), label="Task-vector cosine")
                cosine_md = gr.Markdown()
        swap_panel = lmp.layer_swap_panel()
        with gr.Row():
            merge_btn = gr.Button("Merge", variant="primary", elem_id="btn-merge")
            merge_stop = gr.Button("Cancel", variant="stop", scale=0)
        merge_md = gr.Markdown(elem_id="merge-status")
    return SimpleNamespace(method=method, seed=seed, method_md=method_md, param_boxes=param_boxes,
                           plan_expert=plan_expert, reset_btn=reset_btn, uniform_btn=uniform_btn, swap_btn=swap_btn,
                           layer_rows=layer_rows, drop_sliders=drop_sliders, weight_sliders=weight_sliders,
                           profile_plot=profile_plot, profile_md=profile_md, overrides_md=overrides_md,
                           drop_table=drop_table, weight_table=weight_table, conflict_plot=conflict_plot,
                           conflict_md=conflict_md, cosine_plot=cosine_plot, cosine_md=cosine_md,
                           merge_btn=merge_btn, merge_stop=merge_stop, merge_md=merge_md, swap_panel=swap_panel)


def probe_section() -> SimpleNamespace:
    with gr.Group(elem_classes=["ml-section"]):
        gr.Markdown("## 4 · Probe\nAccuracy of base, each expert and every merge of this session on held-out "
                    "examples of each task (each model with every task's own head); for causal-LM experts, loss and perplexity "
                    "on each task's held-out text (lower is better).")
        with gr.Row():
            probe_btn = gr.Button("Run probe", variant="primary", elem_id="btn-probe")
            probe_stop = gr.Button("Cancel probe", variant="stop", scale=0)
        probe_eta = gr.Markdown(elem_id="probe-eta", elem_classes=["ml-eta"])
        probe_progress = gr.Markdown(elem_id="probe-progress", elem_classes=["ml-progress"])
        probe_df = gr.Dataframe(value=h.placeholder_table("Press Run probe to fill this."), label="Probe results",
                                interactive=False, elem_id="probe-table", elem_classes=["ml-wide-table"])
        probe_plot = gr.Plot(fg.empty_figure("Press Run probe to fill this."), label="Probe accuracy")
        probe_md = gr.Markdown(elem_id="probe-status")
        band = an.seed_band_area()  # the benchmark's verdict for this zoo, and Run over 3 seeds
        history_df = gr.Dataframe(value=h.placeholder_table("Press Merge, then Run probe."),
                                  label="Session history: every merge so far", interactive=False,
                                  elem_id="history-table", elem_classes=["ml-wide-table"])
        with gr.Row():
            history_btn = gr.Button("Download history (JSON)", variant="secondary", size="sm", scale=0,
                                    min_width=220, elem_classes=["ml-btn"], elem_id="btn-history")
            restore_btn = gr.UploadButton("Restore history from JSON", file_types=[".json"], file_count="single",
                                          variant="secondary", size="sm", scale=0, min_width=220,
                                          elem_classes=["ml-btn"], elem_id="btn-restore")
        history_file = gr.File(label="History file (merges, probe results and recipes)", elem_id="history-file",
                               visible=False)
        history_md = gr.Markdown(elem_id="history-status")
        with gr.Accordion("Drop-ratio sweep (APL vs DARE vs magnitude)", open=False):
            with gr.Row():
                sweep_btn = gr.Button("Sweep drop ratios", elem_id="btn-sweep")
                sweep_stop = gr.Button("Stop", variant="stop", scale=0, elem_id="btn-sweep-stop")
            sweep_eta = gr.Markdown(elem_id="sweep-eta", elem_classes=["ml-eta"])
            sweep_progress = gr.Markdown(elem_id="sweep-progress", elem_classes=["ml-progress"])
            sweep_plot = gr.Plot(fg.empty_figure("Press Sweep drop ratios to fill this."),
                                 label="Accuracy vs drop ratio")
            sweep_md = gr.Markdown()
        predict_uses = gr.Markdown(h.merge_in_use(None), elem_id="predict-uses")
        with gr.Column(elem_id="try-sentence") as sentence_box:
            with gr.Row():
                sentence = gr.Textbox(label="Try a sentence", placeholder="Type a sentence…", scale=4)
                predict_btn = gr.Button("Predict", variant="secondary", scale=0, min_width=120,
                                        elem_classes=["ml-btn"])
            predict_df = gr.Dataframe(value=h.placeholder_table("Press Predict to fill this."),
                                      interactive=False, label="Base, expert and merged predictions",
                                      elem_classes=["ml-wide-table"])
        prompt = prompt_area()
    return SimpleNamespace(probe_btn=probe_btn, probe_stop=probe_stop, probe_df=probe_df, probe_plot=probe_plot,
                           probe_md=probe_md, history_df=history_df, history_btn=history_btn,
                           restore_btn=restore_btn, history_file=history_file, history_md=history_md,
                           sweep_btn=sweep_btn, sweep_stop=sweep_stop, sweep_eta=sweep_eta, probe_eta=probe_eta,
                           sweep_progress=sweep_progress, probe_progress=probe_progress,
                           predict_uses=predict_uses, sweep_plot=sweep_plot, sweep_md=sweep_md, sentence=sentence,
                           predict_btn=predict_btn, predict_df=predict_df, sentence_box=sentence_box, prompt=prompt,
                           band=band)


def prompt_area() -> SimpleNamespace:
    """Try a prompt (causal-LM experts; shown instead of Try a sentence once LM experts are loaded): the base,
    a chosen expert and the last merge continue the same prompt, side by side."""
    with gr.Column(visible=False, elem_id="try-prompt") as box:
        gr.Markdown("**Try a prompt**: the base, the chosen expert and the last merge each continue your text "
                    f"(greedy: always the most likely next token; or sampled from the seed). At most "
                    f"{wb.MAX_NEW_TOKENS} new tokens; **Stop** ends it between tokens.")
        with gr.Row():
            text = gr.Textbox(label="Prompt", placeholder="Type the start of a text…", scale=4, elem_id="prompt-text")
            expert = ui.Dropdown(label="Expert to compare", choices=[], allow_custom_value=True, scale=1)
        with gr.Row():
            new_tokens = ui.Slider(1, wb.MAX_NEW_TOKENS, value=wb.DEFAULT_NEW_TOKENS, step=1, label="New tokens")
            sample = gr.Checkbox(label="Sample instead of greedy", value=False)
            seed = ui.Number(label="Sampling seed", value=0, precision=0, minimum=0, maximum=wb.MAX_SEED)
        with gr.Row():
            button = gr.Button("Continue the prompt", variant="secondary", elem_id="btn-generate")
            stop = gr.Button("Stop", variant="stop", scale=0, elem_id="btn-generate-stop")
        with gr.Row(elem_id="prompt-outputs"):
            outputs = [gr.Textbox(label=name, interactive=False, lines=3, elem_id=f"continuation-{i}")
                       for i, name in enumerate(("base", "expert", "merge"))]
    return SimpleNamespace(box=box, text=text, expert=expert, new_tokens=new_tokens, sample=sample, seed=seed,
                           button=button, stop=stop, outputs=outputs)


def export_section() -> SimpleNamespace:
    with gr.Group(elem_classes=["ml-section"]):
        gr.Markdown("## 5 · Export\nA zip with a Hugging Face folder per chosen task for classifier experts (merged "
                    "body + that task's head; a causal LM merge is one folder, with the base's generation config "
                    "and chat template), recipe.yaml (replay: `python -m merging merge recipe.yaml --out DIR`), mergekit "
                    "YAML where the method exists there, a model card and the importance JSON.")
        with gr.Row():
            export_tasks = ui.Dropdown([], label="Tasks to export (a folder each)", multiselect=True,
                                       allow_custom_value=True)
            dtype = ui.Radio(list(h.DTYPES), value="fp32", label="dtype")
            configs_from = lmp.configs_from_choice()
        export_uses = gr.Markdown(h.merge_in_use(None), elem_id="export-uses")
        with gr.Row():
            export_btn = gr.Button("Export", variant="primary", elem_id="btn-export")
            export_stop = gr.Button("Cancel export", variant="stop", scale=0)
        export_file = gr.File(label="Download (press Export to fill this)", elem_id="export-file")
        export_md = gr.Markdown(elem_id="export-status")
    return SimpleNamespace(export_tasks=export_tasks, dtype=dtype, configs_from=configs_from, export_uses=export_uses, export_btn=export_btn, export_stop=export_stop,
                           export_file=export_file, export_md=export_md)


def api_inputs() -> SimpleNamespace:
    """Hidden inputs of API-only endpoints (one per-layer override through the API)."""
    return SimpleNamespace(expert=gr.Textbox(visible=False), layer=gr.Textbox(visible=False),
                           key=gr.Textbox(visible=False), value=ui.Number(visible=False),
                           button=gr.Button(visible=False))


# ====================================================================== wiring (events only)

@h.safe
def refresh_plan(session, expert, method_value, *values):
    """Plan views and the selected expert's sliders, for the method's current shared values."""
    session = h.session_of(session)  # a tab that has loaded nothing yet (or whose state gradio dropped)
    shared = h.shared_values(method_value, values)
    return (*h.plan_views(session, method_value, shared),
            *h.slider_updates(session, expert, method_value, shared))


@h.safe
def on_method(session, expert, method_value):
    """A new method: its parameter controls, with the plan and sliders redrawn at its defaults."""
    session = h.session_of(session)
    updates = h.param_updates(method_value)
    defaults = [u.get("value") if u.get("visible") else None for u in updates]
    shared = h.shared_values(method_value, defaults)
    return (h.method_info(session, method_value), *updates,
            *h.plan_views(session, method_value, shared),
            *h.slider_updates(session, expert, method_value, shared))


def wire_startup(demo, page) -> None:
    """Show where the demo zoo stands when a page loads; while it builds (the server started that), refresh
    the one progress line every two seconds and keep Guided first merge off until it is ready. A zoo that is
    ready relabels the zoo switch: its labels count the built zoos' own experts."""
    intro, ex = page.intro, page.experts
    outputs = [intro.zoo_md, ex.zoo_pick, ex.base_box, intro.guided_btn, intro.zoo_timer, ex.zoo_kind]

    def show(status):
        if status.ready:
            base, _ = wb.zoo_refs(status.zoo)
            return (status.line, gr.update(choices=status.zoo.tasks, value=status.zoo.tasks), base,
                    gr.update(interactive=True), gr.Timer(active=False), gr.update(choices=wb.demo_zoos()))
        building = status.state == "building"
        return (status.line, gr.update(), gr.update(),
                gr.update(interactive=False), gr.Timer(active=building), gr.update())

    @h.safe
    def startup(zoo_name=None):  # the zoo the switch names (the LM zoo is built when a tab first switches to it)
        return show(lmp.demo_zoo_status(zoo_name))

    demo.load(startup, [ex.zoo_kind], outputs, api_visibility="private", show_progress="hidden")
    intro.zoo_timer.tick(startup, [ex.zoo_kind], outputs, api_visibility="private", show_progress="hidden",
                         queue=False)
    ex.zoo_kind.input(startup, [ex.zoo_kind], outputs, api_visibility="private", show_progress="hidden")


def experts_table(rows) -> dict:
    """The experts table once loaded (its label stays "Experts": the status line above it says the homology
    check passed, once it has; an update of the label would change what the API returns)."""
    return {"headers": wb.EXPERT_HEADERS, "data": rows}


def wire_experts(page) -> None:
    ex, merge, imp, exp = page.experts, page.merge, page.importance, page.export

    @h.safe
    def on_load(session, base, tasks, extra, files, method_value, tokenizer=None, request: gr.Request = None,
                progress=gr.Progress()):
        status = lmp.demo_zoo_status(lmp.zoo_of_ref(base))  # the zoo the base names (classifier or LM)
        session, rows, note, data = h.load(session, base, tasks, extra, files, status.zoo, progress,
                                           zoo_waiting=None if status.ready else status.not_ready_message(),
                                           tokenizer=lmp.tokenizer_of(tokenizer))
        h.register_client(request, session)
        experts = session.experts
        tasks = wb.export_tasks(session)  # classifier heads get a folder each; an LM merge is one folder
        return (session, experts_table(rows), note, data, gr.update(choices=experts, value=experts[0]),
                gr.update(choices=experts, value=experts[0]), gr.update(choices=experts, value=experts[0]),
                gr.update(choices=tasks, value=tasks, visible=bool(tasks)), h.method_info(session, method_value))

    load_event = ex.load_btn.click(
        h.heavy(on_load), [page.state, ex.base_box, ex.zoo_pick, ex.extra_box, ex.upload, merge.method, ex.tokenizer],
        [page.state, ex.experts_df, ex.load_md, ex.data_md, ex.attach_expert, merge.plan_expert, imp.hid_expert,
         exp.export_tasks, merge.method_md],
        api_name="load_experts", **h.HEAVY)
    page.done["load"] = load_event
    announce(load_event.then(refresh_plan, page.plan_inputs, page.plan_outputs + page.slider_outputs,
                             api_visibility="private").then(
        _cosine_view, [page.state], [merge.cosine_plot, merge.cosine_md], api_visibility="private"), "load-status")

    @h.safe
    def on_attach(session, expert, file, n, method_value):
        session, rows, data = h.attach(session, expert, file, n)
        return session, experts_table(rows), data, h.method_info(session, method_value)

    ex.attach_btn.click(h.heavy(on_attach), [page.state, ex.attach_expert, ex.attach_file, imp.fewshot, merge.method],
                        [page.state, ex.experts_df, ex.data_md, merge.method_md], api_name="attach_task_data",
                        **h.HEAVY)


def wire_importance(page) -> None:
    imp, merge = page.importance, page.merge
    outputs = [page.state, imp.heat_plot, imp.heat_md, imp.fid_plot, imp.fid_md, imp.mag_plot, imp.mag_md,
               imp.hid_layer, imp.hid_module, merge.method_md]

    @h.safe
    def on_importance(session, n, mode_value, intervention_value, method_value, *rest, progress=gr.Progress()):
        session = h.session_of(session)
        values, scope = rest[:len(h.PARAM_NAMES)], (rest[len(h.PARAM_NAMES):] or (None,))[0]
        wb.compute_importance(session, n, mode_value, intervention_value, progress=h.progress_sink(progress),
                              scope=scope)
        views = h.importance_views(session, method_value, values)
        layers, layer, modules, module = h.hidden_choices(session)
        return (session, *views, gr.update(choices=layers, value=layer), gr.update(choices=modules, value=module),
                h.method_info(session, method_value))

    hidden_io = ([page.state, imp.hid_expert, imp.hid_module], [imp.hid_plot, imp.hid_md])
    done = long_step(imp.imp_btn, imp.imp_stop, on_importance,
                     [page.state, imp.fewshot, imp.mode, imp.intervention, merge.method, *merge.param_boxes, imp.scope],
                     outputs, "compute_importance", progress_on=imp.imp_progress,
                     announce_id="heatmap-status")
    page.done["importance"] = done
    done.then(h.safe(h.layer_views), [page.state], [imp.layer_plot, imp.layer_md], api_visibility="private")
    done.then(refresh_plan, page.plan_inputs, page.plan_outputs + page.slider_outputs, api_visibility="private").then(
        h.safe(h.hidden_figure), *hidden_io, api_visibility="private")

    @h.safe
    def on_compare(session, n, progress=gr.Progress()):
        session = h.session_of(session)
        if not session.refs:
            raise wb.MergeLabError("load experts first, then compare the interventions")
        result = wb.compare_interventions(session, n, progress=h.progress_sink(progress))
        return (session, *h.comparison_views(result))

    page.done["compare"] = long_step(imp.compare_btn, imp.compare_stop, on_compare, [page.state, imp.fewshot],
                                     [page.state, imp.compare_plot, imp.compare_md], "compare_interventions",
                                     progress_on=imp.compare_progress)

    def on_hidden_layer(session, layer):
        modules = wb.unit_module_choices(h.session_of(session)).get(layer, [])
        return gr.update(choices=modules, value=modules[0] if modules else None)

    imp.hid_layer.input(on_hidden_layer, [page.state, imp.hid_layer], imp.hid_module, api_visibility="private")
    for comp in (imp.hid_expert, imp.hid_module):
        comp.change(h.safe(h.hidden_figure), *hidden_io, api_visibility="private")


def _slider_handler(index: int, key: str, unchanged: int):
    """Handler of one per-layer slider (every user change: drag, keys, its number box, its reset); the
    ``unchanged`` outputs (the plan views and the slider) are left as they are when no expert is loaded or
    the value is the plan's already (a release or blur that changed nothing records no override)."""
    @h.safe
    def on_slider(session, expert, value, method_value, *values):
        session = h.session_of(session)
        if not session.refs or index >= len(session.layers) or expert not in session.refs or value is None:
            return (session, *[gr.update()] * unchanged)
        layer = session.layers[index]
        shared = h.shared_values(method_value, values)
        current = wb.plan(session, method_value, shared)[expert][key][layer]
        if abs(float(value) - current) <= 5e-5:  # the sliders show the plan rounded to 4 decimals
            return (session, *[gr.update()] * unchanged)
        wb.set_cell(session, expert, layer, key, value, method_value)
        label = f"layer {layer} · {key.replace('_', ' ')} ✎"
        return (session, *h.plan_views(session, method_value, shared), gr.update(label=label))
    return on_slider


def _preset(fn):
    @h.safe
    def handler(session, expert, method_value, *values):
        session = h.session_of(session)
        if not session.refs:
            raise wb.MergeLabError("load experts first")
        shared = h.shared_values(method_value, values)
        fn(session, shared, expert)
        return (session, *h.plan_views(session, method_value, shared),
                *h.slider_updates(session, expert, method_value, shared))
    return handler


def _table_handler(key: str, unchanged: int):
    """Handler of one editable plan table; ``unchanged`` outputs are left as they are when no expert is loaded."""
    @h.safe
    def apply_table(session, expert, table, method_value, *values):
        session = h.session_of(session)
        if not session.refs:
            return (session, *[gr.update()] * unchanged)
        shared = h.shared_values(method_value, values)
        wb.apply_table(session, key, h.table_rows(table), method_value, shared)
        return (session, *h.plan_views(session, method_value, shared),
                *h.slider_updates(session, expert, method_value, shared))
    return apply_table


def wire_plan(page) -> None:
    """The method, its shared parameters and the per-layer plan (sliders, presets, tables)."""
    merge, api = page.merge, page.api
    plan_io = (page.plan_inputs, page.plan_outputs + page.slider_outputs)
    merge.method.input(on_method, [page.state, merge.plan_expert, merge.method],
                       [merge.method_md, *merge.param_boxes, *page.plan_outputs, *page.slider_outputs],
                       api_visibility="private")
    merge.plan_expert.change(refresh_plan, *plan_io, api_visibility="private")
    for box in merge.param_boxes:
        box.input(refresh_plan, *plan_io, api_visibility="private")

    for i in range(h.MAX_LAYER_ROWS):
        for key, slider in ((wb.DROP, merge.drop_sliders[i]), (wb.WEIGHT, merge.weight_sliders[i])):
            # .input: every user change (drag, arrow/Home/End/PageUp keys, typing into the number box);
            # .release: the ↺ reset (and pointer-up / blur, which change nothing more). Neither fires on our
            # own updates (expert shown, presets, APL prefill), so those never become overrides.
            handler = _slider_handler(i, key, len(page.plan_outputs) + 1)
            for event in (slider.input, slider.release):
                event(handler, [page.state, merge.plan_expert, slider, merge.method, *merge.param_boxes],
                      [page.state, *page.plan_outputs, slider], api_visibility="private",
                      trigger_mode="always_last", show_progress="hidden")

    @h.safe
    def on_api_set(session, expert, layer, key, value, method_value, *values):
        session = h.session_of(session)
        wb.set_cell(session, expert, layer, key, value, method_value)
        return session, *h.plan_views(session, method_value, h.shared_values(method_value, values))

    api.button.click(on_api_set, [page.state, api.expert, api.layer, api.key, api.value, merge.method,
                                  *merge.param_boxes], [page.state, *page.plan_outputs], api_name="set_layer")

    preset_io = (page.plan_inputs, [page.state, *page.plan_outputs, *page.slider_outputs])
    merge.reset_btn.click(_preset(lambda s, shared, e: wb.reset_overrides(s)), *preset_io, api_name="reset_to_apl")
    merge.uniform_btn.click(_preset(lambda s, shared, e: wb.preset_uniform(s, float(shared.get(wb.DROP, 0.5)), 1.0)),
                            *preset_io, api_name="preset_uniform")
    merge.swap_btn.click(_preset(lambda s, shared, e: wb.preset_layer_swap(s, outer=e)), *preset_io,
                         api_name="preset_layer_swap")

    # an edit applies as soon as the cell is left (.input fires on user edits only, not on our own updates)
    for key, table in ((wb.DROP, merge.drop_table), (wb.WEIGHT, merge.weight_table)):
        table.input(_table_handler(key, len(page.plan_outputs) + len(page.slider_outputs)), [page.state, merge.plan_expert, table, merge.method, *merge.param_boxes],
                    [page.state, *page.plan_outputs, *page.slider_outputs], api_visibility="private",
                    trigger_mode="always_last")


def wire_merge(page) -> None:
    merge = page.merge

    @h.safe
    def on_merge(session, method_value, seed_value, *values, progress=gr.Progress()):
        session = h.session_of(session)
        shared = wb.layer_swap_shared(session, method_value, h.shared_values(method_value, values))  # the panel's
        summary = wb.merge(session, method_value, shared, seed_value, progress=h.progress_sink(progress))
        return session, merge_text(summary)

    page.done["merge"] = long_step(merge.merge_btn, merge.merge_stop, on_merge,
                                   [page.state, merge.method, merge.seed, *merge.param_boxes],
                                   [page.state, merge.merge_md], "merge", progress_on=merge.merge_md,
                                   announce_id="merge-status")
    page.done["merge"].then(lambda s: (h.merge_in_use(s),) * 2, [page.state],
                            [page.export.export_uses, page.probe.predict_uses], api_visibility="private")


def merge_text(summary) -> str:
    """The merge status line: what was merged, how long it took, what was recomputed, what to do next."""
    if summary.reused:
        return (f"**{summary.label}** done at once: an identical merge was already in memory (same experts, "
                f"settings and seed). Settings: {summary.settings}. Next: **Run probe**.")
    changed = ", ".join(summary.changed_layers) or "none (all reused)"
    return (f"**{summary.label}** done in {summary.seconds:.2f} s — {summary.recomputed} tensors "
            f"recomputed; layers re-merged: {changed}. Settings: {summary.settings}. Next: **Run probe**.")


def wire_probe(page) -> None:
    probe = page.probe

    @h.safe
    def on_probe(session, progress=gr.Progress()):
        session = h.session_of(session)
        report = wb.run_probe(session, progress=h.progress_sink(progress))
        return (session, *h.probe_views(session, report))

    page.done["probe"] = long_step(probe.probe_btn, probe.probe_stop, on_probe, [page.state],
                                   [page.state, probe.probe_df, probe.probe_plot, probe.probe_md, probe.history_df],
                                   "run_probe", progress_on=probe.probe_progress,
                                   announce_id="probe-status")

    @h.safe
    def on_sweep(session, progress=gr.Progress()):
        session = h.session_of(session)
        if not session.refs:
            raise wb.MergeLabError("load experts first, then sweep the drop ratios")
        ratios = wb.SWEEP_RATIOS
        results = wb.drop_sweep(session, ratios, progress=h.progress_sink(progress))
        return fg.sweep_figure(ratios, results), fg.sweep_summary(ratios, results)

    page.done["sweep"] = long_step(probe.sweep_btn, probe.sweep_stop, on_sweep, [page.state],
                                   [probe.sweep_plot, probe.sweep_md], "sweep", progress_on=probe.sweep_progress)

    # nothing lost: the session's history as a file, and back
    @h.safe
    def on_history(session):
        path = wb.save_history(h.session_of(session))
        return gr.update(value=str(path), visible=True), (
            f"Saved `{path.name}`: every merge of this session with its probe results and full recipe. "
            "Restore it later with **Restore history from JSON**.")

    probe.history_btn.click(on_history, [page.state], [probe.history_file, probe.history_md],
                            api_name="download_history")

    @h.safe
    def on_restore(session, file):
        session = h.session_of(session)
        if not file:
            raise wb.MergeLabError("choose the history JSON file saved with Download history")
        session, note = wb.restore_history(session, getattr(file, "name", None) or file)
        headers, rows = wb.history_rows(session)
        return session, {"headers": headers, "data": rows}, note

    probe.restore_btn.upload(on_restore, [page.state, probe.restore_btn], [page.state, probe.history_df,
                                                                           probe.history_md],
                             api_name="restore_history")

    @h.safe
    def on_predict(session, text):
        return {"headers": h.PREDICT_HEADERS, "data": wb.predict(h.session_of(session), text)}

    probe.predict_btn.click(h.heavy(on_predict), [page.state, probe.sentence], probe.predict_df, api_name="predict",
                            **h.HEAVY)
    probe.sentence.submit(on_predict, [page.state, probe.sentence], probe.predict_df, api_visibility="private")
    wire_prompt(page)


def wire_prompt(page) -> None:
    """Try a prompt for causal-LM experts; after each load the page shows it or Try a sentence, and names the
    probe table and chart after the metric the experts get (perplexity or accuracy)."""
    probe, prompt = page.probe, page.probe.prompt

    @h.safe
    def on_generate(session, text, expert, new_tokens, sample, seed):
        rows = wb.generate_side_by_side(h.session_of(session), text, expert, new_tokens, seed, bool(sample))
        return [continuation for _, continuation in rows]  # plain strings: what /generate returns to API callers

    @h.safe
    def name_outputs(session, expert):
        """The three boxes' labels: base, the expert compared and the merge they show."""
        session = h.session_of(session)
        return [gr.update(label=name) for name in ("base", expert or "expert", session.last_label or "merge")]

    long_step(prompt.button, prompt.stop, on_generate,
              [page.state, prompt.text, prompt.expert, prompt.new_tokens, prompt.sample, prompt.seed],
              prompt.outputs, "generate").then(name_outputs, [page.state, prompt.expert], prompt.outputs,
                                               api_visibility="private")
    page.done["load"].then(h.try_area, [page.state],
                           [probe.sentence_box, prompt.box, prompt.expert, probe.probe_df, probe.probe_plot],
                           api_visibility="private")


def wire_export(page) -> None:
    exp = page.export

    @h.safe
    def on_export(session, tasks, dtype_value, configs_from=None, progress=gr.Progress()):
        session = h.session_of(session)
        path = wb.export(session, tasks or None, h.dtype_of(dtype_value), progress=h.progress_sink(progress),
                         configs_from=configs_from or None)
        return str(path), h.export_note(session, path)

    page.done["export"] = long_step(exp.export_btn, exp.export_stop, on_export,
                                    [page.state, exp.export_tasks, exp.dtype, exp.configs_from],
                                    [exp.export_file, exp.export_md],
                                    "export", progress_on=exp.export_md,
                                    announce_id="export-status")


def wire_guided(page) -> None:
    """Guided first merge: fill every step with a good first setting on the demo zoo."""
    ex, imp, merge = page.experts, page.importance, page.merge

    intro = page.intro
    buttons = [ex.load_btn, imp.imp_btn, merge.merge_btn, page.probe.probe_btn, page.export.export_btn]

    @h.safe
    def guided(session):
        status = wb.zoo_status()
        if not status.ready:  # the button is off while the zoo builds; an API caller is told why
            raise wb.MergeLabError(status.not_ready_message())
        zoo = status.zoo
        tasks, base = zoo.tasks, wb.zoo_refs(zoo)[0]
        classifiers = ex.zoo_kind.choices[0][1]  # the guide walks the classifier zoo: the switch says so too
        return (classifiers, gr.update(value=tasks), base, wb.DEFAULT_FEWSHOT, "gradient", "restore", wb.DEFAULT_METHOD,
                "Guided setup done: every step has a good first setting. Press the highlighted button; the line at "
                "the bottom of the window says what each step showed and which button comes next.",
                wb.next_step(None), *h.guide_views(session, None))

    intro.guided_btn.click(guided, [page.state], [ex.zoo_kind, ex.zoo_pick, ex.base_box, imp.fewshot, imp.mode, imp.intervention,
                                                  merge.method, ex.load_md, intro.guide_state, intro.guide_md,
                                                  *buttons],
                           api_visibility="private").then(
        on_method, [page.state, merge.plan_expert, merge.method],
        [merge.method_md, *merge.param_boxes, *page.plan_outputs, *page.slider_outputs], api_visibility="private")

    def advance(step: str):
        @h.safe
        def after(session, waiting):
            if waiting != step:  # the guide is off, or waits for another step: leave the page as it is
                return (waiting, gr.update(), *[gr.update()] * len(buttons))
            return (wb.next_step(step), *h.guide_views(session, step))
        return after

    for step in wb.GUIDE_STEPS:
        page.done[step].then(advance(step), [page.state, intro.guide_state],
                             [intro.guide_state, intro.guide_md, *buttons], api_visibility="private",
                             show_progress="hidden")


def wire_estimates(page) -> None:
    """Before each long step, how long it takes on this machine (measured rate × units), refreshed after every
    step that changes the units or measures a rate, and when the mode or the exact scope changes."""
    imp = page.importance
    inputs = [page.state, imp.mode, imp.scope, imp.fewshot]
    outputs = [imp.imp_eta, imp.compare_eta, page.probe.probe_eta, page.probe.sweep_eta]
    eta = h.safe(h.estimate_lines)
    for step in ("load", "importance", "compare", "merge", "probe", "sweep"):
        page.done[step].then(eta, inputs, outputs, api_visibility="private", show_progress="hidden",
                             concurrency_limit=1, concurrency_id=h.HEAVY["concurrency_id"])
    for event in (imp.mode.change, imp.scope.change, imp.fewshot.release):
        event(eta, inputs, outputs, api_visibility="private", show_progress="hidden",
              concurrency_limit=1, concurrency_id=h.HEAVY["concurrency_id"])


@h.safe
def _cosine_view(session):
    session = h.session_of(session)
    experts, matrix = wb.cosine_data(session)
    off = [matrix[i][j] for i in range(len(experts)) for j in range(len(experts)) if i < j]
    text = (f"Task vectors: mean pairwise cosine {sum(off) / len(off):.3f} over {len(off)} pair(s) "
            "(0 = orthogonal: little interference; near 1 = the experts changed the same things).") if off else ""
    return fg.cosine_figure(experts, matrix), text


def wire_recipe(page) -> None:
    """Recipe import: an uploaded file's text goes into the box; Import fills the page from the box and merges."""
    rec, ex, imp, merge, exp = page.recipe, page.experts, page.importance, page.merge, page.export
    rec.recipe_file.upload(h.safe(h.recipe_file_text), [rec.recipe_file], [rec.recipe_text], api_visibility="private")

    @h.safe
    def on_import(session, text, request: gr.Request = None, progress=gr.Progress()):
        status = wb.zoo_status()
        session, recipe, shared = h.import_recipe(session, text, zoo=status.zoo if status.ready else None,
                                                  progress=progress)
        h.register_client(request, session)
        experts, method = session.experts, recipe.method
        why = wb.method_available(session, method)
        if why:
            merged = f"Not merged yet: {why}."
            merge_md = ""
        else:
            merge_md = merge_text(wb.merge(session, method, shared, recipe.seed, progress=h.progress_sink(progress)))
            merged = "Merged: " + merge_md
        n_cells = sum(len(layers) for keys in session.overrides.values() for layers in keys.values())
        note = (f"Imported a **{wb.method_spec(method).pretty_name}** recipe: base `{recipe.base}`, experts "
                f"{', '.join(f'`{e}`' for e in experts)}, seed {recipe.seed}; {n_cells} per-layer cell(s) set from "
                f"it (the sliders and tables below show them). {merged}")
        # one update per output: gradio consumes an update dict as it applies it
        choices = [gr.update(choices=experts, value=experts[0]) for _ in range(3)]
        return (method, recipe.seed, h.dtype_label(recipe.dtype), *h.recipe_param_updates(method, shared),
                session, experts_table(session.summary), f"Loaded from the recipe: {len(experts)} experts of base "
                f"`{session.base_ref}`, homology check passed.", wb.data_status(session), *choices,
                gr.update(choices=experts, value=experts), h.method_info(session, method),
                *h.plan_views(session, method, shared), *h.slider_updates(session, experts[0], method, shared),
                merge_md, note)

    # the method's controls first: the expert shown on the sliders changes too, and its change event reads them
    outputs = [merge.method, merge.seed, exp.dtype, *merge.param_boxes,
               page.state, ex.experts_df, ex.load_md, ex.data_md, ex.attach_expert, merge.plan_expert,
               imp.hid_expert, exp.export_tasks, merge.method_md, *page.plan_outputs, *page.slider_outputs,
               merge.merge_md, rec.recipe_md]
    event = rec.import_btn.click(h.heavy(on_import), [page.state, rec.recipe_text], outputs, api_name="import_recipe",
                                 **h.HEAVY)
    # the plan once more from the controls as they now are (whatever order the browser applied the updates in)
    announce(event.then(refresh_plan, page.plan_inputs, page.plan_outputs + page.slider_outputs,
                        api_visibility="private").then(
        _cosine_view, [page.state], [merge.cosine_plot, merge.cosine_md], api_visibility="private"), "recipe-status")
