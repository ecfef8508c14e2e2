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


# ---- tiny causal LMs with a word-level tokenizer, fine-tuned on their own text ---------------------

LM_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
LM_WORDS = [f"w{i}" for i in range(60)]
LM_IDS = dict(pad_token_id=0, bos_token_id=2, eos_token_id=3)


def lm_config(kind: str, tied: bool | None = None):
    """A 2-layer, hidden-16 causal LM config over the 64-entry word vocabulary (``tied`` overrides
    the family's default tying of the LM head to the input embeddings)."""
    extra = {} if tied is None else {"tie_word_embeddings": tied}
    if kind == "gpt2":
        return GPT2Config(vocab_size=64, n_positions=64, n_embd=16, n_layer=2, n_head=2, **LM_IDS, **extra)
    from transformers import MistralConfig

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    return cls(vocab_size=64, num_hidden_layers=2, num_key_value_heads=2, max_position_embeddings=64, **TINY,
               **LM_IDS, **extra)


def build_lm(kind: str, seed: int = 0, tied: bool | None = None) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(lm_config(kind, tied)).eval()


def lm_tokenizer(folder: Path | None = None):
    """A word-level fast tokenizer (whitespace split, BOS prepended) saved to ``folder`` when given."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(LM_SPECIALS + LM_WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 2)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>",
                                        bos_token="<s>", eos_token="</s>")
    if folder is not None:
        tokenizer.save_pretrained(str(folder))
    return tokenizer


def lm_task_texts(task: str, n: int, seed: int) -> list[str]:
    """Seeded texts of two learnable toy tasks: ``count`` (runs of consecutive words) and ``echo``
    (a few words, then the same words again)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        start = int(torch.randint(0, 40, (1,), generator=generator))
        if task == "count":
            words = [LM_WORDS[start + i] for i in range(8)]
        else:
            picked = torch.randint(0, 60, (4,), generator=generator).tolist()
            words = [LM_WORDS[i] for i in picked] * 2
        out.append(" ".join(words))
    return out


def fine_tune_lm(model: torch.nn.Module, tokenizer, texts: list[str], steps: int, seed: int, lr: float = 3e-2):
    """A few seeded Adam steps of next-token training on ``texts`` (full batch): real, task-shaped deltas."""
    torch.manual_seed(seed)
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        optimiser.zero_grad()
        model(**batch, labels=labels).loss.backward()
        optimiser.step()
    return model.eval()


def lm_family(tmp: Path, kind: str, steps: int = 6, tied: bool | None = None, n: int = 24):
    """A saved base with tokenizer and two experts fine-tuned on their own task, plus each task's data file
    (``count``: JSONL text rows; ``echo``: JSONL prompt/completion rows). Returns (base, experts, data)."""
    tokenizer = lm_tokenizer()
    base = save(build_lm(kind, tied=tied), tmp / "base")
    tokenizer.save_pretrained(str(base))
    experts, data = {}, {}
    for index, task in enumerate(("count", "echo")):
        texts = lm_task_texts(task, n, seed=10 + index)
        model = fine_tune_lm(build_lm(kind, tied=tied), tokenizer, texts, steps, seed=index)
        experts[task] = save(model, tmp / task)
        file = tmp / f"{task}.jsonl"
        rows = [{"text": t} if task == "count" else {"prompt": " ".join(t.split()[:4]), "completion": " ".join(t.split()[4:])}
                for t in texts]
        import json

        file.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        data[task] = file
    return base, experts, data
