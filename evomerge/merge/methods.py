"""Merge methods as pure functions on one tensor; their parameters are declared in the registry.

A search scores thousands of candidate merges, so the arithmetic is kept apart from any model or
file: every method takes the base's tensor and the experts' task vectors stacked as
``deltas[K, *base.shape]`` (expert minus base) and returns the merged tensor. That makes each
method cheap to call per tensor and testable on a 64x48 matrix.

Parameter names, defaults and semantics follow mergekit 0.1.5 (each method declares its
parameters once, in :mod:`evomerge.merge.registry`) so that a recipe found here exports to a
mergekit config one to one and merges to the same weights; a method receives them resolved
(defaults filled in, one value per expert). Where mergekit's
behaviour differs from a paper, mergekit's choice is kept, and where this module departs from
mergekit (DARE and DELLA rescale to the L1 norm they keep in expectation, not the realized one:
the same within the random mask's noise, for one pass over the deltas less) the method's
docstring (for the task-arithmetic family, its :class:`TaskArithmeticVariant`'s ``reference``)
says so.

Magnitude sparsification (TIES, breadcrumbs) compares magnitudes with thresholds, and an element
*at* a threshold counts as above it: TIES keeps every element at or above its cut, breadcrumbs'
outlier cut drops every element at or above its cut. mergekit keeps exactly ``k`` elements and
breaks ties by sort order; the two agree unless several elements share the threshold magnitude
(common in bf16), where TIES here keeps all of them. The rule makes each mask a pure function of
thresholds, so a precomputed table (:mod:`evomerge.merge.stats`) can replace the per-call sort;
DELLA's in-row magnitude ranks are likewise computed once per tensor. The loops the methods run in
live in :mod:`evomerge.merge.kernels`, DARE's and DELLA's random draws in :mod:`evomerge.merge.draws`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evomerge.merge.draws import DRAW_STEPS, Grid, draw_keys
from evomerge.merge.kernels import (
    Combination, KeepRule, combine, consensus_slab, elementwise, magmax_slab, merge_kept, merged_output, weight_total,
    work_dtype)
from evomerge.merge.params import MergeParamError
from evomerge.merge.registry import METHODS, MergeParams, TaskArithmeticVariant, resolve
from evomerge.merge.stats import MagnitudeStats, l1_norms, magnitude_cuts, rank_width, ranked_l1_norms, row_ranks

# --- generalized task arithmetic ---------------------------------------------------------------


def _keep_rule(variant: TaskArithmeticVariant, deltas: Tensor, params: MergeParams,
               generator: torch.Generator | None, stats: MagnitudeStats | None) -> KeepRule:
    """What ``variant`` keeps of each expert's delta under ``params``, as thresholds and draw
    parameters a kernel compares with, so the kernel itself reads no parameter."""
    count, kind = deltas.shape[0], variant.sparsification
    if kind == "none":
        return KeepRule(kind)
    density = params.density
    numel = deltas[0].numel()
    if kind == "magnitude":
        # mergekit keeps int(density * n) elements but at least one whenever density > 0.
        counts = [numel if d >= 1 else 0 if d <= 0 else max(1, int(d * numel)) for d in density]
        return KeepRule(kind, low=magnitude_cuts(deltas, counts, stats)[:, :, None])
    if kind == "band":
        dropped_top, kept_through = [], []
        for d, g in zip(density, params.gamma):
            if d >= 1:
                dropped_top.append(0)
                kept_through.append(numel)
                continue
            target = int(d * numel)
            # mergekit shrinks the outlier cut when the kept band would run off the bottom.
            skipped_bottom = max(0, numel - target - int(g * numel))
            dropped_top.append(numel - skipped_bottom - target)
            kept_through.append(numel - skipped_bottom)
        return KeepRule(kind, low=magnitude_cuts(deltas, kept_through, stats)[:, :, None],
                        high=magnitude_cuts(deltas, dropped_top, stats)[:, :, None])
    generator = _need(generator, f"{kind} sparsification")
    seed = int(torch.randint(0, 1 << 32, (), generator=generator, device=generator.device))
    keys = draw_keys(seed, count, numel, deltas.device)
    width = rank_width(deltas)
    grid = Grid.of(width, deltas.device)
    column = lambda values: torch.tensor(values, dtype=torch.float64, device=deltas.device)[:, None, None]  # noqa: E731
    if kind == "random":
        cut = torch.ceil(column(density) * DRAW_STEPS).clamp(0, DRAW_STEPS).to(torch.int32)
        return KeepRule(kind, cut=cut, keys=keys, grid=grid)
    # DELLA keeps where draw < density - epsilon + 2 * epsilon * rank / (width - 1); all where
    # the density reaches 1, none where it is 0.
    intercepts, slopes = [], []
    for d, e in zip(density, params.epsilon):
        if d >= 1 or d <= 0:
            intercepts.append(math.inf if d >= 1 else -math.inf)
            slopes.append(0.0)
        else:
            intercepts.append((d - e) * DRAW_STEPS)
            slopes.append(2 * e * DRAW_STEPS / max(width - 1, 1))
    ranks = stats.row_ranks() if stats is not None else row_ranks(deltas)
    return KeepRule(kind, cut=column(intercepts).float(), slope=column(slopes).float(), keys=keys,
                    ranks=ranks.view(count, -1, width), grid=grid)


def generalized_task_arithmetic(variant: TaskArithmeticVariant, base: Tensor, deltas: Tensor, params: MergeParams,
                                generator: torch.Generator | None = None,
                                stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """mergekit's generalized task arithmetic for any :class:`TaskArithmeticVariant`: sparsify each
    expert's delta, optionally rescale it to its original L1 norm, weight, combine (with or
    without sign election), optionally divide by the weight that contributed, scale by lambda.

    The merged tensor is written in the base's dtype into ``out`` (the base's shape) when given,
    by :func:`~evomerge.merge.kernels.merge_kept`, which says how the work is split into loops.
    Random variants draw one counter-based uniform per element of ``deltas``
    (:func:`~evomerge.merge.draws.draw_uniforms` replays them) from a seed taken from
    ``generator``; DELLA reads in-row ranks from ``stats`` (or ranks the tensor here without it),
    and a rescale reads the deltas' L1 norms from ``stats`` (or sums them here).
    """
    count = deltas.shape[0]
    work = work_dtype(deltas.dtype)
    width = rank_width(deltas)
    rule = _keep_rule(variant, deltas, params, generator, stats)
    norms = ranked_norms = None
    if variant.default_rescale is not None and params.rescale:
        norms = stats.l1_norms() if stats is not None else l1_norms(deltas)
        if rule.kind == "rank":
            ranked_norms = stats.ranked_l1_norms() if stats is not None else ranked_l1_norms(deltas, rule.ranks)
    combination = Combination(
        weight=torch.tensor(params.weight, dtype=work, device=base.device)[:, None, None],
        lam=torch.tensor(params.lambda_, dtype=work, device=base.device), elect=variant.elect_sign,
        normalize=params.normalize, norms=norms, ranked_norms=ranked_norms)
    merged = merged_output(base, out)
    merge_kept(deltas.reshape(count, -1, width), base.reshape(-1, width), rule, combination, merged.view(-1, width))
    return merged


# --- methods -----------------------------------------------------------------------------------


def _stack(deltas: Tensor) -> Tensor:
    return deltas.reshape(deltas.shape[0], -1)


def linear(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
           stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Weighted average of the experts' full weights ("model soups", Wortsman et al. 2022,
    arXiv:2203.05482): fine-tunes of one base stay in one loss basin, so averaging them keeps
    each one's gains; the baseline every other method must beat."""
    weight = params.weight
    merged = merged_output(base, out)
    if params.normalize:
        total = math.fsum(weight)
        combine(base.reshape(-1), _stack(deltas), 1.0, [w / total for w in weight], merged.view(-1))
    else:
        combine(base.reshape(-1), _stack(deltas), math.fsum(weight), weight, merged.view(-1))
    return merged


def slerp(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
          stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Spherical interpolation from the base (t=0) to one expert (t=1), treating the whole tensor as
    one vector: unlike a straight line it keeps the norm from sagging midway between two distant
    weights. Nearly parallel tensors (|cos| > 0.9995) fall back to linear interpolation, where the
    spherical formula is numerically unstable (mergekit's rule and threshold). The angle comes
    from three sums; the result, ``a * base + b * expert``, is one :func:`combine` pass."""
    if deltas.shape[0] != 1:
        raise MergeParamError(f"slerp interpolates between the base and exactly 1 expert, got {deltas.shape[0]}")
    t = params.t
    work = work_dtype(base.dtype)
    start = base.reshape(-1).to(work)
    delta = deltas.reshape(-1).to(work)
    start_sq = start.dot(start)
    start_delta = start.dot(delta)
    end_sq = start_sq + 2 * start_delta + delta.dot(delta)
    start_norm = start_sq.sqrt()
    end_norm = end_sq.clamp(min=0).sqrt()
    start_norm = torch.where(start_norm > 1e-8, start_norm, 1.0)
    end_norm = torch.where(end_norm > 1e-8, end_norm, 1.0)
    cos = ((start_sq + start_delta) / (start_norm * end_norm)).clamp(-1, 1)
    nearly_parallel = cos.abs() > 0.9995
    theta = torch.acos(torch.where(nearly_parallel, 0.0, cos))
    sin_theta = torch.sin(theta)
    start_coef = torch.where(nearly_parallel, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    end_coef = torch.where(nearly_parallel, t, torch.sin(t * theta) / sin_theta)
    merged = merged_output(base, out)
    # start_coef * base + end_coef * (base + delta)
    combine(base.reshape(-1), _stack(deltas), float(start_coef + end_coef), [float(end_coef)], merged.view(-1))
    return merged


def model_stock(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
                stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): fine-tunes scatter around a centre that
    generalises better than any of them, and the angle between their task vectors says how far
    to move from the base toward their average: ratio ``K cos / (1 + (K - 1) cos)`` with ``cos``
    the mean pairwise cosine. Per tensor, or per row with ``filter_wise`` (mergekit's option);
    where the ratio is singular the base is kept, as in mergekit."""
    count = deltas.shape[0]
    if count < 2:
        raise MergeParamError(f"model_stock needs at least 2 experts to measure their angle, got {count}")
    work = work_dtype(base.dtype)
    filter_wise = params.filter_wise and base.ndim >= 1
    rows = deltas.to(work).reshape(count, -1, base.shape[-1]) if filter_wise else deltas.to(work).reshape(count, 1, -1)
    norms = torch.linalg.vector_norm(rows, dim=-1)
    dots = torch.einsum("irm,jrm->ijr", rows, rows)
    cos = (dots / (norms[:, None] * norms[None, :]).clamp(min=1e-6)).clamp(-1, 1)
    pairs = torch.triu_indices(count, count, offset=1)
    mean_cos = cos[pairs[0], pairs[1]].mean(0)
    denominator = 1 + (count - 1) * mean_cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, 0.0, count * mean_cos / torch.where(singular, 1.0, denominator))
    merged = merged_output(base, out)
    if filter_wise:
        step = ratio[:, None] * rows.mean(0)
        merged.copy_(base.to(work) + step.reshape(base.shape))
    else:
        combine(base.reshape(-1), _stack(deltas), 1.0, [float(ratio[0]) / count] * count, merged.view(-1))
    return merged


def magmax(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
           stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """MagMax (Marczak et al., ECCV 2024): per element, the expert that moved it most
    is the one that needed it, so take the delta of largest magnitude, scaled by ``lambda``.
    ``weight`` scales each expert's deltas before the choice (1 everywhere is the paper)."""
    work = work_dtype(base.dtype)
    weight = torch.tensor(params.weight, dtype=work, device=base.device)
    lam = torch.tensor(params.lambda_, dtype=work, device=base.device)
    merged = merged_output(base, out)
    elementwise(magmax_slab, base.reshape(-1), _stack(deltas), merged.view(-1), weight[:, None], lam)
    return merged


def consensus(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
              stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model Merging
    and Compression", arXiv:2405.07813): an element that matters to fewer than ``k`` experts is
    either useless or selfish and only interferes, so drop it from the task-arithmetic sum.
    Expert i relies on an element when its TALL mask holds, ``|tau_i| >= lambda_tall *
    |tau_sum - tau_i|`` (tau are the weighted deltas). The paper tunes ``lambda_tall`` per task in
    [0.2, 0.6] on validation data; 0.4 is the middle of that grid, and k = 2 is the paper's."""
    work = work_dtype(base.dtype)
    weight = torch.tensor(params.weight, dtype=work, device=base.device)
    divisor = weight_total(weight) if params.normalize else torch.ones((), dtype=work)
    scalar = lambda value: torch.tensor(value, dtype=work, device=base.device)  # noqa: E731
    merged = merged_output(base, out)
    elementwise(consensus_slab, base.reshape(-1), _stack(deltas), merged.view(-1), weight[:, None],
                scalar(params.lambda_), scalar(params.lambda_tall), scalar(params.k), divisor.to(base.device))
    return merged


def lines(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
          stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """LiNeS (Wang et al. 2025, arXiv:2410.17146): shallow layers hold general features that a
    merge should disturb least, so the task-arithmetic sum is scaled by ``alpha + beta *
    layer_fraction``, growing linearly with depth (the paper's parametrisation: ``beta`` is the
    extra scale at the last block). ``alpha`` None is 1/K, the paper's choice for summed task
    vectors; ``beta`` is tuned on validation data in the paper and defaults to 0.5 here."""
    if params.layer_fraction is None:
        raise MergeParamError("lines scales by depth and needs layer_fraction "
                              "(0 for embeddings, 1 for the last block)")
    weight = params.weight
    divisor = 1.0
    if params.normalize:
        total = math.fsum(weight)
        divisor = 1.0 if abs(total) < 1e-8 else total
    alpha = 1 / deltas.shape[0] if params.alpha is None else params.alpha
    scale = (alpha + params.beta * params.layer_fraction) / divisor
    merged = merged_output(base, out)
    combine(base.reshape(-1), _stack(deltas), 1.0, [w * scale for w in weight], merged.view(-1))
    return merged


def cabs(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
         stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """CABS (Yang et al. 2025, "CABS: Conflict-Aware and Balanced Sparsification for Enhancing
    Model Merging", arXiv:2503.01874): magnitude pruning keeps each expert's elements where they
    cluster and lets experts keep the same elements, where they then collide. CABS prunes the
    experts one after another in the recipe's expert order, each choosing only among the elements
    no earlier expert kept (conflict-aware), and keeps the largest ``round(density * block)``
    magnitudes of every ``block`` consecutive elements (n:m, balanced) instead of the largest of
    the whole tensor; the kept deltas are added to the base with their weights times ``lambda``.
    An expert whose share of a block is already taken keeps what is free there; the last block
    of a tensor that ``block`` does not divide is shorter. Every tensor is treated alike, as in
    the authors' K-expert version (their mergekit contribution); ``block`` 32 is the m of their
    examples. A candidate costs K top-n selections in every block, one expert after another (each
    depends on the earlier masks): a partial sort per block, which bounds its speed, not memory."""
    count = deltas.shape[0]
    work = work_dtype(base.dtype)
    block = int(params.block)
    flat = deltas.reshape(count, -1)
    numel = flat.shape[1]
    padded = numel + (-numel) % block
    taken = torch.zeros(padded, dtype=torch.bool, device=base.device)
    update = torch.zeros(numel, dtype=work, device=base.device)
    for delta, weight, density in zip(flat, params.weight, params.density):
        keep = min(block, round(density * block))
        if keep == 0 or weight == 0:
            continue
        scores = torch.full((padded,), -math.inf, dtype=work, device=base.device)
        scores[:numel] = delta.abs().to(work)
        scores.masked_fill_(taken, -math.inf)
        top = scores.view(-1, block).topk(keep, dim=1, sorted=False)  # which, not in what order
        mask = torch.zeros_like(taken).view(-1, block).scatter_(1, top.indices, top.values > -math.inf).view(-1)
        taken |= mask
        update += (weight * params.lambda_) * delta.to(work) * mask[:numel]
    merged = merged_output(base, out)
    merged.copy_((base.reshape(-1).to(work) + update).view(base.shape))
    return merged


def _need(generator: torch.Generator | None, method: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{method} drops elements at random; pass a torch.Generator so merges reproduce")
    return generator


def merge_tensor(method: str, base: Tensor, deltas: Tensor, params: MergeParams,
                 generator: torch.Generator | None = None, stats: MagnitudeStats | None = None,
                 out: Tensor | None = None) -> Tensor:
    """Merge one tensor by ``method``: validate, compute in float32 for half-precision inputs, and
    return the merged tensor in the base's dtype, written into ``out`` (contiguous, the base's
    shape and dtype) when given. ``stats`` (for TIES, breadcrumbs and DELLA) must describe these
    ``deltas``, e.g. :meth:`MagnitudeQuantiles.from_deltas` of them. ``params`` are resolved
    against the method's schema first (free when the caller resolved them already)."""
    if deltas.ndim != base.ndim + 1 or deltas.shape[1:] != base.shape:
        raise ValueError(f"deltas have shape {list(deltas.shape)}; expected [K, {', '.join(map(str, base.shape))}]")
    if out is not None and (out.shape != base.shape or out.dtype != base.dtype or not out.is_contiguous()):
        raise ValueError(f"out is a {'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} tensor of shape "
                         f"{list(out.shape)}; expected a contiguous {base.dtype} one of shape {list(base.shape)}")
    if not (base.is_floating_point() and deltas.is_floating_point()):
        raise TypeError(f"merging needs floating-point tensors, got {base.dtype} and {deltas.dtype}")
    params = resolve(method, params, experts=deltas.shape[0])
    spec = METHODS[method]
    if spec.randomized:
        _need(generator, method)
    if base.numel() == 0:
        return base.clone() if out is None else out
    return spec.function(base, deltas, params, generator, stats, out=out)
