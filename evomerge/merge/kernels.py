"""Merge kernels: the element-wise loops the methods' arithmetic runs in, and when they run compiled.

A candidate's merge is a few passes over every delta, so these loops set a search's speed. Each
kernel reads its inputs once per pass: compiled by torch.compile for large tensors (one fused
loop instead of a dozen eager passes: 10-20x on CPU), eager slab by slab for small ones and
wherever compiling fails. What a kernel is told arrives as typed values (:class:`KeepRule`,
:class:`Combination`) that keep their static choices (the sparsification, sign election,
normalize, rescale or not) as Python values: dynamo specializes a graph on each, as it did on
the keyword arguments they replace, and never on the numbers that change per candidate, which
are tensors.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from evomerge.merge.draws import DRAW_STEPS, Grid, integer_draws
from evomerge.merge.quantized import unpack
from evomerge.merge.registry import Sparsification

_HALF = (torch.float16, torch.bfloat16)
_NORM_EPS = 1e-7  # below this L1 norm a rescale would only amplify rounding noise (mergekit's value)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision a merge computes in: float32 for half-precision inputs, which lose too much."""
    return torch.float32 if dtype in _HALF else dtype


def merged_output(base: Tensor, out: Tensor | None) -> Tensor:
    """Where a method writes its merged tensor: ``out`` when the caller gives one (the resident
    model's weight, merged in place), else a new tensor like ``base``. One rule for every method."""
    return torch.empty(base.shape, dtype=base.dtype, device=base.device) if out is None else out


def weight_total(weight: Tensor) -> Tensor:
    """Sum of weights as a divisor, 1 where it vanishes (mergekit's guard against dividing by 0)."""
    total = weight.sum(0)
    return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)


# --- compilation ---------------------------------------------------------------------------------

_COMPILE_MIN_ELEMENTS = 1 << 16
"""Tensors this large run the slab kernels compiled (one fused loop instead of a dozen eager
passes: 10-20x on CPU); smaller ones, like the test models', are not worth a compile."""
_SLAB_ELEMENTS = 1 << 18
"""Elements of the ``[K, columns]`` slab an eager kernel merges at a time: 1 MiB in float32, so
its passes run on cached data."""
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


@dataclass
class Compilation:
    """The process's torch.compile state for the merge kernels, in one owner: the compiled
    kernels by name (compiling costs seconds, so each is compiled once per process), the first
    compile failure (after which every merge runs eagerly: same numbers, slower), and whether
    small tensors run compiled too (see :meth:`compiling_every_tensor`)."""

    compiled: dict[str, Callable] = field(default_factory=dict)
    failure: str | None = None
    every_tensor: bool = False

    @contextlib.contextmanager
    def compiling_every_tensor(self, enabled: bool = True) -> Iterator[None]:
        """Within it, small tensors run the compiled kernels too. For a model whose large tensors
        compile them anyway, its small ones (the norms' 1-D weights: 61 of 272 tensors in
        SmolLM2-135M) then cost one compiled call (~0.05 ms) instead of a dozen eager ops each
        (~0.5 ms); the Merger enters it for such models, while a model of only small tensors (the
        tests') never pays a compile."""
        previous, self.every_tensor = self.every_tensor, enabled
        try:
            yield
        finally:
            self.every_tensor = previous

    def compiles(self, numel: int) -> bool:
        """Whether a kernel over ``numel`` elements runs compiled."""
        return self.failure is None and (numel >= _COMPILE_MIN_ELEMENTS or (self.every_tensor and numel > 0))

    def kernel(self, fn: Callable, numel: int) -> Callable:
        """``fn`` compiled with torch.compile for a large tensor, else as is. Where compiling fails
        (no C++ compiler, no triton), it warns once and every merge runs eagerly."""
        if not self.compiles(numel):
            return fn
        if fn.__name__ not in self.compiled:
            config = torch._dynamo.config
            config.recompile_limit = max(config.recompile_limit, _KERNEL_VARIANTS)
            self.compiled[fn.__name__] = torch.compile(fn, dynamic=True, options=_INDUCTOR_OPTIONS)
        compiled = self.compiled[fn.__name__]

        def run(*args, **kwargs):
            try:
                return compiled(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - any backend failure falls back to eager
                if self.failure is not None:
                    raise
                self.failure = f"{type(error).__name__}: {error}".splitlines()[0]
                warnings.warn(f"torch.compile failed ({self.failure}); merging eagerly", stacklevel=2)
                return fn(*args, **kwargs)

        return run

    def slabs(self, count: int, rows: int, width: int = 1) -> list[slice]:
        """Row ranges a kernel over a ``[count, rows, width]`` stack runs on: the whole tensor in
        one call when compiled (the loop is fused, and each call costs ~0.1 ms to dispatch: more
        than the merge over 1000+ slabs), slabs of about :data:`_SLAB_ELEMENTS` when eager, so
        temporaries stay in cache."""
        step = rows if self.compiles(count * rows * width) else max(1, _SLAB_ELEMENTS // (count * width))
        return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


COMPILATION = Compilation()
"""The one compilation state: compiled kernels are per process, as dynamo's caches are."""
compiling_every_tensor = COMPILATION.compiling_every_tensor
compiles = COMPILATION.compiles


# --- linear combination --------------------------------------------------------------------------

_COMBINE_COLUMNS = 1 << 20
"""Columns per matrix-vector product in :func:`combine`: bounds the temporary a lower-precision
stack is upcast into (K x 1M elements) while staying large enough to run at memory bandwidth."""


def combine(base: Tensor, stack: Tensor, scale: float, coefficients: Sequence[float], out: Tensor) -> Tensor:
    """``out = scale * base + sum_k coefficients[k] * stack[k]`` for a flat ``base`` and a
    ``[K, numel]`` ``stack`` (any float dtype: it is upcast a chunk at a time). Task arithmetic
    and linear merges with their parameters folded into ``scale`` and ``coefficients``: BLAS's
    matrix-vector product runs at memory bandwidth with no compile and no per-call overhead."""
    work = work_dtype(base.dtype)
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


def combine_codes(base: Tensor, codes: Tensor, scales: Tensor, bits: int, scale: float,
                  coefficients: Sequence[float], out: Tensor) -> Tensor:
    """:func:`combine` over whole groups of a quantized stack, dequantizing in the same pass:
    ``out = scale * base + sum_k coefficients[k] * (codes[k] * scales[k])`` for a flat ``base``
    of ``G * GROUP`` elements, ``codes`` ``[K, G, GROUP]`` int8 (8 bits) or ``[K, G, GROUP / 2]``
    packed uint8 (4 bits), ``scales`` ``[K, G]``. Each element is ``code * scale`` rounded to
    float32 as :meth:`QuantizedStack.dense` rounds it, then weighted and summed, so the merge is
    the unfused one's up to the order of the sum. Compiled, it is one loop reading a byte (or a
    nibble) per delta element, where dequantizing first wrote and read back a float32 block."""
    work = work_dtype(base.dtype)
    vector = torch.tensor(coefficients, dtype=work, device=base.device)
    groups = scales.shape[1]
    COMPILATION.kernel(_combine_codes, codes.numel() * (8 // bits))(
        base.view(groups, -1), codes, scales, vector, torch.tensor(scale, dtype=work, device=base.device),
        out.view(groups, -1), bits)
    return out


def _combine_codes(base: Tensor, codes: Tensor, scales: Tensor, vector: Tensor, scale: Tensor, out: Tensor,
                   bits: int) -> None:
    total = base.to(vector.dtype) * scale
    for k in range(codes.shape[0]):  # unrolled when traced: one pass over every expert's codes
        row = codes[k] if bits == 8 else unpack(codes[k])
        total = total + (row.to(torch.float32) * scales[k][:, None]).to(vector.dtype) * vector[k]
    out.copy_(total)


# --- generalized task arithmetic -----------------------------------------------------------------


@dataclass(frozen=True)
class KeepRule:
    """Which elements of each expert's delta survive sparsification, as tensors a kernel reads:
    magnitude cuts ``low``/``high`` (``[K, 1, 1]``) for TIES and breadcrumbs; draw ``keys`` (see
    :func:`~evomerge.merge.draws.draw_keys`) for DARE and DELLA, with, in units of draws, DARE's
    integer ``cut`` ``ceil(density * 2^16)`` or DELLA's keep-probability ramp ``cut + slope *
    rank`` over the in-row ``ranks`` (``[K, rows, width]``), both ``[K, 1, 1]``, and the
    positions' ``grid``. ``first_row`` is where the rows a kernel sees start in the tensor, so a
    slab draws what the whole tensor would at its positions. ``kind`` is static: each is a graph."""

    kind: Sparsification
    low: Tensor | None = None
    high: Tensor | None = None
    cut: Tensor | None = None
    slope: Tensor | None = None
    keys: Tensor | None = None
    ranks: Tensor | None = None
    grid: Grid | None = None
    first_row: int = 0

    def rows(self, slab: slice) -> KeepRule:
        """The rule of rows ``slab`` of the tensor, for a kernel that sees only them."""
        ranks = None if self.ranks is None else self.ranks[:, slab]
        return replace(self, ranks=ranks, first_row=self.first_row + slab.start)

    def draws(self, count: int, rows: int) -> list[Tensor] | None:
        """Each expert's integer draws over this rule's first ``rows`` rows (None unless random)."""
        if self.keys is None:
            return None
        return integer_draws(self.keys, count, self.grid.spread(self.first_row, rows))


@dataclass(frozen=True)
class Combination:
    """How the kept deltas become the merged tensor: ``weight`` (``[K, 1, 1]``) and ``lam`` (a
    0-d tensor) in working precision; with ``norms`` (``[K]``, the deltas' L1 norms) each expert is
    rescaled to its norm, for DELLA with ``ranked_norms`` too (see
    :meth:`~evomerge.merge.stats.MagnitudeStats.ranked_l1_norms`). ``elect`` (TIES' sign election),
    ``normalize`` and whether ``norms`` is None are static: each is a graph."""

    weight: Tensor
    lam: Tensor
    elect: bool
    normalize: bool
    norms: Tensor | None = None
    ranked_norms: Tensor | None = None


def merge_kept(x: Tensor, base: Tensor, rule: KeepRule, combination: Combination, out: Tensor) -> None:
    """Generalized task arithmetic of one tensor seen as rows (``x`` is ``[K, rows, width]``,
    ``base`` and ``out`` ``[rows, width]``): sparsify by ``rule``, combine by ``combination``.

    One kernel call upcasts, sparsifies, combines and writes the merged tensor into ``out``
    (:func:`_merge_whole`): compiled for large tensors, eager for small ones. Rescaling multiplies
    each expert's weight by its norm ratio: for the random rules, the expected kept norm comes
    from precomputed sums (:func:`_expected_kept_norms`); for the magnitude rules, a first loop of
    that kernel measures it by sparsifying without writing anything, and the merge loop sparsifies
    again, which costs less than storing the kept deltas and reading them back because every keep
    rule is a pure function of an element's value and position. Only where compiling failed do
    large tensors run eagerly, slab by slab of rows, to bound the temporaries."""
    slabs = COMPILATION.slabs(x.shape[0], x.shape[1], x.shape[2])
    if len(slabs) == 1:
        COMPILATION.kernel(_merge_whole, x.numel())(x, base, rule, combination, out)
        return
    after = None
    if combination.norms is not None:
        after = _expected_kept_norms(rule, combination)
        if after is None:
            after = sum(_norms_slab(x[:, slab], rule.rows(slab)).double() for slab in slabs)
    coefficient = _coefficient(combination, after)
    for slab in slabs:
        _merge_slab(x[:, slab], base[slab], rule.rows(slab), coefficient, combination, out[slab])


# The kernels below loop over the K experts in Python instead of reducing over a K axis: traced by
# torch.compile, the loop unrolls into one element-wise pass that reads each input once, where a
# reduction over the outer axis compiled into several passes (TIES: 9x slower on the embedding).


def _merge_whole(x: Tensor, base: Tensor, rule: KeepRule, combination: Combination, out: Tensor) -> Tensor:
    """Generalized task arithmetic of a whole tensor in one call: rescaling (to the expected kept
    norms for the random rules, else measuring the kept norms in a first loop), then the
    coefficients and the merge loop. One call instead of one per loop and a few eager ops on the
    norms in between: each compiled call costs ~0.1 ms to dispatch, and a merge of the zoo's model
    makes one per large tensor (211). Returning the coefficients makes inductor store them once
    instead of recomputing the norm ratios (three scalar divisions) in every vector step of the
    merge loop."""
    after = None
    if combination.norms is not None:
        after = _expected_kept_norms(rule, combination)
        if after is None:
            after = _norms_slab(x, rule)
    coefficient = _coefficient(combination, after)
    _merge_slab(x, base, rule, coefficient, combination, out)
    return coefficient


def _kept(x: Tensor, k: int, rule: KeepRule, draws: list[Tensor] | None) -> Tensor:
    """Expert ``k``'s slab of deltas (``x``) with the dropped elements zeroed; magnitudes at a cut
    count as above it."""
    kind = rule.kind
    if kind == "none":
        return x
    if kind in ("magnitude", "band"):
        magnitude = x.abs()
        keep = magnitude >= rule.low[k]
        if kind == "band":
            keep = keep & (magnitude < rule.high[k])
        return torch.where(keep, x, 0.0)
    if kind == "random":
        return torch.where(draws[k] < rule.cut[k], x, 0.0)
    probability = rule.cut[k] + rule.slope[k] * rule.ranks[k].to(torch.float32)
    return torch.where(draws[k].to(torch.float32) < probability, x, 0.0)


def _norms_slab(x: Tensor, rule: KeepRule) -> Tensor:
    """``[K]`` L1 norm of each expert's slab (``[K, rows, width]``) after sparsifying, for rescale."""
    count = x.shape[0]
    draws = rule.draws(count, x.shape[1])
    kept = [_kept(x[k].to(work_dtype(x.dtype)), k, rule, draws) for k in range(count)]
    return torch.stack([row.abs().sum() for row in kept])


def _merge_slab(x: Tensor, base: Tensor, rule: KeepRule, coefficient: Tensor, combination: Combination,
                out: Tensor) -> None:
    """One slab of the generalized task-arithmetic merge, written into ``out``: sparsify, weight
    by ``coefficient`` (the combination's weights, rescaled and normalized), combine (with TIES'
    sign election: keep the weighted deltas whose sign agrees with their sum's, +1 where the sum
    is 0, and with ``normalize`` divide by the weight that agreed, 1 where none did), scale by
    ``lam`` and add the base. One pass when compiled."""
    dtype = coefficient.dtype
    count = x.shape[0]
    draws = rule.draws(count, x.shape[1])
    rows = [_kept(x[k].to(dtype), k, rule, draws) * coefficient[k] for k in range(count)]
    mixed = _sum(rows)
    if combination.elect:
        positive = mixed >= 0
        agreeing = [torch.where(positive, row > 0, row < 0) for row in rows]
        mixed = _sum([torch.where(agrees, row, 0.0) for agrees, row in zip(agreeing, rows)])
        if combination.normalize:
            weight = combination.weight
            contributed = _sum([torch.where(agrees, weight[k], 0.0) for k, agrees in enumerate(agreeing)])
            mixed = mixed / torch.where(contributed == 0, 1.0, contributed)
    out.copy_(base.to(dtype) + combination.lam * mixed)


def _coefficient(combination: Combination, after: Tensor | None) -> Tensor:
    """``[K, 1, 1]`` factor of each expert's kept delta: its weight, times its norm ratio when
    rescaling (``after`` are the kept L1 norms), divided up front by the total weight when
    normalizing without sign election (with it, the merge loop divides by the weight that
    agreed)."""
    weight = coefficient = combination.weight
    if after is not None:
        coefficient = weight * _rescale_ratio(combination.norms, after).to(weight.dtype)[:, None, None]
    return coefficient / weight_total(weight) if combination.normalize and not combination.elect else coefficient


def _expected_kept_norms(rule: KeepRule, combination: Combination) -> Tensor | None:
    """``[K]`` L1 norm a random keep rule leaves each expert in expectation, from the deltas' L1
    norms and, for DELLA, their rank-weighted ones: an element of magnitude m survives DARE's
    draw with probability ``cut / 2^16`` and DELLA's with ``(cut + slope * rank) / 2^16``. None
    for the deterministic rules, whose kept norm a pass over the deltas measures. Rescaling to
    the expected norm rather than the realized one (as mergekit does) spares that pass, half of a
    DARE or DELLA merge's reads and hashes; the two differ by about ``1 / sqrt(kept elements)``
    (0.1% on a 576 x 1536 matrix at density 0.5), the random mask's own noise, and the expected
    one is the rescale DARE's paper defines."""
    before = combination.norms
    if rule.kind == "random":
        return before * (rule.cut.reshape(-1).to(before.dtype) / DRAW_STEPS)
    if rule.kind != "rank":
        return None
    intercept, slope = rule.cut.reshape(-1).to(before.dtype), rule.slope.reshape(-1).to(before.dtype)
    expected = (intercept * before + slope * combination.ranked_norms) / DRAW_STEPS
    return torch.where(intercept == math.inf, before, torch.where(intercept == -math.inf, 0.0, expected))


def _rescale_ratio(before: Tensor, after: Tensor) -> Tensor:
    """mergekit's rescale: original L1 norm over kept L1 norm, 1 where either is below 1e-7."""
    usable = (before >= _NORM_EPS) & (after >= _NORM_EPS)
    return torch.where(usable, before / torch.where(usable, after, torch.ones_like(after)), 1.0)


def _sum(rows: list[Tensor]) -> Tensor:
    total = rows[0]
    for row in rows[1:]:
        total = total + row
    return total


# --- element-wise selections ---------------------------------------------------------------------


def elementwise(kernel: Callable, base: Tensor, stack: Tensor, out: Tensor, *args: Tensor) -> Tensor:
    """Run an element-wise ``kernel(x, base, *args, out)`` over a flat ``base`` and ``out`` and a
    ``[K, numel]`` ``stack``: compiled over the whole tensor when it is large, slab by slab of
    columns otherwise."""
    run = COMPILATION.kernel(kernel, stack.numel())
    for slab in COMPILATION.slabs(len(stack), base.numel()):
        run(stack[:, slab], base[slab], *args, out[slab])
    return out


def magmax_slab(x: Tensor, base: Tensor, weight: Tensor, lam: Tensor, out: Tensor) -> None:
    """MagMax on a slab: per element, the weighted delta of largest magnitude, scaled by ``lam``."""
    strongest = x[0].to(weight.dtype) * weight[0]
    for k in range(1, x.shape[0]):  # the first expert wins a tie, as argmax picks
        row = x[k].to(weight.dtype) * weight[k]
        strongest = torch.where(row.abs() > strongest.abs(), row, strongest)
    out.copy_(base.to(weight.dtype) + lam * strongest)


def consensus_slab(x: Tensor, base: Tensor, weight: Tensor, lam: Tensor, lambda_tall: Tensor, k: Tensor,
                   divisor: Tensor, out: Tensor) -> None:
    """Consensus merging on a slab: the weighted sum where at least ``k`` experts' TALL masks hold."""
    rows = [x[i].to(weight.dtype) * weight[i] for i in range(x.shape[0])]
    total = _sum(rows)
    relying = _sum([(row.abs() >= lambda_tall * (total - row).abs()).to(weight.dtype) for row in rows])
    mixed = torch.where(relying >= k, total, 0.0)
    out.copy_(base.to(weight.dtype) + lam * (mixed / divisor))
