"""Translate a recipe into the YAML mergekit 0.1.5 runs (``mergekit-yaml config.yml OUT``).

Every parameter is translated to mergekit's meaning, checked against mergekit 0.1.5's source
(``merge_methods/registry.py``, ``generalized_task_arithmetic.py``, ``sparsify.py``, ``config.py``,
``plan.py``); what mergekit cannot express is written into the file as ``#`` comments.

- ``drop_ratio`` → ``density`` = 1 − drop_ratio (mergekit keeps ``int(density·n)`` entries, at least one;
  Merge Lab ``round(density·n)``: they agree where density·n is whole).
- Norm tensors: Merge Lab never sparsifies them (nor applies TIES sign election to them); the export
  gives them ``density: 1.0`` through mergekit filters (substrings of tensor names), which is
  mergekit's "no sparsification". mergekit still elects signs on them for ties / dare_ties / della.
- ``linear``: mergekit's linear merges the models listed, so the base is not named (naming
  ``base_model`` makes it an input without a weight: "Missing required parameter weight").
- ``magnitude`` (no sign election) is mergekit's ``breadcrumbs`` with ``gamma: 0``:
  ``magnitude_outliers`` then removes no outliers and keeps the ``density`` largest entries.
- DELLA: mergekit's keep probabilities span density ± ε (``della_magprune``: ``(density − ε) +
  rank_norm·2ε``); ours span density ± ε/2, so mergekit's ``epsilon`` is ours / 2.
- ``rescale``: Merge Lab divides kept entries by their keep probability; mergekit's ``rescale: true``
  multiplies the kept delta by ‖Δ‖₁ / ‖kept‖₁ (``RescaleNorm.l1``), equal in expectation, not entry-wise.
- Per-layer values (lists interpolated over embeddings…head, ``{layer: value}`` maps, per-expert
  overrides) are resolved per (expert, layer) as the engine does and written as mergekit filters on
  each layer's tensor-name prefix, which mergekit evaluates exactly. mergekit's own gradients
  interpolate over blocks only (block i at i/(N−1), embeddings and head at 0), so they are used only
  when tensor names are unknown, and a note says what differs.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import yaml

from ..errors import MergeLabError
from ..methods import get_method
from ..params import ParamResolver, normalize_aliases
from .layout import EMBEDDINGS, HEAD, ROLE_MERGE, ROLE_TASK_HEAD, Layout

#: Substrings naming norm tensors, as Merge Lab's layout recognises them (layernorm, layer_norm,
#: LayerNorm, ln_1, ln_f, norm): mergekit filters match a substring of the tensor name, case-sensitively.
NORM_FILTERS = ("norm", "Norm", "ln_")
_BLOCK = re.compile(r"(?:^|\.)((?:layer|layers|h|blocks|block)\.(\d+)\.)")

# Merge Lab method → (mergekit merge_method, fixed mergekit parameters). Parameters Merge Lab has no
# control for are pinned so that mergekit's defaults cannot change the arithmetic.
_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "linear": ("linear", {"normalize": True}),
    "task_arithmetic": ("task_arithmetic", {"normalize": False}),
    "ties": ("ties", {"rescale": False}),
    "magnitude": ("breadcrumbs", {"normalize": False, "rescale": False}),
    "breadcrumbs": ("breadcrumbs", {"normalize": False, "rescale": False}),
    "dare_linear": ("dare_linear", {"normalize": False}),
    "dare_ties": ("dare_ties", {}),
    "della": ("della", {"rescale": True}),
    "slerp": ("slerp", {}),
    "model_stock": ("model_stock", {}),
    "layer_swap": ("passthrough", {}),  # or linear with per-layer weights where slices cannot say it (_layer_swap)
}
# Methods mergekit lacks, with why (said in the refusal).
_ABSENT = {"localize_stitch": " (its per-expert masks, trained on few-shot data or "
                              "taken model-wide by magnitude, cannot be written in a mergekit config)"}
_SPARSIFYING = {"ties", "magnitude", "breadcrumbs", "dare_linear", "dare_ties", "della"}
_CONSENSUS = {"ties", "dare_ties", "della"}
_RANDOM = {"dare_linear", "dare_ties", "della"}
# Merge Lab parameters set per model in mergekit (its NON_BASE scope), and shared ones (under parameters).
_PER_MODEL = ("weight", "drop_ratio", "gamma", "epsilon")
_SHARED = ("lambda", "normalize", "rescale", "filter_wise")


def to_mergekit(recipe, layers: Sequence[str] | Layout | None = None) -> dict[str, Any]:
    """mergekit config dict for ``recipe``; notes on what mergekit cannot express under the key ``# notes``.

    ``layers`` is the model's :class:`Layout` (exact per-layer filters and norm filters checked against
    the tensor names) or just its layer names (then per-layer values become mergekit gradients over the
    blocks). MergeLabError if mergekit has no such method or cannot run the values given.
    """
    spec = get_method(recipe.method)
    if recipe.method not in _METHODS:
        raise MergeLabError(no_mergekit_note(spec), field="method")
    layout = layers if isinstance(layers, Layout) else None
    layer_names = list(layout.layers if layout else layers) if layers is not None else None
    ctx = _Context(layout, layer_names)
    method = recipe.method
    mk_method, fixed = _METHODS[method]
    shared = normalize_aliases(recipe.parameters)
    per_expert = {e.name: normalize_aliases(e.parameters, f"experts.{e.name}.parameters") for e in recipe.experts}
    if any(_varies(v) for v in [*shared.values(), *(v for p in per_expert.values() for v in p.values())]):
        ctx.require_layers()
    resolver = ParamResolver(spec.params, shared, per_expert, layer_names or ())
    declared = set(spec.param_names())
    notes: list[str] = []

    if method == "layer_swap":
        config = _layer_swap(recipe, ctx, notes)
    elif method == "slerp":
        first, second = recipe.experts
        t = ctx.setting({layer: resolver.value("t", first.name, layer) for layer in ctx.rows()})
        config = {"merge_method": "slerp", "base_model": _model_ref(first.model, notes),
                  "models": [{"model": _model_ref(first.model, notes)}, {"model": _model_ref(second.model, notes)}],
                  "parameters": {"t": t}}
    else:
        models = []
        for expert in recipe.experts:
            params: dict[str, Any] = {}
            for name in _PER_MODEL:
                if name not in declared:
                    continue
                values = {layer: resolver.value(name, expert.name, layer) for layer in ctx.rows()}
                if name == "drop_ratio":
                    params["density"] = ctx.setting({k: _round(1.0 - v) for k, v in values.items()},
                                                    norms=1.0 if method in _SPARSIFYING else None)
                elif name == "epsilon":
                    params["epsilon"] = ctx.setting({k: _round(v / 2) for k, v in values.items()})
                else:
                    params[name] = ctx.setting(values)
            if method == "magnitude":
                params["gamma"] = 0.0
            if method == "della":
                _check_della(expert.name, resolver, ctx.rows())
            models.append({"model": _model_ref(expert.model, notes), "parameters": params})
        config = {"merge_method": mk_method}
        if method != "linear":
            config["base_model"] = _model_ref(recipe.base, notes)
        config["models"] = models
        parameters: dict[str, Any] = {}
        for name in list(models[0]["parameters"]):  # the same for every model: said once, globally
            if all(m["parameters"].get(name) == models[0]["parameters"][name] for m in models):
                parameters[name] = models[0]["parameters"][name]
                for model in models:
                    del model["parameters"][name]
        for model in models:
            if not model["parameters"]:
                del model["parameters"]
        for name in _SHARED:
            if name in declared:
                value = ctx.setting({layer: resolver.value(name, None, layer) for layer in ctx.rows()})
                parameters[name] = value
        parameters.update(fixed)
        config["parameters"] = parameters
    if recipe.tokenizer is not None:  # vocabularies aligned by token: mergekit's tokenizer_source, the same rule
        refs = {e.name: e.model for e in recipe.experts}
        named_base = "base_model" in config
        config["tokenizer_source"] = (recipe.tokenizer if recipe.tokenizer == "union" or named_base and
                                      recipe.tokenizer == "base" else
                                      _model_ref(refs.get(recipe.tokenizer, recipe.base), notes))
        if recipe.tokenizer == "union":
            notes.append("tokenizer union: mergekit appends the models' added tokens in its own order of the models "
                         "(a set, which varies between runs), Merge Lab in expert order: the added tokens' ids, and "
                         "so their rows, may be permuted; each token's row is the same.")
    config["dtype"] = "float32"  # Merge Lab computes in float32 and writes recipe.dtype
    if recipe.dtype != "float32":
        config["out_dtype"] = recipe.dtype

    notes += ctx.notes
    notes += _method_notes(recipe, resolver, ctx)
    heads = sorted(n for n, i in layout.tensors.items() if i.role == ROLE_TASK_HEAD) if layout else []
    if heads:
        notes.append(f"Merge Lab keeps each expert's own task head ({', '.join(heads[:4])}"
                     f"{', …' if len(heads) > 4 else ''}) and writes one folder per task; mergekit merges "
                     "those tensors like the body into one model.")
    if notes:
        config["# notes"] = notes
    return config


def no_mergekit_note(spec) -> str:
    """Why a method has no mergekit export, naming it (every method outside ``_METHODS``, registered
    later ones included): mergekit 0.1.5 lacks it, and for a data-aware method a config could not carry
    what ``prepare`` measured on the experts' few-shot data anyway."""
    why = ("it merges with inputs measured on each expert's few-shot data (its prepare step), which a mergekit "
           "config cannot carry" if spec.prepare is not None else "mergekit implements no such merge")
    if getattr(spec, "per_task_bodies", False):
        why += ("; it also makes one body per task, where a mergekit config makes one model (the Merge Lab "
                "recipe writes one folder per task)")
    why += _ABSENT.get(spec.name, "")
    return (f"mergekit has no '{spec.name}' method ({spec.pretty_name}): {why}. Export the Merge Lab recipe "
            "instead (python -m merging merge recipe.yaml --out DIR replays it)")


def to_mergekit_yaml(recipe, layers: Sequence[str] | Layout | None = None) -> str:
    """The mergekit YAML for ``recipe``, headed by comments saying what mergekit cannot reproduce."""
    config = to_mergekit(recipe, layers)
    notes = config.pop("# notes", [])
    header = [f"# Generated by Merge Lab from a '{recipe.method}' recipe, for mergekit 0.1.5:",
              "#   mergekit-yaml mergekit.yaml OUT_DIR"
              + (f" --random-seed {recipe.seed}" if recipe.method in _RANDOM else ""),
              "# Model paths are as the recipe names them: run from the recipe's folder."]
    if recipe.method in _RANDOM:
        header.append(f"# The recipe's seed is {recipe.seed}; --random-seed seeds mergekit's own generator, "
                      "it does not reproduce Merge Lab's masks.")
    header += [f"# Note: {note}" for note in notes]
    return "\n".join(header) + "\n" + yaml.safe_dump(config, sort_keys=False)


# ---- layer swapping ----------------------------------------------------------------------

def _layer_swap(recipe, ctx: _Context, notes: list[str]) -> dict[str, Any]:
    """Layer swapping as mergekit runs it: ``passthrough`` slices when every block is one model's and the
    embeddings and head come from the first and last slice's model (where mergekit's slices take them,
    ``plan.py``: pre-weights from the first slice, post-weights from the last); otherwise ``linear`` with
    per-layer weight filters (1 for the source, 0 for the others, the blend shares for a blended layer),
    which mergekit computes as Σ w·Θ / Σ w — the same copies and blends."""
    from ..methods.layer_swap import BASE, BLEND, INNER, OUTER, layer_plan, outer_inner

    if ctx.layers is None:
        raise MergeLabError("layer swapping counts its top layers from the model's depth: export it to mergekit "
                            "with the models at hand (python -m merging merge recipe.yaml --format mergekit)",
                            field="method")
    blocks = [layer for layer in ctx.layers if layer not in (EMBEDDINGS, HEAD)]
    plan = layer_plan(ctx.layers, len(blocks), normalize_aliases(recipe.parameters))
    outer, inner = outer_inner([e.name for e in recipe.experts], recipe.parameters.get("outer_expert", "first"))
    refs = {e.name: e.model for e in recipe.experts}
    models = {OUTER: _model_ref(refs[outer], notes), INNER: _model_ref(refs[inner], notes),
              BASE: _model_ref(recipe.base, notes)}
    sources = [plan[b][0] for b in blocks]
    ends_agree = (plan.get(EMBEDDINGS, (sources[0],))[0] == sources[0]
                  and plan.get(HEAD, (sources[-1],))[0] == sources[-1])
    if blocks and BLEND not in sources and ends_agree:
        slices, start = [], 0
        for index in range(1, len(sources) + 1):
            if index == len(sources) or sources[index] != sources[start]:
                slices.append({"sources": [{"model": models[sources[start]], "layer_range": [start, index]}]})
                start = index
        return {"merge_method": "passthrough", "slices": slices}
    if ctx.layer_filters is None:
        raise MergeLabError("this layer swap blends layers (or takes the embeddings or head from another model than "
                            "the first or last block's), which mergekit's passthrough slices cannot say; its linear "
                            "form needs the tensor names: export with the models at hand", field="method")
    used = [OUTER, INNER] + ([BASE] if any(source == BASE for source, _ in plan.values()) else [])
    entries = []
    for role in used:
        weights = {layer: _swap_weight(role, source, share) for layer, (source, share) in plan.items()}
        entries.append({"model": models[role], "parameters": {"weight": ctx.setting(weights)}})
    notes.append("layer swapping as mergekit's linear merge with per-layer weights (1 for the layer's source, 0 "
                 "for the others, blend shares where layers are blended): passthrough slices cannot blend layers "
                 "or take the embeddings and head from another model than the first and last slice's.")
    return {"merge_method": "linear", "models": entries, "parameters": {"normalize": True}}


def _swap_weight(role: str, source: str, share: float) -> float:
    """mergekit linear weight of the model in ``role`` for a layer whose source is ``source``."""
    if source == "blend":
        return _round(share) if role == "outer" else _round(1.0 - share) if role == "inner" else 0.0
    return 1.0 if role == source else 0.0


# ---- parameters -------------------------------------------------------------------------

class _Context:
    """Turns per-layer values into mergekit settings for one model's layout."""

    def __init__(self, layout: Layout | None, layers: list[str] | None):
        self.layout = layout
        self.layers = layers
        self.notes: list[str] = []
        self._noted: set[str] = set()
        self.norm_filters = _norm_filters(layout)
        self.layer_filters = _layer_filters(layout) if layout else None

    def rows(self) -> list[str | None]:
        return list(self.layers) if self.layers else [None]

    def require_layers(self) -> None:
        if self.layers is None:
            raise MergeLabError("per-layer values need the model's layers to export to mergekit: export from "
                                "the app or with python -m merging merge recipe.yaml --format mergekit")

    def setting(self, values: dict, norms: float | None = None) -> Any:
        """A mergekit setting giving each layer its value (and norm tensors ``norms``, when given)."""
        distinct = {_key(v) for v in values.values()}
        rest: Any
        filters: list[dict[str, Any]] = []
        if len(distinct) == 1:
            rest = next(iter(values.values()))
        elif self.layer_filters is not None:
            rest = Counter(_key(v) for v in values.values()).most_common(1)[0][0]
            rest = next(v for v in values.values() if _key(v) == rest)
            for layer, value in values.items():
                if _key(value) != _key(rest):
                    filters += [{"filter": f, "value": value} for f in self.layer_filters[layer]]
        else:
            blocks = [values[layer] for layer in self.layers if layer not in (EMBEDDINGS, HEAD)]
            rest = blocks if len({_key(v) for v in blocks}) > 1 else blocks[0]
            first = blocks[0]
            for layer in (EMBEDDINGS, HEAD):
                if layer in values and _key(values[layer]) != _key(first):
                    self._note(f"mergekit gradients run over blocks only and give embeddings and head tensors "
                               f"block 0's value ({first}), not the recipe's ({values[layer]} for {layer}); "
                               "export with the model at hand for exact per-layer filters")
        if norms is not None and self.norm_filters and (filters or _key(rest) != _key(norms)):
            filters = [{"filter": f, "value": norms} for f in self.norm_filters] + filters
        if not filters:
            return rest
        return filters + [{"value": rest}]

    def _note(self, text: str) -> None:
        if text not in self._noted:
            self._noted.add(text)
            self.notes.append(text)


def _norm_filters(layout: Layout | None) -> list[str]:
    """Filters selecting exactly the norm tensors: the generic substrings when they select just those,
    else each norm tensor's shortest unambiguous name suffix."""
    if layout is None:
        return list(NORM_FILTERS)
    merged = [n for n, i in layout.tensors.items() if i.role == ROLE_MERGE]
    norms = {n for n in merged if not layout[n].droppable}
    if not norms:
        return []
    used = [f for f in NORM_FILTERS if any(f in n for n in merged)]
    if all(any(f in n for f in used) == (n in norms) for n in merged):
        return used
    return sorted({_unique_suffix(n, merged) for n in norms})


def _layer_filters(layout: Layout) -> dict[str, list[str]]:
    """Layer → substrings matching exactly that layer's merged tensors among the model's names."""
    merged = [n for n, i in layout.tensors.items() if i.role == ROLE_MERGE]
    out: dict[str, list[str]] = {layer: [] for layer in layout.layers}
    by_layer = layout.layer_tensors()
    for layer, names in by_layer.items():
        if not names:
            continue
        prefixes = set()
        if layer not in (EMBEDDINGS, HEAD):
            for name in names:
                match = _BLOCK.search(name)
                prefixes.add(match.group(1) if match else name)
            if len(prefixes) == 1:
                prefix = next(iter(prefixes))
                if all((prefix in n) == (n in names) for n in merged):
                    out[layer] = [prefix]
                    continue
        out[layer] = [_unique_suffix(n, merged) for n in names]
    return out


def _unique_suffix(name: str, names: Sequence[str]) -> str:
    """Shortest dotted suffix of ``name`` that is a substring of no other name (mergekit matches
    substrings, and a checkpoint may name tensors with or without the model prefix)."""
    parts = name.split(".")
    for start in range(len(parts) - 1, -1, -1):
        suffix = ".".join(parts[start:])
        if not any(suffix in other for other in names if other != name):
            return suffix
    return name


def _check_della(expert: str, resolver: ParamResolver, rows: list) -> None:
    for layer in rows:
        density = 1.0 - float(resolver.value("drop_ratio", expert, layer))
        epsilon = float(resolver.value("epsilon", expert, layer))
        if density < 1.0 and not (0.0 < density - epsilon / 2 and density + epsilon / 2 < 1.0):
            where = f" at layer {layer}" if layer is not None else ""
            raise MergeLabError(
                f"mergekit's DELLA needs density ± ε/2 strictly inside (0, 1) (it raises otherwise); expert "
                f"'{expert}'{where} has density {density:g}, ε {epsilon:g}: lower epsilon or move drop_ratio "
                "to export it", field="parameters.epsilon")


def _method_notes(recipe, resolver: ParamResolver, ctx: _Context) -> list[str]:
    method = recipe.method
    notes = []
    if method in _RANDOM:
        notes.append("Merge Lab draws its random masks per (seed, expert, tensor); mergekit draws from torch's "
                     "global generator, so its DARE/DELLA output differs entry-wise from Merge Lab's (equal in "
                     "expectation).")
    if method in ("dare_linear", "dare_ties"):
        notes.append("rescale: Merge Lab divides kept entries by 1 − drop_ratio; mergekit's rescale: true scales "
                     "each kept delta to the L1 norm of the whole delta (same expectation, not entry-wise).")
    if method == "della":
        notes.append("epsilon is Merge Lab's ε / 2: mergekit's keep probabilities span density ± epsilon, "
                     "Merge Lab's density ± ε/2.")
        notes.append("Merge Lab divides each kept entry by its keep probability; mergekit's rescale: true scales "
                     "each kept delta to the L1 norm of the whole delta (same expectation, not entry-wise).")
    if method in _CONSENSUS:
        notes.append("Merge Lab merges norm tensors without TIES sign election; mergekit elects signs on them "
                     "too, so norm tensors differ (they are not sparsified: density 1.0 by filter).")
    if method in ("ties", "magnitude"):
        scope = recipe.parameters.get("trim_scope", "tensor")
        if scope != "tensor":
            notes.append(f"trim_scope {scope}: Merge Lab takes one magnitude threshold per {scope}; mergekit "
                         "trims each tensor on its own and has no equivalent, so the kept entries differ.")
    if method == "magnitude":
        notes.append("Merge Lab's 'magnitude' is mergekit's breadcrumbs with gamma 0 (no outliers removed, "
                     "no sign election).")
    if method in ("ties", "magnitude", "breadcrumbs"):
        notes.append("mergekit keeps int(density·n) entries of a tensor of n, Merge Lab round(density·n): "
                     "where density·n is not whole mergekit may keep one entry fewer.")
    if method == "breadcrumbs":
        notes.append("where gamma + density > 1 mergekit removes fewer outliers to keep density; Merge Lab "
                     "keeps fewer entries instead.")
    if method == "slerp":
        notes.append("where a tensor of either model is all zero (norm < 1e-8) Merge Lab interpolates linearly; "
                     "mergekit takes the angle to a zero vector as 90° (sin-weighted), so those tensors differ.")
    if method == "linear":
        notes.append("linear: mergekit averages the listed models, so the base is not named; weights summing "
                     "to 0 divide by 0 in mergekit (Merge Lab then adds the weighted deltas to the base).")
    return notes


def _model_ref(ref: str, notes: list[str]) -> str:
    """A recipe's model reference as mergekit reads it: hf:org/name@rev → org/name@rev."""
    if ref.startswith("hf:"):
        return ref[3:]
    if ref.startswith("zoo:"):
        note = (f"'{ref}' is a Merge Lab zoo model: mergekit cannot open it; replace it with the folder "
                "python -m merging zoo shows for it")
        if note not in notes:
            notes.append(note)
    return ref


def _varies(value: Any) -> bool:
    return isinstance(value, (list, tuple, dict))


def _key(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _round(value: float) -> float:
    """1 − 0.7 is 0.30000000000000004: round away the binary noise (12 digits) so the YAML reads as meant."""
    return round(float(value), 12)
