"""TSV-M, Task Singular Vectors merging (Gargiulo et al., CVPR 2025), as a registered merge method.

Per 2-D weight, each task keeps the top ⌊k/T⌋ singular triplets of its task vector (k = min of the two
dimensions, T the number of experts), the kept left and right singular vectors of all tasks are put side by
side and decorrelated across tasks, and the matrix is rebuilt from them with the kept singular values:

- Δ_t = U_t Σ_t V_tᵀ, r = ⌊k/T⌋; U = [U_1[:, :r] … U_T[:, :r]] (m × k, zero columns where T·r < k), the
  same for Σ (the singular values, concatenated) and V;
- orthogonalisation (the paper's "whitening"): U⊥ = P_U Q_Uᵀ from the SVD U = P_U S Q_Uᵀ — the orthogonal
  matrix nearest U (orthogonal Procrustes, the polar factor), not P_U alone; the same for V;
- Θ = Θ_base + λ · U⊥ diag(Σ) V⊥ᵀ.

Other tensors (1-D biases and norms, or anything not 2-D) get the mean task vector, and λ.

Facts from the authors' ``compute_and_sum_svd_mem_reduction`` (AntoAndGar/task_singular_vectors): the kept
rank is ``int(k · (1/T))`` (equal to ⌊k/T⌋ for every k < 5000, T ≤ 32), every 2-D tensor takes part (they
skip CLIP's ``text_projection``, a name no Merge Lab layout has), non-2-D tensors are averaged, and the
orthogonal factors are ``u_u @ v_u`` of the SVD of the concatenated U (and V); the paper merges with
α = 1, Merge Lab's λ default. When T > k no triplet is kept (r = 0) and the tensor keeps the base, as there.

The SVDs need the whole matrix, so TSV-M is not row-separable and is merged whole.
"""

from __future__ import annotations

import torch

from .base import MethodSpec, TensorJob, register
from .classic import LAMBDA

TSV_URL = "https://arxiv.org/abs/2412.00081"


def nearest_orthogonal(matrix: torch.Tensor) -> torch.Tensor:
    """P Qᵀ from the SVD ``matrix`` = P S Qᵀ: the matrix with orthonormal columns (or rows) nearest it."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def tsv_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M of 2-D task vectors (each m × n, float32): U⊥ diag(Σ) V⊥ᵀ from each task's top ⌊k/T⌋ triplets."""
    m, n = deltas[0].shape
    k = min(m, n)
    rank = k // len(deltas)
    device = deltas[0].device  # float32 as before, on the deltas' device
    if rank == 0:
        return torch.zeros(m, n, device=device)
    left = torch.zeros(m, k, device=device)
    values = torch.zeros(k, device=device)
    right = torch.zeros(k, n, device=device)
    for index, delta in enumerate(deltas):
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        cols = slice(index * rank, (index + 1) * rank)
        left[:, cols] = u[:, :rank]
        values[cols] = s[:rank]
        right[cols, :] = vh[:rank, :]
    return torch.linalg.multi_dot((nearest_orthogonal(left), torch.diag(values), nearest_orthogonal(right)))


def _tsv_kernel(job: TensorJob) -> torch.Tensor:
    """Θ = Θ_base + λ · TSV-M(Δ_1 … Δ_T) for 2-D tensors, Θ_base + λ · mean Δ_t for the others."""
    deltas = list(job.deltas().values())
    if job.base.dim() == 2:
        merged = tsv_merge(deltas)
    else:
        merged = torch.stack(deltas).mean(dim=0)
    return job.base.float() + float(job.shared.get("lambda", 1.0)) * merged


register(MethodSpec(
    "tsv", "TSV-M (Task Singular Vectors)", TSV_URL,
    "For every weight matrix, keeps each task vector's top ⌊k/T⌋ singular directions (k the smaller dimension, T "
    "the number of experts), replaces the tasks' left and right singular vectors, side by side, by the nearest "
    "orthonormal sets so the tasks stop interfering, and rebuilds the matrix with the kept singular values; "
    "other tensors get the mean task vector; λ scales the result.",
    (LAMBDA,), _tsv_kernel, row_separable=False,
    explanation=(
        "Treats each weight matrix's task vector as a sum of directions: keeps each task's top ⌊k/T⌋ "
        "singular directions (the ones it changed most), puts all tasks' directions side by side and "
        "replaces them by the nearest orthonormal set, so the tasks' changes stop overlapping. The matrix "
        'rebuilt from them with the kept singular values, times λ, is added to the base; other tensors '
        'get the mean task vector.'),
))
