"""Exact importance with blocks below each patch replayed and repeated patches measured once: every score
equals the plain one-full-forward-per-partition loop, written here from the definition as the oracle."""

import apl_fixtures as fx
import numpy as np
import pytest
import torch

from merging.apl.importance import BlockReplay, compute_importance
from merging.apl.taskloss import body_state, task_loss
from merging.io.layout import unit_slice

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


def _bert_task(tok):
    """The tiny BERT set, its first expert's loss at the base, and the base's and that expert's bodies."""
    expert_set = fx.expert_set()
    expert = next(iter(expert_set.experts))
    base, own = body_state(expert_set, "base"), body_state(expert_set, expert)
    return expert_set, task_loss(expert_set, expert, _examples(expert_set), tok, base, purpose="the test"), base, own


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


def test_a_module_between_blocks_replays_only_the_blocks_before_it(tok):
    """DeBERTa-v2 runs ``encoder.conv`` after block 0 (the layout files it under the head): a patch of it must
    rerun blocks 1…, not replay every block as a head patch does (which scored it exactly 0)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from merging.io.experts import check_homology
    from merging.io.sources import ModelSource

    config = AutoConfig.for_model(
        "deberta-v2", vocab_size=64, num_labels=3, pad_token_id=0, hidden_size=16, num_hidden_layers=2,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=40, relative_attention=True,
        position_biased_input=False, norm_rel_ebd="layer_norm", conv_kernel_size=3, type_vocab_size=2,
        pos_att_type=["p2c", "c2p"], max_relative_positions=-1, position_buckets=8)
    torch.manual_seed(0)
    full = AutoModelForSequenceClassification.from_config(config).state_dict()
    generator = torch.Generator().manual_seed(5)
    expert = {k: v + 0.05 * torch.randn(v.shape, generator=generator) if v.is_floating_point() else v
              for k, v in full.items()}
    body = {k.removeprefix("deberta."): v for k, v in full.items() if k.startswith("deberta.")}
    expert_set = check_homology(ModelSource.from_state_dict("base", body, config.to_dict()),
                                {"t": ModelSource.from_state_dict("t", expert, config.to_dict())})
    assert any(name.startswith("encoder.conv.") for name in expert_set.layout.partitions("module")["encoder.conv.conv"])
    examples = {"t": fx.examples(8, seed=3)}
    result = compute_importance(expert_set, examples, tok, mode="exact", level=LEVELS)
    want = oracle(expert_set, examples, tok, "restore")
    for (expert_name, level, key), value in want.items():
        got = result.scores(expert_name, level, absolute=False)[key]
        assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (level, key)
    assert want[("t", "module", "encoder.conv.conv")] != 0.0


@torch.no_grad()
def unit_oracle(expert_set, examples, tokenizer, expert, units):
    """module → unit → L(base with that unit's rows/columns and bias entry switched to the expert) − L(base),
    one full forward each."""
    base, own = body_state(expert_set, "base"), body_state(expert_set, expert)
    task = task_loss(expert_set, expert, examples, tokenizer, base, purpose="the oracle")
    reference = float(task.loss())
    layout, out = expert_set.layout, {}
    for module, indices in units.items():
        names = layout.unit_modules()[module]
        for unit in indices:
            for name in names:
                where = unit_slice(layout[name], [unit])
                task.live[name][where] = own[name][where]
            out[(module, unit)] = float(task.loss()) - reference
            for name in names:
                task.live[name].copy_(base[name])
    return out


def test_replayed_hidden_unit_scores_equal_full_forwards(tok):
    """Hidden-state units patch a slice of one module: the sub-modules before it replay too."""
    expert_set = fx.expert_set(n_experts=1)
    examples = _examples(expert_set)
    expert = next(iter(expert_set.experts))
    result = compute_importance(expert_set, examples, tok, mode="exact", level="hidden", sample=None)
    units = {m: range(len(result.unit_scores(expert, m))) for m in result.units}
    assert sum(len(v) for v in units.values()) > 100
    want = unit_oracle(expert_set, examples, tok, expert, units)
    for (module, unit), value in want.items():
        got = float(result.unit_scores(expert, module, absolute=False)[unit])
        assert got == pytest.approx(value, rel=1e-5, abs=1e-7), (module, unit)


def test_blocks_below_a_patch_are_not_run(tok):
    expert_set, task, base, own = _bert_task(tok)
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


def _calls_during_patch(replay, task, own, start, names, watched):
    """Which of ``watched`` (label → module) run while ``names`` are patched to ``own``; the replayed loss and
    the full-forward loss of the same patch."""
    calls = []
    handles = [m.register_forward_hook(lambda *_, k=k: calls.append(k)) for k, m in watched.items()]
    with torch.no_grad():
        for name in names:
            task.live[name].copy_(own[name])
        replayed = replay.loss(names)
        ran = set(calls)
        full = float(task.loss())
        for name in names:
            task.live[name].copy_(start[name])
    for handle in handles:
        handle.remove()
    return ran, replayed, full


def test_sub_modules_finished_before_the_patch_are_not_run(tok):
    """A patch of block 1's ``output.dense``: block 1's attention and intermediate projection replay (as block
    0 does); the patched module and the norm after it run; the loss is the full forward's."""
    expert_set, task, base, own = _bert_task(tok)
    replay = BlockReplay(task, expert_set.layout)
    with torch.no_grad():
        replay.start_loss()
    layer = replay.blocks[1]
    watched = {"block0": replay.blocks[0], "attention": layer.attention, "intermediate": layer.intermediate,
               "output.dense": layer.output.dense, "output.LayerNorm": layer.output.LayerNorm}
    names = expert_set.layout.partitions("module")["encoder.layer.1.output.dense"]
    ran, replayed, full = _calls_during_patch(replay, task, own, base, names, watched)
    assert ran == {"output.dense", "output.LayerNorm"}
    assert replayed == pytest.approx(full, rel=1e-6)
    embeddings = expert_set.layout.partitions("module")["embeddings.word_embeddings"]
    ran, replayed, full = _calls_during_patch(replay, task, own, base, embeddings, watched)
    assert ran == set(watched)  # the embeddings run before block 0: nothing can replay
    assert replayed == pytest.approx(full, rel=1e-6)


def test_a_block_reading_a_sub_module_attribute_runs_whole(tok):
    """Glue that reads an attribute of a replaced sub-module (which the stand-in lacks) falls back to running
    the block whole, with the same loss, instead of failing the importance run."""
    expert_set, task, base, own = _bert_task(tok)
    replay = BlockReplay(task, expert_set.layout)
    layer = replay.blocks[1]
    layer.attention.marker = 1.0
    plain_forward = layer.forward

    def reading_forward(*args, **kwargs):
        assert layer.attention.marker == 1.0
        return plain_forward(*args, **kwargs)

    layer.forward = reading_forward
    with torch.no_grad():
        replay.start_loss()
    names = expert_set.layout.partitions("module")["encoder.layer.1.intermediate.dense"]
    ran, replayed, full = _calls_during_patch(replay, task, own, base, names, {"attention": layer.attention})
    assert ran == {"attention"} and replay.inner == {}
    assert replayed == pytest.approx(full, rel=1e-6)


@pytest.mark.parametrize("kind, patched, replayed_modules", [
    ("gpt2", "mlp.c_proj", ("ln_1", "attn", "ln_2", "mlp.c_fc")),
    ("llama", "mlp.down_proj", ("input_layernorm", "self_attn", "mlp.gate_proj", "mlp.up_proj")),
])
def test_lm_blocks_replay_the_attention_below_an_mlp_patch(tmp_path, kind, patched, replayed_modules):
    import tiny_models as tm

    from merging.io.experts import ExpertSet
    from merging.io.taskdata import LMExample

    tokenizer = tm.lm_tokenizer()
    base_dir = tm.save(tm.build_lm(kind), tmp_path / "base")
    tokenizer.save_pretrained(str(base_dir))
    expert_set = ExpertSet.load(base_dir, {"t0": tm.save(tm.perturbed(tm.build_lm(kind), seed=50), tmp_path / "t0")})
    examples = {"t0": [LMExample("a b c", "d e f"), LMExample("c b", "a a d e")]}
    base, own = body_state(expert_set, "base"), body_state(expert_set, "t0")
    task = task_loss(expert_set, "t0", examples, tokenizer, base, purpose="the test")
    replay = BlockReplay(task, expert_set.layout)
    with torch.no_grad():
        replay.start_loss()
    block = replay.blocks[1]
    watched = {path: block.get_submodule(path) for path in (*replayed_modules, patched)}
    module = next(m for m in expert_set.layout.partitions("module") if m.endswith(f"1.{patched}"))
    ran, replayed, full = _calls_during_patch(replay, task, own, base, expert_set.layout.partitions("module")[module],
                                              watched)
    assert ran == {patched}
    assert replayed == pytest.approx(full, rel=1e-6)


def test_over_the_byte_budget_a_block_runs_whole(tok):
    """A block whose sub-module outputs pass ``inner_bytes`` keeps no record (freed as soon as it overflows), so its
    patches rerun it whole; a budget that holds one block's record keeps block 0's and drops block 1's."""
    expert_set, task, base, own = _bert_task(tok)
    roomy = BlockReplay(task, expert_set.layout)
    with torch.no_grad():
        roomy.start_loss()
    one_block = roomy.inner[0].nbytes
    for budget, kept in ((1, set()), (one_block, {0})):
        replay = BlockReplay(task, expert_set.layout, inner_bytes=budget)
        with torch.no_grad():
            replay.start_loss()
        assert set(replay.inner) == kept and len(replay.outputs) == 2
        layer = replay.blocks[1]
        names = expert_set.layout.partitions("module")["encoder.layer.1.output.dense"]
        ran, replayed, full = _calls_during_patch(replay, task, own, base, names, {"attention": layer.attention})
        assert ran == {"attention"} and replayed == pytest.approx(full, rel=1e-6)
