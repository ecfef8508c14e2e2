"""Recipe: everything needed to reproduce a merge, as YAML.

```yaml
merge_lab: 1
method: ties
base: zoo:default/base           # or a path relative to this file, or hf:org/name@rev
experts:
  - name: topic
    model: zoo:default/topic
    parameters: {weight: 1.0, drop_ratio: {"5": 0.8}}   # per expert, per layer
parameters: {lambda: 1.0, drop_ratio: 0.5}              # shared
seed: 0
dtype: float32
configs_from: base               # whose generation_config.json and chat template the export keeps (or an expert)
```

Invalid recipes get a :class:`MergeLabError` naming the field and, when read from YAML,
the line. The app and the CLI are two faces of the same recipe: an exported recipe
replays with ``python -m merging merge recipe.yaml --out DIR``.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import MergeLabError
from ..methods import get_method
from ..params import validate_params
from .names import check_name, derive_name

FORMAT_VERSION = 1
DTYPES = ("float32", "float16", "bfloat16")
_TOP_KEYS = {"merge_lab", "method", "base", "experts", "parameters", "seed", "dtype", "importance",
             "suggested", "notes", "few_shot", "calibrated", "configs_from", "tokenizer", "device"}
CONFIGS_FROM_BASE = "base"
_EXPERT_KEYS = {"name", "model", "parameters", "task"}


@dataclass
class ExpertRef:
    name: str
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    """A merge, reproducibly described."""

    method: str
    base: str
    experts: list[ExpertRef]
    parameters: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    dtype: str = "float32"
    importance: str | None = None  # where the importance a data-aware merge used is stored
    suggested: dict[str, Any] = field(default_factory=dict)  # e.g. APL's calibrated tables, beside overrides
    few_shot: dict[str, Any] = field(default_factory=dict)  # per expert: file (by reference), n, seed, indices
    #: set when the experts' parameters already hold what the method's ``prepare`` computed (and it needed
    #: nothing else): replay then merges from the recipe alone. Says what it was calibrated from.
    calibrated: dict[str, Any] | None = None
    #: the model whose generation_config.json (stop tokens, sampling defaults) and chat template the export
    #: keeps: "base" or an expert's name (what makes a merged instruct model usable, not part of the weights)
    configs_from: str = CONFIGS_FROM_BASE
    #: for experts whose vocabularies differ: whose vocabulary the merge uses (base, union or an expert's name;
    #: embedding and LM-head rows aligned by token, see io/vocab.py); None: the vocabularies must be one
    tokenizer: str | None = None
    #: where the merge that wrote this recipe ran (a record, not an instruction): None is the CPU; "cuda" says
    #: a random drop's masks came from CUDA's generator, so a CPU replay of the same seed draws other masks
    device: str | None = None
    notes: str = ""
    source: Path | None = None  # the file it was read from (resolves relative model paths)

    # ---- YAML ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "merge_lab": FORMAT_VERSION,
            "method": self.method,
            "base": self.base,
            "experts": [_expert_dict(e) for e in self.experts],
            "parameters": copy.deepcopy(self.parameters),
            "seed": self.seed,
            "dtype": self.dtype,
        }
        for key in ("importance", "notes"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        for key in ("suggested", "few_shot"):
            if getattr(self, key):
                out[key] = copy.deepcopy(getattr(self, key))
        if self.calibrated is not None:
            out["calibrated"] = copy.deepcopy(self.calibrated) or True
        if self.configs_from != CONFIGS_FROM_BASE:
            out["configs_from"] = self.configs_from
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer
        if self.device is not None:
            out["device"] = self.device
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_yaml(), encoding="utf-8")
        return path

    @classmethod
    def from_yaml(cls, text: str, source: Path | None = None) -> Recipe:
        try:
            _check_plain_yaml(text)
            data = yaml.safe_load(text)
            lines = _line_map(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise MergeLabError(f"recipe is not valid YAML: {getattr(exc, 'problem', exc)}",
                                line=(mark.line + 1) if mark else None) from exc
        return cls.from_dict(data, source=source, lines=lines)

    @classmethod
    def from_dict(cls, data: Any, source: Path | None = None, lines: Mapping[str, int] | None = None) -> Recipe:
        lines = lines or {}
        try:
            return _parse(data, source)
        except MergeLabError as exc:
            if exc.line is None and exc.field:
                exc.line = _find_line(lines, exc.field)
            raise

    def validate(self, layers: list[str] | None = None) -> None:
        """Check parameters against the method's declarations (and layer names, when known)."""
        spec = get_method(self.method)
        validate_params(spec.params, self.parameters, "parameters", layers)
        check_configs_from(self.configs_from, [e.name for e in self.experts])
        if self.tokenizer is not None:
            from .vocab import check_tokenizer_choice

            check_tokenizer_choice(self.tokenizer, [e.name for e in self.experts])
        for index, expert in enumerate(self.experts):
            validate_params(spec.params, expert.parameters, f"experts[{index}].parameters", layers,
                            per_expert=True)

    def expert_params(self) -> dict[str, dict[str, Any]]:
        return {e.name: dict(e.parameters) for e in self.experts if e.parameters}

    def resolve_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()


def read_recipe_text(path: str | Path) -> str:
    """The text of a recipe file (ours or a mergekit config), or a MergeLabError saying why it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise MergeLabError(f"recipe file {path} not found") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeLabError(f"cannot read recipe {path}: {exc}") from exc


def load_recipe(path: str | Path) -> Recipe:
    """Read a recipe YAML file (errors name the field and line)."""
    return Recipe.from_yaml(read_recipe_text(path), source=Path(path).resolve())


def _expert_dict(expert: ExpertRef) -> dict[str, Any]:
    out: dict[str, Any] = {"name": expert.name, "model": expert.model}
    if expert.parameters:
        out["parameters"] = copy.deepcopy(expert.parameters)
    return out


def _parse(data: Any, source: Path | None) -> Recipe:
    if not isinstance(data, dict):
        raise MergeLabError("a recipe must be a YAML mapping with method, base and experts", field="recipe")
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise MergeLabError(f"unknown recipe field '{unknown[0]}' (known: {', '.join(sorted(_TOP_KEYS))})",
                            field=unknown[0])
    version = data.get("merge_lab", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        raise MergeLabError(f"merge_lab format {version!r} is not supported (this version reads {FORMAT_VERSION})",
                            field="merge_lab")
    method = _required_str(data, "method")
    spec = get_method(method)
    base = _required_str(data, "base")
    experts = _parse_experts(data.get("experts"))
    parameters = data.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise MergeLabError("parameters must be a mapping of name: value", field="parameters")
    recipe = Recipe(
        method=method, base=base, experts=experts, parameters=dict(parameters),
        seed=_seed(data.get("seed", 0)), dtype=_dtype(data.get("dtype", "float32")),
        importance=_optional_str(data, "importance"),
        suggested=_mapping(data, "suggested"), few_shot=_mapping(data, "few_shot"),
        calibrated=_calibrated(data.get("calibrated")),
        configs_from=data.get("configs_from", CONFIGS_FROM_BASE), tokenizer=data.get("tokenizer"),
        device=_device_record(data.get("device")), notes=str(data.get("notes") or ""), source=source,
    )
    recipe.validate()
    spec.check_expert_count(len(experts))
    return recipe


def _parse_experts(value: Any) -> list[ExpertRef]:
    if not isinstance(value, list) or not value:
        raise MergeLabError("experts must be a non-empty list of {name, model, parameters}", field="experts")
    out: list[ExpertRef] = []
    for index, item in enumerate(value):
        where = f"experts[{index}]"
        if isinstance(item, str):
            item = {"model": item}
        if not isinstance(item, dict):
            raise MergeLabError(f"{where} must be a mapping with model (and optional name, parameters)", field=where)
        unknown = sorted(str(k) for k in item if k not in _EXPERT_KEYS)
        if unknown:
            raise MergeLabError(f"{where}: unknown field '{unknown[0]}' (known: {', '.join(sorted(_EXPERT_KEYS))})",
                                field=f"{where}.{unknown[0]}")
        model = item.get("model")
        if not isinstance(model, str) or not model.strip():
            raise MergeLabError(f"{where}.model must name a model (zoo:NAME/TASK, a path, or hf:org/name)",
                                field=f"{where}.model")
        name = item.get("name") or derive_name(model.rstrip("/").split("/")[-1].split("@")[0])
        if not isinstance(name, str):
            raise MergeLabError(f"{where}.name must be text", field=f"{where}.name")
        check_name(name, field=f"{where}.name")  # it becomes a folder name at export
        if any(e.name == name for e in out):
            raise MergeLabError(f"two experts are named '{name}': names must be unique", field=f"{where}.name")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise MergeLabError(f"{where}.parameters must be a mapping", field=f"{where}.parameters")
        out.append(ExpertRef(name, model, dict(params)))
    return out


def _device_record(value: Any) -> str | None:
    """The recipe's ``device`` record: the device type a merge ran on (cpu or cuda); cpu is stored as absent."""
    if value is None:
        return None
    if value not in ("cpu", "cuda"):
        raise MergeLabError(f"device records where the merge ran: cpu or cuda, got {str(value)[:40]!r}",
                            field="device")
    return None if value == "cpu" else value


def check_configs_from(value: Any, experts: list[str]) -> str:
    """``configs_from`` names the base or one of the recipe's experts."""
    choices = [CONFIGS_FROM_BASE, *experts]
    if not isinstance(value, str) or value not in choices:
        raise MergeLabError(f"configs_from must name the model whose generation config and chat template the export "
                            f"keeps: one of {', '.join(choices)}; got {str(value)[:64]!r}", field="configs_from")
    return value


def _required_str(data: dict, key: str) -> str:
    value = data.get(key)
    if not isinstance(value, str) or not value.strip():
        raise MergeLabError(f"recipe field '{key}' is missing or not text", field=key)
    return value.strip()


def _optional_str(data: dict, key: str) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise MergeLabError(f"recipe field '{key}' must be text", field=key)
    return value


def _mapping(data: dict, key: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise MergeLabError(f"recipe field '{key}' must be a mapping", field=key)
    return dict(value)


def _calibrated(value: Any) -> dict | None:
    """``calibrated: true`` or a mapping saying what from; absent or false: the method prepares on replay."""
    if value is None or value is False:
        return None
    if value is True:
        return {}
    if not isinstance(value, dict):
        raise MergeLabError("calibrated must be true or a mapping (from: …) saying what the per-layer values were "
                            f"calibrated from, got {value!r}", field="calibrated")
    return dict(value)


MAX_SEED = 2**31 - 1  # the one largest seed: the app's Seed box and recipes (the CLI) agree on it


def _seed(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_SEED:
        raise MergeLabError(f"seed must be a whole number in [0, {MAX_SEED}], got {str(value)[:40]}", field="seed")
    return value


def _dtype(value: Any) -> str:
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    if isinstance(value, str):
        value = aliases.get(value, value)
    if not isinstance(value, str) or value not in DTYPES:
        raise MergeLabError(f"dtype must be one of {', '.join(DTYPES)} (or fp32/fp16/bf16), got {value!r}",
                            field="dtype")
    return value


MAX_YAML_DEPTH = 64


def _check_plain_yaml(text: str) -> None:
    """Refuse anchors/aliases and deep nesting while only *parsing* (events, nothing expanded or built).

    A recipe never needs aliases, and a "billion laughs" document of nested aliases expands to billions of
    nodes in safe_load and in the line-number walk (the CLI hung); nesting thousands deep overflows the
    composer's recursion. Both are refused here, before anything walks the document."""
    depth = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
            mark = event.start_mark
            raise MergeLabError("recipe uses a YAML anchor or alias (& or *): write each value out in full "
                                "(recipes never need them)", line=mark.line + 1 if mark else None)
        if isinstance(event, (yaml.MappingStartEvent, yaml.SequenceStartEvent)):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                raise MergeLabError(f"recipe nests deeper than {MAX_YAML_DEPTH} levels: a recipe is a few levels "
                                    "deep (is it the right file?)", line=event.start_mark.line + 1)
        elif isinstance(event, (yaml.MappingEndEvent, yaml.SequenceEndEvent)):
            depth -= 1


def _line_map(text: str) -> dict[str, int]:
    """Field path (``method``, ``experts[0].model``, ``parameters.drop_ratio``) → 1-based YAML line."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    out: dict[str, int] = {}

    def walk(node: Any, path: str) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                child = f"{path}.{key.value}" if path else str(key.value)
                out[child] = key.start_mark.line + 1
                walk(value, child)
        elif isinstance(node, yaml.SequenceNode):
            for index, value in enumerate(node.value):
                child = f"{path}[{index}]"
                out[child] = value.start_mark.line + 1
                walk(value, child)

    walk(root, "")
    return out


def _find_line(lines: Mapping[str, int], field: str) -> int | None:
    """Line of a field, or of its nearest named parent (``experts.NAME`` maps to its list entry)."""
    candidates = [field]
    parts = field.split(".")
    while len(parts) > 1:
        parts = parts[:-1]
        candidates.append(".".join(parts))
    for candidate in candidates:
        if candidate in lines:
            return lines[candidate]
    return None
