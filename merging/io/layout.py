"""Layout: what every tensor of a transformer *is* — its layer, its module, its output-unit axis.

APL scores and the merge methods' per-layer parameters are defined on partitions of a
model (model, layer, module, hidden state). The layout derives those partitions from
tensor names alone, so it works for any architecture whose blocks are named
``layer.N`` / ``layers.N`` / ``h.N`` / ``blocks.N`` (BERT, GPT-2, Llama, Qwen2, …) without
loading a model class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

EMBEDDINGS = "embeddings"
HEAD = "head"

# Roles a tensor can play in a merge.
ROLE_MERGE = "merge"  # a body tensor: merged
ROLE_COPY = "copy"  # non-float buffers (position_ids, attention masks): copied from the base
ROLE_TASK_HEAD = "task_head"  # per-expert classifier / score head: kept per expert, never merged
ROLE_TIED = "tied"  # a tied lm_head: equals the input embeddings, counted once under embeddings

_BLOCK = re.compile(r"(?:^|\.)(?:layer|layers|h|blocks|block)\.(\d+)\.")
_TASK_HEAD_PREFIXES = ("classifier.", "score.", "qa_outputs.", "cls.")

# (regex on the name inside its block, module kind, output axis for weights)
# Order matters: the first match wins.
_BLOCK_PATTERNS: list[tuple[re.Pattern[str], str, int | None]] = [
    (re.compile(r"(layernorm|layer_norm|LayerNorm|ln_\d|ln_[a-z]+|norm)"), "norm", None),
    (re.compile(r"attn\.c_attn\."), "qkv", 1),  # GPT-2 fused Conv1D, stored [in, 3*out]
    (re.compile(r"attn\.c_proj\."), "o", 1),
    (re.compile(r"mlp\.c_fc\."), "ffn_in", 1),
    (re.compile(r"mlp\.c_proj\."), "ffn_out", 1),
    (re.compile(r"(attention\.self\.query|q_proj|\.query\.|\.q\.)"), "q", 0),
    (re.compile(r"(attention\.self\.key|k_proj|\.key\.|\.k\.)"), "k", 0),
    (re.compile(r"(attention\.self\.value|v_proj|\.value\.|\.v\.)"), "v", 0),
    (re.compile(r"(qkv_proj|query_key_value|Wqkv)"), "qkv", 0),
    (re.compile(r"(attention\.output\.dense|o_proj|out_proj|attn\.dense|\.o\.)"), "o", 0),
    (re.compile(r"(intermediate\.dense|gate_proj|up_proj|gate_up_proj|fc1|w1|w3|dense_h_to_4h)"), "ffn_in", 0),
    (re.compile(r"(output\.dense|down_proj|fc2|w2|dense_4h_to_h)"), "ffn_out", 0),
]

#: Display order of module kinds (heatmap columns).
MODULE_KINDS = ["embed", "q", "k", "v", "qkv", "o", "ffn_in", "ffn_out", "norm", "pooler", "lm_head", "other"]


@dataclass(frozen=True)
class TensorInfo:
    """What one tensor is.

    ``module`` is the tensor's module path (its name without ``.weight``/``.bias``): one
    partition at module level. ``unit_axis`` is the output-unit axis of a weight (0 for
    ``nn.Linear`` ``[out, in]``, 1 for GPT-2's ``Conv1D`` ``[in, out]``), 0 for a bias, and
    ``None`` where there are no hidden-state partitions (embeddings, norms).
    """

    name: str
    layer: str  # "embeddings" | "0", "1", … | "head"
    kind: str  # one of MODULE_KINDS
    module: str
    unit_axis: int | None
    role: str
    shape: tuple[int, ...] = ()

    @property
    def droppable(self) -> bool:
        """Norms are never dropped or rescaled; only merged (weights and λ apply)."""
        return self.role == ROLE_MERGE and self.kind != "norm"

    @property
    def n_units(self) -> int:
        if self.unit_axis is None or not self.shape:
            return 0
        return self.shape[self.unit_axis]


@dataclass
class Layout:
    """Every tensor of a model family mapped to its partitions."""

    tensors: dict[str, TensorInfo]
    n_blocks: int
    tied_embeddings: bool = False
    layers: list[str] = field(default_factory=list)

    # ---- construction -------------------------------------------------
    @classmethod
    def from_shapes(
        cls,
        shapes: Mapping[str, tuple[int, ...]],
        dtypes: Mapping[str, str] | None = None,
        *,
        tied_embeddings: bool = False,
    ) -> Layout:
        """Build the layout of a base model from tensor names, shapes and dtype names.

        Non-float tensors (``dtypes[name]`` not a float type) are copied from the base.
        """
        dtypes = dtypes or {}
        infos = {name: describe_tensor(name, tuple(shape), dtypes.get(name, "float32"), tied_embeddings)
                 for name, shape in shapes.items()}
        blocks = sorted({int(i.layer) for i in infos.values() if i.layer.isdigit()})
        n_blocks = (blocks[-1] + 1) if blocks else 0
        layers = [EMBEDDINGS] + [str(i) for i in range(n_blocks)] + [HEAD]
        return cls(infos, n_blocks, tied_embeddings, layers)

    # ---- queries ------------------------------------------------------
    def __getitem__(self, name: str) -> TensorInfo:
        return self.tensors[name]

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def merged_names(self) -> list[str]:
        return [n for n, i in self.tensors.items() if i.role == ROLE_MERGE]

    def layer_position(self, layer: str) -> float:
        """Depth of a layer in [0, 1]: embeddings 0, head 1 (for interpolated per-layer values)."""
        index = self.layers.index(str(layer))
        return index / max(1, len(self.layers) - 1)

    def layer_of(self, name: str) -> str:
        return self.tensors[name].layer

    def modules(self) -> dict[str, list[str]]:
        """Module path → its merged tensor names (a module partition)."""
        out: dict[str, list[str]] = {}
        for name, info in self.tensors.items():
            if info.role == ROLE_MERGE:
                out.setdefault(info.module, []).append(name)
        return out

    def layer_tensors(self) -> dict[str, list[str]]:
        """Layer → its merged tensor names (a layer partition)."""
        out: dict[str, list[str]] = {layer: [] for layer in self.layers}
        for name, info in self.tensors.items():
            if info.role == ROLE_MERGE:
                out[info.layer].append(name)
        return out

    def module_kind(self, module: str) -> str:
        for info in self.tensors.values():
            if info.module == module:
                return info.kind
        raise KeyError(module)

    def partitions(self, level: str) -> dict[str, list[str]]:
        """Partition id → tensor names, for level ``model``, ``layer`` or ``module``.

        (Hidden-state partitions are slices of tensors; see :meth:`unit_modules`.)
        """
        if level == "model":
            return {"model": self.merged_names()}
        if level == "layer":
            return {k: v for k, v in self.layer_tensors().items() if v}
        if level == "module":
            return self.modules()
        raise ValueError(f"unknown level {level!r}: use model, layer or module (hidden states are slices)")

    def unit_modules(self) -> dict[str, list[str]]:
        """Modules that have hidden-state partitions → their tensors (weight and bias share the unit axis)."""
        out: dict[str, list[str]] = {}
        for name, info in self.tensors.items():
            if info.droppable and info.unit_axis is not None:
                out.setdefault(info.module, []).append(name)
        return out


def describe_tensor(name: str, shape: tuple[int, ...], dtype: str, tied_embeddings: bool = False) -> TensorInfo:
    """Classify one tensor of a base model by its name (docs/ARCHITECTURE.md, "Layout", lists the rules)."""
    module = _module_path(name)
    if not _is_float(dtype):
        return TensorInfo(name, _layer_of(name), "other", module, None, ROLE_COPY, shape)
    if name.startswith(_TASK_HEAD_PREFIXES) or ".classifier." in name:
        return TensorInfo(name, HEAD, "other", module, None, ROLE_TASK_HEAD, shape)
    layer = _layer_of(name)
    if layer == EMBEDDINGS:
        kind = "norm" if _looks_like_norm(name) else "embed"
        return TensorInfo(name, EMBEDDINGS, kind, module, None, ROLE_MERGE, shape)
    if layer == HEAD:
        return _describe_head(name, module, shape, tied_embeddings)
    kind, axis = _block_kind(name)
    unit_axis = _unit_axis(name, axis, shape)
    return TensorInfo(name, layer, kind, module, unit_axis, ROLE_MERGE, shape)


def _describe_head(name: str, module: str, shape: tuple[int, ...], tied: bool) -> TensorInfo:
    if "lm_head" in name:
        role = ROLE_TIED if tied else ROLE_MERGE
        return TensorInfo(name, HEAD if not tied else EMBEDDINGS, "lm_head", module, 0 if len(shape) == 2 else None, role, shape)
    if _looks_like_norm(name):
        return TensorInfo(name, HEAD, "norm", module, None, ROLE_MERGE, shape)
    if "pooler" in name:
        axis = 0 if shape else None
        return TensorInfo(name, HEAD, "pooler", module, axis, ROLE_MERGE, shape)
    return TensorInfo(name, HEAD, "other", module, 0 if len(shape) >= 1 else None, ROLE_MERGE, shape)


def _module_path(name: str) -> str:
    for suffix in (".weight", ".bias"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _is_float(dtype: str) -> bool:
    dtype = str(dtype).lower().replace("torch.", "")
    return dtype.startswith(("float", "bfloat", "f16", "f32", "f64", "bf16", "half", "double"))


def _looks_like_norm(name: str) -> bool:
    return bool(re.search(r"(layernorm|layer_norm|ln_|\bnorm\b|(^|\.)norm\.)", name, re.IGNORECASE))


def _layer_of(name: str) -> str:
    match = _BLOCK.search(name)
    if match:
        return str(int(match.group(1)))
    if re.search(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type)", name):
        return EMBEDDINGS
    return HEAD


def _block_kind(name: str) -> tuple[str, int | None]:
    inner = _BLOCK.split(name)[-1]
    inner = "." + inner
    for pattern, kind, axis in _BLOCK_PATTERNS:
        if pattern.search(inner):
            return kind, axis
    return "other", 0


def _unit_axis(name: str, weight_axis: int | None, shape: tuple[int, ...]) -> int | None:
    if weight_axis is None or not shape:
        return None
    if name.endswith(".bias") or len(shape) == 1:
        return 0
    return weight_axis


def layout_from_tensors(tensors: Mapping[str, object], tied_embeddings: bool | None = None) -> Layout:
    """Layout of an in-memory state dict (``name → torch.Tensor``).

    Tied embeddings are detected when ``lm_head.weight`` shares storage with another tensor."""
    if tied_embeddings is None:
        heads = [t for n, t in tensors.items() if n.endswith("lm_head.weight")]
        others = {t.data_ptr() for n, t in tensors.items() if not n.endswith("lm_head.weight")}
        tied_embeddings = bool(heads) and heads[0].data_ptr() in others
    shapes = {n: tuple(t.shape) for n, t in tensors.items()}
    dtypes = {n: str(t.dtype) for n, t in tensors.items()}
    return Layout.from_shapes(shapes, dtypes, tied_embeddings=tied_embeddings)


def unit_slice(info: TensorInfo, units: Iterable[int] | slice) -> tuple:
    """Index tuple selecting the given output units of a tensor (for hidden-state partitions)."""
    if info.unit_axis is None:
        raise ValueError(f"{info.name} has no hidden-state units")
    index: list = [slice(None)] * len(info.shape)
    index[info.unit_axis] = units if isinstance(units, slice) else list(units)
    return tuple(index)
