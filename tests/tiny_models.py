"""Tiny random transformers built from a config, saved with safetensors (no hub, no downloads)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

TINY = dict(hidden_size=16, num_attention_heads=2, intermediate_size=32)


def bert_config(**extra) -> BertConfig:
    return BertConfig(vocab_size=64, num_hidden_layers=2, max_position_embeddings=32, **TINY, **extra)


def gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2)


def llama_config() -> LlamaConfig:
    return LlamaConfig(vocab_size=64, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=32, **TINY)


def qwen2_config() -> Qwen2Config:
    return Qwen2Config(vocab_size=64, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=32, **TINY)


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "bert":
        return BertModel(bert_config())
    if kind == "bert_cls":
        return BertForSequenceClassification(bert_config(num_labels=3))
    if kind == "gpt2":
        return GPT2LMHeadModel(gpt2_config())
    if kind == "llama":
        return LlamaForCausalLM(llama_config())
    if kind == "qwen2":
        return Qwen2ForCausalLM(qwen2_config())
    raise ValueError(kind)


def perturbed(model: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """A fake fine-tune: every float parameter moved by seeded noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(scale * torch.randn(param.shape, generator=generator))
    return model


def save(model: torch.nn.Module, folder: Path) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def family(tmp: Path, kind: str, n_experts: int = 2, expert_kind: str | None = None) -> tuple[Path, list[Path]]:
    """Save a base and ``n_experts`` perturbed copies; returns (base folder, expert folders)."""
    base = save(build(kind), tmp / "base")
    experts = []
    for i in range(n_experts):
        model = build(expert_kind or kind)
        if expert_kind:  # a task class: start from the base body, fresh head
            model.base_model.load_state_dict(build(kind).state_dict(), strict=False)
        experts.append(save(perturbed(model, seed=100 + i), tmp / f"expert{i}"))
    return base, experts
