"""Merge methods that work in each weight matrix's singular-vector basis: TSV-M, Iso-C, Iso-CTS, STAR.

A fine-tuning update of a weight matrix is close to low-rank, and experts interfere where their
dominant singular directions overlap rather than element by element, which is why these methods
beat the element-wise family (TIES, DARE) by wide margins in their papers. Each one takes the
stacked task vectors of one tensor, as the methods in :mod:`evomerge.merge.methods` do, and works
on the 2-D weight matrices of the transformer blocks (``params.in_block``). Every other tensor
gets the weighted mean of the task vectors (times ``lambda``): what the TSV and Iso reference
code does with the tensors it does not decompose. Two departures, both for decoder LLMs, which
the papers did not merge: the token embeddings and head are not decomposed (the references' 2-D
rule would take a vocabulary-sized SVD; their vision models' input embedding is a 4-D
convolution, which they average), and STAR, whose reference merges only LoRA-targeted matrices
and leaves the rest at the base, averages the rest like the others, since full fine-tunes move
norms and embeddings too.

What a candidate's genes do not change is computed once per tensor and cached by the merger's
:class:`~evomerge.merge.stats.DeltaStats`: each expert's SVD (STAR) and TSV-M's
per-expert components. Iso-C and Iso-CTS decompose the weighted sum of the task vectors, which
every candidate changes, so they pay an SVD per matrix per candidate: their compute floor.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from evomerge.merge.kernels import combine, merged_output, work_dtype
from evomerge.merge.registry import MergeParams


class SpectralStats(Protocol):
    """What the subspace methods read of each expert's delta that no candidate changes."""

    def singular_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(U [K, m, r], S [K, r], Vh [K, r, n])``: each expert's thin SVD, descending."""
        ...

    def tsv_components(self, rank: int) -> Tensor:
        """TSV-M's per-expert components for ``rank`` directions each (:func:`tsv_components`)."""
        ...


# --- building blocks ---------------------------------------------------------------------------


def singular_factors(deltas: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each expert's thin SVD ``(U [K, m, r], S [K, r], Vh [K, r, n])`` in working precision."""
    u, s, vh = torch.linalg.svd(deltas.to(work_dtype(deltas.dtype)), full_matrices=False)
    return u, s, vh


def orthogonal_factor(a: Tensor) -> Tensor:
    """The matrix with orthonormal columns (or rows, if wider than tall) nearest to ``a`` in
    Frobenius norm: ``P Q^T`` for ``a = P S Q^T`` (the polar factor, Procrustes' solution).
    LAPACK's float32 SVD fails to converge on some of these stacked bases (seen on the zoo: a
    576 x 576 stack of singular vectors), so such a matrix is decomposed in float64 instead."""
    try:
        p, _, qh = torch.linalg.svd(a, full_matrices=False)
    except torch.linalg.LinAlgError:
        p, _, qh = torch.linalg.svd(a.double(), full_matrices=False)
    return (p @ qh).to(a.dtype)


def tsv_bases(factors: tuple[Tensor, Tensor, Tensor], rank: int) -> tuple[Tensor, Tensor]:
    """``(U⊥ [m, K*rank], V⊥h [K*rank, n])``: every expert's top ``rank`` left and right singular
    vectors side by side, each set made orthonormal as a whole. Experts' directions that
    overlap are pulled apart, so one expert's update no longer moves along another's."""
    u, s, vh = factors
    count = u.shape[0]
    # Directions past an expert's numerical rank (a LoRA adapter's delta has rank r) carry none of
    # its task and are an arbitrary basis of its null space: left in, they would steer the joint
    # orthonormalization of the real ones (two equal-up-to-rounding pools merged 70% apart).
    # Zeroed, they drop out of it, and the other directions' orthonormal factor is unique.
    tolerance = s[:, :1] * max(u.shape[1], vh.shape[2]) * torch.finfo(s.dtype).eps
    real = (s[:, :rank] > tolerance).to(u.dtype)
    left = (u[:, :, :rank] * real[:, None, :]).permute(1, 0, 2).reshape(u.shape[1], count * rank)
    right = (vh[:, :rank, :] * real[:, :, None]).reshape(count * rank, vh.shape[2])
    return orthogonal_factor(left), orthogonal_factor(right.T).T


def tsv_components(factors: tuple[Tensor, Tensor, Tensor], rank: int) -> Tensor:
    """``[K, m, n]``: expert i's top ``rank`` singular values on its share of the jointly
    orthonormalized bases. TSV-M's update is ``lambda * sum_i w_i C_i``, task arithmetic over
    these: with them cached, a candidate costs what task arithmetic costs, where rebuilding from
    the bases would be a full-rank matrix product per matrix and candidate."""
    left, right = tsv_bases(factors, rank)
    values = factors[1]
    count = values.shape[0]
    out = torch.empty((count, left.shape[0], right.shape[1]), dtype=left.dtype, device=left.device)
    for i in range(count):
        share = slice(i * rank, (i + 1) * rank)
        torch.matmul(left[:, share] * values[i, :rank], right[share], out=out[i])
    return out


def is_block_matrix(shape: Sequence[int]) -> bool:
    """A matrix the subspace methods take apart by SVD (when it sits in a block): 2-D, neither
    side 1. The memory plan counts TSV-M's components by the same rule."""
    return len(shape) == 2 and min(shape) > 1


def _is_block_matrix(shape: torch.Size, params: MergeParams) -> bool:
    return is_block_matrix(shape) and params.in_block is not False


def _write(base: Tensor, update: Tensor, out: Tensor | None) -> Tensor:
    """base + update, in the base's dtype, into ``out`` when given."""
    merged = merged_output(base, out)
    merged.copy_(base.to(update.dtype) + update)
    return merged


def _task_arithmetic(base: Tensor, deltas: Tensor, coefficients: list[float], out: Tensor | None) -> Tensor:
    """base + sum_i c_i delta_i: the fallback outside the block matrices."""
    merged = merged_output(base, out)
    combine(base.reshape(-1), deltas.reshape(deltas.shape[0], -1), 1.0, coefficients, merged.view(-1))
    return merged


def _weighted_sum(deltas: Tensor, weights: list[float]) -> Tensor:
    work = work_dtype(deltas.dtype)
    w = torch.tensor(weights, dtype=work, device=deltas.device)
    return torch.einsum("k,kmn->mn", w, deltas.to(work))


def rank_for(fraction: float, full_rank: int) -> int:
    """Directions kept of a matrix of rank ``full_rank``: the fraction's share, at least one."""
    return max(1, min(full_rank, int(fraction * full_rank)))


def tsv_m_rank(shape: torch.Size, count: int, params: MergeParams) -> int | None:
    """The rank of the components TSV-M merges a tensor of ``shape`` from (each of ``count``
    experts' top directions), or None where it takes the weighted mean ``lambda / count`` of the
    task vectors instead (outside the block matrices). One home for the rule: the merge and
    its weight gradients (:mod:`evomerge.merge.weight_grad`) must agree on it."""
    if not _is_block_matrix(shape, params):
        return None
    fraction = 1 / count if params.rank_fraction is None else params.rank_fraction
    return rank_for(fraction, min(shape))


# --- methods -----------------------------------------------------------------------------------


def tsv_m(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
          stats: SpectralStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model
    Merging", arXiv:2412.00081): keep each expert's top ``rank_fraction`` of singular directions
    (default 1/K, so the K sets together span at most the full rank), orthonormalize the left and
    the right sets as wholes, and rebuild with each expert's singular values times its weight
    (:func:`tsv_components`);
    the merged update, scaled by ``lambda`` (the paper tunes it in 0.1..3 on validation data),
    is added to the base: singular values are summed, not averaged. The components depend on no
    gene and come from ``stats``, so a candidate costs a weighted sum, like task arithmetic."""
    count = deltas.shape[0]
    weights = params.weight
    rank = tsv_m_rank(base.shape, count, params)
    if rank is None:
        return _task_arithmetic(base, deltas, [params.lambda_ * w / count for w in weights], out)
    components = (stats.tsv_components(rank) if stats is not None
                  else tsv_components(singular_factors(deltas), rank))
    return _task_arithmetic(base, components, [params.lambda_ * w for w in weights], out)


def iso_c(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
          stats: SpectralStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Iso-C (Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
    Task-Specific Subspaces", arXiv:2502.04959): the summed task matrix is dominated by a few
    directions that the strongest experts share, so weaker experts' directions are drowned out;
    flattening its spectrum (every singular value set to their mean) gives each direction an
    equal say. The update ``lambda * mean(S) * U Vh`` of the weighted sum ``U S Vh`` is added to
    the base (the mean over all min(m, n) values, near-zero ones included, as the reference code
    takes it; ``lambda`` is tuned in 0.1..3 in the paper). One SVD per matrix and candidate: the
    sum depends on the weights."""
    count = deltas.shape[0]
    if not _is_block_matrix(base.shape, params):
        return _task_arithmetic(base, deltas, [params.lambda_ * w / count for w in params.weight], out)
    u, s, vh = torch.linalg.svd(_weighted_sum(deltas, params.weight), full_matrices=False)
    return _write(base, (params.lambda_ * s.mean()) * (u @ vh), out)


def iso_cts(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
            stats: SpectralStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Iso-CTS (Marczak et al. 2025, arXiv:2502.04959): Iso-C's flat spectrum over a subspace
    that keeps room for every expert. The top ``common_fraction`` of the weighted sum's singular
    directions form the common subspace; the rest of the rank is shared equally among the
    experts, each filling it with the top directions of its own weighted update projected off the
    common subspace (on the left). The split follows the reference code: ``int(fraction * r)``
    common directions, the rest rounded to a whole number per expert and the common part taking
    what rounding leaves, so all ``r = min(m, n)`` directions are used. Both sets of left and
    right directions are orthonormalized as wholes, every singular value is set to the mean of
    the kept ones, and ``lambda`` times the result is added to the base. Per matrix and
    candidate: an SVD of the sum, one per expert, and two orthonormalizations."""
    count = deltas.shape[0]
    if not _is_block_matrix(base.shape, params):
        return _task_arithmetic(base, deltas, [params.lambda_ * w / count for w in params.weight], out)
    work = work_dtype(deltas.dtype)
    u, s, vh = torch.linalg.svd(_weighted_sum(deltas, params.weight), full_matrices=False)
    full = s.shape[0]
    specific = min(round((full - int(params.common_fraction * full)) / count), full // count)
    common = full - specific * count
    lefts, values, rights = [u[:, :common]], [s[:common]], [vh[:common]]  # common may be empty
    if specific > 0:
        shared = u[:, :common]
        for w, delta in zip(params.weight, deltas.to(work)):
            own = w * delta
            own = own - shared @ (shared.T @ own)
            ui, si, vhi = torch.linalg.svd(own, full_matrices=False)
            lefts.append(ui[:, :specific])
            values.append(si[:specific])
            rights.append(vhi[:specific])
    left = orthogonal_factor(torch.cat(lefts, dim=1))
    right = orthogonal_factor(torch.cat(rights, dim=0).T).T
    return _write(base, (params.lambda_ * torch.cat(values).mean()) * (left @ right), out)


def star(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
         stats: SpectralStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """STAR (Lee et al. 2025, "STAR: Spectral Truncation and Rescale for Model Merging",
    arXiv:2502.10339): an expert's small singular components are noise that collides with other
    experts, so each expert keeps the fewest top components holding ``eta`` of its nuclear norm,
    rescaled so the kept singular values sum to the full nuclear norm again (the truncation keeps
    the expert's size); the truncated updates are averaged with the weights and ``lambda``
    (``eta`` 0.4 is the paper's default). The SVDs depend on no gene and come from ``stats``; a
    candidate pays one rebuild of rank the kept components."""
    count = deltas.shape[0]
    weights = params.weight
    if not _is_block_matrix(base.shape, params):
        return _task_arithmetic(base, deltas, [params.lambda_ * w / count for w in weights], out)
    u, s, vh = stats.singular_factors() if stats is not None else singular_factors(deltas)
    lefts, scales, rights = [], [], []
    for i, w in enumerate(weights):
        total = s[i].sum()
        if float(total) <= 0:
            continue
        kept = int(torch.searchsorted(torch.cumsum(s[i], 0), params.eta * total).item()) + 1
        kept = min(kept, s.shape[1])
        values = s[i, :kept]
        lefts.append(u[i, :, :kept])
        scales.append(values * (total / values.sum()) * (w * params.lambda_ / count))
        rights.append(vh[i, :kept])
    if not lefts:
        return _write(base, torch.zeros((), dtype=s.dtype, device=s.device), out)
    return _write(base, (torch.cat(lefts, dim=1) * torch.cat(scales)) @ torch.cat(rights, dim=0), out)
