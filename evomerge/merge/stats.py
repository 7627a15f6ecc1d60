"""Magnitude statistics of stacked task vectors: what sparsifying merges read that no candidate changes.

A search merges one tensor under many densities, so what the keep rules compare with is
computed once per tensor and reused: sorted-magnitude tables turn TIES' and breadcrumbs' per-call
sort into a lookup, DELLA's in-row magnitude ranks are ranked once, and the L1 norms a rescale
restores are summed once. Thresholds come out in the merge's working precision, so a cut compares
with the kernels' upcast values exactly as a sort of them would.
"""

from __future__ import annotations

import bisect
import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import Tensor

from evomerge.merge.kernels import work_dtype


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
        ordered = flat.abs().to(work_dtype(flat.dtype)).sort(dim=1, descending=True).values
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


def _kth_largest(deltas: Tensor, counts: Sequence[int], stats: MagnitudeStats | None) -> list[float]:
    """Per expert, the ``counts[i]``-th largest magnitude in working precision: inf keeps nothing,
    0 keeps everything; from ``stats`` when given, else by selection."""
    work = work_dtype(deltas.dtype)
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


def magnitude_cuts(deltas: Tensor, counts: Sequence[int], stats: MagnitudeStats | None) -> Tensor:
    """``[K, 1]`` cuts in working precision: an element is at or above its expert's cut when its
    magnitude is among the ``counts[i]`` largest."""
    values = _kth_largest(deltas, counts, stats)
    return torch.tensor(values, dtype=work_dtype(deltas.dtype), device=deltas.device)[:, None]


def rank_width(deltas: Tensor) -> int:
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
    width = rank_width(deltas)
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


_KEPT_COMPONENTS = 2
"""TSV-M component stacks kept per tensor (each the size of the deltas): a run needs one."""


@dataclass(eq=False)
class DeltaStats:
    """:class:`MagnitudeStats` of one tensor's stacked deltas, each computed on first use and kept:
    a search merges one tensor under many parameters, and neither the quantile table (TIES,
    breadcrumbs) nor DELLA's in-row ranks depend on them. The ranks cost 2 bytes per delta element
    (a quarter of an fp32 stack; 4 for rows over 2048 wide), so they exist only for tensors DELLA
    has merged.

    ``source`` is the ``[K, ...]`` stack, or, for deltas stored in another form (quantized), a
    function that makes it dense: called only when a statistic is built, and not even then while
    a merge has :meth:`lending` the dense stack it already made, so no dense copy outlives the
    merge that needed it."""

    source: Tensor | Callable[[], Tensor]
    resolution: int = 1024
    _lent: Tensor | None = None
    _quantiles: MagnitudeQuantiles | None = None
    _ranks: Tensor | None = None
    _norms: Tensor | None = None
    _ranked_norms: Tensor | None = None
    _svd: tuple[Tensor, Tensor, Tensor] | None = None
    _components: dict[tuple[int, tuple[int, ...]], Tensor] = field(default_factory=dict)

    @property
    def deltas(self) -> Tensor:
        """The dense stack: the one lent, the tensor given, or one made from ``source`` now."""
        if self._lent is not None:
            return self._lent
        return self.source() if callable(self.source) else self.source

    @contextlib.contextmanager
    def lending(self, deltas: Tensor) -> Iterator[None]:
        """Build statistics from ``deltas`` (the dense stack a merge already holds, equal to what
        ``source`` makes) rather than making another one, for the duration of the block."""
        self._lent = deltas
        try:
            yield
        finally:
            self._lent = None

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

    def cached_bytes(self) -> int:
        """Bytes of what is built so far (the memory plan leaves these out)."""
        tensors = [self._ranks, self._norms, self._ranked_norms, *(self._svd or ()), *self._components.values()]
        if self._quantiles is not None:
            tensors.append(self._quantiles.values)
        return sum(t.nbytes for t in tensors if t is not None)

    def singular_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        """Each expert's thin SVD (STAR): about 1.4 to 2 times the deltas' size in working
        precision, built only for tensors such a method has merged."""
        if self._svd is None:
            from evomerge.merge.subspace import singular_factors

            self._svd = singular_factors(self.deltas)
        return self._svd

    def tsv_components(self, rank: int, indices: tuple[int, ...] | None = None) -> Tensor:
        """TSV-M's components for ``rank`` directions of the experts at ``indices`` (all by
        default): one delta stack's size each. A run merges with one rank and one set of experts,
        so a couple are kept; the SVDs they come from are kept only if STAR built them."""
        deltas = None  # made dense at most once, and only when a key needs it
        if indices is None:
            deltas = self.deltas
            indices = tuple(range(deltas.shape[0]))
        key = (rank, tuple(indices))
        if key not in self._components:
            from evomerge.merge.subspace import singular_factors, tsv_components

            deltas = self.deltas if deltas is None else deltas
            chosen = torch.tensor(key[1], device=deltas.device)
            if self._svd is not None:
                factors = tuple(f.index_select(0, chosen) for f in self._svd)
            else:
                factors = singular_factors(deltas.index_select(0, chosen))
            while len(self._components) >= _KEPT_COMPONENTS:
                self._components.pop(next(iter(self._components)))
            self._components[key] = tsv_components(factors, rank).to(deltas.dtype)  # bf16 deltas: bf16 too
        return self._components[key]


def l1_norms(deltas: Tensor) -> Tensor:
    """``[K]`` L1 norms of stacked deltas (see :meth:`MagnitudeStats.l1_norms`)."""
    flat = deltas.reshape(deltas.shape[0], -1)
    return flat.abs().sum(1, dtype=torch.float64).to(work_dtype(deltas.dtype))


def ranked_l1_norms(deltas: Tensor, ranks: Tensor) -> Tensor:
    """``[K]`` sums of magnitude times in-row rank (see :meth:`MagnitudeStats.ranked_l1_norms`),
    a row block at a time so no ``[K, numel]`` float64 temporary is made."""
    flat, ranks = deltas.reshape(deltas.shape[0], -1), ranks.reshape(deltas.shape[0], -1)
    total = torch.zeros(flat.shape[0], dtype=torch.float64, device=flat.device)
    for start in range(0, flat.shape[1], _RANK_ROWS_ELEMENTS):
        block = slice(start, start + _RANK_ROWS_ELEMENTS)
        total += (flat[:, block].abs().double() * ranks[:, block].double()).sum(1)
    return total.to(work_dtype(deltas.dtype))
