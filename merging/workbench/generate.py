"""Try a prompt: the continuation of one prompt by the base, a chosen expert and the latest merge.

For causal-LM sessions (classifier sessions try a sentence, :func:`.probe.predict`). One model of the
selection's architecture is built once per selection and each body is copied into it in turn, so three
continuations cost one model's memory. Generation is transformers' own ``generate``: greedy by default,
or sampling from one seed (the same seed gives the same three continuations), bounded by
:data:`MAX_NEW_TOKENS` and stopped between tokens by Stop (a stopping criterion that asks
:func:`merging.cancel.checkpoint`). An EMR merge (one body per task) continues with the chosen expert's
task body: that is the model the merge gives for that expert's task.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..cancel import checkpoint
from ..errors import MergeLabError
from .experts import models_for, tokenizer_for
from .limits import MAX_SENTENCE_CHARS, check_number, check_seed
from .session import Session

DEFAULT_NEW_TOKENS = 24
MAX_NEW_TOKENS = 64  # a 2-core Space generates three continuations of this length in seconds for small models


@dataclass
class _Generator:
    """A causal LM of the selection's architecture and its parameters by base tensor name."""

    model: object
    params: dict


def check_new_tokens(value) -> int:
    return int(check_number("New tokens", DEFAULT_NEW_TOKENS if value in (None, "") else value, 1, MAX_NEW_TOKENS,
                            integer=True))


def check_prompt(prompt: str | None) -> str:
    prompt = (prompt or "").strip()
    if not prompt:
        raise MergeLabError("type a prompt first")
    if len(prompt) > MAX_SENTENCE_CHARS:
        raise MergeLabError(f"Try a prompt: at most {MAX_SENTENCE_CHARS} characters, got {len(prompt)}")
    return prompt


def _generator(models) -> _Generator:
    """The selection's generation model (built once, kept in ``models.predictor`` — an LM selection never
    predicts sentences); its weights are whichever body was copied in last."""
    from ..lm.model import bind_body, causal_lm_from_config, has_own_lm_head

    if isinstance(models.predictor, _Generator):
        return models.predictor
    expert_set = models.expert_set
    first = next(iter(expert_set.experts.values()))
    model = causal_lm_from_config(first.source.config or expert_set.base.config, first.name,
                                  untie=has_own_lm_head(expert_set.layout))
    models.predictor = _Generator(model, bind_body(model, expert_set.layout, first.body_key, first.name))
    return models.predictor


@torch.no_grad()
def _load(generator: _Generator, body: Mapping[str, torch.Tensor]) -> None:
    missing = [n for n in generator.params if n not in body]
    if missing:
        raise MergeLabError(f"the body lacks {len(missing)} tensor(s) of the base, e.g. '{missing[0]}'")
    for name, param in generator.params.items():
        param.data.copy_(body[name].to(param.dtype))


class _StopOnCancel:
    """A transformers stopping criterion that raises :class:`~merging.cancel.Cancelled` once Stop is
    pressed: called after every generated token."""

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        checkpoint()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def continue_prompt(model, tokenizer, prompt: str, max_new_tokens: int, seed: int = 0,
                    sample: bool = False) -> str:
    """The text ``model`` adds to ``prompt`` (special tokens dropped): greedy, or sampled from ``seed``."""
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Stop(_StopOnCancel, StoppingCriteria):
        pass

    encoded = tokenizer(prompt, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded.get("attention_mask")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    options = dict(max_new_tokens=max_new_tokens, do_sample=sample, pad_token_id=pad,
                   stopping_criteria=StoppingCriteriaList([Stop()]))
    if sample:
        options.update(temperature=1.0, top_k=0, top_p=1.0)  # the model's own distribution, one seed
    else:
        options.update(temperature=None, top_k=None, top_p=None)  # greedy: no sampling settings to warn about
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model.generate(input_ids=ids, attention_mask=mask, **options)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def generate_side_by_side(session: Session, prompt: str, expert: str | None = None,
                          max_new_tokens: int | None = None, seed: int | None = None,
                          sample: bool = False) -> list[tuple[str, str]]:
    """``[(model, continuation)]`` for the base, ``expert`` (default: the first) and the latest merge."""
    from .lm import is_lm_session
    from .merge import merged_result

    prompt = check_prompt(prompt)
    n_new, seed = check_new_tokens(max_new_tokens), check_seed(seed)
    if not is_lm_session(session):
        raise MergeLabError("Try a prompt continues text with causal-LM experts; these experts are classifiers: "
                            "use Try a sentence")
    expert = expert or session.refs and next(iter(session.refs))
    if expert not in session.refs:
        raise MergeLabError(f"no expert named '{expert}' is loaded (experts: {', '.join(session.refs)})")
    models = models_for(session)
    tokenizer = tokenizer_for(models)
    result = merged_result(session)
    expert_set = models.expert_set
    with models.lock:
        generator = _generator(models)
        bodies = [("base", {n: expert_set.base.get(n) for n in generator.params}),
                  (expert, {n: expert_set.experts[expert].get(n) for n in generator.params}),
                  (session.last_label or "merged", result.body_for(expert))]
        out = []
        for label, body in bodies:
            checkpoint()
            _load(generator, body)
            out.append((label, continue_prompt(generator.model, tokenizer, prompt, n_new, seed, sample)))
    return out
