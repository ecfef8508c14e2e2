"""Per-tab session state and the demo zoo it starts from; small, no model weights."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import MergeLabError
from .cache import selection_key
from .limits import DEFAULT_FEWSHOT, DEFAULT_METHOD, Progress


@dataclass
class TaskData:
    """Few-shot and probe examples of one expert's task."""

    fewshot: list[tuple[str, int]]
    probe: list[tuple[str, int]]
    labels: list[str]
    source: str  # "zoo", "folder" or the uploaded file's name


Override = tuple[str, str, str, float]  # (expert, key, layer, value)


@dataclass(frozen=True)
class MergeInputs:
    """Everything a merge is a function of, frozen when Merge is pressed.

    Merge, Export, the rebuild of an evicted merge and the drop sweep all build from this one value
    rather than from the session's live fields, which the page keeps changing (a slider moved after
    Merge must not change what Export writes). Method-agnostic: a data-aware method's few-shot
    examples (and the recipe's record of them) and the importance map ride along; what the method
    makes of them is its ``prepare``'s business. Fields are copies nobody else holds: read them only.
    """

    method: str
    shared: dict[str, Any]
    seed: int
    overrides: tuple[Override, ...] = ()
    examples: dict[str, tuple[tuple[str, int], ...]] = field(default_factory=dict)  # expert → few-shot drawn
    fewshot: dict[str, dict[str, Any]] = field(default_factory=dict)  # the recipe's few_shot record of them
    importance: Any = None  # the session's ImportanceMap, for methods that need importance

    def override_map(self) -> dict[str, dict[str, dict[str, float]]]:
        out: dict[str, dict[str, dict[str, float]]] = {}
        for expert, key, layer, value in self.overrides:
            out.setdefault(expert, {}).setdefault(key, {})[layer] = value
        return out


def freeze_overrides(overrides: dict[str, dict[str, dict[str, float]]]) -> tuple[Override, ...]:
    return tuple((e, k, layer, float(v)) for e, keys in overrides.items() for k, layers in keys.items()
                 for layer, v in layers.items())


@dataclass
class Session:
    """Per-tab state: small, picklable, no tensors."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])
    base_ref: str | None = None
    refs: dict[str, str] = field(default_factory=dict)  # expert name → model ref
    tasks: dict[str, str | None] = field(default_factory=dict)  # expert → zoo task it came from
    folders: dict[str, str | None] = field(default_factory=dict)  # expert → its HF folder (probe heads)
    data: dict[str, TaskData] = field(default_factory=dict)
    layers: list[str] = field(default_factory=list)
    summary: list[list] = field(default_factory=list)
    importance: Any = None  # ImportanceMap
    importance_runs: dict[str, Any] = field(default_factory=dict)  # "gradient/restore" → ImportanceMap
    fewshot_n: int = DEFAULT_FEWSHOT
    overrides: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # expert → key → layer → v
    method: str = DEFAULT_METHOD
    shared: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    last_recipe: Any = None
    last_label: str | None = None
    merges: int = 0
    history: list[dict] = field(default_factory=list)
    reference: Any = None  # ProbeReport of base and experts
    first_looks: dict[str, dict] = field(default_factory=dict)  # merge key → metrics on the probe's first look
    merge_key: str | None = None  # content hash of the last merge (its body lives in the shared cache)
    merge_inputs: MergeInputs | None = None  # what that merge was built from: Export and a rebuild read it
    comparison: Any = None  # the last "compare interventions and draws" result
    layer_take: dict[str, str] = field(default_factory=dict)  # layer swap: layer → expert, blend, base or shape
    tokenizer: str | None = None  # LM experts whose vocabularies differ: base, union or an expert (io.vocab)

    @property
    def key(self) -> str:
        key = selection_key(self.base_ref or "", self.refs)
        return key if self.tokenizer is None else f"{key}|tokenizer={self.tokenizer}"  # other tensors: other models

    @property
    def experts(self) -> list[str]:
        return list(self.refs)

    def missing_data(self) -> list[str]:
        return [e for e in self.refs if e not in self.data]




def open_default_zoo(name: str | None = None):
    """The configured zoo, or None if it is not built yet."""
    from ..zoo.zoo import default_zoo_name, open_zoo

    try:
        return open_zoo(name or default_zoo_name())
    except MergeLabError:
        return None


def ensure_zoo(name: str | None = None, progress: Progress | None = None):
    """Open the zoo, building it first (minutes: one short fine-tune per task) if it is missing."""
    from ..zoo.zoo import build_zoo, default_zoo_name

    name = name or default_zoo_name()
    zoo = open_default_zoo(name)
    if zoo is not None:
        return zoo
    return build_zoo(name, progress=progress)


def zoo_refs(zoo, tasks: Sequence[str] | None = None) -> tuple[str, dict[str, str]]:
    tasks = list(tasks if tasks is not None else zoo.tasks)
    return f"zoo:{zoo.name}/base", {t: f"zoo:{zoo.name}/{t}" for t in tasks}


