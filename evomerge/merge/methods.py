"""Merge methods as pure functions on one tensor, plus the registry that checks recipes from data.

A search scores thousands of candidate merges, so the arithmetic is kept apart from any model or
file: every method takes the base's tensor and the experts' task vectors stacked as
``deltas[K, *base.shape]`` (expert minus base) and returns the merged tensor. That makes each
method cheap to call per tensor and testable on a 64x48 matrix.

Parameter names and semantics follow mergekit 0.1.5 (``weight``, ``density``, ``gamma``,
``epsilon``, ``lambda``, ``normalize``, ``rescale``, ``t``, ``filter_wise``) so that a recipe found
here exports to a mergekit config one to one and merges to the same weights. Where mergekit's
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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, Union

import torch
from torch import Tensor

from evomerge.merge.draws import DRAW_STEPS, Grid, draw_keys
from evomerge.merge.kernels import (
    Combination, KeepRule, combine, consensus_slab, elementwise, magmax_slab, merge_kept, weight_total, work_dtype)
from evomerge.merge.stats import MagnitudeStats, l1_norms, magnitude_cuts, rank_width, ranked_l1_norms, row_ranks

from evomerge.errors import UserError

PerExpert = Union[float, Sequence[float], Tensor, None]
"""One value per expert (length K), one value for every expert, or None for the default."""

EXPERT_DEFAULTS: dict[str, float] = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}
"""Per-expert defaults: mergekit's, except ``weight``, which mergekit requires and is 1 here."""

BOOL_PARAMS: tuple[str, ...] = ("normalize", "rescale", "filter_wise")


class MergeParamError(UserError, ValueError):
    """A recipe asks a merge method for something it cannot do; the message says what is valid."""


@dataclass(frozen=True)
class ParamRange:
    """Where a parameter is meaningful, so recipes can be checked (and mutated) from data alone."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def complaint(self, value: float) -> str | None:
        """Why ``value`` is invalid, phrased to follow '<name> <value>', or None when it is valid."""
        if not math.isfinite(value):
            return "is not a finite number"
        if self.integer and value != int(value):
            return "is not an integer"
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return None if above and below else f"is outside {self}"

    def __str__(self) -> str:
        return (f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


PARAM_RANGES: dict[str, ParamRange] = {
    "weight": ParamRange(),
    "density": ParamRange(0.0, 1.0),
    "gamma": ParamRange(0.0, 1.0),
    "epsilon": ParamRange(0.0, 1.0, high_open=True),
    "lambda": ParamRange(),
    "t": ParamRange(0.0, 1.0),
    "layer_fraction": ParamRange(0.0, 1.0),
    "alpha": ParamRange(),
    "beta": ParamRange(),
    "lambda_tall": ParamRange(0.0, math.inf, high_open=True),
    "k": ParamRange(0.0, math.inf, high_open=True, integer=True),
}
"""Valid values of every numeric parameter, by the name recipes use (mergekit's names)."""


@dataclass(frozen=True, eq=False)
class MergeParams:
    """Everything a method may read when merging one tensor; each method reads only its own.

    Per-expert fields take K values (a sequence or a 1-D tensor), one value for every expert, or
    None for :data:`EXPERT_DEFAULTS`. ``lambda_`` is mergekit's ``lambda`` (a Python keyword).
    ``normalize`` and ``rescale`` left as None take the method's default (mergekit's).
    ``layer_fraction`` is this tensor's depth in the model, 0 for embeddings and 1 for the last
    block, given by the caller for layer-aware methods. ``alpha`` None means 1/K.
    """

    weight: PerExpert = None
    density: PerExpert = None
    gamma: PerExpert = None
    epsilon: PerExpert = None
    lambda_: float = 1.0
    normalize: bool | None = None
    rescale: bool | None = None
    t: float = 0.5
    layer_fraction: float | None = None
    alpha: float | None = None
    beta: float = 0.5
    k: int = 2
    lambda_tall: float = 0.4
    filter_wise: bool = False


def _param(params: MergeParams, name: str) -> object:
    return getattr(params, "lambda_" if name == "lambda" else name)


MergeFn = Callable[..., Tensor]
"""Every method's signature: ``(base, deltas, params, generator, stats, *, out=None) -> merged``;
methods ignore the generator or stats they have no use for, so callers need no per-method cases.
Each computes in float32 for half-precision inputs (upcasting on the fly, so a bf16 delta stack is
never copied whole) and writes the merged tensor, in the base's dtype, into ``out`` when given."""


@dataclass(frozen=True)
class MethodSpec:
    """What a method takes, so recipes can be validated, mutated and exported from data.
    ``variant`` is set for the generalized task-arithmetic family, whose members differ only in it."""

    name: str
    fn: MergeFn
    per_expert_params: tuple[str, ...]
    global_params: tuple[str, ...]
    randomized: bool
    needs_base: bool
    description: str
    default_normalize: bool | None = None
    default_rescale: bool | None = None
    min_experts: int = 1
    max_experts: int | None = None
    variant: TaskArithmeticVariant | None = None


# --- helpers -----------------------------------------------------------------------------------


def _floats(raw: float | Sequence[float] | Tensor) -> float | list[float]:
    """A per-expert value as Python floats: one float when it applies to every expert."""
    if isinstance(raw, Tensor):
        return float(raw) if raw.ndim == 0 else [float(v) for v in raw.detach().reshape(-1).tolist()]
    if isinstance(raw, (int, float)):
        return float(raw)
    return [float(v) for v in raw]


def _expert_floats(params: MergeParams, name: str, count: int) -> list[float]:
    raw = getattr(params, name)
    values = EXPERT_DEFAULTS[name] if raw is None else _floats(raw)
    if isinstance(values, float):
        return [values] * count
    if len(values) != count:
        raise MergeParamError(f"{name} has {len(values)} values for {count} experts")
    return values


def _flag(value: bool | None, method: str, which: str) -> bool:
    return _option(value, bool(getattr(METHODS[method], f"default_{which}")))


def _option(value: bool | None, default: bool) -> bool:
    """A recipe's switch, or the method's default where the recipe leaves it unset."""
    return default if value is None else value


# --- generalized task arithmetic ---------------------------------------------------------------

Sparsification = Literal["none", "magnitude", "band", "random", "rank"]
"""How each expert's delta is thinned before combining: kept whole, its top magnitudes (TIES), a
magnitude band below the outliers (breadcrumbs), a uniform random keep (DARE), or a random keep
whose probability rises with magnitude rank within each row (DELLA)."""

@dataclass(frozen=True)
class TaskArithmeticVariant:
    """One member of mergekit's generalized task arithmetic family, as data: every member
    sparsifies each expert's delta, optionally rescales it to its original L1 norm, and adds the
    weighted deltas to the base scaled by ``lambda``, optionally keeping only the elements that
    agree with an elected sign. :func:`generalized_task_arithmetic` merges every variant.
    ``reference`` says why the variant exists and where mergekit's behaviour is followed."""

    sparsification: Sparsification
    elect_sign: bool
    default_normalize: bool
    default_rescale: bool | None  # None where nothing is dropped, so there is no norm to restore
    reference: str

    @property
    def reads_stats(self) -> bool:
        """Whether the merge reads :class:`MagnitudeStats`: magnitude cuts, in-row ranks, or
        (any sparsification that rescales) the deltas' L1 norms."""
        return self.sparsification != "none"

    @property
    def randomized(self) -> bool:
        return self.sparsification in ("random", "rank")


def _keep_rule(variant: TaskArithmeticVariant, deltas: Tensor, params: MergeParams,
               generator: torch.Generator | None, stats: MagnitudeStats | None) -> KeepRule:
    """What ``variant`` keeps of each expert's delta under ``params``, as thresholds and draw
    parameters a kernel compares with, so the kernel itself reads no parameter."""
    count, kind = deltas.shape[0], variant.sparsification
    if kind == "none":
        return KeepRule(kind)
    density = _expert_floats(params, "density", count)
    numel = deltas[0].numel()
    if kind == "magnitude":
        # mergekit keeps int(density * n) elements but at least one whenever density > 0.
        counts = [numel if d >= 1 else 0 if d <= 0 else max(1, int(d * numel)) for d in density]
        return KeepRule(kind, low=magnitude_cuts(deltas, counts, stats)[:, :, None])
    if kind == "band":
        dropped_top, kept_through = [], []
        for d, g in zip(density, _expert_floats(params, "gamma", count)):
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
    for d, e in zip(density, _expert_floats(params, "epsilon", count)):
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
    if variant.default_rescale is not None and _option(params.rescale, variant.default_rescale):
        norms = stats.l1_norms() if stats is not None else l1_norms(deltas)
        if rule.kind == "rank":
            ranked_norms = stats.ranked_l1_norms() if stats is not None else ranked_l1_norms(deltas, rule.ranks)
    combination = Combination(
        weight=torch.tensor(_expert_floats(params, "weight", count), dtype=work, device=base.device)[:, None, None],
        lam=torch.tensor(params.lambda_, dtype=work, device=base.device), elect=variant.elect_sign,
        normalize=_option(params.normalize, variant.default_normalize), norms=norms, ranked_norms=ranked_norms)
    merged = _output(base, out)
    merge_kept(deltas.reshape(count, -1, width), base.reshape(-1, width), rule, combination, merged.view(-1, width))
    return merged
    coefficient = weight
    if rescale:
        after = _expected_kept_norms(rule.kind, rule.cut, rule.slope, before, ranked)
        if after is None:
            after = sum(_norms_slab(grid[:, slab], rule.low, rule.high, rule.cut, rule.slope, rule.slab(slab),
                                    rule.keys, columns, row_step, slab.start, kind=rule.kind).double()
                        for slab in slabs)
        coefficient = weight * _rescale_ratio(before, after).to(work)[:, None, None]
    coefficient = _normalized(coefficient, weight, divide and not variant.elect_sign)
    for slab in slabs:
        _merge_slab(grid[:, slab], base_grid[slab], rule.low, rule.high, rule.cut, rule.slope, rule.slab(slab),
                    rule.keys, columns, row_step, slab.start, coefficient, weight, lam, merged_grid[slab], **options)
    return merged


# --- methods -----------------------------------------------------------------------------------


def _output(base: Tensor, out: Tensor | None) -> Tensor:
    return torch.empty(base.shape, dtype=base.dtype, device=base.device) if out is None else out


def _stack(deltas: Tensor) -> Tensor:
    return deltas.reshape(deltas.shape[0], -1)


def linear(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
           stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Weighted average of the experts' full weights ("model soups", Wortsman et al. 2022,
    arXiv:2203.05482): fine-tunes of one base stay in one loss basin, so averaging them keeps
    each one's gains; the baseline every other method must beat."""
    weight = _expert_floats(params, "weight", deltas.shape[0])
    merged = _output(base, out)
    if _flag(params.normalize, "linear", "normalize"):
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
    merged = _output(base, out)
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
    merged = _output(base, out)
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
    weight = torch.tensor(_expert_floats(params, "weight", deltas.shape[0]), dtype=work, device=base.device)
    lam = torch.tensor(params.lambda_, dtype=work, device=base.device)
    merged = _output(base, out)
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
    weight = torch.tensor(_expert_floats(params, "weight", deltas.shape[0]), dtype=work, device=base.device)
    divisor = weight_total(weight) if _flag(params.normalize, "consensus", "normalize") else torch.ones((), dtype=work)
    scalar = lambda value: torch.tensor(value, dtype=work, device=base.device)  # noqa: E731
    merged = _output(base, out)
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
    weight = _expert_floats(params, "weight", deltas.shape[0])
    divisor = 1.0
    if _flag(params.normalize, "lines", "normalize"):
        total = math.fsum(weight)
        divisor = 1.0 if abs(total) < 1e-8 else total
    alpha = 1 / deltas.shape[0] if params.alpha is None else params.alpha
    scale = (alpha + params.beta * params.layer_fraction) / divisor
    merged = _output(base, out)
    combine(base.reshape(-1), _stack(deltas), 1.0, [w * scale for w in weight], merged.view(-1))
    return merged


def _need(generator: torch.Generator | None, method: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{method} drops elements at random; pass a torch.Generator so merges reproduce")
    return generator


TASK_ARITHMETIC_VARIANTS: dict[str, TaskArithmeticVariant] = {
    "task_arithmetic": TaskArithmeticVariant(
        "none", elect_sign=False, default_normalize=False, default_rescale=None,
        reference="Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): fine-tuning directions add "
                  "up, so the base plus a scaled sum of task vectors gains several skills at once."),
    "ties": TaskArithmeticVariant(
        "magnitude", elect_sign=True, default_normalize=True, default_rescale=False,
        reference="TIES (Yadav et al. 2023, arXiv:2306.01708): most of a task vector is noise that "
                  "interferes with other experts, so keep each expert's largest density fraction, elect "
                  "a sign per element, and average only the values that agree with it."),
    "dare_linear": TaskArithmeticVariant(
        "random", elect_sign=False, default_normalize=False, default_rescale=True,
        reference="DARE (Yu et al. 2024, arXiv:2311.03099): task vectors are so redundant that dropping "
                  "most elements at random and rescaling the rest barely changes an expert, while it "
                  "makes experts interfere less. Keep probability is density; rescale divides by it, as "
                  "the paper does, which restores the expert's L1 norm in expectation (mergekit matches "
                  "the realized norm: the two differ by the mask's noise, ~0.1% on a large matrix)."),
    "dare_ties": TaskArithmeticVariant(
        "random", elect_sign=True, default_normalize=False, default_rescale=True,
        reference="DARE's random drop followed by TIES' sign election (Yu et al. 2024, "
                  "arXiv:2311.03099), for experts whose surviving elements still disagree in sign."),
    "breadcrumbs": TaskArithmeticVariant(
        "band", elect_sign=False, default_normalize=False, default_rescale=False,
        reference="Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): the very largest "
                  "changes are outliers that hurt other tasks as much as the smallest are noise, so drop "
                  "the top gamma fraction by magnitude and keep the next density fraction (mergekit's "
                  "band)."),
    "breadcrumbs_ties": TaskArithmeticVariant(
        "band", elect_sign=True, default_normalize=False, default_rescale=False,
        reference="Breadcrumbs' magnitude band followed by TIES' sign election (mergekit's combination)."),
    "della": TaskArithmeticVariant(
        "rank", elect_sign=True, default_normalize=True, default_rescale=True,
        reference="DELLA (Deep et al. 2024, arXiv:2406.11617): a random drop that spares large elements "
                  "works better than DARE's uniform one. Within each row, an element's keep probability "
                  "rises linearly with its magnitude rank from density - epsilon to density + epsilon; "
                  "then TIES' sign election. Rescale restores each expert's L1 norm in expectation, with one "
                  "factor per expert as mergekit's does for the realized norm (the paper divides each "
                  "element by its own keep probability)."),
    "della_linear": TaskArithmeticVariant(
        "rank", elect_sign=False, default_normalize=False, default_rescale=True,
        reference="DELLA's rank-based drop without sign election (mergekit's della_linear)."),
}
"""The generalized task-arithmetic family by recipe name: one function, eight variants as data."""

_SPARSE_GLOBALS = ("lambda", "normalize", "rescale")
_VARIANT_EXPERT_PARAMS: dict[Sparsification, tuple[str, ...]] = {
    "none": ("weight",), "magnitude": ("weight", "density"), "band": ("weight", "density", "gamma"),
    "random": ("weight", "density"), "rank": ("weight", "density", "epsilon")}


def _variant_spec(name: str, description: str) -> MethodSpec:
    """The registry entry of a task-arithmetic variant, its parameters and defaults read off the variant."""
    variant = TASK_ARITHMETIC_VARIANTS[name]
    sparse = variant.default_rescale is not None
    return MethodSpec(name, partial(generalized_task_arithmetic, variant),
                      _VARIANT_EXPERT_PARAMS[variant.sparsification],
                      _SPARSE_GLOBALS if sparse else ("lambda", "normalize"), variant.randomized, True,
                      description, default_normalize=variant.default_normalize,
                      default_rescale=variant.default_rescale, variant=variant)


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("linear", linear, ("weight",), ("normalize",), False, False,
               "weighted average of the experts", default_normalize=True),
    _variant_spec("task_arithmetic", "base plus lambda times the weighted sum of task vectors"),
    _variant_spec("ties", "top-density magnitudes, sign election, disjoint mean"),
    _variant_spec("dare_linear", "random drop (keep probability density), rescale, weighted sum"),
    _variant_spec("dare_ties", "random drop, rescale, sign election"),
    _variant_spec("breadcrumbs", "drop the top gamma and keep the next density by magnitude, weighted sum"),
    _variant_spec("breadcrumbs_ties", "breadcrumbs band, sign election"),
    _variant_spec("della", "magnitude-rank keep probabilities density +/- epsilon, rescale, sign election"),
    _variant_spec("della_linear", "magnitude-rank keep probabilities, rescale, weighted sum"),
    MethodSpec("slerp", slerp, (), ("t",), False, True,
               "spherical interpolation from the base (t=0) to one expert (t=1)", min_experts=1, max_experts=1),
    MethodSpec("model_stock", model_stock, (), ("filter_wise",), False, True,
               "move toward the experts' average by a ratio set by their angle", min_experts=2),
    MethodSpec("magmax", magmax, ("weight",), ("lambda",), False, True,
               "per element, the delta of largest magnitude"),
    MethodSpec("consensus", consensus, ("weight",), ("lambda", "normalize", "k", "lambda_tall"), False, True,
               "task arithmetic on the elements at least k experts' TALL masks keep", default_normalize=False),
    MethodSpec("lines", lines, ("weight",), ("alpha", "beta", "normalize", "layer_fraction"), False, True,
               "task arithmetic scaled by alpha + beta * depth", default_normalize=False),
)}
"""Every merge method by its recipe name (mergekit's name where mergekit has the method)."""


# --- validation and entry point ----------------------------------------------------------------


def _expert_labels(spec: MethodSpec, params: MergeParams, experts: Sequence[str] | int | None) -> list[str] | None:
    """How messages name each expert; None when neither ``experts`` nor any parameter says K."""
    if isinstance(experts, int):
        return [f"expert {i}" for i in range(experts)]
    if experts is not None:
        return [f"expert {name!r}" for name in experts]
    for name in spec.per_expert_params:
        raw = getattr(params, name)
        values = None if raw is None else _floats(raw)
        if isinstance(values, list):
            return [f"expert {i}" for i in range(len(values))]
    return None


def validate(method: str, params: MergeParams, experts: Sequence[str] | int | None = None) -> None:
    """Raise :class:`MergeParamError` (a ValueError) naming the first value ``method`` cannot use.

    ``experts`` gives the experts' names (or just their number) for the messages and the expert
    count checks; without it K is taken from the per-expert sequences. Only the parameters the
    method reads are checked; others are ignored.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise MergeParamError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    labels = _expert_labels(spec, params, experts)
    if labels is not None:
        count = len(labels)
        if count < spec.min_experts or (spec.max_experts is not None and count > spec.max_experts):
            if spec.max_experts is None:
                wanted = f"at least {spec.min_experts} experts"
            else:
                wanted = f"exactly {spec.max_experts} expert{'s' if spec.max_experts > 1 else ''}"
            raise MergeParamError(f"{method} merges the base with {wanted}, got {count}: {', '.join(labels)}")
    resolved: dict[str, list[float]] = {}
    for name in spec.per_expert_params:
        values = _expert_floats(params, name, len(labels) if labels is not None else 1)
        resolved[name] = values
        for label, value in zip(labels or ["every expert"], values):
            problem = PARAM_RANGES[name].complaint(value)
            if problem:
                raise MergeParamError(f"{name} {value:g} for {label} {problem}")
    for name in spec.global_params:
        value = _param(params, name)
        if value is None:
            continue
        if name in BOOL_PARAMS:
            if not isinstance(value, bool):
                raise MergeParamError(f"{name} {value!r} for {method} must be true or false")
            continue
        problem = PARAM_RANGES[name].complaint(float(value))
        if problem:
            raise MergeParamError(f"{name} {float(value):g} for {method} {problem}")
    if spec.name in ("della", "della_linear"):
        for label, d, e in zip(labels or ["every expert"], resolved["density"], resolved["epsilon"]):
            if 0 < d < 1 and not (d - e > 0 and d + e < 1):
                raise MergeParamError(f"epsilon {e:g} for {label} is too wide for density {d:g}: keep probabilities "
                                      f"density +/- epsilon must lie in (0, 1), so epsilon < {min(d, 1 - d):g}")
    if spec.name == "linear" and labels is not None and _flag(params.normalize, "linear", "normalize"):
        if abs(math.fsum(resolved["weight"])) < 1e-8:
            raise MergeParamError("linear weights sum to 0 and cannot be normalized; "
                                  "use weights with a non-zero sum or normalize false")


def merge_tensor(method: str, base: Tensor, deltas: Tensor, params: MergeParams,
                 generator: torch.Generator | None = None, stats: MagnitudeStats | None = None,
                 out: Tensor | None = None) -> Tensor:
    """Merge one tensor by ``method``: validate, compute in float32 for half-precision inputs, and
    return the merged tensor in the base's dtype, written into ``out`` (contiguous, the base's
    shape and dtype) when given. ``stats`` (for TIES, breadcrumbs and DELLA) must describe these
    ``deltas``, e.g. :meth:`MagnitudeQuantiles.from_deltas` of them."""
    if deltas.ndim != base.ndim + 1 or deltas.shape[1:] != base.shape:
        raise ValueError(f"deltas have shape {list(deltas.shape)}; expected [K, {', '.join(map(str, base.shape))}]")
    if out is not None and (out.shape != base.shape or out.dtype != base.dtype or not out.is_contiguous()):
        raise ValueError(f"out is a {'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} tensor of shape "
                         f"{list(out.shape)}; expected a contiguous {base.dtype} one of shape {list(base.shape)}")
    if not (base.is_floating_point() and deltas.is_floating_point()):
        raise TypeError(f"merging needs floating-point tensors, got {base.dtype} and {deltas.dtype}")
    validate(method, params, experts=deltas.shape[0])
    spec = METHODS[method]
    if spec.randomized:
        _need(generator, method)
    if base.numel() == 0:
        return base.clone() if out is None else out
    return spec.fn(base, deltas, params, generator, stats, out=out)
