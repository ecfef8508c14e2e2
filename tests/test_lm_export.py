"""What a merged causal LM needs beside its weights: the export keeps generation_config.json (stop tokens,
sampling defaults) and the chat template of the model the recipe's ``configs_from`` names (the base by
default), the folder reloads with transformers, and replaying the exported recipe keeps the choice. An LM
merge is one folder: the export offers task folders only for classifier experts with heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tiny_models as tm
import torch
import yaml

from merging import workbench as wb
from merging.cli.main import main
from merging.errors import MergeLabError
from merging.io.export import export_recipe
from merging.io.recipe import ExpertRef, Recipe, load_recipe

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|eot|> {% endfor %}"
OLD_TEMPLATE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
GENERATION = {  # what a chat fine-tune ships: several stop ids, sampling on
    "chat": dict(bos_token_id=1, eos_token_id=[2, 3], pad_token_id=0, do_sample=True, temperature=0.6, top_p=0.9),
    "base": dict(bos_token_id=1, eos_token_id=2, do_sample=False),
}


def _tokenizer(template: str | None, template_in_config: bool = False):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", "<|eot|>"] + [f"w{i}" for i in range(60)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>")
    if template and not template_in_config:
        tokenizer.chat_template = template
    return tokenizer


def _save_lm(folder: Path, seed: int | None, generation: dict | None, template: str | None,
             template_in_config: bool = False) -> Path:
    """A tiny Llama folder (weights, config, tokenizer) with the generation config and chat template given."""
    from transformers import GenerationConfig

    model = tm.build("llama")
    if seed is not None:
        tm.perturbed(model, seed=seed)
    tm.save(model, folder)
    (folder / "generation_config.json").unlink(missing_ok=True)  # save_pretrained writes a default one
    _tokenizer(template, template_in_config).save_pretrained(str(folder))
    if template and template_in_config:  # the older place: a key of tokenizer_config.json
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    if generation is not None:
        GenerationConfig(**generation).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def lm_family(tmp_path_factory):
    """A base with its own generation config and no template, a chat expert with both (template as a .jinja
    file), and a second expert whose tokenizer_config.json carries an older template and no generation config."""
    root = tmp_path_factory.mktemp("lm")
    _save_lm(root / "base", None, GENERATION["base"], None)
    _save_lm(root / "chat", 100, GENERATION["chat"], CHAT_TEMPLATE)
    _save_lm(root / "other", 101, None, OLD_TEMPLATE, template_in_config=True)
    return root


def _recipe(root: Path, **extra) -> Path:
    data = {"method": "task_arithmetic", "base": "base",
            "experts": [{"name": "other", "model": "other"}, {"name": "chat", "model": "chat"}],
            "parameters": {"lambda": 0.5}, **extra}
    path = root / f"recipe-{abs(hash(repr(extra))) % 10**8}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _reload(folder: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    has_generation = (folder / "generation_config.json").is_file()
    return model, tokenizer, GenerationConfig.from_pretrained(str(folder)) if has_generation else None


def test_export_keeps_the_chosen_experts_generation_config_and_template(lm_family, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(_recipe(lm_family)), "--out", str(out), "--configs-from", "chat"]) == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == []  # an LM merge is one folder
    assert _json(out / "generation_config.json") == _json(lm_family / "chat" / "generation_config.json")
    assert (out / "chat_template.jinja").read_text() == CHAT_TEMPLATE
    # the tokenizer files came from the first expert, whose tokenizer_config.json held another template:
    # the export holds one template, the chosen model's
    assert "chat_template" not in _json(out / "tokenizer_config.json")
    model, tokenizer, generation = _reload(out)
    assert generation.eos_token_id == [2, 3] and generation.do_sample is True and generation.temperature == 0.6
    assert tokenizer.chat_template == CHAT_TEMPLATE
    assert tokenizer.apply_chat_template([{"role": "user", "content": "w1 w2"}], tokenize=False) == \
        "<|user|> w1 w2 <|eot|> "
    assert load_recipe(out / "recipe.yaml").configs_from == "chat"
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 6]])).logits
    assert logits.shape == (1, 3, 64) and torch.isfinite(logits).all()


def test_replaying_the_exported_recipe_keeps_the_choice(lm_family, tmp_path):
    first = tmp_path / "first"
    assert main(["merge", str(_recipe(lm_family)), "--out", str(first), "--configs-from", "chat"]) == 0
    replayed_recipe = lm_family / "replayed.yaml"  # beside the models: its paths are relative to its folder
    replayed_recipe.write_text((first / "recipe.yaml").read_text())
    assert "configs_from: chat" in replayed_recipe.read_text()
    again = tmp_path / "again"
    assert main(["merge", str(replayed_recipe), "--out", str(again)]) == 0  # no option: the recipe's choice
    for name in ("generation_config.json", "chat_template.jinja", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (first / name).read_bytes(), name


def test_default_is_the_base(lm_family, tmp_path):
    out = tmp_path / "base-configs"
    report = export_recipe(load_recipe(_recipe(lm_family)), out)
    assert _json(out / "generation_config.json") == _json(lm_family / "base" / "generation_config.json")
    assert not (out / "chat_template.jinja").exists()  # the base has no template, so the export has none
    assert "chat_template" not in _json(out / "tokenizer_config.json")
    assert load_recipe(out / "recipe.yaml").configs_from == "base"
    assert "configs_from" not in (out / "recipe.yaml").read_text()  # the default is not written
    _, tokenizer, generation = _reload(out)
    assert generation.eos_token_id == 2 and tokenizer.chat_template is None
    assert not report.warnings or all("generation_config" not in w for w in report.warnings)


def test_a_template_in_the_tokenizer_config_is_kept(lm_family, tmp_path):
    out = tmp_path / "other-configs"
    report = export_recipe(load_recipe(_recipe(lm_family, configs_from="other")), out)
    assert _json(out / "tokenizer_config.json")["chat_template"] == OLD_TEMPLATE
    assert not (out / "generation_config.json").exists()
    assert any("no generation_config.json" in w and "base, chat" in w for w in report.warnings)
    _, tokenizer, _ = _reload(out)
    assert tokenizer.chat_template == OLD_TEMPLATE


def test_configs_from_must_name_a_model(lm_family, tmp_path, capsys):
    assert main(["merge", str(_recipe(lm_family)), "--out", str(tmp_path / "x"), "--configs-from", "nobody"]) == 2
    err = capsys.readouterr().err
    assert "configs_from must name" in err and "base, other, chat" in err
    with pytest.raises(MergeLabError, match="configs_from") as caught:
        load_recipe(_recipe(lm_family, configs_from="nobody"))
    assert caught.value.line is not None  # named with its YAML line
    recipe = Recipe(method="linear", base="base", experts=[ExpertRef("a", "a")], configs_from="b")
    with pytest.raises(MergeLabError, match="one of base, a"):
        recipe.validate()


def test_an_lm_merge_has_no_task_folders_to_choose(lm_family):
    session = wb.load_experts(wb.Session(), str(lm_family / "base"),
                              {"other": str(lm_family / "other"), "chat": str(lm_family / "chat")})
    assert wb.export_tasks(session) == []
    wb.merge(session, "task_arithmetic", {"lambda": 0.5})
    with pytest.raises(MergeLabError, match="one folder"):
        wb.export(session, ["chat"])
    import zipfile

    with zipfile.ZipFile(wb.export(session, configs_from="chat")) as archive:
        names = archive.namelist()
        assert json.loads(archive.read("generation_config.json")) == _json(lm_family / "chat" / "generation_config.json")
        assert archive.read("chat_template.jinja").decode() == CHAT_TEMPLATE
        assert "configs_from: chat" in archive.read("recipe.yaml").decode()
    assert not any("/" in n and n.split("/")[0] in ("chat", "other") for n in names)  # one folder, no task folders


def test_classifier_experts_keep_a_folder_each(tmp_path):
    root = tmp_path / "cls"
    tm.family(root, "bert", 2, expert_kind="bert_cls")
    session = wb.load_experts(wb.Session(), str(root / "base"), {"a": str(root / "expert0"), "b": str(root / "expert1")})
    assert wb.export_tasks(session) == ["a", "b"]


# ---- experts whose tokenizers add tokens ----------------------------------------------------------------

ADDED = {"chat": ["<|im_start|>", "<|im_end|>"], "other": ["<|im_end|>"]}  # other's <|im_end|> has id 64


def _save_added(folder: Path, seed: int, added: list[str]) -> Path:
    """A fine-tune that added special tokens: tokenizer and embeddings / LM head grown by len(added) rows."""
    model = tm.build("llama")
    model.resize_token_embeddings(64 + len(added))
    tm.perturbed(model, seed=seed)
    tm.save(model, folder)
    tokenizer = _tokenizer(None)
    tokenizer.add_special_tokens({"additional_special_tokens": added})
    tokenizer.save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="module")
def added_family(tmp_path_factory):
    root = tmp_path_factory.mktemp("added")
    _save_lm(root / "base", None, GENERATION["base"], None)
    _save_added(root / "chat", 100, ADDED["chat"])
    _save_added(root / "other", 101, ADDED["other"])
    return root


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def _token_ids(folder: Path) -> dict[str, int]:
    return json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"] | {
        t["content"]: t["id"] for t in json.loads((folder / "tokenizer.json").read_text())["added_tokens"]}


def _expected_rows(root: Path, model: str, tensor: str, tokens: dict[str, int]) -> torch.Tensor:
    """The oracle, from mergekit's documented rule: a model's own row for a token it has; for one it lacks, the
    only other model's row that has it, else the base's, else the mean of those that have it."""
    names = ("base", "other", "chat")
    states = {m: _state(root / m) for m in names}
    ids = {m: _token_ids(root / m) for m in names}
    out = torch.zeros(max(tokens.values()) + 1, states[model][tensor].shape[1])
    for token, row in tokens.items():
        if token in ids[model]:
            out[row] = states[model][tensor][ids[model][token]]
            continue
        donors = [m for m in names if token in ids[m]]
        if len(donors) > 1 and "base" in donors:
            donors = ["base"]
        out[row] = sum(states[m][tensor][ids[m][token]] for m in donors) / len(donors)
    return out


def _refs(root: Path) -> dict[str, str]:
    return {"other": str(root / "other"), "chat": str(root / "chat")}


def test_different_vocabularies_need_a_tokenizer_choice(added_family):
    from merging.io.experts import ExpertSet

    with pytest.raises(MergeLabError, match="choose a tokenizer"):
        ExpertSet.load(str(added_family / "base"), _refs(added_family))
    with pytest.raises(MergeLabError, match="tokenizer must be one of base, union, other, chat"):
        ExpertSet.load(str(added_family / "base"), _refs(added_family), tokenizer="mine")


@pytest.mark.parametrize("choice", ["union", "base", "chat", "other"])
def test_rows_are_aligned_by_token(added_family, choice):
    from merging.io.experts import ExpertSet

    expert_set = ExpertSet.load(str(added_family / "base"), _refs(added_family), tokenizer=choice)
    base_ids = _token_ids(added_family / "base")
    if choice == "union":
        tokens = {**base_ids, "<|im_end|>": 64, "<|im_start|>": 65}  # additions in expert order: other's, then chat's
    else:
        tokens = _token_ids(added_family / choice)
    for tensor in ("model.embed_tokens.weight", "lm_head.weight"):
        assert expert_set.layout[tensor].shape == (len(tokens), 16)
        for model, source in [("base", expert_set.base), *((n, e.source) for n, e in expert_set.experts.items())]:
            want = _expected_rows(added_family, model, tensor, tokens)
            assert torch.equal(source.get(tensor), want), (choice, model, tensor)
            assert torch.equal(source.get_rows(tensor, 10, 66), want[10:66]), (choice, model, tensor)


def test_union_export_reloads_with_the_added_tokens(added_family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = _recipe(added_family, configs_from="chat")
    out = tmp_path / "union"
    assert main(["merge", str(recipe), "--out", str(out)]) == 2  # the vocabularies differ: a choice is needed
    assert main(["merge", str(recipe), "--out", str(out), "--tokenizer", "union"]) == 0
    assert load_recipe(out / "recipe.yaml").tokenizer == "union"
    tokenizer = AutoTokenizer.from_pretrained(str(out))
    assert tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>", "w3"]) == [64, 65, 7]
    assert _json(out / "config.json")["vocab_size"] == 66
    model = AutoModelForCausalLM.from_pretrained(str(out))
    merged = _state(out)["model.embed_tokens.weight"]
    # task arithmetic, λ 0.5: base + 0.5·Σ(Θ_t − base) on the aligned rows (the oracle's)
    rows = {m: _expected_rows(added_family, m, "model.embed_tokens.weight", {**_token_ids(added_family / "base"),
                                                                              "<|im_end|>": 64, "<|im_start|>": 65})
            for m in ("base", "other", "chat")}
    want = rows["base"] + 0.5 * ((rows["other"] - rows["base"]) + (rows["chat"] - rows["base"]))
    torch.testing.assert_close(merged, want, rtol=0, atol=1e-6)
    with torch.no_grad():
        assert model(torch.tensor([[64, 65, 7]])).logits.shape == (1, 3, 66)


@pytest.mark.slow
@pytest.mark.parametrize("choice", ["chat", "base", "union"])
def test_mergekit_aligns_the_same_rows(added_family, choice, tmp_path):
    """The exported mergekit config (tokenizer_source) run by mergekit 0.1.5 gives every token the same rows (the
    union's added tokens may sit at other ids: mergekit orders them by a set of models)."""
    import os
    import subprocess

    from mergekit_reference import mergekit_yaml
    from safetensors.torch import load_file

    from merging.io.replay import merge_recipe

    script = mergekit_yaml()
    recipe = _recipe(added_family, tokenizer=choice)
    config = recipe.with_suffix(".mergekit.yml")
    assert main(["merge", str(recipe), "--format", "mergekit", "--out", str(config)]) == 0
    out = tmp_path / "mergekit"
    done = subprocess.run([str(script), config.name, str(out), "--quiet", "--no-write-model-card"], cwd=added_family,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    theirs = load_file(str(out / "model.safetensors"))
    ours = merge_recipe(load_recipe(recipe)).tensors
    our_ids = _token_ids(added_family / ("base" if choice in ("base", "union") else choice))
    if choice == "union":
        our_ids = {**our_ids, "<|im_end|>": 64, "<|im_start|>": 65}
    their_ids = _token_ids(out)
    assert set(their_ids) == set(our_ids)
    for name, tensor in ours.items():
        other = theirs[name].float()
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            order = [their_ids[token] for token, _ in sorted(our_ids.items(), key=lambda item: item[1])]
            other = other[order]
        torch.testing.assert_close(other, tensor, rtol=0, atol=2e-6, msg=name)
