"""The classic methods as configurations of one pipeline: sparsify → consensus → weight → add.

As in mergekit's generalized task arithmetic: each expert's delta Δ_t is sparsified
(nothing, magnitude top-k, DARE random drop, breadcrumbs, DELLA), optionally a TIES sign
is elected and only agreeing entries kept, the deltas are weighted (and optionally
normalised by the summed weights of what was kept), and λ times the result is added to
the base. Norm tensors are never dropped (docs/ARCHITECTURE.md, Layout): they skip sparsify and consensus.
SLERP interpolates two experts' weights directly.

Row chunks (``MethodSpec.row_separable``): every pipeline works entry by entry or row by row
(DARE's uniforms are located by flat index, DELLA ranks within rows, TIES elects signs per
entry) except for its magnitude top-k, which the engine takes over the whole tensor first and
hands each chunk as a cut plus a tie quota — so these merge in chunks exactly. Two do not:
SLERP's angle is one number over the whole tensor, and breadcrumbs takes two top-k cuts with
their own ties at both ends. Both are declared non-separable and merged whole: exact for the
price of one tensor's memory, where precomputing breadcrumbs' cuts would need a second
tie-quota protocol (for the outliers removed) for a method rarely run on such tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..params import PER_LAYER, SHARED, ParamSpec
from . import kernels
from .base import MethodSpec, TensorJob, register

_IN_PLACE_MAX_EXPERTS = 4  # above this, Pipeline reduces a stack of the deltas (the reference form)
_EXACT_IN_FLOAT32 = (torch.float32, torch.float16, torch.bfloat16)  # subtracted from float32 without .float()
_BLOCK = 1 << 18  # entries per block of Pipeline._plain and _blocked: their few 1 MB buffers stay in L2/L3 (measured in the engine, 1 thread: task arithmetic 2.10× a bandwidth pass at 2^16, 1.86× at 2^17, 1.83× at 2^18)

WEIGHT = ParamSpec("weight", "float", 1.0, "Weight of the expert's delta (per expert, per layer).",
                   PER_LAYER, -5.0, 5.0)
LAMBDA = ParamSpec("lambda", "float", 1.0, "Scale λ of the merged delta added to the base.", PER_LAYER, 0.0, 5.0)
DROP = ParamSpec("drop_ratio", "float", 0.5, "Fraction of each delta set to zero (density = 1 − drop_ratio).",
                 PER_LAYER, 0.0, 0.999)
RESCALE = ParamSpec("rescale", "bool", True, "Rescale kept entries by 1/(1 − drop_ratio) so the expectation is kept.")
TRIM_SCOPE = ParamSpec("trim_scope", "choice", "tensor",
                       "Where the magnitude top-k threshold is taken: per tensor, per layer or whole model.",
                       SHARED, choices=("tensor", "layer", "model"))
GAMMA = ParamSpec("gamma", "float", 0.01, "Fraction of largest-magnitude entries removed as outliers.",
                  PER_LAYER, 0.0, 0.5)
EPSILON = ParamSpec("epsilon", "float", 0.1,
                    "Spread of keep probabilities across magnitude ranks (DELLA's ε).", PER_LAYER, 0.0, 1.0)
T_PARAM = ParamSpec("t", "float", 0.5, "Interpolation position: 0 is the first expert, 1 the second.",
                    PER_LAYER, 0.0, 1.0)


def _normalize(default: bool) -> ParamSpec:
    return ParamSpec("normalize", "bool", default,
                     "Divide the merged delta by the summed weights of the experts kept at each entry.")


@dataclass(frozen=True)
class Pipeline:
    """One configuration of sparsify → consensus → weight → add."""

    #: every step is IEEE arithmetic that keeps NaN/Inf (NaN × 0 and Inf × 0 are NaN; masks multiply, they
    #: never select), so a broken input entry always shows in the output: the engine checks the output
    #: only, and scans the inputs just to name the broken model (engine._nonfinite_reaches_output)
    nonfinite_reaches_output = True
    #: entry-wise arithmetic, exact selections and exact counts only — no float reduction whose rounding
    #: follows torch's thread count — so the engine may merge several tensors at once on fewer threads
    #: each and still write the same bytes (engine._in_order)
    thread_count_invariant = True

    sparsify: str  # none | magnitude | random | breadcrumbs | della
    consensus: bool  # TIES sign election
    always_normalize: bool = False  # linear averaging divides by the summed weights, no parameter

    def __call__(self, job: TensorJob) -> torch.Tensor:
        if len(job.experts) > _IN_PLACE_MAX_EXPERTS:
            return self._stacked(job)
        if not job.info.droppable or (self.sparsify == "none" and not self.consensus):
            return self._plain(job)  # nothing to drop or elect (norm tensors skip both): a weighted sum
        if self.sparsify in _BLOCKED_SPARSIFY:
            return self._blocked(job)
        # The same arithmetic as _stacked, expert by expert and in place: no [T, ...] stack, no copies of
        # float32 inputs. Both add the experts in order (kernels.ordered_sum), so results match _stacked
        # value for value at any expert count.
        base = job.base.float()
        droppable = job.info.droppable
        consensus = self.consensus and droppable
        weights, kept = [], []
        total = None  # Σ weighted (sparsified) deltas
        scratch = None  # without consensus, experts after the first reuse one buffer for their delta
        for expert, tensor in job.experts.items():
            p = job.params[expert]
            if tensor.dtype not in _EXACT_IN_FLOAT32:
                tensor = tensor.float()
            if total is None or consensus:
                delta = torch.sub(tensor, base)  # = tensor.float() - base (exact upcast)
            else:
                scratch = kernels.scratch("delta", total.numel(), base.device).view(total.shape) \
                    if scratch is None else scratch
                delta = torch.sub(tensor, base, out=scratch)
            if droppable:
                delta = self.sparsify_delta(delta, expert, p, job, inplace=True)
            weight = float(p["weight"])
            if weight != 1.0:
                delta.mul_(weight)
            weights.append(weight)
            if consensus:
                kept.append(delta)
                total = delta.clone() if total is None else total.add_(delta)
            else:
                total = delta if total is None else total.add_(delta)
            del delta
        del scratch
        weight_t = torch.tensor(weights, device=base.device).reshape(-1, *([1] * total.dim()))
        normalize = self.always_normalize or job.shared.get("normalize", False)
        if consensus:
            sign = kernels.sign_of_sum(total, inplace=True)
            del total
            mixed = divisor = None
            for index, delta in enumerate(kept):
                # kernels.agreement_mask one expert at a time, as 1.0/0.0 (what torch makes of the booleans)
                agree = torch.sign(delta).eq_(sign)
                delta.mul_(agree)
                mixed = delta if mixed is None else mixed.add_(delta)
                if normalize:
                    share = agree if weights[index] == 1.0 else agree.mul_(weight_t[index])
                    divisor = share if divisor is None else divisor.add_(share)
            kept.clear()
        else:
            mixed = total
            divisor = weight_t.sum(0)  # broadcasts over the tensor
        if normalize:
            divisor = kernels.replace_tiny_divisors_(divisor)
            mixed.div_(divisor)
        lam = float(job.shared.get("lambda", 1.0))
        if lam != 1.0:
            mixed.mul_(lam)
        return mixed.add_(base)

    def _plain(self, job: TensorJob) -> torch.Tensor:
        """Linear and task arithmetic: ``__call__``'s arithmetic entry for entry (Δ_t = x_t − base, weighted,
        added in expert order, divided by the summed weights, times λ, plus the base), run block by block
        so each block's deltas and sums stay in the CPU cache: one read of every input and one write of
        the output, instead of a pass over memory per step."""
        base = job.base.float()
        flat_base = base.reshape(-1)
        inputs = [(t if t.dtype in _EXACT_IN_FLOAT32 else t.float()).reshape(-1) for t in job.experts.values()]
        weights = [float(job.params[e]["weight"]) for e in job.experts]
        divisor = None
        if self.always_normalize or job.shared.get("normalize", False):
            summed = torch.tensor(weights, device=base.device).sum(0)  # as __call__ sums them: weight_t.sum(0)
            divisor = kernels.replace_tiny_divisors_(summed)
        lam = float(job.shared.get("lambda", 1.0))
        n = flat_base.numel()
        out = torch.empty(n, device=base.device)
        block = _block_for(base, n)
        delta = kernels.scratch("delta", min(n, block), base.device)
        for start in range(0, n, block):
            stop = min(n, start + block)
            total, b = out[start:stop], flat_base[start:stop]
            for index, (tensor, weight) in enumerate(zip(inputs, weights)):
                step = torch.sub(tensor[start:stop], b, out=total if index == 0 else delta[:stop - start])
                if weight != 1.0:
                    step.mul_(weight)
                if index:
                    total.add_(step)
            if divisor is not None:
                total.div_(divisor)
            if lam != 1.0:
                total.mul_(lam)
            total.add_(b)
        return out.reshape(base.shape)

    def _blocked(self, job: TensorJob) -> torch.Tensor:
        """Magnitude (TIES, magnitude pruning), random (DARE, DARE-TIES) and DELLA drops, ``__call__``'s
        arithmetic entry for entry, run block by block so every step of a block — delta, keep mask, weight,
        sign election, agreeing sum, divisor — works on buffers that stay in the CPU cache: the inputs are
        read once (plus one blocked pass per expert for a magnitude cut the engine did not hand over) and the
        output written once, instead of a pass over memory per step, and a job's working memory is a few
        blocks (DELLA: plus one RNG block per expert), not a few copies of its tensor. Random drops go span
        by span, each span one RNG block of :func:`kernels.uniforms`, so its uniforms are drawn straight into
        a buffer; DELLA's blocks are whole rows (its ranks are a row's), its uniforms read from a
        :class:`kernels.UniformStream`."""
        base = job.base.float().reshape(-1)
        n = base.numel()
        inputs = [(t if t.dtype in _EXACT_IN_FLOAT32 else t.float()).reshape(-1) for t in job.experts.values()]
        weights = [float(job.params[e]["weight"]) for e in job.experts]
        weight_t = torch.tensor(weights, device=base.device)
        drops = [_drop_for(self.sparsify, job, index, expert, x, base)
                 for index, (expert, x) in enumerate(zip(job.experts, inputs))]
        normalize = self.always_normalize or job.shared.get("normalize", False)
        lam = float(job.shared.get("lambda", 1.0))
        out = torch.empty(n, device=base.device)
        block = _block_for(base, n)
        if self.sparsify == "della":  # DELLA ranks within rows: a block holds whole rows
            block = _whole_rows(block, job.base.shape)
        span = kernels.RNG_BLOCK if self.sparsify == "random" else block
        first_span = span - job.start % span if self.sparsify == "random" else span  # spans on RNG blocks
        starts = [0, *range(min(n, first_span), n, span)]
        for s0, s1 in zip(starts, [*starts[1:], n]):
            for drop in drops:
                drop.begin(s0, s1)
            for b0 in range(s0, s1, block):
                b1 = min(s1, b0 + block)
                self._merge_block(out[b0:b1], base[b0:b1], [x[b0:b1] for x in inputs], weights, weight_t,
                                  drops, b0, normalize, lam)
        return out.reshape(job.base.shape)

    def _merge_block(self, out, base, inputs, weights, weight_t, drops, b0, normalize, lam) -> None:
        """One block of :meth:`_blocked`: ``out`` = base + λ · (agreeing, normalised) Σ weighted dropped deltas."""
        size = base.numel()
        consensus = self.consensus
        kept, total = [], None
        for index, (x, weight, drop) in enumerate(zip(inputs, weights, drops)):
            target = out if index == 0 and not consensus else kernels.scratch(f"block-delta{index}", size, base.device)
            delta = torch.sub(x, base, out=target)
            drop.apply(delta, b0)
            if weight != 1.0:
                delta.mul_(weight)
            if consensus:
                kept.append(delta)
                total = kernels.scratch("block-total", size, base.device).copy_(delta) if total is None else total.add_(delta)
            else:
                total = delta if total is None else total.add_(delta)
        if consensus:
            sign = kernels.sign_of_sum(total, inplace=True)
            mixed = divisor = None
            for index, delta in enumerate(kept):
                slot = "block-divisor" if index == 0 else "block-agree"
                agree = torch.sign(delta, out=kernels.scratch(slot, size, base.device)).eq_(sign)
                delta.mul_(agree)
                mixed = delta if mixed is None else mixed.add_(delta)
                if normalize:
                    share = agree if weights[index] == 1.0 else agree.mul_(weight_t[index])
                    divisor = share if divisor is None else divisor.add_(share)
        else:
            mixed, divisor = total, weight_t.sum(0)
        if normalize:
            divisor = kernels.replace_tiny_divisors_(divisor)
            mixed.div_(divisor)
        if lam != 1.0:
            mixed.mul_(lam)
        torch.add(mixed, base, out=out)

    def _stacked(self, job: TensorJob) -> torch.Tensor:
        """Reference form: stack the weighted deltas of all experts, then reduce over experts."""
        deltas = job.deltas()
        droppable = job.info.droppable
        weighted = []
        weights = []
        for expert, delta in deltas.items():
            p = job.params[expert]
            if droppable:
                delta = self.sparsify_delta(delta, expert, p, job)
            weighted.append(delta * float(p["weight"]))
            weights.append(float(p["weight"]))
        stacked = torch.stack(weighted)
        weight_t = torch.tensor(weights, device=stacked.device).reshape(-1, *([1] * (stacked.dim() - 1)))
        if self.consensus and droppable:
            agree = kernels.agreement_mask(stacked, kernels.elect_sign(stacked))
            mixed = kernels.ordered_sum(stacked * agree)
            divisor = kernels.ordered_sum(weight_t * agree)
        else:
            mixed = kernels.ordered_sum(stacked)
            divisor = kernels.ordered_sum(weight_t).expand_as(mixed)
        if self.always_normalize or job.shared.get("normalize", False):
            divisor = torch.where(divisor.abs() < kernels.TINY_DIVISOR, torch.ones_like(divisor), divisor)
            mixed = mixed / divisor
        return job.base.float() + float(job.shared.get("lambda", 1.0)) * mixed

    def sparsify_delta(self, delta: torch.Tensor, expert: str, p: dict, job: TensorJob,
                       inplace: bool = False) -> torch.Tensor:
        if self.sparsify == "none":
            return delta
        drop = float(p["drop_ratio"])
        density = 1.0 - drop
        if self.sparsify == "magnitude":
            given = job.thresholds.get(expert)  # the engine's top-k over a scope wider than this job
            cut, ties = (given.cut, given.ties) if given is not None else (None, 0)
            if inplace:
                return delta.mul_(kernels.magnitude_keep_factor(delta, density, cut, ties))
            return delta * kernels.magnitude_mask(delta, density, cut, ties)
        if self.sparsify == "random":
            return kernels.dare(delta, drop, seed=job.seed, expert=expert, name=job.name,
                                rescale=bool(p.get("rescale", True)), numel=job.numel, start=job.start,
                                inplace=inplace)
        if self.sparsify == "breadcrumbs":
            mask = kernels.breadcrumbs_mask(delta, density, float(p["gamma"]))
            return delta.mul_(mask) if inplace else delta * mask
        if self.sparsify == "della":
            return kernels.della(delta, density, float(p["epsilon"]), seed=job.seed, expert=expert,
                                 name=job.name, numel=job.numel, start=job.start)
        raise ValueError(self.sparsify)


def _slerp_kernel(job: TensorJob) -> torch.Tensor:
    first, second = list(job.experts)
    t = float(job.params[first]["t"])
    return kernels.slerp(job.experts[first], job.experts[second], t)


register(MethodSpec(
    "linear", "Linear average", "https://arxiv.org/abs/2203.05482",
    "Weighted average of the experts' weights (model soup).",
    (WEIGHT,), Pipeline("none", False, always_normalize=True), mergekit_name="linear", row_separable=True,
    explanation=(
        "Averages the experts' weights themselves, each weighted by its expert weight (a model soup). "
        'Seen on the task vectors (each expert minus the base), it adds their weighted mean to the base: '
        'every change is kept, but a change only one task made is divided by the number of experts; '
        'nothing is dropped or rescaled.'),
))
register(MethodSpec(
    "task_arithmetic", "Task arithmetic", "https://arxiv.org/abs/2212.04089",
    "Base plus λ times the weighted sum of task vectors.",
    (WEIGHT, LAMBDA), Pipeline("none", False), mergekit_name="task_arithmetic", row_separable=True,
    explanation=(
        'Adds λ times the weighted sum of the task vectors (each expert minus the base) to the base. '
        'Every entry of every task vector is kept: where tasks changed a weight the same way the changes '
        'add up, where they pulled in opposite directions they cancel; λ below 1 keeps the sum from '
        'overshooting.'),
))
register(MethodSpec(
    "ties", "TIES", "https://arxiv.org/abs/2306.01708",
    "Trim each delta to its largest entries, elect a sign per entry, average the agreeing entries.",
    (WEIGHT, LAMBDA, DROP, TRIM_SCOPE, _normalize(True)), Pipeline("magnitude", True),
    mergekit_name="ties", trim_scope_param="trim_scope", row_separable=True,
    explanation=(
        'Cleans each task vector before adding: trims it to its largest entries by magnitude (the drop '
        'ratio is the fraction removed), elects for every entry the sign with the larger total mass '
        'across the tasks, and keeps only the entries that agree with it, averaged (or summed without '
        'normalisation). λ times the result is added to the base, so small entries and sign conflicts no '
        'longer interfere.'),
))
register(MethodSpec(
    "dare_linear", "DARE (linear)", "https://arxiv.org/abs/2311.03099",
    "Randomly drop delta entries and rescale the rest, then add like task arithmetic.",
    (WEIGHT, LAMBDA, DROP, RESCALE), Pipeline("random", False), mergekit_name="dare_linear", row_separable=True,
    randomised=True,
    explanation=(
        'Drops each entry of each task vector at random with probability p (the drop ratio) and '
        'multiplies the survivors by 1/(1 − p), so every task vector keeps its expected value while most '
        'of its entries become zero; the sparse task vectors are then added like task arithmetic, λ times '
        'their weighted sum.'),
))
register(MethodSpec(
    "dare_ties", "DARE + TIES", "https://arxiv.org/abs/2311.03099",
    "DARE's random drop and rescale, then TIES sign election.",
    (WEIGHT, LAMBDA, DROP, RESCALE, _normalize(False)), Pipeline("random", True), mergekit_name="dare_ties",
    row_separable=True, randomised=True,
    explanation=(
        "DARE's random drop with the 1/(1 − p) rescale on each task vector, then TIES' sign election: for "
        'every entry the sign with the larger total wins and only the task vectors agreeing with it are '
        'added (summed by default), times λ.'),
))
register(MethodSpec(
    "magnitude", "Magnitude pruning", "https://arxiv.org/abs/2306.01708",
    "Keep each delta's largest entries (no rescale), then add like task arithmetic.",
    (WEIGHT, LAMBDA, DROP, TRIM_SCOPE), Pipeline("magnitude", False), trim_scope_param="trim_scope",
    row_separable=True, mergekit_name="breadcrumbs",  # mergekit's breadcrumbs with gamma 0 (no outliers removed)
    explanation=(
        'Keeps only the largest entries of each task vector by magnitude (the drop ratio is the fraction '
        'zeroed, per tensor, layer or model) without rescaling them, and adds λ times their weighted sum '
        'to the base: TIES without the sign election. The small changes are gone, so λ above 1 is often '
        'needed to restore the size of the kept ones.'),
))
register(MethodSpec(
    "breadcrumbs", "Model Breadcrumbs", "https://arxiv.org/abs/2312.06795",
    "Drop both the largest outliers and the smallest entries of each delta, then add.",
    (WEIGHT, LAMBDA, DROP, GAMMA), Pipeline("breadcrumbs", False), mergekit_name="breadcrumbs", row_separable=False,
    explanation=(
        'Removes from each task vector both its smallest entries (the drop ratio) and its very largest '
        'outliers (the top γ fraction), tensor by tensor, and adds λ times the weighted sum of what '
        'remains to the base: the noise and the few extreme entries that dominate interference are both '
        'left out.'),
))
register(MethodSpec(
    "della", "DELLA", "https://arxiv.org/abs/2406.11617",
    "Drop entries with probability falling with their magnitude rank, rescale, elect signs, average.",
    (WEIGHT, LAMBDA, DROP, EPSILON, _normalize(True)), Pipeline("della", True), mergekit_name="della",
    row_separable=True, randomised=True,
    explanation=(
        "Drops entries of each task vector at random, with a probability that falls with the entry's "
        'magnitude rank in its row (large entries are kept more often; ε sets how far the probabilities '
        'spread around the drop ratio), rescales each kept entry by its keep probability, then elects '
        'signs as TIES does and averages the agreeing entries, times λ.'),
))
register(MethodSpec(
    "slerp", "SLERP", "https://en.wikipedia.org/wiki/Slerp",
    "Spherical interpolation between two experts' weights.",
    (T_PARAM,), _slerp_kernel, min_experts=2, max_experts=2, mergekit_name="slerp", row_separable=False,
    explanation=(
        'Interpolates between exactly two experts along the arc between their weight tensors instead of '
        'the straight line, tensor by tensor, at position t (0: the first expert, 1: the second). It '
        'works on the whole weights, not on task vectors, and keeps their norm from shrinking where the '
        'two experts point different ways.'),
))



def _block_for(base: torch.Tensor, n: int) -> int:
    """Entries per block: cache-sized on the CPU; off it (a GPU: one launch per step, not thousands) the
    whole tensor."""
    return _BLOCK if base.device.type == "cpu" else max(n, 1)

def _whole_rows(block: int, shape: torch.Size) -> int:
    """``block`` entries rounded down to whole rows of what DELLA ranks a tensor of ``shape`` as
    (:func:`kernels.della_rows`), at least one row; with empty rows (no entries to merge), ``block``."""
    row = kernels.della_rows(shape)[1]
    return max(row, block // row * row) if row else max(block, 1)


_BLOCKED_SPARSIFY = ("magnitude", "random", "della")  # the drops Pipeline._blocked runs block by block


class _MagnitudeDrop:
    """Keep |Δ| > cut plus the first ``ties`` entries equal to it, over the whole job in flat order (the cut and
    tie quota of :func:`kernels.magnitude_keep_factor`, or the engine's for a wider scope)."""

    def __init__(self, job: TensorJob, index: int, expert: str, tensor: torch.Tensor, base: torch.Tensor):
        given = job.thresholds.get(expert)
        if given is not None:
            self.cut, self.ties = given.cut, given.ties
        else:
            k = int(round((1.0 - float(job.params[expert]["drop_ratio"])) * base.numel()))
            self.cut, self.ties = kernels.delta_topk(tensor, base, k)
        self.slot = f"block-keep{index}"

    def begin(self, start: int, stop: int) -> None:
        pass

    def apply(self, delta: torch.Tensor, start: int) -> None:
        factor = torch.abs(delta, out=kernels.scratch(self.slot, delta.numel(), delta.device))
        tied = None
        if self.ties > 0:
            tied = (factor == self.cut).nonzero().reshape(-1)[:self.ties]
            self.ties -= tied.numel()
        factor.gt_(self.cut)
        if tied is not None:
            factor[tied] = 1.0
        delta.mul_(factor)


class _RandomDrop:
    """DARE's drop and rescale (:func:`kernels.dare`): keep where the entry's uniform falls under 1 − p, divide
    the kept by 1 − p; the uniforms of each span drawn once into a buffer."""

    def __init__(self, job: TensorJob, index: int, expert: str, tensor: torch.Tensor, base: torch.Tensor):
        self.job, self.expert, self.slot, self.device = job, expert, f"block-uniforms{index}", base.device
        self.keep = 1.0 - float(job.params[expert]["drop_ratio"])
        self.divisor = torch.as_tensor(self.keep, dtype=torch.float32, device=base.device).clamp_min(1e-12) \
            if bool(job.params[expert].get("rescale", True)) else None
        self.mask, self.start = None, 0

    def begin(self, start: int, stop: int) -> None:
        if self.keep >= 1.0:
            return
        job = self.job
        u = kernels.uniforms(job.seed, self.expert, job.name, job.numel, job.start + start, job.start + stop,
                             out=kernels.scratch(self.slot, stop - start, self.device))
        self.mask, self.start = u.lt_(self.keep), start  # 1.0 / 0.0 over the uniforms, as kernels.dare

    def apply(self, delta: torch.Tensor, start: int) -> None:
        if self.keep >= 1.0:
            return
        offset = start - self.start
        delta.mul_(self.mask[offset:offset + delta.numel()])
        if self.divisor is not None:
            delta.div_(self.divisor)


class _DellaDrop:
    """DELLA's MagPrune (:func:`kernels.della`) on a block of whole rows: each row's keep probabilities from its
    magnitude ranks, kept where the entry's uniform falls under them, the kept divided by them."""

    def __init__(self, job: TensorJob, index: int, expert: str, tensor: torch.Tensor, base: torch.Tensor):
        p = job.params[expert]
        self.density, self.epsilon = 1.0 - float(p["drop_ratio"]), float(p["epsilon"])
        self.row = kernels.della_rows(job.base.shape)[1]
        self.offset, self.slot = job.start, f"block-uniforms{index}"
        self.stream = kernels.UniformStream(job.seed, expert, job.name, job.numel, slot=f"rng-block{index}")

    def begin(self, start: int, stop: int) -> None:
        pass

    def apply(self, delta: torch.Tensor, start: int) -> None:
        size = delta.numel()
        probs = kernels.della_keep_probabilities(delta.view(size // self.row, self.row), self.density, self.epsilon)
        u = self.stream.read(self.offset + start, self.offset + start + size,
                             out=kernels.scratch(self.slot, size, delta.device))
        keep = u.view_as(probs).lt_(probs)  # 1.0 / 0.0, as kernels.della's boolean mask multiplies
        delta.mul_(keep.view(-1)).div_(probs.view(-1))


_DROPS = {"magnitude": _MagnitudeDrop, "random": _RandomDrop, "della": _DellaDrop}


def _drop_for(sparsify: str, job: TensorJob, index: int, expert: str, tensor: torch.Tensor, base: torch.Tensor):
    return _DROPS[sparsify](job, index, expert, tensor, base)
