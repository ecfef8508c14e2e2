"""Read a mergekit YAML config into a Merge Lab :class:`Recipe` (paste or upload a mergekit config, merge it).

The inverse of :mod:`merging.io.mergekit_yaml`, with mergekit 0.1.5's meanings: ``density`` →
``drop_ratio`` = 1 − density (mergekit's default density is 1.0: nothing dropped), DELLA's ``epsilon``
→ ε = 2·epsilon (mergekit spans density ± epsilon, Merge Lab density ± ε/2), ``breadcrumbs`` with
``gamma: 0`` stays breadcrumbs (= Merge Lab's magnitude). mergekit gradients interpolate over the blocks
only (block i at i/(N−1), embeddings and head at 0), so they need the model's layers and become
``{layer: value}`` maps. Filters naming a block (``layers.3.``), the embeddings or the head become
map entries; a ``density: 1.0`` filter on norm tensors is dropped (Merge Lab never sparsifies norms).

What Merge Lab cannot take — other methods, slices that reorder or mix layers, ``modules``, tokenizer
settings, LoRA references, filters on modules — is a :class:`MergeLabError` saying what to change.
The YAML is read with aliases and anchors refused, so an alias bomb is an error, not a billion nodes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeLabError
from .layout import EMBEDDINGS, HEAD
from .mergekit_yaml import NORM_FILTERS
from .recipe import Recipe

MAX_CONFIG_BYTES = 1 << 20
_MERGE_METHOD = re.compile(r"^merge_method\s*:", re.MULTILINE)
_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.?$")
_EMBEDDING_NAMES = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                    "token_type_embeddings", "embeddings")
_HEAD_NAMES = ("lm_head", "ln_f", "model.norm", "final_layernorm", "final_layer_norm", "pooler")

# mergekit method → (Merge Lab method, mergekit parameters it takes, mergekit defaults that differ from ours)
_METHODS: dict[str, tuple[str, set[str]]] = {
    "linear": ("linear", {"weight", "normalize"}),
    "task_arithmetic": ("task_arithmetic", {"weight", "lambda", "normalize", "rescale", "int8_mask", "density"}),
    "ties": ("ties", {"weight", "lambda", "density", "normalize", "rescale", "int8_mask"}),
    "dare_linear": ("dare_linear", {"weight", "lambda", "density", "normalize", "rescale", "int8_mask"}),
    "dare_ties": ("dare_ties", {"weight", "lambda", "density", "normalize", "rescale", "int8_mask"}),
    "breadcrumbs": ("breadcrumbs", {"weight", "lambda", "density", "gamma", "normalize", "rescale", "int8_mask"}),
    "della": ("della", {"weight", "lambda", "density", "epsilon", "normalize", "rescale", "int8_mask"}),
    "slerp": ("slerp", {"t"}),
    # mergekit's model_stock reads one switch, filter_wise (global, default false), and no per-model value
    "model_stock": ("model_stock", {"filter_wise"}),
}
_NO_SPARSIFY = ("linear", "slerp", "task_arithmetic", "model_stock")  # no density: no drop_ratio to default
# mergekit's defaults (registry.py) for the switches Merge Lab fixes per method: (normalize, rescale)
_MK_DEFAULTS = {"linear": (True, False), "task_arithmetic": (False, False), "ties": (True, False),
                "dare_linear": (False, True), "dare_ties": (False, True), "breadcrumbs": (False, False),
                "della": (True, True)}
# what Merge Lab computes for those switches where it has no parameter: None = it has the parameter
_OURS_FIXED = {"linear": (True, False), "task_arithmetic": (False, False), "ties": (None, False),
               "dare_linear": (False, None), "dare_ties": (None, None), "breadcrumbs": (False, False),
               "della": (None, True)}
_TOP_KEYS = {"merge_method", "base_model", "models", "slices", "modules", "parameters", "dtype", "out_dtype",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "bfloat16", "fp32": "float32",
           "fp16": "float16", "bf16": "bfloat16"}

Layers = Sequence[str] | Callable[[Recipe], Sequence[str]] | None


class _NoAliasLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses anchors and aliases (and so ``<<`` merge keys) before expanding any."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise MergeLabError("mergekit config uses a YAML anchor or alias (&name / *name): write the values "
                                "out in full", line=mark.line + 1)
        return super().compose_node(parent, index)


def is_mergekit_yaml(text: str) -> bool:
    """A mergekit config names ``merge_method`` at the top level (a Merge Lab recipe names ``method``)."""
    return bool(_MERGE_METHOD.search(text))


def load_mergekit_yaml(text: str) -> Any:
    """Parse ``text`` safely: no Python objects, no aliases, bounded size; MergeLabError on anything odd."""
    if not isinstance(text, str):
        raise MergeLabError("a mergekit config must be text")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_CONFIG_BYTES:
        raise MergeLabError(f"mergekit config is larger than {MAX_CONFIG_BYTES // 1024} KB: is this the right file?")
    try:
        return yaml.load(text, Loader=_NoAliasLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise MergeLabError(f"mergekit config is not valid YAML: {getattr(exc, 'problem', None) or exc}",
                            line=(mark.line + 1) if mark else None) from exc
    except RecursionError as exc:
        raise MergeLabError("mergekit config nests too deeply to be a merge config") from exc


def from_mergekit_yaml(text: str, layers: Layers = None, source: Path | None = None, seed: int = 0) -> Recipe:
    """The Merge Lab recipe for a mergekit YAML config.

    ``layers`` (the model's layer names, or a function of the draft recipe returning them, e.g. opening
    its base) is needed only for mergekit gradients. ``seed`` is the recipe's seed (mergekit takes its
    seed on the command line, ``--random-seed``, not in the config).
    """
    data = load_mergekit_yaml(text)
    return from_mergekit(data, layers, source, seed)


def from_mergekit(data: Any, layers: Layers = None, source: Path | None = None, seed: int = 0) -> Recipe:
    if not isinstance(data, dict):
        raise MergeLabError("a mergekit config must be a YAML mapping with merge_method and models")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise MergeLabError(f"unknown mergekit field '{unknown[0]}' (mergekit 0.1.5 knows: "
                            f"{', '.join(sorted(_TOP_KEYS))})", field=unknown[0])
    mk_method = data.get("merge_method")
    if not isinstance(mk_method, str) or mk_method not in _METHODS:
        raise MergeLabError(f"mergekit method {mk_method!r} has no Merge Lab equivalent; Merge Lab reads "
                            f"{', '.join(sorted(_METHODS))}", field="merge_method")
    method, accepted = _METHODS[mk_method]
    for key in ("modules", "tokenizer", "chat_template"):
        if data.get(key) is not None:
            raise MergeLabError(f"mergekit '{key}' has no Merge Lab equivalent: remove it (Merge Lab merges one "
                                "model body and copies the tokenizer from the base)", field=key)
    if data.get("tokenizer_source") not in (None, "base"):
        raise MergeLabError("tokenizer_source: Merge Lab copies the tokenizer from the base model and cannot "
                            "build a union or take another model's: remove it or write tokenizer_source: base",
                            field="tokenizer_source")
    base = _ref(data.get("base_model"), "base_model") if data.get("base_model") is not None else None
    if (data.get("models") is None) == (data.get("slices") is None):
        raise MergeLabError("a mergekit config needs exactly one of models or slices", field="models")
    if data.get("slices") is not None:
        entries, slice_params = _from_slices(data["slices"])
    else:
        entries, slice_params = _from_models(data["models"]), {}
    shared_raw = _mapping(data.get("parameters"), "parameters")
    for key, value in slice_params.items():
        if key in shared_raw:
            raise MergeLabError(f"'{key}' is set both globally and per slice: give it in one place",
                                field=f"parameters.{key}")
        shared_raw[key] = value

    # base and experts
    refs = [ref for ref, _ in entries]
    if method == "linear":  # mergekit averages every input, the base_model too (added if not listed)
        experts = list(entries)
        if base is not None and base not in refs:
            if "weight" not in shared_raw:
                raise MergeLabError("linear names a base_model that models does not list, so it has no weight: "
                                    "mergekit rejects that (\"Missing required parameter weight\"); drop "
                                    "base_model or list it under models with a weight", field="base_model")
            experts.append((base, {}))
        base = base or refs[0]
    elif method == "slerp":
        if base is None or base not in refs or len(refs) != 2:
            raise MergeLabError("slerp needs base_model and exactly two models, one of them the base_model "
                                "(t = 0 gives the base)", field="models")
        experts = sorted(entries, key=lambda e: e[0] != base)  # the base first: t = 0 is the first expert
    else:
        if base is None:
            raise MergeLabError(f"{mk_method} needs base_model (the model the task vectors are taken from)",
                                field="base_model")
        experts = [(ref, params) for ref, params in entries if ref != base]
        if not experts:
            raise MergeLabError(f"{mk_method} needs at least one model besides base_model", field="models")
        if mk_method == "model_stock" and len(experts) < 2:
            raise MergeLabError("model_stock needs at least two models besides base_model (the angle between "
                                "their task vectors sets the merge)", field="models")

    draft_layers: list[str] | None = None

    def need_layers(where: str) -> list[str]:
        nonlocal draft_layers
        if draft_layers is None:
            if layers is None:
                raise MergeLabError(f"{where} is a mergekit gradient, which runs over the model's blocks: give "
                                    "the model's layers (python -m merging merge opens the base to find them)",
                                    field=where)
            if callable(layers):
                draft = Recipe(method, base or refs[0], _expert_refs(experts), {}, seed, "float32",
                               source=source)
                draft_layers = list(layers(draft))
            else:
                draft_layers = list(layers)
        return draft_layers

    names = _names([ref for ref, _ in experts])
    shared = _translate(method, mk_method, shared_raw, "parameters", need_layers, accepted)
    per_expert = {}
    for (ref, params), name in zip(experts, names):
        if params:
            per_expert[name] = _translate(method, mk_method, params, f"models.{ref}.parameters", need_layers,
                                          accepted, per_model=True)
    _check_switches(mk_method, method, shared_raw)
    if mk_method not in _NO_SPARSIFY:
        # mergekit's density defaults to 1.0 (no drop); Merge Lab's drop_ratio to 0.5
        if "drop_ratio" not in shared and not all("drop_ratio" in per_expert.get(n, {}) for n in names):
            shared["drop_ratio"] = 0.0
    if mk_method == "della" and "epsilon" not in shared:
        shared["epsilon"] = 0.3  # mergekit's default epsilon 0.15, doubled
    if mk_method == "slerp" and "t" not in shared and not per_expert:
        raise MergeLabError("slerp needs t (0 gives the base model)", field="parameters.t")
    dtype = data.get("out_dtype") or data.get("dtype") or "float32"
    if not isinstance(dtype, str) or dtype.removeprefix("torch.") not in _DTYPES:
        raise MergeLabError(f"dtype {dtype!r}: Merge Lab writes float32, float16 or bfloat16", field="dtype")
    notes = ["imported from a mergekit config; model paths resolve against the config's folder (mergekit resolves "
             "them against the folder it runs in)"]
    compute = data.get("dtype")
    if isinstance(compute, str) and _DTYPES.get(compute.removeprefix("torch."), "float32") != "float32":
        notes.append(f"mergekit computes in its dtype ({compute}); Merge Lab computes in float32 and writes "
                     f"{_DTYPES[dtype.removeprefix('torch.')]}")
    if mk_method in ("dare_linear", "dare_ties", "della") and _fixed(shared_raw, "rescale", True):
        notes.append("mergekit's rescale scales by the L1 norm of each delta; Merge Lab divides kept entries by "
                     "their keep probability (same expectation)")
    data_out = {"method": method, "base": base or refs[0],
                "experts": [{"name": n, "model": ref, **({"parameters": per_expert[n]} if n in per_expert else {})}
                            for (ref, _), n in zip(experts, names)],
                "parameters": shared, "seed": seed, "dtype": _DTYPES[dtype.removeprefix("torch.")],
                "notes": "; ".join(notes)}
    recipe = Recipe.from_dict(data_out, source=source)
    if draft_layers is not None:
        recipe.validate(draft_layers)
    return recipe


# ---- models and slices ---------------------------------------------------------------------

def _ref(value: Any, where: str) -> str:
    if isinstance(value, dict) and set(value) <= {"model", "lora"} and isinstance(value.get("model"), str):
        if value.get("lora"):
            raise MergeLabError(f"{where} applies a LoRA; merge the LoRA into its model first", field=where)
        value = value["model"]
    if not isinstance(value, str) or not value.strip():
        raise MergeLabError(f"{where} must name a model (a folder or org/name[@revision])", field=where)
    if "+" in value:
        raise MergeLabError(f"{where} '{value}' applies a LoRA (model+lora); merge the LoRA into its model first",
                            field=where)
    if value.count("@") > 1:
        raise MergeLabError(f"{where} '{value}' has more than one @revision", field=where)
    return value.strip()


def _from_models(models: Any) -> list[tuple[str, dict]]:
    if not isinstance(models, list) or not models:
        raise MergeLabError("models must be a non-empty list of {model, parameters}", field="models")
    out: list[tuple[str, dict]] = []
    for index, item in enumerate(models):
        where = f"models[{index}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict):
            raise MergeLabError(f"{where} must be a mapping with model and optional parameters", field=where)
        unknown = sorted(str(k) for k in item if k not in ("model", "parameters"))
        if unknown:
            raise MergeLabError(f"{where}: unknown field '{unknown[0]}' (known: model, parameters)", field=where)
        ref = _ref(item.get("model"), f"{where}.model")
        if any(ref == r for r, _ in out):
            raise MergeLabError(f"{where}: model '{ref}' is listed twice", field=where)
        out.append((ref, _mapping(item.get("parameters"), f"{where}.parameters")))
    return out


def _from_slices(slices: Any) -> tuple[list[tuple[str, dict]], dict]:
    """Slices Merge Lab can express: consecutive ranges 0..N of the same models, each layer taken from its own
    position (no reordering, stacking or mixing). Scalar parameters per slice become per-layer maps."""
    if not isinstance(slices, list) or not slices:
        raise MergeLabError("slices must be a non-empty list of {sources: [...]}", field="slices")
    models: list[str] | None = None
    per_model: dict[str, dict[str, dict]] = {}
    shared: dict[str, dict] = {}
    expected_start = 0
    for index, item in enumerate(slices):
        where = f"slices[{index}]"
        if not isinstance(item, dict) or not isinstance(item.get("sources"), list) or not item["sources"]:
            raise MergeLabError(f"{where} must be a mapping with a non-empty sources list", field=where)
        unknown = sorted(str(k) for k in item if k not in ("sources", "parameters", "base_model"))
        if unknown or item.get("base_model") is not None:
            raise MergeLabError(f"{where}: '{(unknown or ['base_model'])[0]}' per slice has no Merge Lab "
                                "equivalent: give one base_model for the whole merge", field=where)
        ranges, refs = set(), []
        for j, src in enumerate(item["sources"]):
            swhere = f"{where}.sources[{j}]"
            if not isinstance(src, dict):
                raise MergeLabError(f"{swhere} must be a mapping with model and layer_range", field=swhere)
            layer_range = src.get("layer_range")
            if (not isinstance(layer_range, list) or len(layer_range) != 2
                    or not all(isinstance(v, int) and not isinstance(v, bool) for v in layer_range)):
                raise MergeLabError(f"{swhere}.layer_range must be [start, end] (whole numbers)", field=swhere)
            ranges.add(tuple(layer_range))
            ref = _ref(src.get("model"), f"{swhere}.model")
            refs.append(ref)
            params = _mapping(src.get("parameters"), f"{swhere}.parameters")
            for key, value in params.items():
                per_model.setdefault(ref, {}).setdefault(key, {})
                _slice_value(per_model[ref][key], value, layer_range, f"{swhere}.parameters.{key}")
        if len(ranges) != 1:
            raise MergeLabError(f"{where} takes different layer ranges from different models: Merge Lab merges "
                                "each layer with the same layer of every model", field=where)
        start, end = next(iter(ranges))
        if start != expected_start or end <= start:
            raise MergeLabError(f"{where} takes layers {start}..{end} where layer {expected_start} comes next: "
                                "Merge Lab cannot reorder, repeat or drop layers (frankenmerges)", field=where)
        expected_start = end
        if models is None:
            models = refs
        elif sorted(models) != sorted(refs):
            raise MergeLabError(f"{where} merges other models than slice 0: Merge Lab merges the same models "
                                "at every layer", field=where)
        for key, value in _mapping(item.get("parameters"), f"{where}.parameters").items():
            _slice_value(shared.setdefault(key, {}), value, [start, end], f"{where}.parameters.{key}")
    # mergekit plans the pre-weights (embeddings) with slice 0's parameters, the post-weights (final norm,
    # head) with the last slice's (plan.py, plan_module)
    for values in [*shared.values(), *(v for p in per_model.values() for v in p.values())]:
        if "0" in values:
            values[EMBEDDINGS] = values["0"]
        if str(expected_start - 1) in values:
            values[HEAD] = values[str(expected_start - 1)]
    entries = [(ref, {k: _collapse(v) for k, v in per_model.get(ref, {}).items()}) for ref in models]
    return entries, {k: _collapse(v) for k, v in shared.items()}


def _slice_value(target: dict, value: Any, layer_range: Sequence[int], where: str) -> None:
    if isinstance(value, (list, dict)):
        raise MergeLabError(f"{where}: gradients and filters inside slices are not supported; give a number per "
                            "slice or use models: with a gradient", field=where)
    for layer in range(layer_range[0], layer_range[1]):
        target[str(layer)] = value


class _LayerMap(dict):
    """Per-layer values gathered from slices (already one number per block)."""


def _collapse(values: dict) -> Any:
    distinct = {repr(v) for v in values.values()}
    return next(iter(values.values())) if len(distinct) == 1 else _LayerMap(values)


def _names(refs: list[str]) -> list[str]:
    names: list[str] = []
    taken = {"base"}  # the expert set calls the base model 'base'
    for ref in refs:
        name = ref.rstrip("/").split("/")[-1].split("@")[0] or "model"
        candidate, n = name, 2
        while candidate in names or candidate in taken:
            candidate, n = f"{name}-{n}", n + 1
        names.append(candidate)
    return names


def _expert_refs(entries):
    from .recipe import ExpertRef
    return [ExpertRef(n, ref) for (ref, _), n in zip(entries, _names([r for r, _ in entries]))]


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise MergeLabError(f"{where} must be a mapping of name: value", field=where)
    return dict(value)


# ---- parameters ------------------------------------------------------------------------

def _translate(method: str, mk_method: str, params: dict, where: str, need_layers, accepted: set[str],
               per_model: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in params.items():
        key = str(key)
        at = f"{where}.{key}"
        if key not in accepted:
            raise MergeLabError(f"{at}: mergekit's {mk_method} does not take '{key}' (it takes "
                                f"{', '.join(sorted(accepted))})", field=at)
        if per_model and key in ("normalize", "rescale", "int8_mask", "lambda", "t", "filter_wise"):
            raise MergeLabError(f"{at}: mergekit reads '{key}' for all models together (its shared scope) and "
                                "ignores it per model: give it under parameters", field=at)
        if key in ("normalize", "rescale", "int8_mask"):
            if not isinstance(value, bool):
                raise MergeLabError(f"{at} must be true or false, got {value!r}", field=at)
            if key == "normalize" and _OURS_FIXED[mk_method][0] is None:
                out["normalize"] = value
            elif key == "rescale" and _OURS_FIXED[mk_method][1] is None:
                out["rescale"] = value
            continue  # int8_mask changes memory, not values; fixed switches are checked in _check_switches
        if key == "filter_wise":
            if not isinstance(value, bool):
                raise MergeLabError(f"{at} must be true or false, got {value!r} (Merge Lab reads one filter_wise "
                                    "for the whole merge)", field=at)
            out["filter_wise"] = value
            continue
        if key == "density" and mk_method == "task_arithmetic":
            continue  # mergekit's task_arithmetic takes density and ignores it (no sparsification)
        resolved = _setting(value, at, need_layers, norm_ok=key == "density")
        if key == "density":
            out["drop_ratio"] = _map(resolved, lambda v: _round(1.0 - v))
        elif key == "epsilon":
            out["epsilon"] = _map(resolved, lambda v: _round(2.0 * v))
        else:
            out[key] = resolved
    return out


def _check_switches(mk_method: str, method: str, shared_raw: dict) -> None:
    if mk_method not in _OURS_FIXED:  # slerp, model_stock: no normalize / rescale switches
        return
    for index, key in enumerate(("normalize", "rescale")):
        ours = _OURS_FIXED[mk_method][index]
        if ours is None or (key == "rescale" and mk_method == "task_arithmetic"):
            continue  # rescale acts on sparsified deltas only: task_arithmetic is the same either way
        value = shared_raw.get(key, _MK_DEFAULTS[mk_method][index])
        if value != ours:
            raise MergeLabError(f"{key}: {str(value).lower()} with {mk_method} has no Merge Lab equivalent (Merge "
                                f"Lab's {method} computes {key} {str(ours).lower()}): remove it", field=f"parameters.{key}")


def _fixed(shared_raw: dict, key: str, default: bool) -> bool:
    return shared_raw.get(key, default) is True


def _setting(value: Any, where: str, need_layers, norm_ok: bool) -> Any:
    """A mergekit setting (scalar, gradient, filters) as a Merge Lab value (scalar or {layer: value})."""
    if isinstance(value, _LayerMap):
        return {layer: _scalar(v, f"{where}.{layer}") for layer, v in value.items()}
    if isinstance(value, dict) and "value" in value:
        value = [value]
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        return _filters(value, where, need_layers, norm_ok)
    if isinstance(value, list):
        return _gradient(value, where, need_layers)
    return _scalar(value, where)


def _scalar(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise MergeLabError(f"{where} must be a finite number, got {value!r}", field=where)
    return float(value)


def _gradient(points: list, where: str, need_layers) -> Any:
    if not points:
        raise MergeLabError(f"{where} is an empty list: give a number or a list of numbers", field=where)
    values = [_scalar(v, f"{where}[{i}]") for i, v in enumerate(points)]
    if len(values) == 1:
        return values[0]
    layers = need_layers(where)
    blocks = [layer for layer in layers if layer not in (EMBEDDINGS, HEAD)]
    out: dict[str, float] = {}
    for i, layer in enumerate(blocks):  # mergekit's plan_slice: t = i / (N − 1), or 1 for a single block
        t = i / (len(blocks) - 1) if len(blocks) > 1 else 1.0
        out[layer] = _interpolate(values, t)
    for layer in (EMBEDDINGS, HEAD):  # pre- and post-weights are planned with t = 0
        if layer in layers:
            out[layer] = values[0]
    return out


def _interpolate(values: list[float], t: float) -> float:
    """mergekit's evaluate_setting for a numeric gradient."""
    scaled = t * (len(values) - 1)
    i0 = int(scaled)
    i1 = min(len(values) - 1, i0 + 1)
    frac = scaled - i0
    return (1 - frac) * values[i0] + frac * values[i1]


def _filters(conditions: list[dict], where: str, need_layers, norm_ok: bool) -> Any:
    out: dict[str, Any] = {}
    default: Any = None
    for index, cond in enumerate(conditions):
        at = f"{where}[{index}]"
        unknown = sorted(str(k) for k in cond if k not in ("filter", "value"))
        if unknown or "value" not in cond:
            raise MergeLabError(f"{at} must be {{filter: NAME, value: V}} or {{value: V}}", field=at)
        text = cond.get("filter")
        if text is not None and not isinstance(text, str):
            raise MergeLabError(f"{at}.filter must be text", field=at)
        if text in (None, "*"):
            if default is None:
                default = _setting(cond["value"], f"{at}.value", need_layers, norm_ok=False)
            continue
        normish = any(f in text for f in NORM_FILTERS)
        if normish and norm_ok and _scalar(cond["value"], f"{at}.value") == 1.0:
            continue  # Merge Lab never sparsifies norm tensors: the same as density 1.0 there
        layer = _filter_layer(text)
        if layer is None and normish:
            raise MergeLabError(f"{at}: filter '{text}' selects norm tensors; Merge Lab never sparsifies norms "
                                "and sets values per layer, not per module: remove it", field=at)
        if layer is None:
            raise MergeLabError(f"{at}: filter '{text}' selects tensors by module; Merge Lab's values vary by layer "
                                "(embeddings, block, head) only: replace it with per-layer values", field=at)
        value = _scalar(cond["value"], f"{at}.value")
        if layer not in out:  # mergekit takes the first filter that matches
            out[layer] = value
    if default is None:
        if not out:
            raise MergeLabError(f"{where} has no value", field=where)
        return out
    if not out:
        return default
    if isinstance(default, dict):
        return {**default, **out}
    return {**out, "default": default}


def _filter_layer(text: str) -> str | None:
    match = _BLOCK.search(text)
    if match:
        return str(int(match.group(1)))
    stem = text.removesuffix(".weight").removesuffix(".bias")
    if any(stem == n or stem.endswith("." + n) for n in _EMBEDDING_NAMES):
        return EMBEDDINGS
    if any(stem == n or stem.endswith("." + n) or stem.startswith(n + ".") for n in _HEAD_NAMES):
        return HEAD
    return None


def _map(value: Any, fn) -> Any:
    if isinstance(value, dict):
        return {k: fn(v) for k, v in value.items()}
    return fn(value)


def _round(value: float) -> float:
    return round(float(value), 12)
