"""Layout: every tensor of BERT-, GPT-2-, Llama- and Qwen2-style models mapped as docs/ARCHITECTURE.md (Layout) says."""

import pytest
import tiny_models as tm

from merging.io.layout import ROLE_COPY, ROLE_TASK_HEAD, ROLE_TIED, Layout, layout_from_tensors


def _layout(kind):
    return layout_from_tensors(tm.build(kind).state_dict())


def test_bert_partitions():
    layout = _layout("bert")
    assert layout.layers == ["embeddings", "0", "1", "head"]
    q = layout["encoder.layer.0.attention.self.query.weight"]
    assert (q.layer, q.kind, q.unit_axis) == ("0", "q", 0)
    assert layout["encoder.layer.1.intermediate.dense.weight"].kind == "ffn_in"
    out = layout["encoder.layer.1.output.dense.weight"]
    assert (out.kind, out.unit_axis, out.n_units) == ("ffn_out", 0, 16)
    assert layout["encoder.layer.1.attention.output.dense.bias"].kind == "o"
    norm = layout["encoder.layer.0.attention.output.LayerNorm.weight"]
    assert (norm.kind, norm.layer, norm.droppable, norm.unit_axis) == ("norm", "0", False, None)
    emb_norm = layout["embeddings.LayerNorm.weight"]
    assert (emb_norm.layer, emb_norm.kind) == ("embeddings", "norm")
    assert layout["embeddings.word_embeddings.weight"].unit_axis is None
    pooler = layout["pooler.dense.weight"]
    assert (pooler.layer, pooler.kind) == ("head", "pooler")


def test_bert_task_head_and_buffers_are_not_merged():
    shapes = {"bert.encoder.layer.0.attention.self.query.weight": (4, 4), "classifier.weight": (3, 4),
              "embeddings.position_ids": (1, 8)}
    layout = Layout.from_shapes(shapes, {"embeddings.position_ids": "int64"})
    assert layout["classifier.weight"].role == ROLE_TASK_HEAD
    assert layout["embeddings.position_ids"].role == ROLE_COPY


def test_gpt2_conv1d_axis_and_fused_qkv():
    layout = _layout("gpt2")
    qkv = layout["transformer.h.0.attn.c_attn.weight"]
    assert (qkv.kind, qkv.unit_axis, qkv.n_units) == ("qkv", 1, 48)  # [in, 3*d]
    assert layout["transformer.h.0.attn.c_attn.bias"].n_units == 48
    assert layout["transformer.h.1.mlp.c_fc.weight"].kind == "ffn_in"
    assert layout["transformer.h.1.mlp.c_proj.weight"].kind == "ffn_out"
    assert layout["transformer.h.1.attn.c_proj.weight"].kind == "o"
    assert layout["transformer.wte.weight"].layer == "embeddings"
    assert (layout["transformer.ln_f.weight"].layer, layout["transformer.ln_f.weight"].kind) == ("head", "norm")
    tied = layout["lm_head.weight"]  # tied to wte: counted once, under embeddings, never merged twice
    assert (tied.layer, tied.role) == ("embeddings", ROLE_TIED)
    assert "lm_head.weight" not in layout.merged_names()


def test_tied_lm_head_counts_under_embeddings():
    layout = Layout.from_shapes({"transformer.wte.weight": (64, 16), "lm_head.weight": (64, 16)},
                                tied_embeddings=True)
    assert layout["lm_head.weight"].layer == "embeddings"
    assert "lm_head.weight" not in layout.merged_names()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_llama_style(kind):
    layout = _layout(kind)
    assert layout.layers == ["embeddings", "0", "1", "head"]
    assert layout["model.layers.0.mlp.gate_proj.weight"].kind == "ffn_in"
    assert layout["model.layers.0.mlp.up_proj.weight"].kind == "ffn_in"
    assert layout["model.layers.0.mlp.down_proj.weight"].kind == "ffn_out"
    assert layout["model.layers.1.self_attn.o_proj.weight"].kind == "o"
    assert layout["model.layers.1.input_layernorm.weight"].kind == "norm"
    assert (layout["model.norm.weight"].layer, layout["model.norm.weight"].kind) == ("head", "norm")
    assert layout["lm_head.weight"].layer == "head"
    assert layout["model.embed_tokens.weight"].layer == "embeddings"
    if kind == "qwen2":
        assert layout["model.layers.0.self_attn.q_proj.bias"].unit_axis == 0


def test_granularities_cover_every_merged_tensor():
    layout = _layout("bert")
    merged = set(layout.merged_names())
    assert set(layout.partitions("model")["model"]) == merged
    assert set().union(*layout.partitions("layer").values()) == merged
    assert set().union(*layout.partitions("module").values()) == merged
    units = layout.unit_modules()
    assert "encoder.layer.0.attention.self.query" in units
    assert all(layout[n].kind != "norm" for names in units.values() for n in names)
    assert layout.layer_position("embeddings") == 0 and layout.layer_position("head") == 1
