"""A merge recipe: which merge method, with which parameters, applies to which tensors.

A recipe is plain data (no torch) because it crosses every boundary in evomerge: a genome decodes
to one, Ray workers receive one pickled and materialize it, the archive keys candidates by its
hash, and a user exports it, as evomerge YAML or as a mergekit config that redoes the merge with
``mergekit-yaml``. Tensors are addressed by transformer block and by kind (attention, MLP, the
rest of the block, and everything outside the blocks) because that is the granularity layer-wise
merging works at, and exactly what mergekit's slices and parameter filters can express.

Which parameters a method takes, their defaults and ranges are the method registry's
(:mod:`evomerge.merge.registry`); mergekit I/O lives in :mod:`evomerge.mergekit_config`.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Iterator, Mapping, Sequence

from evomerge.errors import UserError
from evomerge.merge import registry
from evomerge.serialization import canonical_json, checked_mapping, dump_yaml, load_yaml, short_repr

COMPONENTS = ("all", "attn", "mlp")


class ExpertParams(Mapping[str, float]):
    """One expert's per-expert parameters by name (mergekit's names, as the method registry
    declares them): ``ExpertParams(weight=0.6, density=0.5)``. Unset ones take the method's
    default once a :class:`MethodConfig` holds them; any name some registered method takes is
    accepted, so one set of values can be tried under several methods."""

    __slots__ = ("_values",)

    def __init__(self, **values: Any) -> None:
        known = registry.known_params("expert")
        checked = {}
        for key, value in values.items():
            if key not in known:
                raise UserError(f"unknown per-expert parameter {key!r}; valid: {', '.join(sorted(known))}")
            if value is not None:
                checked[key] = known[key].convert(value, key)
        object.__setattr__(self, "_values", checked)

    def __getitem__(self, key: str) -> float:
        return self._values[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __getattr__(self, key: str) -> float:
        if key.startswith("_"):
            raise AttributeError(key)  # not set yet (unpickling), or private
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"no per-expert parameter {key!r} is set here") from None

    def __reduce__(self):
        return _expert_params, (self._values,)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("ExpertParams is immutable")

    def __repr__(self) -> str:
        return f"ExpertParams({', '.join(f'{k}={v!r}' for k, v in self._values.items())})"

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ExpertParams:
        checked_mapping(data, where, optional=list(registry.known_params("expert")))
        try:
            return cls(**data)
        except UserError as error:
            raise UserError(f"{where}.{error}") from None


class MethodConfig:
    """One merge method and its parameters; an expert left out takes no part.

    Built as ``MethodConfig("ties", {"add": ExpertParams(weight=0.5)}, lambda_=0.8)`` (``lambda_``
    is ``lambda``, a Python keyword). Parameters are resolved against the method's registry
    entry at once: each holds its value or the method's default, and parameters the method does
    not take are dropped, so two configs that merge alike compare, serialize and hash alike."""

    __slots__ = ("method", "experts", "params", "_hash")

    def __init__(self, method: str, experts: Mapping[str, ExpertParams], **params: Any) -> None:
        if not isinstance(method, str) or not method:
            raise UserError(f"merge method must be a non-empty name, got {short_repr(method)}")
        spec = registry.method(method)
        if not isinstance(experts, Mapping):
            raise UserError(f"experts of a {method} config must map names to ExpertParams, "
                            f"got {short_repr(experts)}")
        for name, values in experts.items():
            if not isinstance(name, str) or not name or not isinstance(values, ExpertParams):
                raise UserError(f"experts of a {method} config must map names to "
                                f"ExpertParams, got {short_repr(name)}: {short_repr(values)}")
        known = registry.known_params("global")
        given = {("lambda" if k == "lambda_" else k): v for k, v in params.items()}
        for key, value in given.items():
            if key not in known:
                raise UserError(f"unknown parameter {key!r} for a merge config; valid: "
                                f"{', '.join(sorted(known))}")
        shared = {p.name: p.default if given.get(p.name) is None else p.convert(given[p.name], p.name)
                  for p in spec.global_params}
        resolved = {name: ExpertParams(**{p.name: values.get(p.name, p.default)
                                          for p in spec.expert_params})
                    for name, values in experts.items()}
        for key, value in (("method", method), ("experts", resolved), ("params", shared)):
            object.__setattr__(self, key, value)

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("MethodConfig is immutable")

    def __getattr__(self, key: str) -> Any:
        """A global parameter as an attribute (``config.lambda_``); None where the method has none."""
        if key.startswith("_") or key in MethodConfig.__slots__:
            raise AttributeError(key)  # not set yet, or private
        return self.get("lambda" if key == "lambda_" else key)

    def get(self, key: str) -> Any:
        """A global parameter by its mergekit name; None where the method does not take it."""
        return self.params.get(key)

    def replace(self, *, method: str | None = None, experts: Mapping[str, ExpertParams] | None = None,
                **params: Any) -> MethodConfig:
        """A copy with some values changed (resolved anew for ``method``, when it changes)."""
        return MethodConfig(method or self.method, self.experts if experts is None else experts,
                            **{**self.params, **params})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MethodConfig) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        # Cached, since a materialization looks its config up once per tensor (hundreds per
        # candidate); from sha256, not str hash, so a copy pickled to a worker stays valid there.
        try:
            return object.__getattribute__(self, "_hash")
        except AttributeError:
            digest = hashlib.sha256(canonical_json(self.to_dict()).encode()).digest()
            object.__setattr__(self, "_hash", int.from_bytes(digest[:8], "little"))
            return self._hash

    def __reduce__(self):
        return _method_config, (self.method, self.experts, self.params)

    def __repr__(self) -> str:
        return f"MethodConfig({self.to_dict()!r})"

    def to_dict(self) -> dict[str, Any]:
        """Plain data: the method's own parameters only (None: a default the method derives)."""
        shared = {k: v for k, v in self.params.items() if v is not None}
        return {"method": self.method, **shared,
                "experts": {name: dict(values) for name, values in self.experts.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> MethodConfig:
        known = registry.known_params("global")
        checked_mapping(data, where, required=("method",), optional=("experts", *known))
        experts = checked_mapping(data.get("experts", {}), f"{where}.experts")
        shared = {k: known[k].convert(v, f"{where}.{k}") for k, v in data.items()
                  if k in known and v is not None}
        return cls(data["method"],
                   {name: ExpertParams.from_dict(p, f"{where}.experts.{name}") for name, p in experts.items()},
                   **shared)


def _joined(groups: Sequence[LayerGroup]) -> list[LayerGroup]:
    """``groups`` with each run of adjacent groups of one kind and one config made one group."""
    joined: list[LayerGroup] = []
    for group in sorted(groups, key=lambda g: (g.component, g.start, g.end)):
        last = joined[-1] if joined else None
        if last is not None and last.component == group.component and last.end == group.start \
                and last.config == group.config:
            joined[-1] = LayerGroup(last.start, group.end, group.component, group.config)
        else:
            joined.append(group)
    return joined


def _expert_params(values: Mapping[str, float]) -> ExpertParams:
    return ExpertParams(**values)


def _method_config(method: str, experts: Mapping[str, ExpertParams], params: Mapping[str, Any]) -> MethodConfig:
    return MethodConfig(method, experts, **params)


@dataclass(frozen=True)
class LayerGroup:
    """A half-open range of blocks whose tensors of one kind share a config."""

    start: int
    end: int
    component: str
    config: MethodConfig

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool):
                raise UserError(f"layer group {name} must be an integer, got "
                                f"{short_repr(getattr(self, name))}")
        if not 0 <= self.start < self.end:
            raise UserError(f"layer group [{self.start}, {self.end}) is empty or negative; "
                            f"need 0 <= start < end")
        if self.component not in COMPONENTS:
            raise UserError(f"layer group component {short_repr(self.component)} is not one of "
                            f"{', '.join(COMPONENTS)}")
        if not isinstance(self.config, MethodConfig):
            raise UserError(f"layer group config must be a MethodConfig, got {short_repr(self.config)}")

    @property
    def label(self) -> str:
        return f"{self.component} layers [{self.start}, {self.end})"

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "component": self.component,
                "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerGroup:
        checked_mapping(data, where, required=("start", "end", "config"), optional=("component",))
        return cls(data["start"], data["end"], data.get("component", "all"),
                   MethodConfig.from_dict(data["config"], f"{where}.config"))


@dataclass(frozen=True)
class Recipe:
    """The plan for one merge: a config per block range and kind, and one outside the blocks."""

    base: str
    experts: tuple[str, ...]
    num_layers: int
    groups: tuple[LayerGroup, ...]
    outside: MethodConfig  # embeddings, final norm, LM head
    dtype: str = "float32"
    expert_refs: dict[str, str] = field(default_factory=dict)  # name -> path/hub id; default: name

    def __post_init__(self) -> None:
        for name in ("base", "dtype"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UserError(f"recipe {name} must be a non-empty string, got "
                                f"{short_repr(getattr(self, name))}")
        experts = tuple(self.experts) if isinstance(self.experts, (list, tuple)) else None
        if not experts or not all(isinstance(e, str) and e for e in experts):
            raise UserError(f"recipe experts must be a non-empty list of names, got "
                            f"{short_repr(self.experts)}")
        if len(set(experts)) != len(experts):
            raise UserError(f"recipe experts {list(experts)} name an expert twice")
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) \
                or self.num_layers < 1:
            raise UserError(f"num_layers must be a positive integer, got {short_repr(self.num_layers)}")
        if not isinstance(self.outside, MethodConfig):
            raise UserError(f"recipe outside must be a MethodConfig, got {short_repr(self.outside)}")
        if not isinstance(self.groups, (list, tuple)) or \
                not all(isinstance(g, LayerGroup) for g in self.groups):
            raise UserError(f"recipe groups must be a list of LayerGroup, got "
                            f"{short_repr(self.groups)}")
        refs = self.expert_refs
        if not isinstance(refs, Mapping) or \
                not all(isinstance(v, str) and v for v in refs.values()):
            raise UserError(f"expert_refs must map expert names to model paths, got {short_repr(refs)}")
        for name in refs:
            if name not in experts:
                raise UserError(f"expert_refs names {short_repr(name)}, which is not one of the "
                                f"recipe's experts ({', '.join(experts)})")
        object.__setattr__(self, "experts", experts)
        # Order, identity refs and where a run of equal configs is cut carry no meaning, so
        # equal plans compare (and hash) equal: one candidate, whatever genome spelled it.
        object.__setattr__(self, "groups", tuple(sorted(
            _joined(self.groups), key=lambda g: (g.start, COMPONENTS.index(g.component), g.end))))
        object.__setattr__(self, "expert_refs", {k: v for k, v in refs.items() if k != v})
        self._check_coverage()
        for where, config in self.method_configs():
            for name in config.experts:
                if name not in experts:
                    raise UserError(f"expert {name!r} in the {where} config is not one of the "
                                    f"recipe's experts ({', '.join(experts)})")

    def _check_coverage(self) -> None:
        """Each block needs one 'all' group (its norms) and at most one attn and one mlp group."""
        for component in COMPONENTS:
            owner: list[LayerGroup | None] = [None] * self.num_layers
            for group in (g for g in self.groups if g.component == component):
                if group.end > self.num_layers:
                    raise UserError(f"group {group.label} runs past the model's last layer "
                                    f"{self.num_layers - 1} (num_layers={self.num_layers})")
                for layer in range(group.start, group.end):
                    other = owner[layer]
                    if other is not None:
                        raise UserError(f"layer {layer} is covered twice: by {other.label} and "
                                        f"by {group.label}")
                    owner[layer] = group
            gaps = [layer for layer, g in enumerate(owner) if g is None]
            if component == "all" and gaps:
                raise UserError(f"no 'all' group covers layer{'s' * (len(gaps) > 1)} "
                                f"{_runs(gaps)}; every layer needs one (for its norms, and for "
                                f"attn/mlp tensors without a group of their own)")

    def method_configs(self) -> Iterator[tuple[str, MethodConfig]]:
        """(label, config) of every method config the recipe applies: outside, then each group."""
        yield "outside", self.outside
        for group in self.groups:
            yield group.label, group.config

    def __hash__(self) -> int:
        return hash(self.hash)

    @classmethod
    def uniform(cls, base: str, experts: Sequence[str], num_layers: int, config: MethodConfig,
                *, dtype: str = "float32", expert_refs: Mapping[str, str] | None = None) -> Recipe:
        """The usual hand-made recipe: one config for every tensor."""
        return cls(base, tuple(experts), num_layers, (LayerGroup(0, num_layers, "all", config),),
                   config, dtype, dict(expert_refs or {}))

    @classmethod
    def alone(cls, base: str, experts: Sequence[str], num_layers: int, expert: str | None = None,
              *, dtype: str = "float32", expert_refs: Mapping[str, str] | None = None) -> Recipe:
        """One input model spelled as a recipe: the base (``expert`` None: every task vector at
        weight 0) or one expert (its own at weight 1), as task arithmetic. The one spelling of a
        parent, so a search's parents and a layer path's sources hash alike."""
        if expert is not None and expert not in experts:
            raise UserError(f"expert {expert!r} is not one of {', '.join(experts)}")
        config = MethodConfig("task_arithmetic", {e: ExpertParams(weight=1.0 if e == expert else 0.0) for e in experts})
        return cls.uniform(base, experts, num_layers, config, dtype=dtype, expert_refs=expert_refs)

    def config_for(self, layer: int | None, component: str) -> MethodConfig:
        """Config for a tensor of block ``layer`` (None: outside the blocks) of kind ``component``
        ('attn', 'mlp', or 'all'/'norm' for the rest); an attn/mlp group beats an 'all' group."""
        if component not in COMPONENTS + ("norm",):
            raise UserError(f"tensor component {component!r} is not one of "
                            f"{', '.join(COMPONENTS + ('norm',))}")
        if layer is None:
            return self.outside
        if not 0 <= layer < self.num_layers:
            raise UserError(f"layer {layer} is outside this recipe's {self.num_layers} layers "
                            f"(0-{self.num_layers - 1})")
        kinds = (component, "all") if component in COMPONENTS[1:] else ("all",)
        return next(g.config for kind in kinds for g in self.groups
                    if g.component == kind and g.start <= layer < g.end)

    # --- evomerge's own format -----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "experts": list(self.experts),
                "expert_refs": dict(self.expert_refs), "num_layers": self.num_layers,
                "dtype": self.dtype, "outside": self.outside.to_dict(),
                "groups": [g.to_dict() for g in self.groups]}

    @classmethod
    def from_dict(cls, data: Any) -> Recipe:
        checked_mapping(data, "recipe", required=("base", "experts", "num_layers", "groups", "outside"),
                 optional=("dtype", "expert_refs"))
        groups = data["groups"]
        if not isinstance(groups, list):
            raise UserError(f"recipe groups must be a list, got {short_repr(groups)}")
        return cls(base=data["base"], experts=data["experts"], num_layers=data["num_layers"],
                   groups=tuple(LayerGroup.from_dict(g, f"groups[{i}]")
                                for i, g in enumerate(groups)),
                   outside=MethodConfig.from_dict(data["outside"], "outside"),
                   dtype=data.get("dtype", "float32"),
                   expert_refs=checked_mapping(data.get("expert_refs") or {}, "expert_refs"))

    def to_yaml(self) -> str:
        return dump_yaml(self.to_dict())

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        return cls.from_dict(load_yaml(text, "recipe"))

    @cached_property
    def hash(self) -> str:
        """Identity of the plan: what is merged how, not where the models live (base and
        expert_refs are left out), so a recipe moved to another machine keeps its identity and
        seed. Floats count to 12 significant digits, so arithmetic noise is no new candidate."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("base", "expert_refs")}
        return hashlib.sha256(canonical_json(content).encode()).hexdigest()[:16]

    @property
    def seed(self) -> int:
        """Seed for randomized methods (DARE, DELLA): the same recipe drops the same weights."""
        return int(self.hash[:8], 16)

    def summary(self) -> str:
        """One line for tables (``recipe_line`` of this recipe's dict)."""
        return recipe_line(self.to_dict())


def recipe_line(data: Mapping[str, Any]) -> str:
    """One line for tables, read from a recipe's dict (as the archive stores it) without
    validating it, so a report can summarize thousands of candidates quickly: the method(s), the
    layer-weighted mean λ, each expert's weight and density, the number of layer groups; '≈'
    marks a mean of values that vary by group. Raises KeyError/TypeError on a malformed dict."""
    spans = [(g["end"] - g["start"], g["config"]) for g in data["groups"]]
    outside = data["outside"]
    methods = dict.fromkeys(c["method"] for _, c in [*spans, (1, outside)])
    scaled = [(n, c["lambda"]) for n, c in spans if c.get("lambda") is not None]
    parts = ["+".join(methods) + (f" λ{_mean(scaled)}" if scaled else "")]
    for name in data["experts"]:
        present = [(n, c["experts"][name]) for n, c in spans if name in c.get("experts", {})]
        shown = [f"{letter}{_mean(values)}" for letter, key in (("w", "weight"), ("d", "density"))
                 if (values := [(n, p[key]) for n, p in present if key in p])]
        if shown:
            parts.append(" ".join([name, *shown]))
    count = len(spans)
    return " · ".join(parts + [f"{count} layer group{'s' * (count != 1)}"])


def _runs(layers: list[int]) -> str:
    """'3-5, 9' for [3, 4, 5, 9]."""
    runs: list[list[int]] = []
    for layer in layers:
        if runs and layer == runs[-1][1] + 1:
            runs[-1][1] = layer
        else:
            runs.append([layer, layer])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _mean(values: list[tuple[int, float]]) -> str:
    total = sum(n for n, _ in values)
    mean = sum(n * v for n, v in values) / max(total, 1)
    return f"{'=' if len({v for _, v in values}) == 1 else '≈'}{mean:.2f}"
