"""The search space: which numbers a genome holds and how they become a ``Recipe``.

A genome holds, per layer group, a gene for every parameter an allowed method declares evolvable
in the method registry (per expert for per-expert parameters: a weight, a density where some
allowed method sparsifies), and a categorical gene choosing the merge method when more than one
is allowed: mergekit-evolve fixes one method per run, evomerge lets evolution pick per group.
Genes are declared as pymoo variables (``Real``, ``Choice``) so algorithms handle the mixed
space their own way (pymoo's mixed-variable sampling, mating and duplicate elimination) instead
of rounding scattered through our code. A genome is a ``dict`` gene name -> value, the form
pymoo's mixed-variable algorithms ask and tell; real-only algorithms (CMA-ES, DE) see the same
genes as a vector in ``names`` order.
"""

from __future__ import annotations

import random as _random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

from evomerge.config import SpaceConfig
from evomerge.errors import UserError
from evomerge.search.pool_space import PoolSpace
from evomerge.merge import registry
from evomerge.merge.params import Param
from evomerge.mergekit_config import from_mergekit
from evomerge.search.path_space import PathSpace
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe
from evomerge.serialization import load_yaml

Genome = dict[str, Any]


@dataclass(frozen=True)
class _Group:
    key: str  # gene prefix
    start: int
    end: int
    component: str  # recipe component: 'all', 'attn', or 'outside'


@dataclass
class SearchSpace(PoolSpace):
    def __post_init__(self) -> None:
        super().__post_init__()
        # Every evolvable parameter of an allowed method, in the order the methods declare them.
        self._params: dict[str, Param] = {}
        for method in self.config.methods:
            for param in registry.method(method).params:
                if param.evolvable:
                    self._params.setdefault(param.name, param)
        outside = _Group("out", 0, 0, "outside")
        # More knots than layers would be a knot per layer: capped there, so the default works
        # on any depth (a one-layer model has nothing to profile and gets granularity's groups).
        knots = min(self.config.knots, self.num_layers) if self.num_layers >= 2 else 0
        # The layers the knots sit at, evenly from the first block to the last: on layers, so a
        # recipe's value there is the knot's and ``encode`` inverts ``decode``.
        self._knots = [round(i * (self.num_layers - 1) / (knots - 1)) for i in range(knots)]
        if self._knots:
            # Genes live at the knots; the recipe has a group per layer, interpolated between them.
            self._groups = [outside] + [_Group(f"L{n}", n, n + 1, "all") for n in range(self.num_layers)]
            self._gene_groups = [outside] + [_Group(f"k{i}", p, p + 1, "all") for i, p in enumerate(self._knots)]
            return
        size = self.config.granularity or self.num_layers
        spans = [(s, min(s + size, self.num_layers)) for s in range(0, self.num_layers, size)]
        groups = [outside]
        for start, end in spans:
            key = f"L{start}-{end - 1}"
            if self.config.split_components:
                # Norms follow the MLP genes; attention tensors get their own.
                groups += [_Group(f"{key}.mlp", start, end, "all"), _Group(f"{key}.attn", start, end, "attn")]
            else:
                groups.append(_Group(key, start, end, "all"))
        self._groups = groups
        self._gene_groups = groups

    # --- genes -------------------------------------------------------------------------------
    @property
    def mixed(self) -> bool:
        return len(self.config.methods) > 1

    @property
    def names(self) -> list[str]:
        names: list[str] = []
        for group in self._gene_groups:
            if self.mixed:
                names.append(f"{group.key}.method")
            for expert in self.experts:
                names += [f"{group.key}.{expert}.{p.name}" for p in self._params.values() if p.scope == "expert"]
            names += [f"{group.key}.{p.name}" for p in self._params.values() if p.scope == "global"]
        return names

    def _bounds(self, name: str) -> tuple[float, float]:
        """A gene's range: the space config's override for its parameter where it has one
        (``space.weight``, ``space.density``), else the range the parameter declares."""
        param = self._params[name.rsplit(".", 1)[1]]
        override = getattr(self.config, param.name, None)
        low, high = override if override is not None else param.search
        return float(low), float(high)

    def pymoo_vars(self) -> dict[str, Any]:
        """The genes as pymoo variables, for mixed-variable problems."""
        from pymoo.core.variable import Choice, Real

        return {name: Choice(options=list(self.config.methods)) if name.endswith(".method")
                else Real(bounds=self._bounds(name)) for name in self.names}

    def bounds(self) -> tuple[list[float], list[float]]:
        """Lower and upper bounds of a real-only space, in ``names`` order."""
        if self.mixed:
            raise UserError(f"this algorithm needs real-valued genes, but space.methods="
                            f"{list(self.config.methods)} adds a categorical method gene; "
                            f"use one method or a mixed-variable algorithm (ga, nsga2, ...)")
        pairs = [self._bounds(n) for n in self.names]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def as_genome(self, x: Mapping[str, Any] | Sequence[float]) -> Genome:
        """A genome as a dict, from a dict (pymoo mixed variables) or a vector in ``names`` order."""
        if isinstance(x, Mapping):
            genome = {name: x[name] for name in self.names}
        else:
            values = list(x)
            if len(values) != len(self.names):
                raise ValueError(f"genome has {len(values)} values, the space {len(self.names)} genes")
            genome = dict(zip(self.names, values))
        return {k: v if k.endswith(".method") else float(v) for k, v in genome.items()}

    def vector(self, genome: Mapping[str, Any]) -> list[float]:
        return [float(v) for k, v in self.as_genome(genome).items() if not k.endswith(".method")]

    def random(self, rng: _random.Random) -> Genome:
        return {name: rng.choice(self.config.methods) if name.endswith(".method")
                else rng.uniform(*self._bounds(name)) for name in self.names}

    # --- decode / encode --------------------------------------------------------------------
    def _config(self, genome: Genome, group: _Group) -> MethodConfig:
        method = genome[f"{group.key}.method"] if self.mixed else self.config.methods[0]
        spec = registry.method(method)
        # Genes of parameters the method does not take stay out of the recipe, so genomes that
        # merge alike hash alike.
        taken = [p for p in spec.params if p.name in self._params]
        experts = {e: ExpertParams(**{p.name: genome[f"{group.key}.{e}.{p.name}"] for p in taken if p.scope == "expert"})
                   for e in self.experts}
        return MethodConfig(method, experts, **{p.name: genome[f"{group.key}.{p.name}"]
                                                for p in taken if p.scope == "global"})

    def _per_layer(self, genome: Genome) -> Genome:
        """A knot genome spelled out per layer: each number linear between the two nearest
        knots, the method (when evolved) the nearest knot's. A few knots keep the genome small
        (what a sample-efficient search needs) while the recipe still varies layer by layer."""
        out = {k: v for k, v in genome.items() if k.startswith("out.")}
        positions = self._knots
        suffixes = [k.split(".", 1)[1] for k in genome if k.startswith("k0.")]
        for layer in range(self.num_layers):
            left = max(i for i, p in enumerate(positions[:-1]) if p <= layer)
            t = (layer - positions[left]) / (positions[left + 1] - positions[left])
            for suffix in suffixes:
                a, b = genome[f"k{left}.{suffix}"], genome[f"k{left + 1}.{suffix}"]
                # Equal knots give exactly their value, so a flat profile spells a uniform recipe.
                out[f"L{layer}.{suffix}"] = ((a if t < 0.5 else b) if suffix == "method"
                                             else a if a == b else (1 - t) * a + t * b)
        return out

    def decode(self, x: Mapping[str, Any] | Sequence[float]) -> Recipe:
        genome = self.as_genome(x)
        if self._knots:
            genome = self._per_layer(genome)
        outside = self._config(genome, self._groups[0])
        groups = tuple(LayerGroup(g.start, g.end, g.component, self._config(genome, g)) for g in self._groups[1:])
        return Recipe(self.base, self.experts, self.num_layers, groups, outside, expert_refs=self.expert_refs)

    def encode(self, recipe: Recipe) -> Genome:
        """The genome closest to ``recipe``: each group takes the recipe's config at its first
        layer; values are clipped to the bounds (a recipe may lie outside the space)."""
        if tuple(recipe.experts) != self.experts:
            raise UserError(f"recipe merges experts {list(recipe.experts)}, the search space "
                            f"{list(self.experts)}")
        genome: Genome = {}
        for group in self._gene_groups:
            config = (recipe.outside if group.component == "outside"
                      else recipe.config_for(group.start, "mlp" if group.component == "all" else "attn"))
            if self.mixed:
                genome[f"{group.key}.method"] = config.method
            elif config.method != self.config.methods[0]:
                raise UserError(f"recipe uses method {config.method!r}; the search space allows "
                                f"{list(self.config.methods)}")
            if config.method not in self.config.methods:
                raise UserError(f"recipe uses method {config.method!r}; the search space allows "
                                f"{list(self.config.methods)}")
            for param in self._params.values():
                if param.scope == "global":
                    gene = f"{group.key}.{param.name}"
                    genome[gene] = _clip(_value(config.get(param.name), param), self._bounds(gene))
                    continue
                for e in self.experts:
                    # An expert the config leaves out takes no part: weight 0.
                    values = config.experts.get(e, ExpertParams(weight=0.0))
                    gene = f"{group.key}.{e}.{param.name}"
                    genome[gene] = _clip(_value(values.get(param.name), param), self._bounds(gene))
        return genome

    def parent_recipes(self) -> dict[str, Recipe]:
        """The input models and the simplest merges of them, by name: ``base``, ``expert:<name>``
        (that expert alone, as task arithmetic with weight 1) and ``uniform:<w>`` (the space's
        first method with weight w for every expert and its other parameters at their defaults,
        for each weight of ``space.uniform``: a merge the space can spell, so a search can start
        from it). They need no gene: a search scores them as candidates so that what it returns
        is never worse than what the user brought."""
        def alone(expert: str | None) -> Recipe:
            return Recipe.alone(self.base, self.experts, self.num_layers, expert, expert_refs=self.expert_refs)

        def uniform(weight: float) -> Recipe:
            config = MethodConfig(self.config.methods[0], {e: ExpertParams(weight=weight) for e in self.experts})
            return Recipe.uniform(self.base, self.experts, self.num_layers, config, expert_refs=self.expert_refs)

        recipes = {"base": alone(None)}
        recipes.update({f"expert:{e}": alone(e) for e in self.experts})
        recipes.update({f"uniform:{w:g}": uniform(w) for w in self.config.uniform})
        return recipes

    def initial_recipes(self) -> list[Recipe]:
        """Known recipes for the first population, from ``space.initial`` entries: a mapping
        ``{method: ties, weight: 0.5, density: 0.5}`` (uniform over experts and layers) or the
        path of a mergekit YAML or an evomerge recipe YAML."""
        recipes = []
        for entry in self.config.initial:
            if isinstance(entry, Mapping):
                recipes.append(self._uniform(entry))
            elif isinstance(entry, str):
                recipes.append(self._read(entry))
            else:
                raise UserError(f"space.initial entry {entry!r} is neither a mapping like "
                                f"{{method: ties, weight: 0.5, density: 0.5}} nor a recipe file path")
        return recipes

    def _uniform(self, entry: Mapping[str, Any]) -> Recipe:
        """One method with the same values everywhere: per-expert parameters for every expert,
        the others for the method; unset ones take the method's defaults, and parameters of
        other methods are ignored (as a recipe ignores them)."""
        method = entry.get("method", self.config.methods[0])
        if method not in self.config.methods:
            raise UserError(f"space.initial method {method!r} is not in space.methods {list(self.config.methods)}")
        spec = registry.method(method)
        allowed = {"method", *registry.known_params("expert"), *registry.known_params("global")}
        unknown = sorted(set(entry) - allowed)
        if unknown:
            raise UserError(f"space.initial entry key {unknown[0]!r} is unknown; valid: {', '.join(sorted(allowed))}")
        params = ExpertParams(**{p.name: entry[p.name] for p in spec.expert_params if p.name in entry})
        config = MethodConfig(method, {e: params for e in self.experts},
                              **{p.name: entry[p.name] for p in spec.global_params if p.name in entry})
        return Recipe.uniform(self.base, self.experts, self.num_layers, config, expert_refs=self.expert_refs)

    def _read(self, path: str) -> Recipe:
        file = Path(path)
        if not file.is_file():
            raise UserError(f"space.initial recipe file {path} does not exist")
        data = load_yaml(file.read_text(), f"space.initial recipe file {path}")
        try:
            if isinstance(data, Mapping) and "merge_method" in data:
                refs = {name: ref for name, ref in (self.expert_refs or {e: e for e in self.experts}).items()}
                recipe = from_mergekit(data, num_layers=self.num_layers)
                # mergekit names experts by path: map them onto the space's expert names.
                by_ref = {ref: name for name, ref in {e: refs.get(e, e) for e in self.experts}.items()}
                rename = {old: by_ref.get(recipe.expert_refs.get(old, old), old) for old in recipe.experts}
                return Recipe.from_dict(_renamed(recipe.to_dict(), rename))
            return Recipe.from_dict(data)
        except UserError as error:  # name the file: a space may read several
            raise UserError(f"space.initial recipe file {path}: {error}") from None


def _value(value: float | None, param: Param) -> float:
    """A recipe's value for a gene, or the parameter's default where the method lacks it."""
    return float(param.default if value is None else value)


def _clip(value: float, bounds: tuple[float, float]) -> float:
    return min(max(float(value), bounds[0]), bounds[1])


def _renamed(data: dict[str, Any], rename: Mapping[str, str]) -> dict[str, Any]:
    def config(c: dict[str, Any]) -> dict[str, Any]:
        return {**c, "experts": {rename.get(k, k): v for k, v in c["experts"].items()}}

    return {**data, "experts": [rename.get(e, e) for e in data["experts"]], "expert_refs": {},
            "outside": config(data["outside"]),
            "groups": [{**g, "config": config(g["config"])} for g in data["groups"]]}


# A genome's space: merge coefficients or layer paths; both decode, encode and name their genes alike.
Space = Union[SearchSpace, PathSpace]


def search_space(config: SpaceConfig, base: str, experts: Sequence[str], num_layers: int,
                 expert_refs: Mapping[str, str] | None = None) -> Space:
    """The space ``space.kind`` names: merge coefficients (``params``) or layer paths (``dataflow``)."""
    refs = dict(expert_refs or {})
    if config.kind == "dataflow":
        return PathSpace(config, base, tuple(experts), num_layers, expert_refs=refs)
    return SearchSpace(config, base, tuple(experts), num_layers, expert_refs=refs)
