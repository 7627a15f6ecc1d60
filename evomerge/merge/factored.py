"""Task vectors that stay factorized: a LoRA adapter's ``scale · B·A`` held as its factors.

A rank-16 adapter of a 4096×4096 projection is 131k numbers where its dense task vector is
16.8M: keeping the factors is what lets a worker hold a pool of many adapters. Methods never see
them: a tensor whose experts are not all dense is a :class:`FactoredStack`, which the engine
combines with one rank-r product per tensor for the methods that are linear in the deltas and
makes dense, one tensor at a time, for the others (as it does for quantized stacks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from evomerge.merge.quantized import QuantizedStack


@dataclass(frozen=True)
class LowRank:
    """``scale · left @ right`` in the weight's own layout (``left`` rows × r, ``right`` r × cols):
    a Conv1D-style weight stored (in, out) holds ``Bᵀ`` and ``Aᵀ`` swapped, so nothing
    downstream needs to know about transposed layouts."""

    left: Tensor
    right: Tensor
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def dense(self, dtype: torch.dtype | None = None) -> Tensor:
        dtype = dtype or self.left.dtype
        return (self.left.to(dtype) @ self.right.to(dtype)).mul_(self.scale)

    def to(self, device: torch.device, dtype: torch.dtype) -> LowRank:
        return LowRank(self.left.to(device=device, dtype=dtype), self.right.to(device=device, dtype=dtype),
                       self.scale)


Delta = Tensor | LowRank
"""One expert's task vector for one tensor: dense, or factors."""


@dataclass(frozen=True)
class FactoredStack:
    """One tensor's task vectors over the pool's K experts when some are factors or absent (an
    adapter that does not target the tensor moves it by nothing): the dense experts' rows as one
    stack (float or quantized), each factored expert's :class:`LowRank`, and zeros for the rest."""

    shape: tuple[int, ...]
    experts: int
    dense_rows: tuple[int, ...]
    dense_part: Tensor | QuantizedStack | None
    factors: dict[int, LowRank]
    device: torch.device

    def dense_numel(self) -> int:
        """Elements of the dense ``[K, n]`` stack this stands for (what a dense merge touches)."""
        numel = 1
        for size in self.shape:
            numel *= size
        return self.experts * numel

    def select(self, rows: Sequence[int] | Tensor) -> FactoredStack:
        """The experts at ``rows``, in that order, as a stack of their own."""
        rows = [int(r) for r in rows]
        dense = [(new, self.dense_rows.index(old)) for new, old in enumerate(rows) if old in self.dense_rows]
        part = None
        if dense and self.dense_part is not None:
            picked = [at for _, at in dense]
            part = (self.dense_part.select(picked) if isinstance(self.dense_part, QuantizedStack)
                    else self.dense_part.index_select(0, torch.tensor(picked, device=self.dense_part.device)))
        factors = {new: self.factors[old] for new, old in enumerate(rows) if old in self.factors}
        return FactoredStack(self.shape, len(rows), tuple(new for new, _ in dense), part, factors, self.device)

    def dense(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The ``[K, n]`` stack, made dense for one merge (zeros where an expert is absent)."""
        device = self.device
        out = torch.zeros((self.experts, math.prod(self.shape)), dtype=dtype, device=device)
        if self.dense_part is not None:
            rows = torch.tensor(self.dense_rows, device=device)
            part = (self.dense_part.dense(dtype) if isinstance(self.dense_part, QuantizedStack)
                    else self.dense_part.to(dtype))
            out.index_copy_(0, rows, part)
        for row, factor in self.factors.items():
            out[row].copy_(factor.dense(dtype).reshape(-1))
        return out

    def add_low_rank(self, coefficients: Sequence[float], target: Tensor) -> None:
        """``target += Σ_i c_i · scale_i · left_i @ right_i`` over the factored experts, as one
        product of the concatenated factors (rank Σ r_i), never a dense per-expert delta."""
        pairs = [(coefficients[row] * f.scale, f) for row, f in self.factors.items() if coefficients[row] != 0]
        if not pairs:
            return
        work = target.dtype if target.dtype == torch.float64 else torch.float32
        left = torch.cat([f.left.to(work) * c for c, f in pairs], dim=1)
        right = torch.cat([f.right.to(work) for _, f in pairs], dim=0)
        matrix = target.view(self.shape)
        if matrix.dtype == work:
            matrix.addmm_(left, right)
        else:
            matrix.copy_(torch.addmm(matrix.to(work), left, right))
