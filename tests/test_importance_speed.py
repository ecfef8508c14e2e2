"""Exact importance with blocks below each patch replayed and repeated patches measured once: every score
equals the plain one-full-forward-per-partition loop, written here from the definition as the oracle."""

import apl_fixtures as fx
import numpy as np
import pytest
import torch

from merging.apl.importance import BlockReplay, compute_importance
from merging.apl.taskloss import body_state, task_loss

LEVELS = ["model", "layer", "module"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with fx.one_thread():
        yield


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return fx.tokenizer(tmp_path_factory.mktemp("vocab"))


def _examples(expert_set, n=10):
    return {t: fx.examples(n, seed=3 + i) for i, t in enumerate(expert_set.experts)}


@torch.no_grad()
def oracle(expert_set, examples, tokenizer, intervention, levels=LEVELS):
    """(expert, level, partition) → L(start with the partition switched to target) − L(start): one full forward
    of the expert's classifier per partition, every partition measured, nothing reused."""
    out = {}
    for expert in expert_set.experts:
        base, own = body_state(expert_set, "base"), body_state(expert_set, expert)
        start, target = (base, own) if intervention == "restore" else (own, base)
        task = task_loss(expert_set, expert, examples, tokenizer, start, purpose="the oracle")
        reference = float(task.loss())
        for level in levels:
            for key, names in expert_set.layout.partitions(level).items():
                for name in names:
                    task.live[name].copy_(target[name])
                out[(expert, level, key)] = float(task.loss()) - reference
                for name in names:
                    task.live[name].copy_(start[name])
    return out


@pytest.mark.parametrize("intervention", ["restore", "ablate"])
def test_replayed_exact_scores_equal_full_forwards(tok, intervention):
    frozen = tuple(f"encoder.layer.1.attention.self.{m}.{p}" for m in ("query", "key") for p in ("weight", "bias"))
    expert_set = fx.expert_set(frozen=frozen)  # some partitions with no delta, some layers of one kind only
    examples = _examples(expert_set)
    result = compute_importance(expert_set, examples, tok, mode="exact", level=LEVELS, intervention=intervention)
    want = oracle(expert_set, examples, tok, intervention)
    for (expert, level, key), value in want.items():
        got = result.scores(expert, level, absolute=False)[key]
        assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (expert, level, key)
    assert np.any(result.matrix("module") > 0)


def test_blocks_below_a_patch_are_not_run(tok):
    expert_set = fx.expert_set()
    examples = _examples(expert_set)
    expert = next(iter(expert_set.experts))
    base, own = body_state(expert_set, "base"), body_state(expert_set, expert)
    task = task_loss(expert_set, expert, examples, tok, base, purpose="the test")
    replay = BlockReplay(task, expert_set.layout)
    assert replay.blocks is not None and len(replay.blocks) == 2
    calls = []
    handles = [block.register_forward_hook(lambda m, i, o, k=k: calls.append(k)) for k, block in enumerate(replay.blocks)]
    start_loss = replay.start_loss()
    assert calls == [0, 1] and len(replay.outputs) == 2
    names = list(expert_set.layout.partitions("layer")["1"])
    with torch.no_grad():
        for name in names:
            task.live[name].copy_(own[name])
        calls.clear()
        replayed = replay.loss(names)
        assert calls == [1]  # block 0 replayed its recorded output
        full = float(task.loss())
        for name in names:
            task.live[name].copy_(base[name])
    assert replayed == pytest.approx(full, rel=1e-6)
    assert float(task.loss()) == pytest.approx(start_loss, rel=1e-6)  # the blocks are back in place
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_replayed_lm_scores_equal_full_forwards(tmp_path, kind):
    """Causal LMs: the blocks are found by their module path (GPT-2 ``transformer.h``, Llama ``model.layers``)."""
    import tiny_models as tm

    from merging.io.experts import ExpertSet
    from merging.io.taskdata import LMExample

    tokenizer = tm.lm_tokenizer()
    base = tm.save(tm.build_lm(kind), tmp_path / "base")
    tokenizer.save_pretrained(str(base))
    experts = {f"t{i}": tm.save(tm.perturbed(tm.build_lm(kind), seed=50 + i), tmp_path / f"t{i}") for i in range(2)}
    expert_set = ExpertSet.load(base, experts)
    examples = {t: [LMExample(" ".join(tm.lm_task_texts("count", 1, seed=i * 10 + j)[0].split()[:3]),
                              " ".join(tm.lm_task_texts("count", 1, seed=i * 10 + j)[0].split()[3:]))
                    for j in range(6)] for i, t in enumerate(experts)}
    result = compute_importance(expert_set, examples, tokenizer, mode="exact", level=LEVELS)
    want = oracle(expert_set, examples, tokenizer, "restore")
    for (expert, level, key), value in want.items():
        got = result.scores(expert, level, absolute=False)[key]
        assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (expert, level, key)
    task = task_loss(expert_set, "t0", examples, tokenizer, body_state(expert_set, "base"), purpose="the test")
    assert BlockReplay(task, expert_set.layout).blocks is not None  # replayed, not a full run in disguise
