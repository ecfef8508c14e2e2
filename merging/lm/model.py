"""A causal LM as a function of its body: built from config, bound to base names, scored on a fixed batch.

The LM head (tied or untied) is part of the body — a base tensor like any other — never a task head:
an LM expert's "task" is its text. Examples are :class:`~merging.io.taskdata.LMExample` rows
``(prompt, completion)``; the loss is the mean next-token cross-entropy over the completion tokens
(every token of a plain text row, whose prompt is empty), pooled over the batch's target tokens so a
long completion weighs as many tokens as it has.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..devices import AUTO_DEVICE, resolve_device  # noqa: F401  (the one resolver; imported from here too)
from ..errors import MergeLabError
from ..io.layout import ROLE_MERGE, Layout
from ..io.taskdata import LMExample

IGNORE = -100
LM_ARCHITECTURE_ENDINGS = ("ForCausalLM", "LMHeadModel")


def is_causal_lm(config: Mapping | None) -> bool:
    """Whether a config.json describes a causal LM (its saved ``architectures`` say so)."""
    archs = (config or {}).get("architectures") or []
    return any(str(a).endswith(LM_ARCHITECTURE_ENDINGS) for a in archs)


def causal_lm_from_config(config: Mapping, name: str, *, untie: bool = False):
    """A randomly initialised float32 causal LM of ``name``'s architecture (its weights are loaded after).

    ``untie``: build the LM head as its own matrix even where the config ties it to the input
    embeddings — for a checkpoint that ships a distinct ``lm_head.weight``, which the layout merges
    (and APL scores) as its own tensor."""
    if not config or "model_type" not in config:
        raise MergeLabError(f"model '{name}' has no usable config.json (model_type missing): the LM loss builds "
                            "the model from it — use a folder saved with save_pretrained")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    settings = {k: v for k, v in config.items()
                if k not in ("model_type", "transformers_version", "architectures", "dtype", "torch_dtype")}
    if untie:
        settings["tie_word_embeddings"] = False
    try:
        hf_config = AutoConfig.for_model(config["model_type"], **settings)
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        raise MergeLabError(f"model '{name}': transformers cannot build a causal LM from its config ({exc}); "
                            "only architectures transformers ships (GPT-2, Llama, Qwen2, Mistral, …) are supported") \
            from exc
    return model.float().eval()


def bind_body(model, layout: Layout, key_of: Callable[[str], str], name: str) -> dict[str, torch.nn.Parameter]:
    """Base tensor name → the model's parameter holding it; every parameter must be covered.

    A tied LM head is the input embedding's own parameter (one tensor, counted once under embeddings),
    so it needs no entry of its own."""
    params = dict(model.named_parameters())
    bound: dict[str, torch.nn.Parameter] = {}
    for tensor, info in layout.tensors.items():
        if info.role != ROLE_MERGE:
            continue
        key = key_of(tensor)
        if key not in params:
            raise MergeLabError(f"model '{name}': the causal LM built from its config has no parameter '{key}' (base "
                                f"tensor '{tensor}'); its config does not match its weights")
        bound[tensor] = params[key]
    covered = {id(p) for p in bound.values()}
    missing = [k for k, p in params.items() if id(p) not in covered]
    if missing:
        raise MergeLabError(f"model '{name}' has no weights for {', '.join(missing[:3])}: the checkpoint was saved "
                            "partially (re-save it with save_pretrained)")
    for p in model.parameters():
        p.requires_grad_(False)
    return bound


def has_own_lm_head(layout: Layout) -> bool:
    """Whether the base merges a distinct LM head matrix (an untied ``lm_head``)."""
    return any(i.kind == "lm_head" and i.role == ROLE_MERGE for i in layout.tensors.values())


# ---- data --------------------------------------------------------------------------------------

def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def encode_lm_examples(tokenizer, examples: Sequence[LMExample], max_length: int) -> dict[str, torch.Tensor]:
    """Token ids, attention mask and labels of a batch, tokenised once and right-padded.

    The prompt is tokenised with the tokenizer's special tokens (its BOS, where it adds one) and the
    completion without, then concatenated, so the completion's tokens are exactly its own; labels are
    the ids on completion tokens and ``-100`` on prompt and padding. Over ``max_length`` the prompt
    loses its oldest tokens first (the completion is what is scored). Padding is on the right with
    the tokenizer's pad token (else its EOS): under causal attention no real token sees a pad, so a
    padded row scores exactly as alone, positions included."""
    if not examples:
        raise MergeLabError("no LM examples: attach task text (a .txt file, or JSONL rows with text or "
                            "prompt/completion) to the expert")
    if tokenizer is None:
        raise MergeLabError("the LM loss needs the model's tokenizer: add tokenizer files to the base folder")
    rows: list[tuple[list[int], list[int]]] = []
    for example in examples:
        if not isinstance(example, LMExample):
            raise MergeLabError(f"expected causal-LM examples (text or prompt/completion rows), got {example!r:.80}: "
                                "a labelled file is classifier data")
        prompt, completion = _ids(tokenizer, example.prompt, True), _ids(tokenizer, example.completion, False)
        completion = completion[:max_length]
        prompt = prompt[len(prompt) - (max_length - len(completion)):] if len(prompt) + len(completion) > max_length \
            else prompt
        ids = prompt + completion
        rows.append((ids, [IGNORE] * len(prompt) + completion))
    width = max(len(ids) for ids, _ in rows)
    if width < 2:
        raise MergeLabError("the LM examples are too short: each needs at least two tokens (one to predict from)")
    pad = _pad_id(tokenizer)
    batch = {"input_ids": torch.full((len(rows), width), pad, dtype=torch.long),
             "attention_mask": torch.zeros(len(rows), width, dtype=torch.long),
             "labels": torch.full((len(rows), width), IGNORE, dtype=torch.long)}
    for row, (ids, labels) in enumerate(rows):
        batch["input_ids"][row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        batch["attention_mask"][row, :len(ids)] = 1
        batch["labels"][row, :len(ids)] = torch.tensor(labels, dtype=torch.long)
    if not bool((batch["labels"][:, 1:] != IGNORE).any()):
        raise MergeLabError("the LM examples have no completion token to score (empty completions, or prompts "
                            "filling max_length): give each example a non-empty completion")
    return batch


def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id", "unk_token_id"):
        value = getattr(tokenizer, attr, None)
        if isinstance(value, int):
            return value
    return 0


def lm_loss_terms(model, batch: Mapping[str, torch.Tensor], rows: slice | None = None) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy over the target tokens, their count) of some rows of a batch."""
    ids, mask, labels = (batch[k] if rows is None else batch[k][rows] for k in ("input_ids", "attention_mask", "labels"))
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]
    targets = labels[:, 1:]
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            ignore_index=IGNORE, reduction="sum")
    return total, int((targets != IGNORE).sum())


def lm_mean_loss(model, batch: Mapping[str, torch.Tensor], rows: slice | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the target tokens (0 where a row has none: nothing to score)."""
    total, count = lm_loss_terms(model, batch, rows)
    return total / max(count, 1)
