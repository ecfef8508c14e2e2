"""ExpertSet: a base model and its fine-tuned experts, checked to be mergeable.

The check runs on headers before any tensor is read: architecture family, layer count,
vocab size, and every body tensor's name and shape. Experts saved with a task class
(``BertForSequenceClassification``) prefix body names (``bert.``) and add a task head
(``classifier.*``); names are aligned to the base by that prefix, and tensors absent
from the base are the expert's task head — recognised by name and absence, never by
shape, kept per expert and never merged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeLabError
from .layout import ROLE_COPY, ROLE_MERGE, ROLE_TIED, Layout
from .names import check_name, derive_name
from .sources import ModelSource, open_model

_PREFIXES = ("bert.", "roberta.", "model.", "transformer.", "encoder.", "distilbert.", "electra.", "deberta.")
_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_ARCH_KEY = "model_type"
_UNMERGED = ("int8", "uint8", "bool", "f8_e4m3", "f8_e5m2", "float8_e4m3fn", "float8_e5m2")


@dataclass
class Expert:
    """One fine-tuned expert: its source, how its names map to the base, its task head."""

    name: str
    source: ModelSource
    prefix: str = ""  # the expert's names are prefix + base name
    head_names: list[str] = field(default_factory=list)
    task: str | None = None

    def body_key(self, base_name: str) -> str:
        return self.prefix + base_name

    def get(self, base_name: str) -> torch.Tensor:
        return self.source.get(self.body_key(base_name))

    def head(self) -> dict[str, torch.Tensor]:
        return {n: self.source.get(n) for n in self.head_names}


@dataclass
class ExpertSet:
    """A base and N experts that passed the homology check, with the base's :class:`Layout`."""

    base: ModelSource
    experts: dict[str, Expert]
    layout: Layout
    warnings: list[str] = field(default_factory=list)
    #: set when the models' vocabularies differ and a tokenizer was chosen (:mod:`.vocab`): the chosen
    #: vocabulary and where each aligned embedding / LM-head row comes from
    vocab: Any = None

    @classmethod
    def load(cls, base: str | os.PathLike | ModelSource, experts: Iterable | Mapping,
             *, allow_pickle: bool = False, base_dir: Path | None = None, tokenizer: str | None = None) -> ExpertSet:
        """Open base and experts (paths, hub ids, ``zoo:`` refs or sources) and check them.

        ``experts`` is a list of refs (names derived from the path) or a mapping name → ref. ``tokenizer``
        (base, union or an expert's name) merges models whose vocabularies differ, rows aligned by token.
        """
        base_source = base if isinstance(base, ModelSource) else open_model(
            base, name="base", allow_pickle=allow_pickle, base_dir=base_dir)
        items = experts.items() if isinstance(experts, Mapping) else [(None, e) for e in experts]
        sources: dict[str, ModelSource] = {}
        for name, ref in items:
            source = ref if isinstance(ref, ModelSource) else open_model(
                ref, name=name, allow_pickle=allow_pickle, base_dir=base_dir)
            if name is not None:
                source.name = check_name(name)  # a folder name at export: identifiers only
            else:
                source.name = derive_name(source.name)
            if source.name in sources or source.name == "base":
                source.name = _unique(source.name, sources)
            sources[source.name] = source
        return check_homology(base_source, sources, tokenizer=tokenizer)

    # ---- conveniences -----------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.experts)

    def merged_names(self) -> list[str]:
        return self.layout.merged_names()

    def delta(self, expert: str, name: str, rows: slice | None = None) -> torch.Tensor:
        """Δ = Θ_expert − Θ_base for one tensor (or its ``rows``, read without the rest), in float32."""
        if rows is None or rows == slice(None):
            return self.experts[expert].get(name).float() - self.base.get(name).float()
        spec = self.experts[expert]
        return spec.source.read(spec.body_key(name), rows).float() - self.base.read(name, rows).float()

    def has_tokenizer(self) -> bool:
        return self.base.has_tokenizer() or any(e.source.has_tokenizer() for e in self.experts.values())


def _unique(name: str, taken: Mapping[str, object]) -> str:
    index = 2
    while f"{name}-{index}" in taken:
        index += 1
    return f"{name}-{index}"


def check_homology(base: ModelSource, experts: Mapping[str, ModelSource], tokenizer: str | None = None) -> ExpertSet:
    """Check that every expert can be merged with the base; raise one readable error if not. With a
    ``tokenizer`` choice, models whose vocabularies differ are first aligned by token (:mod:`.vocab`)."""
    if not experts:
        raise MergeLabError("no experts given: pick at least one fine-tuned expert of the base (two to merge)")
    for source in (base, *experts.values()):
        check_config_sizes(source)
    plan = None
    if tokenizer is not None:
        from .vocab import align_vocabularies

        base, experts, plan = align_vocabularies(base, experts, tokenizer)
    _check_configs(base, experts)
    tied = bool(base.config.get("tie_word_embeddings", False)) and not _has_distinct_lm_head(base)
    layout = Layout.from_shapes(base.shapes(), base.dtypes(), tied_embeddings=tied)
    if not layout.merged_names():
        raise MergeLabError(f"base model '{base.name}' has no floating-point weights to merge")
    aligned = {name: _align(layout, base, source) for name, source in experts.items()}
    warnings = []
    unmergeable = [n for n, i in layout.tensors.items() if i.role == ROLE_COPY and base.tensors[n].dtype in _UNMERGED]
    if unmergeable:  # quantized or boolean weights cannot be averaged: say so rather than copy them silently
        shown = ", ".join(f"'{n}' ({base.tensors[n].dtype})" for n in unmergeable[:5])
        more = f" and {len(unmergeable) - 5} more" if len(unmergeable) > 5 else ""
        warnings.append(f"{len(unmergeable)} tensor(s) are int8/bool/float8 and are copied from the base, not "
                        f"merged: {shown}{more}. Merge the unquantized models to merge them too")
    if not base.has_tokenizer() and not any(s.has_tokenizer() for s in experts.values()):
        warnings.append("no tokenizer found in the base or the experts: merging and export work, "
                        "but importance and probes need one (add tokenizer files to the base folder)")
    return ExpertSet(base, aligned, layout, warnings, plan)


def _has_distinct_lm_head(base: ModelSource) -> bool:
    return any(name.endswith("lm_head.weight") for name in base.tensors)


# config field → (tensor name endings, dimension) whose size it must equal. Importance and probes build the
# transformers model from config.json, so a config claiming intermediate_size 150000 over small weights
# allocated gigabytes before failing; these sizes are checked against the tensor shapes first.
_CONFIG_SIZES = {
    "vocab_size": (("word_embeddings.weight", "embed_tokens.weight", "wte.weight"), 0),
    "hidden_size": (("word_embeddings.weight", "embed_tokens.weight"), 1),
    "n_embd": (("wte.weight",), 1),
    "intermediate_size": (("intermediate.dense.weight", "mlp.up_proj.weight", "mlp.gate_proj.weight"), 0),
    "n_inner": (("mlp.c_fc.weight",), 1),
    "max_position_embeddings": (("embeddings.position_embeddings.weight",), 0),
    "n_positions": (("wpe.weight",), 0),
    "type_vocab_size": (("token_type_embeddings.weight",), 0),
}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


def check_config_sizes(source: ModelSource) -> None:
    """Refuse a config.json whose sizes disagree with the model's own tensors, naming the field."""
    config = source.config or {}
    if not config or not source.tensors:
        return

    def refuse(key, value, actual, where):
        raise MergeLabError(
            f"config.json of model '{source.name}' says {key} = {str(value)[:40]} but its weights have {actual}"
            f"{where}: the config does not match these weights; fix {key} in config.json or re-export the model",
            field=key)

    for key, (endings, dim) in _CONFIG_SIZES.items():
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            refuse(key, value, "no such size", " (it must be a positive whole number)")
        for name, entry in source.tensors.items():
            if name.endswith(endings) and len(entry.shape) > dim:
                if entry.shape[dim] != value:
                    refuse(key, value, entry.shape[dim], f" (tensor '{name}' has shape {tuple(entry.shape)})")
                break
    indices = {int(m.group(1)) for m in map(_LAYER_INDEX.search, source.tensors) if m}
    for key in _LAYER_KEYS:
        value = config.get(key)
        if value is None or not indices:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value != max(indices) + 1:
            refuse(key, value, f"{max(indices) + 1} layers", "")
    heads, hidden = config.get("num_attention_heads"), config.get("hidden_size")
    if heads is not None and isinstance(hidden, int):
        if isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0 or hidden % heads:
            refuse("num_attention_heads", heads, f"hidden size {hidden}", ", which it must divide")
    labels = config.get("id2label")
    if isinstance(labels, dict):
        for ending in ("classifier.weight", "classifier.out_proj.weight", "score.weight"):
            entry = source.tensors.get(ending)
            if entry is not None and entry.shape and entry.shape[0] != len(labels):
                refuse("id2label", f"{len(labels)} labels", f"a {entry.shape[0]}-class head", f" ('{ending}')")


def _check_configs(base: ModelSource, experts: Mapping[str, ModelSource]) -> None:
    if not base.config:
        return
    for name, source in experts.items():
        if not source.config:
            continue
        base_arch, arch = base.config.get(_ARCH_KEY), source.config.get(_ARCH_KEY)
        if base_arch and arch and base_arch != arch:
            raise MergeLabError(
                f"expert '{name}' is a {arch} model but the base is {base_arch}: "
                "only fine-tunes of the same base architecture can be merged"
            )
        for key in _LAYER_KEYS:
            if key in base.config and key in source.config and base.config[key] != source.config[key]:
                raise MergeLabError(
                    f"expert '{name}' has {source.config[key]} layers but the base has {base.config[key]}: "
                    "it is not a fine-tune of this base"
                )
        if base.config.get("vocab_size") and source.config.get("vocab_size") \
                and base.config["vocab_size"] != source.config["vocab_size"]:
            raise MergeLabError(
                f"expert '{name}' has vocab size {source.config['vocab_size']} but the base has "
                f"{base.config['vocab_size']}: models with different tokenizers cannot be merged tensor by tensor "
                "as they are; choose a tokenizer (recipe 'tokenizer: base', 'union' or an expert's name) to align "
                "their embedding and LM-head rows by token, or pick an expert fine-tuned from this base"
            )


def _align(layout: Layout, base: ModelSource, source: ModelSource) -> Expert:
    """Find the name prefix mapping base → expert names, then compare names and shapes."""
    prefix = _find_prefix(layout, source)
    needed = [n for n, i in layout.tensors.items() if i.role == ROLE_MERGE]
    missing = [n for n in needed if prefix + n not in source.tensors]
    if missing:
        raise MergeLabError(
            f"expert '{source.name}' lacks {len(missing)} tensor(s) the base has, e.g. "
            f"{', '.join(missing[:3])}: it is not a fine-tune of this base (or was saved partially)"
        )
    mismatched = [
        f"{n} {tuple(source.tensors[prefix + n].shape)} vs base {layout[n].shape}"
        for n in needed if tuple(source.tensors[prefix + n].shape) != layout[n].shape
    ]
    if mismatched:
        raise MergeLabError(
            f"expert '{source.name}' has {len(mismatched)} tensor(s) whose shape differs from the base: "
            f"{'; '.join(mismatched[:3])}{' …' if len(mismatched) > 3 else ''}. "
            "Only fine-tunes of the same base (same sizes and vocabulary) can be merged."
        )
    body = {prefix + n for n in layout.tensors}
    heads = sorted(k for k in source.tensors if k not in body and not _is_tied_alias(k, layout))
    task = source.config.get("finetuning_task") or None
    return Expert(source.name, source, prefix, heads, task)


def _is_tied_alias(key: str, layout: Layout) -> bool:
    return key.endswith("lm_head.weight") and any(i.role == ROLE_TIED for i in layout.tensors.values()) \
        or key.endswith("lm_head.weight") and layout.tied_embeddings


def _find_prefix(layout: Layout, source: ModelSource) -> str:
    """The prefix p such that the most base names appear as p + name in the expert."""
    names = [n for n, i in layout.tensors.items() if i.role in (ROLE_MERGE, ROLE_COPY)]
    best, best_hits = "", sum(n in source.tensors for n in names)
    for prefix in _PREFIXES:
        hits = sum(prefix + n in source.tensors for n in names)
        if hits > best_hits:
            best, best_hits = prefix, hits
    if best_hits == 0:
        raise MergeLabError(
            f"expert '{source.name}' shares no tensor names with the base (e.g. base has "
            f"'{names[0] if names else '?'}'): it is a different architecture or not a fine-tune of this base"
        )
    return best
