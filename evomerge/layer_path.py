"""A layer path: which decoder blocks, of which models, in which order a token passes through.

The data-flow counterpart of a :class:`~evomerge.recipe.Recipe` (Sakana's evolutionary model
merge, "data-flow space"): no weights are combined; the candidate is a sequence of slices, each
a run of consecutive blocks of one *source* model, entered with the hidden state scaled by the
slice's ``scale``. Sources are the base, the experts, and optionally one parameter-space merge
(``merge``: a recipe, the PS half of PS+DFS). The embeddings, the final norm and the LM head come
from the ``outside`` source.

Like a recipe it is plain data (no torch) that crosses every boundary: the archive keys it by
hash, workers receive it, users export it. Slices are stored, not single steps, because that is
how the search spells a path and how mergekit's ``passthrough`` slices express one.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Mapping, Union

from evomerge.errors import UserError
from evomerge.recipe import Recipe, recipe_line
from evomerge.serialization import canonical_json, checked_mapping, dump_yaml, short_repr

KIND = "path"  # the ``kind`` key of a path's dict; recipes have none
BASE = "base"
MERGE = "merge"  # the source name of the parameter-space merge in PS+DFS


@dataclass(frozen=True)
class Slice:
    """Blocks ``start`` .. ``end - 1`` of ``source``, the hidden state scaled by ``scale`` on entry."""

    source: str
    start: int
    end: int
    scale: float = 1.0

    @property
    def length(self) -> int:
        return self.end - self.start

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "start": self.start, "end": self.end, "scale": self.scale}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> Slice:
        checked_mapping(data, where, required=("source", "start", "end"), optional=("scale",))
        return cls(data["source"], data["start"], data["end"], data.get("scale", 1.0))


@dataclass(frozen=True)
class LayerPath:
    base: str
    experts: tuple[str, ...]
    num_layers: int  # blocks per source model
    slices: tuple[Slice, ...]
    outside: str = BASE  # source of the embeddings, final norm and LM head
    merge: Recipe | None = None  # the PS merge, source ``merge``
    dtype: str = "float32"
    expert_refs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.base, str) or not self.base:
            raise UserError(f"path base must be a non-empty string, got {short_repr(self.base)}")
        experts = tuple(self.experts) if isinstance(self.experts, (list, tuple)) else ()
        if not experts or not all(isinstance(e, str) and e for e in experts) or len(set(experts)) != len(experts):
            raise UserError(f"path experts must be a non-empty list of distinct names, got {short_repr(self.experts)}")
        if BASE in experts or MERGE in experts:
            raise UserError(f"an expert may not be named {BASE!r} or {MERGE!r}: a path names its sources so")
        object.__setattr__(self, "experts", experts)
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) or self.num_layers < 1:
            raise UserError(f"path num_layers must be a positive integer, got {short_repr(self.num_layers)}")
        if self.merge is not None and not isinstance(self.merge, Recipe):
            raise UserError(f"path merge must be a recipe, got {short_repr(self.merge)}")
        sources = self.sources
        if self.outside not in sources:
            raise UserError(f"path outside source {self.outside!r} is not one of {', '.join(sources)}")
        for i, piece in enumerate(self.slices):
            if not isinstance(piece, Slice):
                raise UserError(f"path slices[{i}] must be a Slice, got {short_repr(piece)}")
            if piece.source not in sources:
                raise UserError(f"path slices[{i}] source {piece.source!r} is not one of {', '.join(sources)}")
            for key in ("start", "end"):
                value = getattr(piece, key)
                if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= self.num_layers:
                    raise UserError(f"path slices[{i}].{key}={short_repr(value)} must be an integer in "
                                    f"0..{self.num_layers}")
            if not isinstance(piece.scale, (int, float)) or not math.isfinite(piece.scale) or piece.scale <= 0:
                raise UserError(f"path slices[{i}].scale={short_repr(piece.scale)} must be a finite number > 0")
        object.__setattr__(self, "slices", _canonical(self.slices))
        if not self.slices:
            raise UserError("a path needs at least one non-empty slice (start < end)")
        refs = self.expert_refs
        if not isinstance(refs, Mapping) or any(k not in experts for k in refs):
            raise UserError(f"path expert_refs must map expert names to model paths, got {short_repr(refs)}")
        object.__setattr__(self, "expert_refs", {k: v for k, v in refs.items() if k != v})

    @property
    def sources(self) -> tuple[str, ...]:
        """The models a slice may take blocks from, in the order the search space numbers them."""
        return (BASE, *self.experts) + ((MERGE,) if self.merge is not None else ())

    @property
    def length(self) -> int:
        return sum(s.length for s in self.slices)

    def steps(self) -> list[tuple[str, int, float]]:
        """Each step of the path: (source, block, cumulative scale of the hidden state there)."""
        out, total = [], 1.0
        for piece in self.slices:
            total *= piece.scale
            out += [(piece.source, layer, total) for layer in range(piece.start, piece.end)]
        return out

    @classmethod
    def whole(cls, source: str, base: str, experts: tuple[str, ...], num_layers: int, *,
              merge: Recipe | None = None, expert_refs: Mapping[str, str] | None = None) -> LayerPath:
        """One source model, every block in order: that model itself, spelled as a path."""
        return cls(base, experts, num_layers, (Slice(source, 0, num_layers),), source, merge,
                   expert_refs=dict(expert_refs or {}))

    # --- evomerge's own format -------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"kind": KIND, "base": self.base, "experts": list(self.experts),
                "expert_refs": dict(self.expert_refs), "num_layers": self.num_layers, "dtype": self.dtype,
                "outside": self.outside, "slices": [s.to_dict() for s in self.slices],
                "merge": self.merge.to_dict() if self.merge is not None else None}

    @classmethod
    def from_dict(cls, data: Any) -> LayerPath:
        checked_mapping(data, "path", required=("kind", "base", "experts", "num_layers", "slices"),
                 optional=("outside", "merge", "dtype", "expert_refs"))
        if not isinstance(data["slices"], list):
            raise UserError(f"path slices must be a list, got {short_repr(data['slices'])}")
        merge = data.get("merge")
        return cls(data["base"], data["experts"], data["num_layers"],
                   tuple(Slice.from_dict(s, f"slices[{i}]") for i, s in enumerate(data["slices"])),
                   data.get("outside", BASE), Recipe.from_dict(merge) if merge is not None else None,
                   data.get("dtype", "float32"), checked_mapping(data.get("expert_refs") or {}, "expert_refs"))

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @cached_property
    def hash(self) -> str:
        """Identity of the path (where the models live left out), as for a recipe."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("base", "expert_refs")}
        if self.merge is not None:
            content["merge"] = self.merge.hash
        return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:16]

    def __hash__(self) -> int:
        return hash(self.hash)

    def summary(self) -> str:
        return path_line([s.to_dict() for s in self.slices], self.outside)


def path_line(slices: list[Mapping[str, Any]], outside: str) -> str:
    """One line for tables: each slice as source[first-last], its entry scale where not 1. Over
    plain slice dicts, so a report can show thousands of archived paths without parsing each."""
    parts = [f"{s['source']}[{s['start']}-{s['end'] - 1}]" + (f"×{s['scale']:.2f}" if s.get("scale", 1) != 1 else "")
             for s in slices]
    blocks = sum(s["end"] - s["start"] for s in slices)
    return f"path of {blocks} blocks: " + " → ".join(parts) + f" · outside: {outside}"


def _canonical(slices: tuple[Slice, ...] | list[Slice]) -> tuple[Slice, ...]:
    """Empty slices dropped, and a slice that just continues the previous one (same source, next
    block, no rescaling) joined to it: paths that run alike hash alike."""
    out: list[Slice] = []
    for piece in slices:
        if piece.length <= 0:
            continue
        scale = float(piece.scale)
        if out and out[-1].source == piece.source and out[-1].end == piece.start and scale == 1.0:
            out[-1] = Slice(piece.source, out[-1].start, piece.end, out[-1].scale)
        else:
            out.append(Slice(piece.source, piece.start, piece.end, scale))
    return tuple(out)


# What a candidate is: a merge recipe or a layer path. Both hash, summarize, export.
Plan = Union[Recipe, LayerPath]


def candidate_line(data: Mapping[str, Any]) -> str:
    """The one-line summary every view shows for an archived candidate (``inspect``, the HTML
    report's hovers and picks): a layer path's slices or a recipe's methods and mean parameters,
    read from the dict without validating it; never raises, since a report must show a run
    written by another evomerge version."""
    try:
        kind = data.get("kind")
        if kind == KIND:
            return path_line(data.get("slices") or [], data.get("outside", BASE))
        if kind is not None:
            return f"({kind} candidate)"
        return recipe_line(data)
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return "(unreadable recipe)"


def plan_from_dict(data: Any) -> Plan:
    """A candidate's plan as the archive stores it: a layer path when marked so, else a recipe."""
    if isinstance(data, Mapping) and data.get("kind") == KIND:
        return LayerPath.from_dict(dict(data))
    return Recipe.from_dict(data)


def source_recipe(path: LayerPath, source: str) -> Recipe:
    """The recipe that materializes one of ``path``'s sources: the base, an expert, or the PS merge."""
    if source == MERGE and path.merge is not None:
        return path.merge
    if source != BASE and source not in path.experts:
        raise UserError(f"path source {source!r} is not one of {', '.join(path.sources)}")
    return Recipe.alone(path.base, path.experts, path.num_layers, None if source == BASE else source,
                        dtype=path.dtype, expert_refs=path.expert_refs)
