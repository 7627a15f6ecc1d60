"""What a model folder's files say without loading a model: safetensors headers (each tensor's
dtype, shape and offsets), the dtype weights are stored in, and a loaded model's parameters
listed once.

Below the pool and the adapters, which both read headers (an adapter's factors are checked
against the base's shapes before anything loads), and the memory plan, which sizes a merge
from headers alone.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from evomerge.errors import UserError

_HEADER_LIMIT = 100 * 2**20  # a larger header is a corrupt file, not a model


def safetensors_header(path: Path) -> dict[str, dict]:
    """Each tensor's header entry (``dtype``, ``shape``, ``data_offsets``) of one safetensors
    file, reading only the header's bytes: the one reader of them (the mergeability check,
    adapters, the memory plan, whose header-only fixtures have no weights behind the header)."""
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= _HEADER_LIMIT:
            raise UserError(f"{path} is not a safetensors file (its first 8 bytes give no header length)")
        try:
            header = json.loads(handle.read(length))
        except ValueError:
            raise UserError(f"{path} has a corrupt safetensors header (not JSON)") from None
    return {name: entry for name, entry in header.items() if name != "__metadata__"}


def header_shapes(entries: Mapping[str, dict]) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape from its safetensors header entry."""
    return {name: tuple(int(n) for n in entry["shape"]) for name, entry in entries.items()}


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    return header_shapes(safetensors_header(path))


def folder_header(folder: Path) -> dict[str, dict]:
    """Every tensor's header entry in a folder's safetensors files (shards merged)."""
    entries: dict[str, dict] = {}
    for file in sorted(folder.glob("*.safetensors")):
        entries.update(safetensors_header(file))
    return entries


def folder_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape in a folder's safetensors files (shards merged), headers only."""
    return header_shapes(folder_header(folder))


_STORED_FLOATS = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def stored_dtype(names: Iterable[str]) -> torch.dtype:
    """The float dtype weights are stored in, from their safetensors dtype names (the widest if
    they differ); float32 when none is a float (nothing known: GGUF, pickles)."""
    found = [_STORED_FLOATS[n] for n in names if n in _STORED_FLOATS]
    return max(found, key=lambda d: d.itemsize, default=torch.float32)


def unique_parameters(model) -> dict[str, torch.Tensor]:
    """Named parameters with tied tensors listed once: merging a tied tensor twice is wasted work."""
    return {name: param.detach() for name, param in model.named_parameters()}
