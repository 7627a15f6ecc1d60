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
thresholds, so a precomputed :class:`MagnitudeQuantiles` table can replace the per-call sort;
DELLA's in-row magnitude ranks are likewise computed once per tensor (:class:`DeltaStats`).
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, Protocol, Union

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


class MagnitudeStats(Protocol):
    """What sparsifying reads of each expert's delta that no candidate changes, precomputed so a
    merge needs no sort: magnitude thresholds (TIES, breadcrumbs), in-row ranks (DELLA) and the
    L1 norms rescaling restores (so a rescaled merge reads the deltas twice, not three times)."""

    def magnitude_threshold(self, expert_index: int, keep_fraction: float) -> float:
        """Magnitude at or above which ``keep_fraction`` of the expert's delta elements lie."""
        ...

    def row_ranks(self) -> Tensor:
        """``[K, numel]`` integer rank of each element's magnitude within its row (0 smallest;
        rows as :func:`row_ranks` cuts them)."""
        ...

    def l1_norms(self) -> Tensor:
        """``[K]`` L1 norm of each expert's delta, summed in float64, in working precision."""
        ...

    def ranked_l1_norms(self) -> Tensor:
        """``[K]`` sum over each expert's delta of magnitude times in-row rank: with
        :meth:`l1_norms`, the L1 norm DELLA keeps in expectation for any density and epsilon."""
        ...


@dataclass(frozen=True, eq=False)
class MagnitudeQuantiles:
    """Sorted-magnitude table of each expert's delta, built once per tensor and reused.

    A search evaluates one tensor under many densities; sorting the magnitudes once and reading
    thresholds from the table turns each TIES or breadcrumbs call from a sort into a lookup.
    ``values[i, j]`` is the ``counts[j]``-th largest magnitude of expert ``i``. A query for a
    fraction ``f`` asks for the ``round(f * numel)``-th largest magnitude: exact when that count is
    in ``counts`` (all counts when ``numel <= resolution + 1``), linearly interpolated between the
    neighbouring counts otherwise. Tensors of more than ``sample`` elements (and more than the
    resolution resolves exactly) read their quantiles off a fixed random sample of ``sample``
    magnitudes per expert: a threshold's kept count is then off by about
    ``sqrt(f (1 - f) / sample)`` of the tensor (at most 0.14% at 2^17), the order of the
    interpolation's own error, while building a SmolLM2-135M table takes seconds, not a minute.
    """

    numel: int
    counts: tuple[int, ...]
    values: Tensor

    @classmethod
    def from_deltas(cls, deltas: Tensor, resolution: int = 1024, sample: int = 1 << 17) -> MagnitudeQuantiles:
        if resolution < 1:
            raise ValueError(f"resolution {resolution} must be at least 1")
        flat = deltas.reshape(deltas.shape[0], -1)
        numel = flat.shape[1]
        if numel <= resolution + 1:
            counts = list(range(1, numel + 1))
        else:
            counts = sorted({max(1, (j * numel + resolution // 2) // resolution) for j in range(resolution + 1)})
        wanted = torch.tensor(counts, dtype=torch.float64, device=flat.device)
        if numel > max(sample, resolution + 1):
            generator = torch.Generator(device=flat.device).manual_seed(0)
            flat = flat[:, torch.randint(numel, (sample,), generator=generator, device=flat.device)]
            wanted = (wanted * sample / numel).clamp(1, sample)  # a count's rank in the sample
        ordered = flat.abs().to(_work_dtype(flat.dtype)).sort(dim=1, descending=True).values
        position = wanted - 1
        low = position.floor().long()
        high = position.ceil().long()
        share = position - low
        values = ordered[:, low].double() * (1 - share) + ordered[:, high].double() * share
        return cls(numel, tuple(counts), values.to("cpu"))

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


def _weight_total(weight: Tensor) -> Tensor:
    """Sum of weights as a divisor, 1 where it vanishes (mergekit's guard against dividing by 0)."""
    total = weight.sum(0)
    return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)


# --- generalized task arithmetic ---------------------------------------------------------------

Sparsification = Literal["none", "magnitude", "band", "random", "rank"]
"""How each expert's delta is thinned before combining: kept whole, its top magnitudes (TIES), a
magnitude band below the outliers (breadcrumbs), a uniform random keep (DARE), or a random keep
whose probability rises with magnitude rank within each row (DELLA)."""

_SLAB_ELEMENTS = 1 << 18
"""Elements of the ``[K, columns]`` slab an eager kernel merges at a time: 1 MiB in float32, so
its passes run on cached data."""


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


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision a merge computes in: float32 for half-precision inputs, which lose too much."""
    return torch.float32 if dtype in _HALF else dtype


def _kth_largest(deltas: Tensor, counts: Sequence[int], stats: MagnitudeStats | None) -> list[float]:
    """Per expert, the ``counts[i]``-th largest magnitude in working precision: inf keeps nothing,
    0 keeps everything; from ``stats`` when given, else by selection."""
    work = _work_dtype(deltas.dtype)
    numel = deltas[0].numel()
    values = []
    for i, count in enumerate(counts):
        if count <= 0:
            values.append(math.inf)
        elif count >= numel:
            values.append(0.0)
        elif stats is not None:
            values.append(float(torch.tensor(stats.magnitude_threshold(i, count / numel), dtype=work)))
        else:
            values.append(float(torch.kthvalue(deltas[i].reshape(-1).to(work).abs(), numel - count + 1).values))
    return values


def _magnitude_cuts(deltas: Tensor, counts: Sequence[int], stats: MagnitudeStats | None) -> Tensor:
    """``[K, 1]`` cuts in working precision: an element is at or above its expert's cut when its
    magnitude is among the ``counts[i]`` largest."""
    values = _kth_largest(deltas, counts, stats)
    return torch.tensor(values, dtype=_work_dtype(deltas.dtype), device=deltas.device)[:, None]


_DRAW_BITS = 16
_DRAW_STEPS = float(1 << _DRAW_BITS)
"""A draw is ``m * 2^-16`` for an integer ``m`` in [0, 2^16), so ``draw < p`` is exactly
``m < ceil(p * 2^16)``: DARE's kernel compares integers instead of converting every draw. A keep
probability thus acts in steps of 1.5e-5, far below anything a density search resolves."""
_WEYL = -1640531535  # 0x9E3779B1 as a signed 32-bit integer
_MIX = 0x45D9F3B
_INT32_SPAN = 1 << 31


def _mix32(h: Tensor) -> Tensor:
    """A 32-bit integer finalizer (two multiply-xorshift rounds) on int32 lanes: multiplies wrap
    as unsigned ones do, and masking makes the arithmetic right shifts logical. int32 rather
    than int64 lanes: a vector op covers twice the elements, and int64 multiplies are the
    slowest vector integer op on CPUs (DARE's kernel: 15% faster on the embedding)."""
    h = (((h >> 16) & 0xFFFF) ^ h) * _MIX
    h = (((h >> 16) & 0xFFFF) ^ h) * _MIX
    return ((h >> 16) & 0xFFFF) ^ h


def _wrap32(value: int) -> int:
    """``value`` modulo 2^32 as a signed 32-bit integer."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= _INT32_SPAN else value


def _draw_keys(seed: int, count: int, numel: int, device: torch.device | str) -> Tensor:
    """``[ceil(count / 2)]`` int32 keys for a ``[count, numel]`` stack drawn from ``seed``: one
    32-bit hash of ``(seed, pair * numel + position)`` yields 16-bit draws for two experts (its
    high half for the even one, its low half for the odd one), so a merge of K experts hashes
    K/2 times per element. Key ``pair`` folds the pair's offset in, so a kernel adds it to
    ``position * 0x9E3779B1`` computed once for all pairs."""
    keys = [_wrap32(seed + pair * numel * _WEYL) for pair in range((count + 1) // 2)]
    return torch.tensor(keys, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class _Grid:
    """Element positions of a tensor seen as ``[rows, width]``, spread by the Weyl step as the
    draws hash them: ``row * row_step + columns[column]`` (int32, wrapping). A kernel builds a
    position from its row (a scalar per row) and a loaded ``[width]`` vector: compiled CPU code
    assembles an ``arange`` vector lane by lane, which cost more than the hash (DARE's norms
    loop ran at 2.7x a plain read with it, at a plain read's speed without)."""

    columns: Tensor
    row_step: Tensor

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, width: int, device: torch.device | str) -> _Grid:
        """The grid of rows ``width`` long, cached: a model has a handful of widths."""
        columns = torch.arange(width, dtype=torch.int64, device=device) * (_WEYL & 0xFFFFFFFF) & 0xFFFFFFFF
        columns = torch.where(columns >= _INT32_SPAN, columns - 2 * _INT32_SPAN, columns).to(torch.int32)
        return cls(columns, torch.tensor(_wrap32(width * _WEYL), dtype=torch.int32, device=device))


def _spread(grid_columns: Tensor, row_step: Tensor, first_row: int, rows: int) -> Tensor:
    """``[rows, width]`` spread positions of rows ``first_row ..`` (see :class:`_Grid`)."""
    row = torch.arange(first_row, first_row + rows, dtype=torch.int32, device=grid_columns.device)
    return (row * row_step)[:, None] + grid_columns


def _draws(keys: Tensor, count: int, spread: Tensor) -> list[Tensor]:
    """Each expert's integer draws at the ``spread`` positions: a counter-based generator, so
    the draws are fused into the merge kernel instead of streamed from a sequential one (which
    took longer than the merge), depend only on each element's position (slabs and devices
    cannot change them), and still reproduce exactly from the seed."""
    draws = []
    for pair in range((count + 1) // 2):
        h = _mix32(spread + keys[pair])
        draws += [(h >> 16) & 0xFFFF, h & 0xFFFF]
    return draws[:count]


def draw_uniforms(seed: int, rows: int, numel: int, device: str | torch.device = "cpu") -> Tensor:
    """The ``[rows, numel]`` uniforms in [0, 1) a randomized method draws for a stack of ``rows``
    task vectors of ``numel`` elements from key ``seed``, so tests and users can replay a mask."""
    keys = _draw_keys(seed, rows, numel, device)
    grid = _Grid.of(numel, device)
    spread = _spread(grid.columns, grid.row_step, 0, 1)[0]
    return torch.stack(_draws(keys, rows, spread)).to(torch.float32) / _DRAW_STEPS


@dataclass(frozen=True)
class _KeepRule:
    """Which elements of each expert's delta survive sparsification, as tensors a kernel reads:
    magnitude cuts ``low``/``high`` (``[K, 1]``) for TIES and breadcrumbs; draw ``keys`` (see
    :func:`_draw_keys`) for DARE and DELLA, with, in units of draws, DARE's integer ``cut``
    ``ceil(density * 2^16)`` or DELLA's keep-probability ramp ``cut + slope * rank`` over the
    in-row ``ranks`` (``[K, rows, width]``), both ``[K, 1, 1]``, and the positions' ``grid``."""

    kind: Sparsification
    low: Tensor | None = None
    high: Tensor | None = None
    cut: Tensor | None = None
    slope: Tensor | None = None
    keys: Tensor | None = None
    ranks: Tensor | None = None
    grid: _Grid | None = None

    def slab(self, rows: slice) -> Tensor | None:
        """The ranks a slab's kernel reads (None unless DELLA)."""
        return None if self.ranks is None else self.ranks[:, rows]

    def grid_tensors(self) -> tuple[Tensor | None, Tensor | None]:
        return (None, None) if self.grid is None else (self.grid.columns, self.grid.row_step)


def _keep_rule(variant: TaskArithmeticVariant, deltas: Tensor, params: MergeParams,
               generator: torch.Generator | None, stats: MagnitudeStats | None) -> _KeepRule:
    count, kind = deltas.shape[0], variant.sparsification
    if kind == "none":
        return _KeepRule(kind)
    density = _expert_floats(params, "density", count)
    numel = deltas[0].numel()
    if kind == "magnitude":
        # mergekit keeps int(density * n) elements but at least one whenever density > 0.
        counts = [numel if d >= 1 else 0 if d <= 0 else max(1, int(d * numel)) for d in density]
        return _KeepRule(kind, low=_magnitude_cuts(deltas, counts, stats)[:, :, None])
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
        return _KeepRule(kind, low=_magnitude_cuts(deltas, kept_through, stats)[:, :, None],
                         high=_magnitude_cuts(deltas, dropped_top, stats)[:, :, None])
    generator = _need(generator, f"{kind} sparsification")
    seed = int(torch.randint(0, 1 << 32, (), generator=generator, device=generator.device))
    keys = _draw_keys(seed, count, numel, deltas.device)
    width = _rank_width(deltas)
    grid = _Grid.of(width, deltas.device)
    column = lambda values: torch.tensor(values, dtype=torch.float64, device=deltas.device)[:, None, None]  # noqa: E731
    if kind == "random":
        cut = torch.ceil(column(density) * _DRAW_STEPS).clamp(0, _DRAW_STEPS).to(torch.int32)
        return _KeepRule(kind, cut=cut, keys=keys, grid=grid)
    # DELLA keeps where draw < density - epsilon + 2 * epsilon * rank / (width - 1); all where
    # the density reaches 1, none where it is 0.
    intercepts, slopes = [], []
    for d, e in zip(density, _expert_floats(params, "epsilon", count)):
        if d >= 1 or d <= 0:
            intercepts.append(math.inf if d >= 1 else -math.inf)
            slopes.append(0.0)
        else:
            intercepts.append((d - e) * _DRAW_STEPS)
            slopes.append(2 * e * _DRAW_STEPS / max(width - 1, 1))
    ranks = stats.row_ranks() if stats is not None else row_ranks(deltas)
    return _KeepRule(kind, cut=column(intercepts).float(), slope=column(slopes).float(), keys=keys,
                     ranks=ranks.view(count, -1, width), grid=grid)


def _rank_width(deltas: Tensor) -> int:
    """Width of the rows DELLA ranks within: the base's rows, or the whole of a 1-D tensor."""
    return deltas[0].numel() // (deltas.shape[1] if deltas.ndim > 2 else 1)


_RANK_ROWS_ELEMENTS = 1 << 22
"""Elements argsorted at a time while ranking, bounding the int64 temporaries."""


_EXACT_HALF_INTEGERS = 2048
"""float16 holds every integer up to here exactly."""


def row_ranks(deltas: Tensor) -> Tensor:
    """``[K, numel]`` rank of each element's magnitude within its row (0 smallest): DELLA's keep
    probability is a function of it. Stored as float16 where rows are at most 2048 wide (the
    ranks are then exact integers, at 2 bytes each), else as int32: compiled CPU kernels load
    int16 an element at a time, 10x slower than float16. A stable sort breaks ties by position,
    as mergekit's does."""
    count = deltas.shape[0]
    width = _rank_width(deltas)
    rows = deltas.reshape(-1, width)
    dtype = torch.float16 if width <= _EXACT_HALF_INTEGERS else torch.int32
    ranks = torch.empty(rows.shape, dtype=dtype, device=deltas.device)
    step = max(1, _RANK_ROWS_ELEMENTS // width)
    for start in range(0, rows.shape[0], step):
        chunk = rows[start:start + step]
        order = chunk.abs().argsort(dim=-1, stable=True)
        positions = torch.arange(width, dtype=dtype, device=deltas.device).expand(chunk.shape)
        ranks[start:start + step].scatter_(-1, order, positions)
    return ranks.view(count, -1)


@dataclass(eq=False)
class DeltaStats:
    """:class:`MagnitudeStats` of one tensor's stacked deltas, each computed on first use and kept:
    a search merges one tensor under many parameters, and neither the quantile table (TIES,
    breadcrumbs) nor DELLA's in-row ranks depend on them. The ranks cost 2 bytes per delta element
    (a quarter of an fp32 stack; 4 for rows over 2048 wide), so they exist only for tensors DELLA
    has merged."""

    deltas: Tensor
    resolution: int = 1024
    _quantiles: MagnitudeQuantiles | None = None
    _ranks: Tensor | None = None
    _norms: Tensor | None = None
    _ranked_norms: Tensor | None = None

    def magnitude_threshold(self, expert_index: int, keep_fraction: float) -> float:
        if self._quantiles is None:
            self._quantiles = MagnitudeQuantiles.from_deltas(self.deltas, resolution=self.resolution)
        return self._quantiles.magnitude_threshold(expert_index, keep_fraction)

    def row_ranks(self) -> Tensor:
        if self._ranks is None:
            self._ranks = row_ranks(self.deltas)
        return self._ranks

    def l1_norms(self) -> Tensor:
        if self._norms is None:
            self._norms = l1_norms(self.deltas)
        return self._norms

    def ranked_l1_norms(self) -> Tensor:
        if self._ranked_norms is None:
            self._ranked_norms = ranked_l1_norms(self.deltas, self.row_ranks())
        return self._ranked_norms


def l1_norms(deltas: Tensor) -> Tensor:
    """``[K]`` L1 norms of stacked deltas (see :meth:`MagnitudeStats.l1_norms`)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    return flat.abs().sum(1, dtype=torch.float64).to(_work_dtype(deltas.dtype))


def ranked_l1_norms(deltas: Tensor, ranks: Tensor) -> Tensor:
    """``[K]`` sums of magnitude times in-row rank (see :meth:`MagnitudeStats.ranked_l1_norms`),
    a row block at a time so no ``[K, numel]`` float64 temporary is made."""
    flat, ranks = deltas.reshape(deltas.shape[0], -1), ranks.reshape(deltas.shape[0], -1)
    total = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], _RANK_ROWS_ELEMENTS):
        block = slice(start, start + _RANK_ROWS_ELEMENTS)
        total += (flat[:, block].abs().double() * ranks[:, block].double()).sum(1)
    return total.to(_work_dtype(deltas.dtype))


def _kept(x: Tensor, k: int, kind: str, low: Tensor | None, high: Tensor | None, cut: Tensor | None,
          slope: Tensor | None, ranks: Tensor | None, draws: list[Tensor] | None) -> Tensor:
    """Expert ``k``'s slab of deltas (``x``) with the dropped elements zeroed; magnitudes at a cut
    count as above it."""
    if kind == "none":
        return x
    if kind in ("magnitude", "band"):
        magnitude = x.abs()
        keep = magnitude >= low[k]
        if kind == "band":
            keep = keep & (magnitude < high[k])
        return torch.where(keep, x, 0.0)
    if kind == "random":
        return torch.where(draws[k] < cut[k], x, 0.0)
    return torch.where(draws[k].to(torch.float32) < cut[k] + slope[k] * ranks[k].to(torch.float32), x, 0.0)


# The kernels below loop over the K experts in Python instead of reducing over a K axis: traced by
# torch.compile, the loop unrolls into one element-wise pass that reads each input once, where a
# reduction over the outer axis compiled into several passes (TIES: 9x slower on the embedding).


def _slab_draws(keys: Tensor | None, count: int, columns: Tensor | None, row_step: Tensor | None,
                first_row: int, rows: int) -> list[Tensor] | None:
    return None if keys is None else _draws(keys, count, _spread(columns, row_step, first_row, rows))


def _norms_slab(x: Tensor, low: Tensor | None, high: Tensor | None, cut: Tensor | None, slope: Tensor | None,
                ranks: Tensor | None, keys: Tensor | None, columns: Tensor | None, row_step: Tensor | None,
                first_row: int, kind: str) -> Tensor:
    """``[K]`` L1 norm of each expert's slab (``[K, rows, width]``, from row ``first_row``) after
    sparsifying, for rescale."""
    count = x.shape[0]
    draws = _slab_draws(keys, count, columns, row_step, first_row, x.shape[1])
    kept = [_kept(x[k].to(_work_dtype(x.dtype)), k, kind, low, high, cut, slope, ranks, draws) for k in range(count)]
    return torch.stack([row.abs().sum() for row in kept])


def _merge_slab(x: Tensor, base: Tensor, low: Tensor | None, high: Tensor | None, cut: Tensor | None,
                slope: Tensor | None, ranks: Tensor | None, keys: Tensor | None, columns: Tensor | None,
                row_step: Tensor | None, first_row: int, coefficient: Tensor, weight: Tensor, lam: Tensor,
                out: Tensor, kind: str, elect: bool, normalize: bool) -> None:
    """One slab of the generalized task-arithmetic merge, written into ``out``: sparsify, weight,
    combine (with TIES' sign election: keep the weighted deltas whose sign agrees with their sum's,
    +1 where the sum is 0, and with ``normalize`` divide by the weight that agreed, 1 where none
    did), scale by ``lam`` and add the base. One pass when compiled."""
    dtype = coefficient.dtype
    count = x.shape[0]
    draws = _slab_draws(keys, count, columns, row_step, first_row, x.shape[1])
    rows = [_kept(x[k].to(dtype), k, kind, low, high, cut, slope, ranks, draws) * coefficient[k]
            for k in range(count)]
    mixed = _sum(rows)
    if elect:
        positive = mixed >= 0
        agreeing = [torch.where(positive, row > 0, row < 0) for row in rows]
        mixed = _sum([torch.where(agrees, row, 0.0) for agrees, row in zip(agreeing, rows)])
        if normalize:
            contributed = _sum([torch.where(agrees, weight[k], 0.0) for k, agrees in enumerate(agreeing)])
            mixed = mixed / torch.where(contributed == 0, 1.0, contributed)
    out.copy_(base.to(dtype) + lam * mixed)


def _sum(rows: list[Tensor]) -> Tensor:
    total = rows[0]
    for row in rows[1:]:
        total = total + row
    return total


_COMPILE_MIN_ELEMENTS = 1 << 16
"""Tensors this large run the slab kernels compiled (one fused loop instead of a dozen eager
passes: 10-20x on CPU); smaller ones, like the test models', are not worth a compile."""
_INDUCTOR_OPTIONS = {"realize_cpu_opcount_threshold": 1000, "realize_reads_threshold": 100}
"""Keep recomputing each expert's sparsified row inside the one loop rather than storing it:
by default inductor stores an expression above 30 ops that is read more than once (DELLA's
rows: the election reads them twice), which split its merge into two loops through three
temporaries (3.6x slower on the embedding)."""
_KERNEL_VARIANTS = 128
"""Compiled graphs dynamo may keep per kernel function. Each static choice a kernel is called
with (sparsification, sign election, normalize, rescale or not), and each shape class (many
rows, or the one row of a 1-D tensor, which dynamo specializes), is one graph of the same code
object, and a search that lets the method vary meets more than dynamo's default of 8: past it,
dynamo ran the kernel eagerly on the whole tensor (DELLA and breadcrumbs-TIES 5-12 s per
candidate instead of 0.2-0.3 s)."""
_compiled: dict[str, Callable] = {}
_compile_failed: list[str] = []
_compile_every_tensor = False


@contextlib.contextmanager
def compiling_every_tensor(enabled: bool = True):
    """Within it, small tensors run the compiled kernels too. For a model whose large tensors
    compile them anyway, its small ones (the norms' 1-D weights: 61 of 272 tensors in
    SmolLM2-135M) then cost one compiled call (~0.05 ms) instead of a dozen eager ops each
    (~0.5 ms); the Merger enters it for such models, while a model of only small tensors (the
    tests') never pays a compile."""
    global _compile_every_tensor
    previous, _compile_every_tensor = _compile_every_tensor, enabled
    try:
        yield
    finally:
        _compile_every_tensor = previous


def compiles(numel: int) -> bool:
    """Whether a kernel over ``numel`` elements runs compiled."""
    return not _compile_failed and (numel >= _COMPILE_MIN_ELEMENTS or (_compile_every_tensor and numel > 0))


def _kernel(fn: Callable, numel: int) -> Callable:
    """``fn`` compiled with torch.compile for a large tensor, else as is. Where compiling fails
    (no C++ compiler, no triton), it warns once and every merge runs eagerly: same numbers, slower."""
    if not compiles(numel):
        return fn
    if fn.__name__ not in _compiled:
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, _KERNEL_VARIANTS)
        _compiled[fn.__name__] = torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS)
    compiled = _compiled[fn.__name__]

    def run(*args, **kwargs):
        try:
            return compiled(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - any backend failure falls back to eager
            if _compile_failed:
                raise
            _compile_failed.append(f"{type(error).__name__}: {error}".splitlines()[0])
            warnings.warn(f"torch.compile failed ({_compile_failed[0]}); merging eagerly", stacklevel=2)
            return fn(*args, **kwargs)

    return run


def _kernel_slabs(count: int, rows: int, width: int = 1) -> list[slice]:
    """Row ranges a kernel over a ``[count, rows, width]`` stack runs on: the whole tensor in one
    call when compiled (the loop is fused, and each call costs ~0.1 ms to dispatch: more than the
    merge over 1000+ slabs), slabs of about :data:`_SLAB_ELEMENTS` when eager, so temporaries
    stay in cache."""
    step = rows if compiles(count * rows * width) else max(1, _SLAB_ELEMENTS // (count * width))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


_COMBINE_COLUMNS = 1 << 20
"""Columns per matrix-vector product in :func:`combine`: bounds the temporary a lower-precision
stack is upcast into (K x 1M elements) while staying large enough to run at memory bandwidth."""


def combine(base: Tensor, stack: Tensor, scale: float, coefficients: Sequence[float], out: Tensor) -> Tensor:
    """``out = scale * base + sum_k coefficients[k] * stack[k]`` for a flat ``base`` and a
    ``[K, numel]`` ``stack`` (any float dtype: it is upcast a chunk at a time). Task arithmetic
    and linear merges with their parameters folded into ``scale`` and ``coefficients``: BLAS's
    matrix-vector product runs at memory bandwidth with no compile and no per-call overhead."""
    work = _work_dtype(base.dtype)
    vector = torch.tensor(coefficients, dtype=work, device=base.device)
    numel = base.numel()
    for start in range(0, numel, _COMBINE_COLUMNS):
        end = min(start + _COMBINE_COLUMNS, numel)
        matrix = stack[:, start:end].to(work).t()
        if out.dtype == work and base.dtype == work:
            torch.addmv(base[start:end], matrix, vector, beta=scale, out=out[start:end])
        else:
            out[start:end].copy_(torch.addmv(base[start:end].to(work), matrix, vector, beta=scale))
    return out


def generalized_task_arithmetic(variant: TaskArithmeticVariant, base: Tensor, deltas: Tensor, params: MergeParams,
                                generator: torch.Generator | None = None,
                                stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """mergekit's generalized task arithmetic for any :class:`TaskArithmeticVariant`: sparsify each
    expert's delta, optionally rescale it to its original L1 norm, weight, combine (with or
    without sign election), optionally divide by the weight that contributed, scale by lambda.

    One kernel call upcasts, sparsifies, combines and writes the merged tensor in the base's
    dtype into ``out`` (the base's shape) when given (:func:`_merge_whole`): compiled for large
    tensors, eager for small ones. Rescaling multiplies each expert's weight by its norm ratio:
    for the random rules, the expected kept norm comes from precomputed sums
    (:func:`_expected_kept_norms`); for the magnitude rules, a first loop of that kernel measures
    it by sparsifying without writing anything, and the merge loop sparsifies again, which costs
    less than storing the kept deltas and reading them back because every keep rule is a pure
    function of an element's value and position. Only where
    compiling failed do large tensors run eagerly, slab by slab of columns, to bound the
    temporaries. Random variants draw one counter-based uniform per element of ``deltas``
    (:func:`draw_uniforms` replays them) from a seed taken from ``generator``; DELLA reads in-row
    ranks from ``stats`` (or ranks the tensor here without it).
    """
    count = deltas.shape[0]
    work = _work_dtype(deltas.dtype)
    width = _rank_width(deltas)
    grid = deltas.reshape(count, -1, width)
    base_grid = base.reshape(-1, width)
    rule = _keep_rule(variant, deltas, params, generator, stats)
    columns, row_step = rule.grid_tensors()
    weight = torch.tensor(_expert_floats(params, "weight", count), dtype=work, device=base.device)[:, None, None]
    lam = torch.tensor(params.lambda_, dtype=work, device=base.device)
    rescale = variant.default_rescale is not None and _option(params.rescale, variant.default_rescale)
    divide = _option(params.normalize, variant.default_normalize)
    merged = torch.empty(base.shape, dtype=base.dtype, device=base.device) if out is None else out
    merged_grid = merged.view(-1, width)
    options = dict(kind=rule.kind, elect=variant.elect_sign, normalize=divide)
    before = ranked = None
    if rescale:
        before = stats.l1_norms() if stats is not None else l1_norms(deltas)
        if rule.kind == "rank":
            ranked = stats.ranked_l1_norms() if stats is not None else ranked_l1_norms(deltas, rule.ranks)
    slabs = _kernel_slabs(count, grid.shape[1], width)
    if len(slabs) == 1:
        _kernel(_merge_whole, grid.numel())(grid, base_grid, rule.low, rule.high, rule.cut, rule.slope, rule.ranks,
                                             rule.keys, columns, row_step, before, ranked, weight, lam, merged_grid,
                                             **options)
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


def _expected_kept_norms(kind: str, cut: Tensor | None, slope: Tensor | None, before: Tensor,
                         ranked: Tensor | None) -> Tensor | None:
    """``[K]`` L1 norm a random keep rule leaves each expert in expectation, from the deltas' L1
    norms (``before``) and, for DELLA, their rank-weighted ones (``ranked``): an element of
    magnitude m survives DARE's draw with probability ``cut / 2^16`` and DELLA's with
    ``(cut + slope * rank) / 2^16``. None for the deterministic rules, whose kept norm a pass
    over the deltas measures. Rescaling to the expected norm rather than the realized one (as
    mergekit does) spares that pass, half of a DARE or DELLA merge's reads and hashes; the two
    differ by about ``1 / sqrt(kept elements)`` (0.1% on a 576 x 1536 matrix at density 0.5),
    the random mask's own noise, and the expected one is the rescale DARE's paper defines."""
    if kind == "random":
        return before * (cut.reshape(-1).to(before.dtype) / _DRAW_STEPS)
    if kind != "rank":
        return None
    intercept, slope = cut.reshape(-1).to(before.dtype), slope.reshape(-1).to(before.dtype)
    expected = (intercept * before + slope * ranked) / _DRAW_STEPS
    return torch.where(intercept == math.inf, before, torch.where(intercept == -math.inf, 0.0, expected))


def _rescale_ratio(before: Tensor, after: Tensor) -> Tensor:
    """mergekit's rescale: original L1 norm over kept L1 norm, 1 where either is below 1e-7."""
    usable = (before >= _NORM_EPS) & (after >= _NORM_EPS)
    return torch.where(usable, before / torch.where(usable, after, torch.ones_like(after)), 1.0)


def _normalized(coefficient: Tensor, weight: Tensor, divide: bool) -> Tensor:
    """Without sign election, normalize divides by the total weight up front."""
    return coefficient / _weight_total(weight) if divide else coefficient


def _merge_whole(x: Tensor, base: Tensor, low: Tensor | None, high: Tensor | None, cut: Tensor | None,
                 slope: Tensor | None, ranks: Tensor | None, keys: Tensor | None, columns: Tensor | None,
                 row_step: Tensor | None, before: Tensor | None, ranked: Tensor | None, weight: Tensor, lam: Tensor,
                 out: Tensor, kind: str, elect: bool, normalize: bool) -> Tensor:
    """Generalized task arithmetic of a whole tensor in one call: with ``before`` (the deltas'
    L1 norms) it rescales, to the expected kept norms for the random rules (from ``ranked`` for
    DELLA), else measuring the kept norms in a first loop; then the coefficients and
    the merge loop. One call instead of one per loop and a few eager ops on the norms in
    between: each compiled call costs ~0.1 ms to dispatch, and a merge of the zoo's model makes
    one per large tensor (211). Returning the coefficients makes inductor store them once
    instead of recomputing the norm ratios (three scalar divisions) in every vector step of the
    merge loop."""
    coefficient = weight
    if before is not None:
        after = _expected_kept_norms(kind, cut, slope, before, ranked)
        if after is None:
            after = _norms_slab(x, low, high, cut, slope, ranks, keys, columns, row_step, 0, kind=kind)
        coefficient = weight * _rescale_ratio(before, after)[:, None, None]
    coefficient = _normalized(coefficient, weight, normalize and not elect)
    _merge_slab(x, base, low, high, cut, slope, ranks, keys, columns, row_step, 0, coefficient, weight, lam, out,
                kind=kind, elect=elect, normalize=normalize)
    return coefficient


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
    work = _work_dtype(base.dtype)
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
    work = _work_dtype(base.dtype)
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


def _magmax_slab(x: Tensor, base: Tensor, weight: Tensor, lam: Tensor, out: Tensor) -> None:
    strongest = x[0].to(weight.dtype) * weight[0]
    for k in range(1, x.shape[0]):  # the first expert wins a tie, as argmax picks
        row = x[k].to(weight.dtype) * weight[k]
        strongest = torch.where(row.abs() > strongest.abs(), row, strongest)
    out.copy_(base.to(weight.dtype) + lam * strongest)


def magmax(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
           stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """MagMax (Marczak et al., ECCV 2024): per element, the expert that moved it most
    is the one that needed it, so take the delta of largest magnitude, scaled by ``lambda``.
    ``weight`` scales each expert's deltas before the choice (1 everywhere is the paper)."""
    work = _work_dtype(base.dtype)
    weight = torch.tensor(_expert_floats(params, "weight", deltas.shape[0]), dtype=work, device=base.device)
    lam = torch.tensor(params.lambda_, dtype=work, device=base.device)
    return _elementwise(_magmax_slab, base, deltas, out, weight[:, None], lam)


def _consensus_slab(x: Tensor, base: Tensor, weight: Tensor, lam: Tensor, lambda_tall: Tensor, k: Tensor,
                    divisor: Tensor, out: Tensor) -> None:
    rows = [x[i].to(weight.dtype) * weight[i] for i in range(x.shape[0])]
    total = _sum(rows)
    relying = _sum([(row.abs() >= lambda_tall * (total - row).abs()).to(weight.dtype) for row in rows])
    mixed = torch.where(relying >= k, total, 0.0)
    out.copy_(base.to(weight.dtype) + lam * (mixed / divisor))


def consensus(base: Tensor, deltas: Tensor, params: MergeParams, generator: torch.Generator | None = None,
              stats: MagnitudeStats | None = None, *, out: Tensor | None = None) -> Tensor:
    """Consensus merging (Wang et al. 2024, "Localizing Task Information for Improved Model Merging
    and Compression", arXiv:2405.07813): an element that matters to fewer than ``k`` experts is
    either useless or selfish and only interferes, so drop it from the task-arithmetic sum.
    Expert i relies on an element when its TALL mask holds, ``|tau_i| >= lambda_tall *
    |tau_sum - tau_i|`` (tau are the weighted deltas). The paper tunes ``lambda_tall`` per task in
    [0.2, 0.6] on validation data; 0.4 is the middle of that grid, and k = 2 is the paper's."""
    work = _work_dtype(base.dtype)
    weight = torch.tensor(_expert_floats(params, "weight", deltas.shape[0]), dtype=work, device=base.device)
    divisor = _weight_total(weight) if _flag(params.normalize, "consensus", "normalize") else torch.ones((), dtype=work)
    scalar = lambda value: torch.tensor(value, dtype=work, device=base.device)  # noqa: E731
    return _elementwise(_consensus_slab, base, deltas, out, weight[:, None], scalar(params.lambda_),
                        scalar(params.lambda_tall), scalar(params.k), divisor.to(base.device))


def _elementwise(kernel: Callable, base: Tensor, deltas: Tensor, out: Tensor | None, *args: Tensor) -> Tensor:
    """Run an element-wise ``kernel(x, base, *args, out)`` over the tensor: compiled over the whole
    tensor when it is large, slab by slab of columns otherwise."""
    merged = _output(base, out)
    stack, flat, target = _stack(deltas), base.reshape(-1), merged.view(-1)
    run = _kernel(kernel, stack.numel())
    for slab in _kernel_slabs(len(stack), flat.numel()):
        run(stack[:, slab], flat[slab], *args, target[slab])
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
