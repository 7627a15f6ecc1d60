"""Merge methods as pure functions on one tensor, plus the registry that checks recipes from data.

A search scores thousands of candidate merges, so the arithmetic is kept apart from any model or
file: every method takes the base's tensor and the experts' task vectors stacked as
``deltas[K, *base.shape]`` (expert minus base) and returns the merged tensor. That makes each
method cheap to call per tensor and testable on a 64x48 matrix.

Parameter names and semantics follow mergekit 0.1.5 (``weight``, ``density``, ``gamma``,
``epsilon``, ``lambda``, ``normalize``, ``rescale``, ``t``, ``filter_wise``) so that a recipe found
here exports to a mergekit config one to one and merges to the same weights. Where mergekit's
behaviour differs from a paper (for instance DARE and DELLA rescale the kept elements to the
original L1 norm instead of dividing by the keep probability), mergekit's choice is kept and the
method's docstring says so.

Magnitude sparsification (TIES, breadcrumbs) compares magnitudes with thresholds, and an element
*at* a threshold counts as above it: TIES keeps every element at or above its cut, breadcrumbs'
outlier cut drops every element at or above its cut. mergekit keeps exactly ``k`` elements and
breaks ties by sort order; the two agree unless several elements share the threshold magnitude
(common in bf16), where TIES here keeps all of them. The rule makes each mask a pure function of
thresholds, so a precomputed :class:`MagnitudeQuantiles` table can replace the per-call sort.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, Union

import torch
from torch import Tensor

from evomerge.errors import UserError

PerExpert = Union[float, Sequence[float], Tensor, None]
"""One value per expert (length K), one value for every expert, or None for the default."""

EXPERT_DEFAULTS: dict[str, float] = {"weight": 1.0, "density": 1.0, "gamma": 0.01, "epsilon": 0.15}
"""Per-expert defaults: mergekit's, except ``weight``, which mergekit requires and is 1 here."""

BOOL_PARAMS: tuple[str, ...] = ("normalize", "rescale", "filter_wise")

_HALF = (torch.float16, torch.bfloat16)
_NORM_EPS = 1e-7  # below this L1 norm a rescale would only amplify rounding noise (mergekit's value)


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


class MagnitudeThresholds(Protocol):
    """Precomputed magnitude quantiles of each expert's delta, so sparsifying needs no sort."""

    def magnitude_threshold(self, expert_index: int, keep_fraction: float) -> float:
        """Magnitude at or above which ``keep_fraction`` of the expert's delta elements lie."""
        ...


@dataclass(frozen=True, eq=False)
class MagnitudeQuantiles:
    """Sorted-magnitude table of each expert's delta, built once per tensor and reused.

    A search evaluates one tensor under many densities; sorting the magnitudes once and reading
    thresholds from the table turns each TIES or breadcrumbs call from a sort into a lookup.
    ``values[i, j]`` is the ``counts[j]``-th largest magnitude of expert ``i``. A query for a
    fraction ``f`` asks for the ``round(f * numel)``-th largest magnitude: exact when that count is
    in ``counts`` (all counts when ``numel <= resolution + 1``), linearly interpolated between the
    neighbouring counts otherwise.
    """

    numel: int
    counts: tuple[int, ...]
    values: Tensor

    @classmethod
    def from_deltas(cls, deltas: Tensor, resolution: int = 1024) -> MagnitudeQuantiles:
        if resolution < 1:
            raise ValueError(f"resolution {resolution} must be at least 1")
        magnitudes = deltas.reshape(deltas.shape[0], -1).abs()
        if magnitudes.dtype in _HALF:
            magnitudes = magnitudes.float()
        numel = magnitudes.shape[1]
        if numel <= resolution + 1:
            counts = list(range(1, numel + 1))
        else:
            counts = sorted({max(1, (j * numel + resolution // 2) // resolution) for j in range(resolution + 1)})
        ordered = magnitudes.sort(dim=1, descending=True).values
        index = torch.tensor([count - 1 for count in counts], dtype=torch.long, device=ordered.device)
        return cls(numel, tuple(counts), ordered[:, index].to("cpu", torch.float64))

    def magnitude_threshold(self, expert_index: int, keep_fraction: float) -> float:
        count = min(round(keep_fraction * self.numel), self.numel)
        if count <= 0:
            return math.inf
        j = bisect.bisect_left(self.counts, count)
        upper = float(self.values[expert_index, j])
        if self.counts[j] == count:
            return upper
        lower = float(self.values[expert_index, j - 1])
        return lower + (upper - lower) * (count - self.counts[j - 1]) / (self.counts[j] - self.counts[j - 1])


MergeFn = Callable[[Tensor, Tensor, MergeParams, "torch.Generator | None", "MagnitudeThresholds | None"], Tensor]
"""Every method's signature: ``(base, deltas, params, generator, thresholds) -> merged``; methods
ignore the generator or thresholds they have no use for, so callers need no per-method cases."""


@dataclass(frozen=True)
class MethodSpec:
    """What a method takes, so recipes can be validated, mutated and exported from data."""

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


def _rows(values: Sequence[float] | Tensor, like: Tensor) -> Tensor:
    """Per-expert values shaped to broadcast against ``like[K, ...]``."""
    column = torch.as_tensor(values, dtype=like.dtype, device=like.device)
    return column.reshape(-1, *([1] * (like.ndim - 1)))


def _flag(value: bool | None, method: str, which: str) -> bool:
    return bool(getattr(METHODS[method], f"default_{which}")) if value is None else value


def _weight_total(weight: Tensor) -> Tensor:
    """Sum of weights as a divisor, 1 where it vanishes (mergekit's guard against dividing by 0)."""
    total = weight.sum(0)
    return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)


def _kth_largest(magnitudes: Tensor, counts: Sequence[int], thresholds: MagnitudeThresholds | None) -> Tensor:
    """Per expert, the ``counts[i]``-th largest magnitude: inf keeps nothing, 0 keeps everything."""
    numel = magnitudes.shape[1]
    values = []
    for i, count in enumerate(counts):
        if count <= 0:
            values.append(magnitudes.new_tensor(math.inf))
        elif count >= numel:
            values.append(magnitudes.new_tensor(0.0))
        elif thresholds is not None:
            values.append(magnitudes.new_tensor(thresholds.magnitude_threshold(i, count / numel)))
        else:
            values.append(torch.kthvalue(magnitudes[i], numel - count + 1).values)
    return torch.stack(values)[:, None]


def _top_magnitude_mask(deltas: Tensor, density: Sequence[float], thresholds: MagnitudeThresholds | None) -> Tensor:
    magnitudes = deltas.abs().reshape(deltas.shape[0], -1)
    numel = magnitudes.shape[1]
    # mergekit keeps int(density * n) elements but at least one whenever density > 0.
    counts = [numel if d >= 1 else 0 if d <= 0 else max(1, int(d * numel)) for d in density]
    return (magnitudes >= _kth_largest(magnitudes, counts, thresholds)).reshape(deltas.shape)


def _band_magnitude_mask(deltas: Tensor, density: Sequence[float], gamma: Sequence[float],
                         thresholds: MagnitudeThresholds | None) -> Tensor:
    magnitudes = deltas.abs().reshape(deltas.shape[0], -1)
    numel = magnitudes.shape[1]
    dropped_top, kept_through = [], []
    for d, g in zip(density, gamma):
        if d >= 1:
            dropped_top.append(0)
            kept_through.append(numel)
            continue
        target = int(d * numel)
        # mergekit shrinks the outlier cut when the kept band would run off the bottom.
        skipped_bottom = max(0, numel - target - int(g * numel))
        dropped_top.append(numel - skipped_bottom - target)
        kept_through.append(numel - skipped_bottom)
    lower = _kth_largest(magnitudes, kept_through, thresholds)
    upper = _kth_largest(magnitudes, dropped_top, thresholds)
    return ((magnitudes >= lower) & (magnitudes < upper)).reshape(deltas.shape)


def _random_mask(deltas: Tensor, density: Sequence[float], generator: torch.Generator) -> Tensor:
    keep = torch.tensor(density, dtype=torch.float32, device=deltas.device)
    draws = torch.rand(deltas.shape, generator=generator, dtype=torch.float32, device=deltas.device)
    return draws < keep.reshape(-1, *([1] * (deltas.ndim - 1)))


def _rank_mask(deltas: Tensor, density: Sequence[float], epsilon: Sequence[float],
               generator: torch.Generator) -> Tensor:
    count = deltas.shape[0]
    rows = deltas.reshape(count, deltas.shape[1] if deltas.ndim > 2 else 1, -1)
    width = rows.shape[-1]
    rank = rows.abs().argsort(dim=-1).argsort(dim=-1).to(torch.float32) / max(width - 1, 1)
    d = torch.tensor(density, dtype=torch.float32, device=deltas.device).reshape(count, 1, 1)
    e = torch.tensor(epsilon, dtype=torch.float32, device=deltas.device).reshape(count, 1, 1)
    probability = torch.where(d >= 1, 1.0, torch.where(d <= 0, 0.0, d - e + 2 * e * rank))
    draws = torch.rand(rows.shape, generator=generator, dtype=torch.float32, device=deltas.device)
    return (draws < probability).reshape(deltas.shape)


def _masked(deltas: Tensor, keep: Tensor, rescale: bool) -> Tensor:
    """Apply ``keep``; with ``rescale``, restore each expert's L1 norm as mergekit does."""
    kept = deltas * keep
    if not rescale:
        return kept
    before = deltas.reshape(deltas.shape[0], -1).abs().sum(1)
    after = kept.reshape(deltas.shape[0], -1).abs().sum(1)
    usable = (before >= _NORM_EPS) & (after >= _NORM_EPS)
    scale = torch.where(usable, before / torch.where(usable, after, torch.ones_like(after)), 1.0)
    return kept * _rows(scale, deltas)


def _combine(base: Tensor, deltas: Tensor, params: MergeParams, method: str, *, elect_sign: bool) -> Tensor:
    """mergekit's generalized task arithmetic after sparsification: weight, optionally keep only the
    elected sign (TIES), sum, optionally divide by the weight that contributed, scale by lambda."""
    weight = _rows(_expert_floats(params, "weight", deltas.shape[0]), deltas)
    weighted = deltas * weight
    if elect_sign:
        # TIES elects the sign of the summed (weighted) deltas, i.e. the one with more total mass.
        elected = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
        agrees = weighted.sign() == elected
        mixed = (weighted * agrees).sum(0)
        contributed = (weight * agrees).sum(0)
        divisor = torch.where(contributed == 0, torch.ones_like(contributed), contributed)
    else:
        mixed = weighted.sum(0)
        divisor = _weight_total(weight)
    if _flag(params.normalize, method, "normalize"):
        mixed = mixed / divisor
    return base + params.lambda_ * mixed


# --- methods -----------------------------------------------------------------------------------


def linear(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
           thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Weighted average of the experts' full weights ("model soups", Wortsman et al. 2022,
    arXiv:2203.05482): fine-tunes of one base stay in one loss basin, so averaging them keeps
    each one's gains; the baseline every other method must beat."""
    weight = _rows(_expert_floats(params, "weight", deltas.shape[0]), deltas)
    mixed = (deltas * weight).sum(0)
    total = weight.sum(0)
    if _flag(params.normalize, "linear", "normalize"):
        return base + mixed / total
    return total * base + mixed


def task_arithmetic(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
                    thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): fine-tuning directions add up,
    so the base plus a scaled sum of task vectors gains several skills at once."""
    return _combine(base, deltas, params, "task_arithmetic", elect_sign=False)


def ties(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
         thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """TIES (Yadav et al. 2023, arXiv:2306.01708): most of a task vector is noise that interferes
    with other experts, so keep each expert's largest ``density`` fraction, elect a sign per
    element, and average only the values that agree with it."""
    keep = _top_magnitude_mask(deltas, _expert_floats(params, "density", deltas.shape[0]), thresholds)
    kept = _masked(deltas, keep, _flag(params.rescale, "ties", "rescale"))
    return _combine(base, kept, params, "ties", elect_sign=True)


def dare_linear(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
                thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """DARE (Yu et al. 2024, arXiv:2311.03099): task vectors are so redundant that dropping most
    elements at random and rescaling the rest barely changes an expert, while it makes experts
    interfere less. Keep probability is ``density``; as in mergekit, ``rescale`` restores the
    expert's L1 norm (the paper divides by ``density``, which agrees in expectation)."""
    keep = _random_mask(deltas, _expert_floats(params, "density", deltas.shape[0]), _need(generator, "dare_linear"))
    kept = _masked(deltas, keep, _flag(params.rescale, "dare_linear", "rescale"))
    return _combine(base, kept, params, "dare_linear", elect_sign=False)


def dare_ties(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
              thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """DARE's random drop followed by TIES' sign election (Yu et al. 2024, arXiv:2311.03099),
    for experts whose surviving elements still disagree in sign."""
    keep = _random_mask(deltas, _expert_floats(params, "density", deltas.shape[0]), _need(generator, "dare_ties"))
    kept = _masked(deltas, keep, _flag(params.rescale, "dare_ties", "rescale"))
    return _combine(base, kept, params, "dare_ties", elect_sign=True)


def breadcrumbs(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
                thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): the very largest changes are
    outliers that hurt other tasks as much as the smallest are noise, so drop the top ``gamma``
    fraction by magnitude and keep the next ``density`` fraction (mergekit's band)."""
    count = deltas.shape[0]
    keep = _band_magnitude_mask(deltas, _expert_floats(params, "density", count),
                                _expert_floats(params, "gamma", count), thresholds)
    kept = _masked(deltas, keep, _flag(params.rescale, "breadcrumbs", "rescale"))
    return _combine(base, kept, params, "breadcrumbs", elect_sign=False)


def breadcrumbs_ties(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
                     thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Breadcrumbs' magnitude band followed by TIES' sign election (mergekit's combination)."""
    count = deltas.shape[0]
    keep = _band_magnitude_mask(deltas, _expert_floats(params, "density", count),
                                _expert_floats(params, "gamma", count), thresholds)
    kept = _masked(deltas, keep, _flag(params.rescale, "breadcrumbs_ties", "rescale"))
    return _combine(base, kept, params, "breadcrumbs_ties", elect_sign=True)


def della(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
          thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """DELLA (Deep et al. 2024, arXiv:2406.11617): a random drop that spares large elements works
    better than DARE's uniform one. Within each row, an element's keep probability rises linearly
    with its magnitude rank from ``density - epsilon`` to ``density + epsilon``; then TIES' sign
    election. As in mergekit, ``rescale`` restores each expert's L1 norm (the paper divides each
    element by its own keep probability)."""
    count = deltas.shape[0]
    keep = _rank_mask(deltas, _expert_floats(params, "density", count),
                      _expert_floats(params, "epsilon", count), _need(generator, "della"))
    kept = _masked(deltas, keep, _flag(params.rescale, "della", "rescale"))
    return _combine(base, kept, params, "della", elect_sign=True)


def della_linear(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
                 thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """DELLA's rank-based drop without sign election (mergekit's ``della_linear``)."""
    count = deltas.shape[0]
    keep = _rank_mask(deltas, _expert_floats(params, "density", count),
                      _expert_floats(params, "epsilon", count), _need(generator, "della_linear"))
    kept = _masked(deltas, keep, _flag(params.rescale, "della_linear", "rescale"))
    return _combine(base, kept, params, "della_linear", elect_sign=False)


def slerp(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
          thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Spherical interpolation from the base (t=0) to one expert (t=1), treating the whole tensor as
    one vector: unlike a straight line it keeps the norm from sagging midway between two distant
    weights. Nearly parallel tensors (|cos| > 0.9995) fall back to linear interpolation, where the
    spherical formula is numerically unstable (mergekit's rule and threshold)."""
    if deltas.shape[0] != 1:
        raise MergeParamError(f"slerp interpolates between the base and exactly 1 expert, got {deltas.shape[0]}")
    t = params.t
    start = base.reshape(-1)
    end = (base + deltas[0]).reshape(-1)
    start_norm = torch.linalg.vector_norm(start)
    end_norm = torch.linalg.vector_norm(end)
    start_norm = torch.where(start_norm > 1e-8, start_norm, 1.0)
    end_norm = torch.where(end_norm > 1e-8, end_norm, 1.0)
    cos = ((start / start_norm) * (end / end_norm)).sum().clamp(-1, 1)
    nearly_parallel = cos.abs() > 0.9995
    theta = torch.acos(torch.where(nearly_parallel, 0.0, cos))
    sin_theta = torch.sin(theta)
    start_coef = torch.where(nearly_parallel, 1 - t, torch.sin((1 - t) * theta) / sin_theta)
    end_coef = torch.where(nearly_parallel, t, torch.sin(t * theta) / sin_theta)
    return (start_coef * start + end_coef * end).reshape(base.shape)


def model_stock(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
                thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Model Stock (Jang et al. 2024, arXiv:2403.19522): fine-tunes scatter around a centre that
    generalises better than any of them, and the angle between their task vectors says how far
    to move from the base toward their average: ratio ``K cos / (1 + (K - 1) cos)`` with ``cos``
    the mean pairwise cosine. Per tensor, or per row with ``filter_wise`` (mergekit's option);
    where the ratio is singular the base is kept, as in mergekit."""
    count = deltas.shape[0]
    if count < 2:
        raise MergeParamError(f"model_stock needs at least 2 experts to measure their angle, got {count}")
    if params.filter_wise and base.ndim >= 1:
        rows = deltas.reshape(count, -1, base.shape[-1])
    else:
        rows = deltas.reshape(count, 1, -1)
    norms = torch.linalg.vector_norm(rows, dim=-1)
    dots = torch.einsum("irm,jrm->ijr", rows, rows)
    cos = (dots / (norms[:, None] * norms[None, :]).clamp(min=1e-6)).clamp(-1, 1)
    pairs = torch.triu_indices(count, count, offset=1)
    mean_cos = cos[pairs[0], pairs[1]].mean(0)
    denominator = 1 + (count - 1) * mean_cos
    singular = denominator.abs() < 1e-6
    ratio = torch.where(singular, 0.0, count * mean_cos / torch.where(singular, 1.0, denominator))
    step = ratio[:, None] * rows.mean(0)
    return base + step.reshape(base.shape)


def magmax(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
           thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """MagMax (Marczak et al., ECCV 2024): per element, the expert that moved it most
    is the one that needed it, so take the delta of largest magnitude, scaled by ``lambda``.
    ``weight`` scales each expert's deltas before the choice (1 everywhere is the paper)."""
    weighted = deltas * _rows(_expert_floats(params, "weight", deltas.shape[0]), deltas)
    strongest = weighted.abs().argmax(dim=0, keepdim=True)
    return base + params.lambda_ * weighted.gather(0, strongest).squeeze(0)


def consensus(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
              thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model Merging
    and Compression", arXiv:2405.07813): an element that matters to fewer than ``k`` experts is
    either useless or selfish and only interferes, so drop it from the task-arithmetic sum.
    Expert i relies on an element when its TALL mask holds, ``|tau_i| >= lambda_tall *
    |tau_sum - tau_i|`` (tau are the weighted deltas). The paper tunes ``lambda_tall`` per task in
    [0.2, 0.6] on validation data; 0.4 is the middle of that grid, and k = 2 is the paper's."""
    weight = _rows(_expert_floats(params, "weight", deltas.shape[0]), deltas)
    weighted = deltas * weight
    total = weighted.sum(0)
    relies = weighted.abs() >= params.lambda_tall * (total - weighted).abs()
    mixed = total * (relies.sum(0) >= params.k)
    if _flag(params.normalize, "consensus", "normalize"):
        mixed = mixed / _weight_total(weight)
    return base + params.lambda_ * mixed


def lines(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
          thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """LiNeS (Wang et al. 2025, arXiv:2410.17146): shallow layers hold general features that a
    merge should disturb least, so the task-arithmetic sum is scaled by ``alpha + beta *
    layer_fraction``, growing linearly with depth (the paper's parametrisation: ``beta`` is the
    extra scale at the last block). ``alpha`` None is 1/K, the paper's choice for summed task
    vectors; ``beta`` is tuned on validation data in the paper and defaults to 0.5 here."""
    if params.layer_fraction is None:
        raise MergeParamError("lines scales by depth and needs layer_fraction "
                              "(0 for embeddings, 1 for the last block)")
    weight = _rows(_expert_floats(params, "weight", deltas.shape[0]), deltas)
    mixed = (deltas * weight).sum(0)
    if _flag(params.normalize, "lines", "normalize"):
        mixed = mixed / _weight_total(weight)
    alpha = 1 / deltas.shape[0] if params.alpha is None else params.alpha
    return base + (alpha + params.beta * params.layer_fraction) * mixed


def _need(generator: torch.Generator | None, method: str) -> torch.Generator:
    if generator is None:
        raise ValueError(f"{method} drops elements at random; pass a torch.Generator so merges reproduce")
    return generator


_SPARSE_GLOBALS = ("lambda", "normalize", "rescale")

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("linear", linear, ("weight",), ("normalize",), False, False,
               "weighted average of the experts", default_normalize=True),
    MethodSpec("task_arithmetic", task_arithmetic, ("weight",), ("lambda", "normalize"), False, True,
               "base plus lambda times the weighted sum of task vectors", default_normalize=False),
    MethodSpec("ties", ties, ("weight", "density"), _SPARSE_GLOBALS, False, True,
               "top-density magnitudes, sign election, disjoint mean",
               default_normalize=True, default_rescale=False),
    MethodSpec("dare_linear", dare_linear, ("weight", "density"), _SPARSE_GLOBALS, True, True,
               "random drop (keep probability density), rescale, weighted sum",
               default_normalize=False, default_rescale=True),
    MethodSpec("dare_ties", dare_ties, ("weight", "density"), _SPARSE_GLOBALS, True, True,
               "random drop, rescale, sign election", default_normalize=False, default_rescale=True),
    MethodSpec("breadcrumbs", breadcrumbs, ("weight", "density", "gamma"), _SPARSE_GLOBALS, False, True,
               "drop the top gamma and keep the next density by magnitude, weighted sum",
               default_normalize=False, default_rescale=False),
    MethodSpec("breadcrumbs_ties", breadcrumbs_ties, ("weight", "density", "gamma"), _SPARSE_GLOBALS, False, True,
               "breadcrumbs band, sign election", default_normalize=False, default_rescale=False),
    MethodSpec("della", della, ("weight", "density", "epsilon"), _SPARSE_GLOBALS, True, True,
               "magnitude-rank keep probabilities density +/- epsilon, rescale, sign election",
               default_normalize=True, default_rescale=True),
    MethodSpec("della_linear", della_linear, ("weight", "density", "epsilon"), _SPARSE_GLOBALS, True, True,
               "magnitude-rank keep probabilities, rescale, weighted sum",
               default_normalize=False, default_rescale=True),
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
                 generator: torch.Generator | None = None, thresholds: MagnitudeThresholds | None = None) -> Tensor:
    """Merge one tensor by ``method``: validate, compute in float32 for half-precision inputs, and
    return the merged tensor in the base's dtype. ``thresholds`` (for TIES and breadcrumbs) must
    describe these ``deltas``, e.g. :meth:`MagnitudeQuantiles.from_deltas` of them."""
    if deltas.ndim != base.ndim + 1 or deltas.shape[1:] != base.shape:
        raise ValueError(f"deltas have shape {list(deltas.shape)}; expected [K, {', '.join(map(str, base.shape))}]")
    if not (base.is_floating_point() and deltas.is_floating_point()):
        raise TypeError(f"merging needs floating-point tensors, got {base.dtype} and {deltas.dtype}")
    validate(method, params, experts=deltas.shape[0])
    spec = METHODS[method]
    if spec.randomized:
        _need(generator, method)
    if base.numel() == 0:
        return base.clone()
    work = torch.float32 if deltas.dtype in _HALF else deltas.dtype
    return spec.fn(base.to(work), deltas.to(work), params, generator, thresholds).to(base.dtype)
