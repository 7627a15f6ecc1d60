"""Counter-based random draws: the uniforms DARE and DELLA compare keep probabilities with.

A draw is a hash of the seed and the element's position rather than the next value of a
sequential generator, so the merge kernels compute it inline (streaming draws from a sequential
generator took longer than the merge itself), and a mask depends only on the seed and each
element's position: neither slabbing, compilation nor the device can change it, and
:func:`draw_uniforms` replays it outside a merge.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

_DRAW_BITS = 16
DRAW_STEPS = float(1 << _DRAW_BITS)
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


def draw_keys(seed: int, count: int, numel: int, device: torch.device | str) -> Tensor:
    """``[ceil(count / 2)]`` int32 keys for a ``[count, numel]`` stack drawn from ``seed``: one
    32-bit hash of ``(seed, pair * numel + position)`` yields 16-bit draws for two experts (its
    high half for the even one, its low half for the odd one), so a merge of K experts hashes
    K/2 times per element. Key ``pair`` folds the pair's offset in, so a kernel adds it to
    ``position * 0x9E3779B1`` computed once for all pairs."""
    keys = [_wrap32(seed + pair * numel * _WEYL) for pair in range((count + 1) // 2)]
    return torch.tensor(keys, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class Grid:
    """Element positions of a tensor seen as ``[rows, width]``, spread by the Weyl step as the
    draws hash them: ``row * row_step + columns[column]`` (int32, wrapping). A kernel builds a
    position from its row (a scalar per row) and a loaded ``[width]`` vector: compiled CPU code
    assembles an ``arange`` vector lane by lane, which cost more than the hash (DARE's norms
    loop ran at 2.7x a plain read with it, at a plain read's speed without)."""

    columns: Tensor
    row_step: Tensor

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, width: int, device: torch.device | str) -> Grid:
        """The grid of rows ``width`` long, cached: a model has a handful of widths."""
        columns = torch.arange(width, dtype=torch.int64, device=device) * (_WEYL & 0xFFFFFFFF) & 0xFFFFFFFF
        columns = torch.where(columns >= _INT32_SPAN, columns - 2 * _INT32_SPAN, columns).to(torch.int32)
        return cls(columns, torch.tensor(_wrap32(width * _WEYL), dtype=torch.int32, device=device))

    def spread(self, first_row: int, rows: int) -> Tensor:
        """``[rows, width]`` spread positions of rows ``first_row ..``."""
        row = torch.arange(first_row, first_row + rows, dtype=torch.int32, device=self.columns.device)
        return (row * self.row_step)[:, None] + self.columns


def integer_draws(keys: Tensor, count: int, spread: Tensor) -> list[Tensor]:
    """Each of ``count`` experts' integer draws in [0, 2^16) at the ``spread`` positions (see
    :meth:`Grid.spread`), from its pair's key (see :func:`draw_keys`)."""
    draws = []
    for pair in range((count + 1) // 2):
        h = _mix32(spread + keys[pair])
        draws += [(h >> 16) & 0xFFFF, h & 0xFFFF]
    return draws[:count]


def draw_uniforms(seed: int, rows: int, numel: int, device: str | torch.device = "cpu") -> Tensor:
    """The ``[rows, numel]`` uniforms in [0, 1) a randomized method draws for a stack of ``rows``
    task vectors of ``numel`` elements from key ``seed``, so tests and users can replay a mask."""
    keys = draw_keys(seed, rows, numel, device)
    spread = Grid.of(numel, device).spread(0, 1)[0]
    return torch.stack(integer_draws(keys, rows, spread)).to(torch.float32) / DRAW_STEPS
