"""Experts whose tokenizers differ (chat fine-tunes add tokens): embedding and LM-head rows aligned by token.

Merging is tensor by tensor, so models with different vocabularies cannot be merged as they are. With an
explicit tokenizer choice they can, as mergekit's ``tokenizer`` option does:

- ``base``: the base's vocabulary; tokens only an expert added are dropped;
- an expert's name: that expert's vocabulary;
- ``union``: the base's vocabulary, then every token an expert added, in expert order (as a tokenizer
  adds them: the next free ids).

Each model's vocabulary-indexed tensors (input embeddings, LM head) are then presented in the chosen
vocabulary: a token the model has keeps the model's row; a token it lacks gets mergekit 0.1.5's default
(``tokenizer/embed.py``): the row of the only model that has it, else the base's row, else the mean of
the rows of the models that have it, else zeros. Rows past the last token (padding to a multiple) are the
chosen vocabulary's model's rows (the base's for ``union``), so every model agrees there.

Vocabularies are read from ``tokenizer.json`` (``tokenizers``, no code runs); models without one cannot be
aligned and say so.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import MergeLabError
from .access import check_file_inside
from .sources import ModelSource, TensorEntry

BASE, UNION = "base", "union"
#: name endings of the tensors indexed by token along axis 0
VOCAB_TENSORS = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "lm_head.weight")


def check_tokenizer_choice(value: Any, experts: list[str]) -> str:
    """``tokenizer`` names the base, the union, or one expert."""
    choices = [BASE, UNION, *experts]
    if not isinstance(value, str) or value not in choices:
        raise MergeLabError(f"tokenizer must be one of {', '.join(choices)} (whose vocabulary the merge uses), got "
                            f"{str(value)[:64]!r}", field="tokenizer")
    return value


def _tokenizer(source: ModelSource):
    from tokenizers import Tokenizer

    path = source.root / "tokenizer.json" if source.root is not None else None
    if path is None or not path.is_file():
        raise MergeLabError(f"model '{source.name}' has no tokenizer.json: its vocabulary cannot be aligned with the "
                            "others' (save its tokenizer with a fast tokenizer, or merge models of one vocabulary)",
                            field="tokenizer")
    try:
        return Tokenizer.from_file(str(check_file_inside(path, source.name)))
    except MergeLabError:
        raise
    except Exception as exc:
        raise MergeLabError(f"model '{source.name}': tokenizer.json cannot be read ({str(exc)[:120]})",
                            field="tokenizer") from None


def vocab_of(source: ModelSource) -> dict[str, int]:
    """Token → id of a model's tokenizer, added tokens included."""
    return dict(_tokenizer(source).get_vocab(with_added_tokens=True))


def _vocab_keys(source: ModelSource) -> dict[str, str]:
    """Vocabulary tensor ending → the model's tensor name."""
    out = {}
    for key in source.tensors:
        for ending in VOCAB_TENSORS:
            if key.endswith(ending) and ending not in out:
                out[ending] = key
    return out


@dataclass
class VocabPlan:
    """The chosen vocabulary and, per model, where each of its rows comes from."""

    choice: str
    tokens: dict[str, int]  # the chosen vocabulary: token → id
    rows: int  # rows of every aligned vocabulary tensor
    own: dict[str, torch.Tensor]  # model → LongTensor[rows]: its own row for each output row, −1 where it lacks it
    sources: dict[str, ModelSource]  # the unaligned models, "base" first
    tokenizer_model: str  # the model whose tokenizer files (and padding rows) the merge uses
    added: list[Any] = field(default_factory=list)  # union: the AddedTokens appended to the base's tokenizer

    def default_source(self, row: int) -> list[str]:
        """Models whose rows give an output row to a model that lacks it (mean of these; [] = zeros)."""
        donors = [m for m, own in self.own.items() if own[row] >= 0]
        if len(donors) <= 1:
            return donors
        if BASE in donors:
            return [BASE]
        return donors

    def aligned_rows(self, model: str, ending: str, start: int, stop: int) -> torch.Tensor:
        """Rows ``start:stop`` of ``model``'s vocabulary tensor ``ending`` in the chosen vocabulary."""
        source = self.sources[model]
        own = self.own[model][start:stop]
        mine = source.get(_vocab_keys(source)[ending])
        out = torch.zeros((stop - start, *mine.shape[1:]), dtype=mine.dtype)
        have = own >= 0
        out[have] = mine[own[have]]
        for index in torch.nonzero(~have).flatten().tolist():
            donors = self.default_source(start + index)
            if not donors:
                continue
            rows = [self._row(d, ending, start + index).float() for d in donors]
            out[index] = (torch.stack(rows).sum(0) / len(rows)).to(mine.dtype)
        return out

    def _row(self, model: str, ending: str, row: int) -> torch.Tensor:
        source = self.sources[model]
        return source.get_rows(_vocab_keys(source)[ending], int(self.own[model][row]), int(self.own[model][row]) + 1)[0]


@dataclass
class AlignedSource(ModelSource):
    """A model seen through a :class:`VocabPlan`: its vocabulary tensors have the chosen vocabulary's rows."""

    plan: VocabPlan | None = None
    model: str = ""
    endings: dict[str, str] = field(default_factory=dict)  # tensor name → vocabulary ending

    def get(self, name: str) -> torch.Tensor:
        ending = self.endings.get(name)
        if ending is None:
            return super().get(name)
        return self.plan.aligned_rows(self.model, ending, 0, self.plan.rows)

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        ending = self.endings.get(name)
        if ending is None:
            return super().get_rows(name, start, stop)
        return self.plan.aligned_rows(self.model, ending, start, min(stop, self.plan.rows))


def align_vocabularies(base: ModelSource, experts: Mapping[str, ModelSource],
                       choice: str) -> tuple[ModelSource, dict[str, ModelSource], VocabPlan]:
    """The base and experts with their vocabulary tensors aligned to ``choice``'s vocabulary."""
    check_tokenizer_choice(choice, list(experts))
    models = {BASE: base, **experts}
    vocabs = {name: vocab_of(source) for name, source in models.items()}
    tokenizer_model = BASE if choice in (BASE, UNION) else choice
    tokens, added = dict(vocabs[tokenizer_model]), []
    if choice == UNION:
        tokens, added = _union(base, experts, vocabs)
    rows = max(max(tokens.values(), default=-1) + 1, _vocab_rows(models[tokenizer_model]))
    own = {}
    for name, vocab in vocabs.items():
        index = torch.full((rows,), -1, dtype=torch.long)
        for token, token_id in tokens.items():
            if token in vocab and vocab[token] < _vocab_rows(models[name]):
                index[token_id] = vocab[token]
        own[name] = index
    _fill_padding(own, tokens, rows, tokenizer_model, _vocab_rows(models[tokenizer_model]))
    plan = VocabPlan(choice, tokens, rows, own, models, tokenizer_model, added)
    aligned = {name: _aligned(source, plan, name) for name, source in models.items()}
    return aligned.pop(BASE), aligned, plan


def _union(base: ModelSource, experts: Mapping[str, ModelSource], vocabs) -> tuple[dict[str, int], list]:
    """The base's vocabulary, then each expert's added tokens at the next free ids (as a tokenizer adds them)."""
    tokens = dict(vocabs[BASE])
    added = []
    next_id = max(tokens.values(), default=-1) + 1
    for name, source in experts.items():
        decoder = _tokenizer(source).get_added_tokens_decoder()
        by_token = {str(t.content): t for t in decoder.values()}
        for token, _ in sorted(vocabs[name].items(), key=lambda item: item[1]):
            if token in tokens:
                continue
            tokens[token] = next_id
            next_id += 1
            added.append(by_token.get(token, token))
    return tokens, added


def _fill_padding(own: dict[str, torch.Tensor], tokens: Mapping[str, int], rows: int, tokenizer_model: str,
                  tokenizer_rows: int) -> None:
    """Rows no token uses (padding to a multiple) are the chosen vocabulary's model's own rows; every other model
    lacks them, so the donor rule gives them that model's row too — all models agree there."""
    padding = torch.ones(rows, dtype=torch.bool)
    padding[list(tokens.values())] = False
    padding[tokenizer_rows:] = False  # past the model's rows: no row to take (zeros)
    for name, index in own.items():
        index[padding] = torch.arange(rows)[padding] if name == tokenizer_model else -1


def _vocab_rows(source: ModelSource) -> int:
    keys = _vocab_keys(source)
    if not keys:
        raise MergeLabError(f"model '{source.name}' has no embedding tensor to align by token", field="tokenizer")
    return source.tensors[next(iter(keys.values()))].shape[0]


def _aligned(source: ModelSource, plan: VocabPlan, model: str) -> AlignedSource:
    """``source`` with its vocabulary tensors' shapes (and config vocab_size) those of the chosen vocabulary."""
    keys = _vocab_keys(source)
    tensors = dict(source.tensors)
    for key in keys.values():
        entry = tensors[key]
        tensors[key] = TensorEntry(entry.file, entry.key, (plan.rows, *entry.shape[1:]), entry.dtype)
    config = dict(source.config or {})
    if "vocab_size" in config:
        config["vocab_size"] = plan.rows
    values = {f.name: getattr(source, f.name) for f in dataclasses.fields(ModelSource)}
    values.update(tensors=tensors, config=config)
    return AlignedSource(**values, plan=plan, model=model, endings={k: e for e, k in keys.items()})


def write_union_tokenizer(plan: VocabPlan, folder: Path) -> Path:
    """tokenizer.json of the union: the base's tokenizer with the experts' added tokens appended."""
    tokenizer = _tokenizer(plan.sources[BASE])
    for token in plan.added:
        if getattr(token, "special", False):
            tokenizer.add_special_tokens([token])
        else:
            tokenizer.add_tokens([token])
    got = tokenizer.get_vocab(with_added_tokens=True)
    wrong = [t for t, i in plan.tokens.items() if got.get(t) != i]
    if wrong:
        raise MergeLabError(f"the union tokenizer gave token {wrong[0]!r} id {got.get(wrong[0])}, the merge placed it "
                            f"at {plan.tokens[wrong[0]]}: export with tokenizer base or one expert's", field="tokenizer")
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path
