"""Layer swapping (Bandarkar et al., "Layer Swapping for Zero-Shot Cross-Lingual Transfer in Large Language
Models", arXiv 2410.01335) as a registered merge method.

Two experts fine-tuned from one base are re-composed layer by layer: the *outer* expert (the paper's
language expert) gives the bottom and top transformer blocks, the *inner* expert (the math expert) the
middle ones. Nothing is added or rescaled: each block is one expert's block, copied — the method moves
whole layers, not deltas. At each seam the paper may put a *transition zone*: blocks that are a weighted
average of the two experts' blocks, ``blend · Θ_outer + (1 − blend) · Θ_inner``.

The shape is declared, never hard-wired:

- ``bottom_layers`` / ``top_layers``: how many blocks at each end come from the outer expert, and
  ``transition_layers`` how many blocks inside each seam are blended. The defaults are the paper's
  configuration for its 32-block Llama 3.1 8B (bottom 5, top 2, one transition block at each seam); on a
  shallower model the zones meet, and where they overlap the outer expert wins, then the blend.
- ``outer_expert``: which expert (first or second, in the order the experts are listed) is the outer one.
- ``embeddings`` and ``head`` (final norm, ``lm_head``, pooler): taken explicitly from the outer expert,
  the inner one, the base, or blended; a tied ``lm_head`` follows the embeddings.
- ``take``: a per-layer choice that overrides the shape layer by layer (``{"7": "outer", "default":
  "shape"}`` in a recipe), so any composition of the two experts' layers and the base's is expressible.

Norms belong to their layer and move with it. Task heads (classifiers) stay per expert, as for every method.
Row chunks: a copy or an entry-wise blend of rows is those rows of the whole tensor's, so row-separable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import MergeLabError
from ..io.layout import EMBEDDINGS, HEAD
from ..params import PER_LAYER, SHARED, ParamResolver, ParamSpec
from .base import MethodSpec, TensorJob, register

LAYER_SWAP_URL = "https://arxiv.org/abs/2410.01335"
OUTER, INNER, BLEND, BASE, SHAPE = "outer", "inner", "blend", "base", "shape"
SOURCES = (OUTER, INNER, BLEND, BASE)

OUTER_EXPERT = ParamSpec("outer_expert", "choice", "first",
                         "Which expert gives the outer (bottom and top) layers — the paper's language expert — in the "
                         "order the experts are listed; the other gives the middle.", SHARED, choices=("first", "second"))
BOTTOM = ParamSpec("bottom_layers", "int", 5, "Blocks at the bottom taken from the outer expert (the paper: 5 of 32).",
                   SHARED, 0, 256)
TOP = ParamSpec("top_layers", "int", 2, "Blocks at the top taken from the outer expert (the paper: 2 of 32).",
                SHARED, 0, 256)
TRANSITION = ParamSpec("transition_layers", "int", 1,
                       "Blocks just inside each seam that blend both experts (the paper's transition zone; 0: a hard "
                       "swap).", SHARED, 0, 64)
BLEND_SHARE = ParamSpec("blend", "float", 0.5, "Share of the outer expert in a blended layer: "
                        "blend·Θ_outer + (1 − blend)·Θ_inner.", PER_LAYER, 0.0, 1.0)
EMBEDDINGS_FROM = ParamSpec("embeddings", "choice", OUTER,
                            "Where the embeddings come from: the outer expert, the inner one, blended, or the base.",
                            SHARED, choices=SOURCES)
HEAD_FROM = ParamSpec("head", "choice", OUTER,
                      "Where the final norm and LM head come from: the outer expert, the inner one, blended, or the "
                      "base.", SHARED, choices=SOURCES)
TAKE = ParamSpec("take", "choice", SHAPE,
                 "Per layer: 'shape' follows the outer/inner shape above; outer, inner, blend or base picks that "
                 "layer's source explicitly.", PER_LAYER, choices=(SHAPE, *SOURCES))
PARAMS = (OUTER_EXPERT, BOTTOM, TOP, TRANSITION, BLEND_SHARE, EMBEDDINGS_FROM, HEAD_FROM, TAKE)
_PER_LAYER = ("take", "blend")


def block_source(block: int, n_blocks: int, bottom: int, top: int, transition: int) -> str:
    """The shape's source of block ``block`` of ``n_blocks``: outer zones first, then transitions, else inner."""
    if block < bottom or (top > 0 and block >= n_blocks - top):
        return OUTER
    if (bottom > 0 and block < bottom + transition) or (top > 0 and block >= n_blocks - top - transition):
        return BLEND
    return INNER


def layer_source(layer: str, values: Mapping[str, Any], n_blocks: int) -> str:
    """Where ``layer`` comes from (outer, inner, blend, base), from the parameters resolved at it."""
    take = values.get("take", SHAPE)
    if take != SHAPE:
        return take
    if layer == EMBEDDINGS:
        return values.get("embeddings", EMBEDDINGS_FROM.default)
    if layer == HEAD:
        return values.get("head", HEAD_FROM.default)
    block = int(layer)
    if not 0 <= block < n_blocks:
        raise MergeLabError(f"layer swapping needs the model's depth to place block {layer}: the merge was given "
                            f"{n_blocks} blocks (merge through MergeEngine, which passes Layout.n_blocks)")
    return block_source(block, n_blocks, int(values.get("bottom_layers", BOTTOM.default)),
                        int(values.get("top_layers", TOP.default)),
                        int(values.get("transition_layers", TRANSITION.default)))


def outer_inner(experts: Sequence[str], outer_expert: str) -> tuple[str, str]:
    """(outer, inner) expert names from the listed order and the ``outer_expert`` choice."""
    if len(experts) != 2:
        raise MergeLabError(f"layer swapping composes exactly two experts, got {len(experts)}", field="experts")
    first, second = experts
    return (first, second) if outer_expert == "first" else (second, first)


def layer_plan(layers: Sequence[str], n_blocks: int, shared: Mapping[str, Any]) -> dict[str, tuple[str, float]]:
    """Layer → (source, blend share) for a whole model, from the recipe's shared parameters (the mergekit
    export and the page's description read the same plan the kernel follows)."""
    resolver = ParamResolver(PARAMS, shared, {}, layers)
    plan = {}
    for layer in layers:
        values = resolver.for_layer(None, layer)
        plan[layer] = (layer_source(layer, values, n_blocks), float(values["blend"]))
    return plan


def _copy(tensor: torch.Tensor) -> torch.Tensor:
    """A float32 copy (the engine's merged dtype; exact for fp16/bf16 sources), never the source itself."""
    return tensor.to(torch.float32, copy=True)


def blend(outer: torch.Tensor, inner: torch.Tensor, share: float) -> torch.Tensor:
    """``share·outer + (1 − share)·inner`` in float32 — products first, then their sum, as mergekit's linear."""
    return (outer.float() * share).add_(inner.float() * (1.0 - share))


def _check_shared(job: TensorJob) -> None:
    """Per-layer choices are the model's, not an expert's: a per-expert value would be silently ignored."""
    for expert, values in job.params.items():
        for name in _PER_LAYER:
            if values.get(name) != job.shared.get(name):
                raise MergeLabError(f"layer swapping: '{name}' is set for expert '{expert}', but a layer's source is "
                                    "one choice for the whole model: set it under the shared parameters",
                                    field=f"experts.{expert}.parameters.{name}")


def _layer_swap_kernel(job: TensorJob) -> torch.Tensor:
    """Each tensor is its layer's source: the outer or inner expert's tensor, the base's, or their blend."""
    _check_shared(job)
    outer, inner = outer_inner(list(job.experts), job.shared.get("outer_expert", OUTER_EXPERT.default))
    source = layer_source(job.info.layer, job.shared, job.n_blocks)
    if source == OUTER:
        return _copy(job.experts[outer])
    if source == INNER:
        return _copy(job.experts[inner])
    if source == BASE:
        return _copy(job.base)
    return blend(job.experts[outer], job.experts[inner], float(job.shared["blend"]))


register(MethodSpec(
    "layer_swap", "Layer swapping", LAYER_SWAP_URL,
    "Re-composes two experts layer by layer: the bottom and top blocks (and, by choice, the embeddings and head) "
    "from the outer expert, the middle blocks from the inner one, with optional blended transition blocks at the "
    "seams; any layer's source can be chosen explicitly.",
    PARAMS, _layer_swap_kernel, min_experts=2, max_experts=2, mergekit_name="passthrough", row_separable=True,
    explanation=(
        "Does not add task vectors at all: every layer of the result is copied whole from one of two experts. "
        "The paper's observation is that a language expert changes mostly the bottom and top layers (reading "
        "and writing the language) while a task expert changes mostly the middle ones (the skill), so taking "
        "the outer layers from the first and the middle from the second composes the two with almost no "
        "interference. Transition layers at the seams can be blended; the embeddings and the head are an "
        "explicit choice. APL's layer importance is the evidence for where to cut."),
))
