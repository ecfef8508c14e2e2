"""The merge takes a device: jobs move there, kernels compute there, results come back to the CPU.

No GPU is needed. Where a second device matters the tests use one of two stand-ins (tests/device_checks.py):

- the engine's two transfer functions spied on, with CUDA faked present: every kernel input must have been
  moved with ``.to(<the engine's device>)`` and every kernel output moved back before it is kept or written —
  an engine that forgot the device, a transfer or the way back fails;
- a simulated device (``DeviceLedger``) under each kernel, and the meta device where a kernel needs no
  values: a helper tensor made on the CPU beside device inputs is found as CUDA would find it.

Every case comes from the method registry and each method's declared choices (``device_checks.cases``).
"""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from device_checks import (
    FAKE,
    DeviceLedger,
    cases,
    expert_count,
    expert_set,
    job_tensors,
    meta_job,
    needs_values,
    settings_for,
    values_reason,
    with_kernel,
)

from merging import MergeEngine, MergeLabError, engine
from merging.io.recipe import Recipe
from merging.methods import get_method, kernels

CASES = [(method, params, label, n) for method, params, label in cases()
         for n in ([2] if expert_count(get_method(method)) == 2 else [3, 5])]  # 5: the pipeline's stacked path


def _params(with_outcome=None):
    out = []
    for method, params, label, n in CASES:
        suffix = f"-{with_outcome(method, params, n)}" if with_outcome else ""
        out.append(pytest.param(method, params, n, id=f"{label}-{n}x{suffix}"))
    return out


def _same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def _plain(method, params, n):
    experts, settings = settings_for(method, params, _experts(n))
    result = MergeEngine(experts, cache=False).merge(settings)
    return result.tensors, result.task_bodies


@functools.cache
def _experts(n):
    return expert_set(n)


def _merge(method, params, n, wrap=None, **engine_kwargs):
    experts, settings = settings_for(method, params, _experts(n))
    if wrap is not None:
        settings = with_kernel(settings, wrap)
    result = MergeEngine(experts, cache=False, **engine_kwargs).merge(settings)
    return result.tensors, result.task_bodies


# ---- device="cpu" is the default, byte for byte --------------------------------------------------------

@pytest.mark.parametrize("method, params, n", _params())
def test_cpu_device_is_byte_identical_to_the_default(method, params, n):
    default, default_tasks = _plain(method, params, n)
    for device in ("cpu", torch.device("cpu"), *(["auto"] if not torch.cuda.is_available() else [])):
        tensors, tasks = _merge(method, params, n, device=device)
        _same(default, tensors)
        assert default_tasks.keys() == tasks.keys()
        for task in tasks:
            _same(default_tasks[task], tasks[task])


# ---- the engine moves every job to its device and every result back ------------------------------------

class _Transfers:
    """Spies on engine.to_device / engine.to_host: each returns a fresh copy (a CPU tensor standing for the
    moved one) and remembers it, so a kernel's inputs and the writer's tensors can be traced by identity."""

    def __init__(self, monkeypatch):
        self.devices: list[torch.device] = []
        self.moved: dict[int, tuple[torch.Tensor, torch.device]] = {}
        self.host: dict[int, torch.Tensor] = {}  # results of to_host
        self.sent_home: set[int] = set()  # ids given to to_host
        self.kept: list[torch.Tensor] = []  # holds what was sent home, so its id is never reused
        monkeypatch.setattr(engine, "to_device", self.to_device)
        monkeypatch.setattr(engine, "to_host", self.to_host)

    def to_device(self, tensor, device):
        self.devices.append(device)
        copy = tensor.clone()
        self.moved[id(copy)] = (copy, device)
        return copy

    def to_host(self, tensor):
        self.sent_home.add(id(tensor))
        self.kept.append(tensor)
        copy = tensor.clone()
        self.host[id(copy)] = copy
        return copy

    def device_of(self, tensor):
        entry = self.moved.get(id(tensor))
        return entry[1] if entry else None


def _fake_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    return torch.device("cuda", 0)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("method, params, n", _params())
def test_every_kernel_input_is_moved_to_the_engine_device_and_every_output_back(method, params, n, chunked,
                                                                                monkeypatch):
    expected = _plain(method, params, n)
    if chunked:
        monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 8 * 3)  # 3 rows of 8 floats: several chunks per matrix
        expected = _plain(method, params, n)
    target = _fake_cuda(monkeypatch)
    spy = _Transfers(monkeypatch)
    outputs: list[torch.Tensor] = []
    stray: list[str] = []

    def wrap(kernel):
        def spied(job):
            for tensor in job_tensors(job):
                if spy.device_of(tensor) != target:
                    stray.append(f"{job.name}: an input {tuple(tensor.shape)} not moved to {target}")
            out = kernel(job)
            outputs.append(out)
            return out
        return spied

    merged = _merge(method, params, n, wrap=wrap, device="cuda:0", workers=2)
    assert not stray, stray[:3]
    assert outputs and spy.devices and set(spy.devices) == {target}  # the engine's device, never its default
    assert all(id(out) in spy.sent_home for out in outputs)  # every kernel output went back to the CPU
    body, tasks = merged
    for name, tensor in [*body.items(), *(item for b in tasks.values() for item in b.items())]:
        info = _experts(n).layout[name]
        if info.role == "merge" and not chunked:  # (row chunks come back one by one into one CPU tensor)
            assert id(tensor) in spy.host, name  # what the caller gets is what came back
    _same(expected[0], body)  # the transfers change no value (here the "device" is the CPU itself)


def test_the_export_writes_only_tensors_brought_back_and_records_the_device(tmp_path, monkeypatch, capsys):
    from tiny_models import family

    from merging.cli.main import main
    from merging.io.export import ShardWriter

    base, experts = family(tmp_path, "bert", 2)
    recipes = {}
    for method in ("ties", "dare_ties"):
        recipe = Recipe(method=method, base=str(base), experts=[], parameters={"drop_ratio": 0.5}, seed=3)
        data = recipe.to_dict() | {"experts": [{"name": f"e{i}", "model": str(p)} for i, p in enumerate(experts)]}
        recipes[method] = tmp_path / f"{method}.yaml"
        recipes[method].write_text(yaml.safe_dump(data))
    for method, path in recipes.items():
        assert main(["merge", str(path), "--out", str(tmp_path / f"{method}-cpu"), "--device", "cpu"]) == 0
    capsys.readouterr()
    _fake_cuda(monkeypatch)
    spy = _Transfers(monkeypatch)
    written: list[tuple[str, bool]] = []
    real_add = ShardWriter.add

    def add(self, name, tensor):
        written.append((name, id(tensor) in spy.host))
        return real_add(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "add", add)
    for method, path in recipes.items():
        written.clear()
        assert main(["merge", str(path), "--out", str(tmp_path / method), "--device", "cuda", "--json"]) == 0
        report = capsys.readouterr().out
        merged_names = {n for n, i in _layout(base).tensors.items() if i.role == "merge"}
        assert {n for n, came_back in written if came_back} == merged_names  # merged = brought back, all of them
        exported = yaml.safe_load((tmp_path / method / "recipe.yaml").read_text())
        assert exported["device"] == "cuda"
        assert _weights(tmp_path / method) == _weights(tmp_path / f"{method}-cpu")  # the stand-in device is the CPU
        assert ("merged on cuda, the recipe records cpu" in report) == (method == "dare_ties")  # random masks differ
    monkeypatch.undo()
    # replaying a recipe merged on CUDA on the CPU: a randomised method is told apart, a deterministic one not
    for method in recipes:
        replay = tmp_path / method / "recipe.yaml"
        assert main(["merge", str(replay), "--out", str(tmp_path / f"{method}-replay"), "--device", "cpu",
                     "--json"]) == 0
        report = capsys.readouterr().out
        assert ("merged on cpu, the recipe records cuda" in report) == (method == "dare_ties")
        assert "device" not in yaml.safe_load((tmp_path / f"{method}-replay" / "recipe.yaml").read_text())


def _layout(base):
    from merging.io.experts import ExpertSet

    return ExpertSet.load(str(base), {"x": str(base)}).layout


def _weights(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.safetensors"))}


# ---- kernels make their helper tensors on their inputs' device ------------------------------------------

@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunks"])
@pytest.mark.parametrize("method, params, n", _params())
def test_kernels_make_their_tensors_on_their_inputs_device(method, params, n, chunked, monkeypatch):
    """Each job's kernel under the simulated device: no CPU tensor beside device inputs, no draw from a CPU
    generator into a device tensor, the output on the device — and the values of the merge unchanged (the
    device-side branches, fresh scratch buffers and one RNG block at a time, equal the CPU's). Row chunks
    reach the paths that draw part of an RNG block and cut per-tensor inputs to rows."""
    if chunked:
        monkeypatch.setattr(engine, "CHUNK_BYTES", 4 * 8 * 3)
    problems: list[str] = []

    def wrap(kernel):
        def checked(job):
            with DeviceLedger(job_tensors(job)) as ledger:
                out = kernel(job)
            problems.extend(f"{job.name}: {v}" for v in ledger.violations)
            if not ledger.on_device(out):
                problems.append(f"{job.name}: the output is a CPU tensor")
            return out
        return checked

    tensors, tasks = _merge(method, params, n, wrap=wrap)
    assert not problems, sorted(set(problems))[:5]
    expected, expected_tasks = _plain(method, params, n)
    _same(expected, tensors)
    for task in tasks:
        _same(expected_tasks[task], tasks[task])


@functools.cache
def _meta_outcome(method, params_items, n):
    """How ``method`` fares on meta tensors: "meta" when every job runs there, else "needs-values(<why>)"."""
    reasons: list[str] = []

    def wrap(kernel):
        def probe(job):
            try:
                kernel(meta_job(job))
            except Exception as exc:  # noqa: BLE001  (classified: a device mix-up is not "needs values")
                if needs_values(exc):
                    reasons.append(values_reason(exc))
            return kernel(job)
        return probe

    _merge(method, dict(params_items), n, wrap=wrap)
    return f"needs-values({reasons[0]})" if reasons else "meta"


def _outcome_label(method, params, n):
    return _meta_outcome(method, tuple(sorted(params.items())), n)


@pytest.mark.parametrize("method, params, n", _params(_outcome_label))
def test_kernels_run_on_the_meta_device(method, params, n):
    """On meta tensors a kernel that makes a CPU helper tensor raises "same device" or returns a CPU
    output. Kernels that need values (a top-k, a seeded draw, a float) cannot run on meta: their id says
    so and they are skipped here — the simulated device above covers them."""
    outcome = _outcome_label(method, params, n)
    if outcome != "meta":
        pytest.skip(f"{method} {outcome}: covered by test_kernels_make_their_tensors_on_their_inputs_device")
    devices: list[torch.device] = []

    def wrap(kernel):
        def on_meta(job):
            devices.append(kernel(meta_job(job)).device)
            return kernel(job)
        return on_meta

    _merge(method, params, n, wrap=wrap)
    assert devices and set(devices) == {torch.device("meta")}


# ---- the selection and drawing helpers the engine and kernels share -------------------------------------

def test_selection_and_drawing_helpers_follow_their_inputs_device(monkeypatch):
    generator = torch.Generator().manual_seed(0)
    big = torch.randn(kernels._SELECT_MIN + 5, generator=generator)
    chunks = [torch.randn(3000, generator=generator), torch.randn(200, 7, generator=generator)]
    keep = torch.rand(4, 1, generator=generator)
    plain = (kernels.kth_smallest(big, 1000), kernels.streaming_topk(lambda: iter(chunks), 500))
    with DeviceLedger([big, *chunks, keep]) as ledger:
        value = kernels.kth_smallest(big, 1000)  # the sampled band
        top = kernels.streaming_topk(lambda: iter(chunks), 500)
        monkeypatch.setattr(kernels, "_band_topk", lambda *a: None)  # the histogram fallback
        histogram = kernels.streaming_topk(lambda: iter(chunks), 500)
        monkeypatch.undo()
        drawn = kernels.uniforms(3, "e", "w", 100, device=FAKE)
        mask = kernels.random_keep_mask((4, 6), keep, seed=3, expert="e", name="w")
        assert ledger.on_device(drawn) and ledger.on_device(mask)
    assert not ledger.violations, ledger.violations
    assert (value, top) == plain and histogram.cut == top.cut and histogram.ties == top.ties
    assert torch.equal(drawn, kernels.uniforms(3, "e", "w", 100))  # a CPU generator stands for the device's


def test_the_simulated_device_catches_what_cuda_would_refuse():
    """The ledger itself can fail: each of these is an error on a GPU."""
    x = torch.randn(3, 4)
    cases = {
        "a CPU helper tensor": lambda: x * torch.tensor([1.0, 2.0, 3.0, 4.0]),
        "a CPU generator": lambda: torch.rand(12, generator=torch.Generator().manual_seed(0), out=x.new_empty(12)),
        "numpy of a device tensor": lambda: x.numpy(),
        "a CPU output": lambda: torch.zeros(3, 4),
        "the device's generator drawing on the CPU": lambda: x + torch.rand(
            3, 4, generator=torch.Generator(device=x.device)).to(x.device),
    }
    for label, body in cases.items():
        with DeviceLedger([x]) as ledger:
            out = body()
        assert ledger.violations or not ledger.on_device(out), label
    assert ledger.violations == ["rand: a draw on the CPU from the device's generator"]  # the last case, by name
    with DeviceLedger([x]) as ledger:  # and these are fine
        out = x * torch.tensor(2.0) + torch.zeros(4, device=x.device)
        out = out * torch.rand(3, 4, generator=torch.Generator(device=x.device).manual_seed(0), device=x.device)
        host = out.cpu().numpy()
    assert not ledger.violations and ledger.on_device(out) and host.shape == (3, 4)


# ---- asking for CUDA where there is none ----------------------------------------------------------------

def test_merge_refuses_cuda_when_none_is_visible(tmp_path, monkeypatch, capsys):
    from merging.cli.main import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"method": "ties", "base": "zoo:none/base",
                                      "experts": [{"name": "a", "model": "zoo:none/a"}]}))
    for device in ("cuda", "cuda:1"):
        assert main(["merge", str(recipe), "--out", str(tmp_path / "out"), "--device", device]) == 2
        err = capsys.readouterr().err
        assert "no CUDA device is available" in err and "--device cpu" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(MergeLabError, match="no CUDA device is available"):
        MergeEngine(_experts(2), device="cuda")
    with pytest.raises(MergeLabError, match="device must be auto, cpu, cuda or cuda:N"):
        MergeEngine(_experts(2), device="tpu")
    assert MergeEngine(_experts(2), device="auto").device == torch.device("cpu")


def test_the_recipe_records_the_device_a_merge_ran_on():
    recipe = Recipe(method="ties", base="b", experts=[], device="cuda")
    data = recipe.to_dict() | {"experts": [{"name": "a", "model": "m"}]}
    assert Recipe.from_dict(data).device == "cuda"
    assert Recipe.from_dict(data | {"device": "cpu"}).device is None  # the CPU is the record's absence
    assert "device" not in Recipe.from_dict(data | {"device": "cpu"}).to_dict()
    with pytest.raises(MergeLabError, match="device records where the merge ran"):
        Recipe.from_dict(data | {"device": "cuda:0"})


def test_the_page_merges_on_cuda_when_present(tmp_path, monkeypatch):
    """The app's engine takes the resolver's auto (CUDA when present, as importance and probe do), and the
    page's recipe records where its merge ran."""
    from tiny_models import family

    import merging.workbench as wb

    base, experts = family(tmp_path, "bert", 2)
    _fake_cuda(monkeypatch)
    spy = _Transfers(monkeypatch)
    session = wb.load_experts(wb.Session(), str(base), {f"e{i}": str(p) for i, p in enumerate(experts)})
    assert wb.models_for(session).engine.device == torch.device("cuda")
    wb.merge(session, "ties", wb.check_shared("ties", {}), 0)
    assert spy.devices and set(spy.devices) == {torch.device("cuda")}
    assert session.last_recipe.device == "cuda"
