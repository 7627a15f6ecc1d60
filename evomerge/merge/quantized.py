"""Quantized task vectors: each expert's delta stored as 8- or 4-bit codes with a scale per group.

A pool's memory is almost all task vectors (K experts, each the model's size), and fine-tuning
deltas are small and smooth, so they survive coarse quantization far better than the weights
themselves: quantizing the delta, not the weights, is task-vector quantization (Cheng et al.
2025, "Task vector quantization for memory-efficient model merging"). Here each tensor's
``[K, numel]`` delta stack is cut into groups of :data:`GROUP` consecutive elements of each
expert's flattened delta, and every group is quantized symmetrically to its own absolute maximum:
one float32 scale per group, codes in ``[-(2^(b-1) - 1), 2^(b-1) - 1]``. A group's largest
element is exact, and any element is at most half a step (``scale / 2``) from its value, so one
outlier costs precision in 128 elements, not in the whole tensor. int4 packs two codes per byte.

int8 stores a fp32 stack in about 0.26 of its bytes (1 byte a code plus 4 bytes of scale per 128
elements: 1.03 bytes an element), int4 in about 0.13 (0.53 bytes an element). Merge methods never see codes: the engine dequantizes one tensor's stack (or a
column block of it) where it needs dense deltas, so the extra memory is one tensor's dense stack.

The format names and their bit widths are declared once, in :data:`evomerge.config.QUANTIZED_DELTAS`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

GROUP = 128
"""Elements of one expert's flattened delta that share a scale: small enough that an outlier
coarsens only its neighbours, large enough that the scales add 4/128 bytes per element."""

BLOCK_COLUMNS = 1 << 20
"""Columns (elements of each expert's delta) quantized or dequantized at a time: bounds the
temporaries to K x 1M floats, as :func:`evomerge.merge.kernels.combine` bounds its upcast. A
multiple of :data:`GROUP` (and of 2, for int4's packing), so blocks start on a group."""


def levels(bits: int) -> int:
    """Largest code magnitude of a symmetric ``bits``-bit code: 127 for int8, 7 for int4 (one code
    of the two's-complement range, -128 or -8, goes unused, so 0 is exact and signs are even)."""
    if bits not in (4, 8):
        raise ValueError(f"quantized deltas have 8 or 4 bits, not {bits}")
    return (1 << (bits - 1)) - 1


def groups_of(numel: int) -> int:
    """Groups one expert's delta of ``numel`` elements is cut into (the last may be short)."""
    return -(-numel // GROUP)


def quantized_bytes(numel: int, bits: int) -> int:
    """Bytes one expert's delta of ``numel`` elements takes quantized to ``bits``: codes for every
    group padded to :data:`GROUP` elements, plus a float32 scale per group. The memory plan counts
    this, and :meth:`QuantizedStack.nbytes` is this times the experts."""
    groups = groups_of(numel)
    return groups * GROUP * bits // 8 + groups * 4


@dataclass(frozen=True, eq=False)
class QuantizedStack:
    """One tensor's ``[K, numel]`` delta stack, group-wise symmetric absmax quantized.

    ``codes`` is ``[K, groups * GROUP]`` int8 for 8 bits, ``[K, groups * GROUP / 2]`` uint8 for 4
    bits (element ``2j`` in the low nibble of byte ``j``, ``2j + 1`` in the high one, each stored
    as code + 8); past ``numel`` the codes are 0. ``scales`` is ``[K, groups]`` float32: a group's
    absolute maximum over :func:`levels`, the step between neighbouring values (0 for an all-zero
    group, whose codes are 0)."""

    codes: Tensor
    scales: Tensor
    numel: int
    bits: int

    @classmethod
    def of(cls, dense: Tensor, bits: int) -> QuantizedStack:
        """Quantize a ``[K, numel]`` stack (any float dtype; computed in float32) a column block at
        a time, so the temporaries stay a few K x 1M floats whatever the tensor's size."""
        top = levels(bits)
        count, numel = dense.shape
        groups = groups_of(numel)
        width = groups * GROUP * bits // 8
        codes = torch.zeros((count, width), dtype=torch.int8 if bits == 8 else torch.uint8, device=dense.device)
        scales = torch.empty((count, groups), dtype=torch.float32, device=dense.device)
        for start, end in _blocks(numel):
            first, last = start // GROUP, groups_of(end)
            block = torch.zeros((count, (last - first) * GROUP), dtype=torch.float32, device=dense.device)
            block[:, :end - start] = dense[:, start:end]
            grouped = block.view(count, last - first, GROUP)
            scale = grouped.abs().amax(dim=-1) / top
            scales[:, first:last] = scale
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale))[..., None]
            quantized = (grouped / divisor).round_().clamp_(-top, top).to(torch.int8).view(count, -1)
            if bits == 8:
                codes[:, first * GROUP:last * GROUP] = quantized
            else:
                codes[:, first * GROUP // 2:last * GROUP // 2] = _pack(quantized)
        return cls(codes, scales, numel, bits)

    @classmethod
    def stacked(cls, rows: Sequence[QuantizedStack]) -> QuantizedStack:
        """One stack of stacks quantized apart (a pool quantizes each expert as it loads): the
        codes and scales of quantizing their dense stack at once, since no group spans two rows."""
        first = rows[0]
        if any((r.numel, r.bits) != (first.numel, first.bits) for r in rows):
            raise ValueError("stacked rows must share their length and bits")
        return cls(torch.cat([r.codes for r in rows]), torch.cat([r.scales for r in rows]), first.numel, first.bits)

    def to(self, device: torch.device | str) -> QuantizedStack:
        return QuantizedStack(self.codes.to(device), self.scales.to(device), self.numel, self.bits)

    def row(self, index: int) -> QuantizedStack:
        """Row ``index`` as a one-row stack of views (nothing copied)."""
        return QuantizedStack(self.codes[index:index + 1], self.scales[index:index + 1], self.numel, self.bits)

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, numel)``: the dense stack's shape."""
        return (self.codes.shape[0], self.numel)

    @property
    def device(self) -> torch.device:
        return self.codes.device

    @property
    def nbytes(self) -> int:
        """Bytes held: codes and scales."""
        return self.codes.nbytes + self.scales.nbytes

    def __len__(self) -> int:
        return self.codes.shape[0]

    def dense_numel(self) -> int:
        """Elements of the dense stack (``K * numel``): what the kernels' compile choice reads."""
        return self.codes.shape[0] * self.numel

    def select(self, rows: Sequence[int] | Tensor) -> QuantizedStack:
        """The stack of the experts at ``rows``, still quantized: a merge of some experts
        dequantizes only theirs."""
        index = torch.as_tensor(rows, device=self.device)
        return QuantizedStack(self.codes.index_select(0, index), self.scales.index_select(0, index),
                              self.numel, self.bits)

    def groups(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        """Codes and scales of the whole groups in columns ``start:end`` (both on group
        boundaries): ``[K, G, GROUP]`` int8 codes (``[K, G, GROUP / 2]`` packed uint8 for 4 bits)
        and ``[K, G]`` scales, views of the stack, for a kernel that dequantizes as it reads."""
        if start % GROUP or end % GROUP:
            raise ValueError(f"columns {start}:{end} must start and end on multiples of {GROUP}")
        per_byte = 8 // self.bits
        codes = self.codes[:, start // per_byte:end // per_byte]
        return codes.view(len(self), -1, GROUP // per_byte), self.scales[:, start // GROUP:end // GROUP]

    def blocks(self) -> Iterator[tuple[int, int]]:
        """Column ranges ``(start, end)`` of at most :data:`BLOCK_COLUMNS` that start on a group:
        dequantize block by block to bound the dense temporaries."""
        return _blocks(self.numel)

    def dense(self, dtype: torch.dtype = torch.float32, start: int = 0, end: int | None = None) -> Tensor:
        """Columns ``start:end`` of the dense ``[K, numel]`` stack (contiguous, ``code * scale``
        rounded once to ``dtype``). ``start`` must be a multiple of :data:`GROUP`; the whole stack
        is dequantized a block at a time into the result, so it is the only full-size tensor."""
        end = self.numel if end is None else end
        if start % GROUP or not 0 <= start <= end <= self.numel:
            raise ValueError(f"columns {start}:{end} of a {self.numel}-column stack must start on a "
                             f"multiple of {GROUP}")
        count = len(self)
        out = torch.empty((count, end - start), dtype=dtype, device=self.device)
        for offset in range(start, end, BLOCK_COLUMNS):
            stop = min(offset + BLOCK_COLUMNS, end)
            first, last = offset // GROUP, groups_of(stop)
            if self.bits == 8:
                codes = self.codes[:, first * GROUP:last * GROUP]
            else:
                codes = unpack(self.codes[:, first * GROUP // 2:last * GROUP // 2])
            grouped = codes.to(torch.float32).view(count, last - first, GROUP) * self.scales[:, first:last, None]
            out[:, offset - start:stop - start] = grouped.view(count, -1)[:, :stop - offset]
        return out


def _blocks(numel: int) -> Iterator[tuple[int, int]]:
    for start in range(0, numel, BLOCK_COLUMNS):
        yield start, min(start + BLOCK_COLUMNS, numel)


def _pack(codes: Tensor) -> Tensor:
    """Two signed 4-bit codes (``[..., 2n]`` int8 in ``[-7, 7]``) per byte: ``[..., n]`` uint8."""
    biased = (codes + 8).to(torch.uint8)
    return biased[..., 0::2] | (biased[..., 1::2] << 4)


def unpack(packed: Tensor) -> Tensor:
    """The inverse of :func:`_pack`: ``[..., n]`` uint8 to ``[..., 2n]`` int8 codes."""
    low = (packed & 0xF).to(torch.int8) - 8
    high = (packed >> 4).to(torch.int8) - 8
    return torch.stack((low, high), dim=-1).flatten(-2)
