"""The data-flow search space: genomes that decode to a :class:`~evomerge.layer_path.LayerPath`.

Sakana's data-flow search kept an include bit for each of 3 × (all models' blocks) slots plus an
M × M scaling matrix and needed 12,800 evaluations. evomerge users have a few hundred, so a
genome here spells a path as ``space.slices`` contiguous slices that roughly follow depth:
boundary ``i`` sits at a depth ``cut`` (a fraction of the blocks), and the next slice starts
``overlap`` blocks before it (repeating blocks; negative: skipping them). Each slice takes its
blocks from one source (the base, an expert, or the PS merge) and scales the hidden state it
receives. With equal sources, no overlap and unit scales a genome *is* one of the input models,
so every parent is a point of the space and a search starts from the best of them; the genes a
search moves are few (4 per slice) and each moves the path a little, which is what CMA-ES and
a small budget need. Every gene is real (a source is a number rounded down to an index), so
any pymoo algorithm runs on it, CMA-ES included.
"""

from __future__ import annotations

import math
import random as _random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from evomerge.errors import UserError
from evomerge.search.pool_space import PoolSpace
from evomerge.layer_path import BASE, MERGE, LayerPath, Slice
from evomerge.recipe import Recipe

Genome = dict[str, Any]


@dataclass
class PathSpace(PoolSpace):
    def __post_init__(self) -> None:
        super().__post_init__()
        if self.config.initial:
            raise UserError(f"space.initial={list(self.config.initial)!r} holds merge recipes; a dataflow search "
                            f"starts from its sources (the parents); set space.initial=[]")
        self.merge = _read_merge(self.config.merge, self.experts, self.num_layers) if self.config.merge else None
        self.sources = (BASE, *self.experts) + ((MERGE,) if self.merge is not None else ())
        self._slices = self.config.slices

    # --- genes -------------------------------------------------------------------------------
    mixed = False

    @property
    def names(self) -> list[str]:
        names = []
        for i in range(self._slices):
            names.append(f"s{i}.source")
            if i:
                names += [f"s{i}.cut", f"s{i}.overlap"]
            names.append(f"s{i}.log2_scale")
        return names + ["out.source"]

    def _bounds(self, name: str) -> tuple[float, float]:
        gene = name.rsplit(".", 1)[1]
        if gene == "source":
            return 0.0, float(len(self.sources))
        if gene == "cut":
            return 0.0, 1.0
        if gene == "overlap":
            return -float(self.config.overlap), float(self.config.overlap)
        low, high = self.config.scale
        return math.log2(low), math.log2(high)

    def pymoo_vars(self) -> dict[str, Any]:
        from pymoo.core.variable import Real

        return {name: Real(bounds=self._bounds(name)) for name in self.names}

    def bounds(self) -> tuple[list[float], list[float]]:
        pairs = [self._bounds(n) for n in self.names]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def as_genome(self, x: Mapping[str, Any] | Sequence[float]) -> Genome:
        if isinstance(x, Mapping):
            return {name: float(x[name]) for name in self.names}
        values = list(x)
        if len(values) != len(self.names):
            raise ValueError(f"genome has {len(values)} values, the space {len(self.names)} genes")
        return {name: float(v) for name, v in zip(self.names, values)}

    def vector(self, genome: Mapping[str, Any]) -> list[float]:
        return list(self.as_genome(genome).values())

    def random(self, rng: _random.Random) -> Genome:
        return {name: rng.uniform(*self._bounds(name)) for name in self.names}

    # --- decode / encode --------------------------------------------------------------------
    def _source(self, value: float) -> str:
        return self.sources[min(max(int(math.floor(value)), 0), len(self.sources) - 1)]

    def decode(self, x: Mapping[str, Any] | Sequence[float]) -> LayerPath:
        genome = self.as_genome(x)
        layers, k = self.num_layers, self._slices
        boundaries = sorted((min(max(genome[f"s{i}.cut"], 0.0), 1.0), genome[f"s{i}.overlap"]) for i in range(1, k))
        ends = [round(cut * layers) for cut, _ in boundaries] + [layers]
        starts = [0] + [min(max(round(cut * layers) - round(overlap), 0), layers) for cut, overlap in boundaries]
        slices = [Slice(self._source(genome[f"s{i}.source"]), starts[i], max(ends[i], starts[i]),
                        _scale(genome[f"s{i}.log2_scale"], self.config.scale)) for i in range(k)]
        if not any(s.length for s in slices):  # every slice cut away: the first source whole
            slices = [Slice(slices[0].source, 0, layers)]
        return LayerPath(self.base, self.experts, layers, tuple(slices), self._source(genome["out.source"]),
                         self.merge, expert_refs=self.expert_refs)

    def encode(self, path: Recipe | LayerPath) -> Genome:
        """The genome of a whole-model path (one source, every block, unit scale): the parents."""
        if not isinstance(path, LayerPath) or len(path.slices) != 1 or path.slices[0].length != self.num_layers \
                or path.slices[0].scale != 1.0 or path.outside != path.slices[0].source:
            raise UserError("only a whole model (one source, all blocks, unit scale) has a genome in a dataflow space")
        index = self.sources.index(path.outside) + 0.5
        genome: Genome = {}
        for i in range(self._slices):
            genome[f"s{i}.source"] = index
            if i:
                genome[f"s{i}.cut"] = i / self._slices
                genome[f"s{i}.overlap"] = 0.0
            genome[f"s{i}.log2_scale"] = 0.0
        genome["out.source"] = index
        return {name: genome[name] for name in self.names}

    def parent_recipes(self) -> dict[str, LayerPath]:
        """The sources, each whole: ``base``, ``expert:<name>`` and (PS+DFS) ``merge``."""
        whole = {"base": BASE, **{f"expert:{e}": e for e in self.experts}}
        if self.merge is not None:
            whole["merge"] = MERGE
        return {name: LayerPath.whole(source, self.base, self.experts, self.num_layers, merge=self.merge,
                                      expert_refs=self.expert_refs) for name, source in whole.items()}

    def initial_recipes(self) -> list[LayerPath]:
        return []


def _scale(log2_scale: float, bounds: Sequence[float]) -> float:
    """A slice's entry scale, to two decimals: finer steps change nothing a search could see, and
    a scale that rounds to 1 lets two slices of one source join (one candidate, one hash)."""
    return round(min(max(2.0 ** log2_scale, bounds[0]), bounds[1]), 2)


def _read_merge(where: str, experts: tuple[str, ...], num_layers: int) -> Recipe:
    """The PS merge of PS+DFS: a recipe file, or an export folder holding one."""
    path = Path(where).expanduser()
    file = path / "recipe.yaml" if path.is_dir() else path
    if not file.is_file():
        raise UserError(f"space.merge={where} is neither a recipe file nor an export folder with recipe.yaml")
    recipe = Recipe.from_yaml(file.read_text())
    if tuple(recipe.experts) != experts or recipe.num_layers != num_layers:
        raise UserError(f"space.merge={where} merges experts {list(recipe.experts)} over {recipe.num_layers} blocks; "
                        f"this search has experts {list(experts)} over {num_layers}")
    return recipe
