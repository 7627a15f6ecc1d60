"""A merge recipe: which merge method, with which parameters, applies to which tensors.

A recipe is plain data (no torch) because it crosses every boundary in evomerge: a genome decodes
to one, Ray workers receive one pickled and materialize it, the archive keys candidates by its
hash, and a user exports it, as evomerge YAML or as a mergekit config that redoes the merge with
``mergekit-yaml``. Tensors are addressed by transformer block and by kind (attention, MLP, the
rest of the block, and everything outside the blocks) because that is the granularity layer-wise
merging works at, and exactly what mergekit's slices and parameter filters can express.

The mergekit side assumes Llama-style tensor names (``model.layers.N.self_attn.*``,
``model.layers.N.mlp.*``, ``model.embed_tokens``, ``model.norm``, ``lm_head``), as in the zoo's
SmolLM2 and in Mistral, Qwen2 and most merged families: mergekit filters match substrings of them.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any, Callable, Iterator, Mapping, Sequence

import yaml

from evomerge.errors import UserError

COMPONENTS = ("all", "attn", "mlp")
# Substrings that mark a block tensor's kind; the mergekit export filters on the same ones.
_FILTERS = {"attn": "self_attn", "mlp": "mlp"}
_IN_BLOCK = "layers."  # in every block tensor's name, in no name outside the blocks

_EXPERT_KEYS = ("weight", "density", "gamma", "epsilon")
_GLOBAL_KEYS = ("lambda", "normalize", "rescale", "t", "alpha", "beta", "k", "lambda_tall",
                "filter_wise")
_BOOL_KEYS = ("normalize", "rescale", "filter_wise")
# Globals only some methods read (LiNeS, consensus, model_stock): None means the method's default,
# and they are written (and hashed) only when set, so recipes that never set them keep their hash.
_OPTIONAL_KEYS = ("alpha", "beta", "k", "lambda_tall", "filter_wise")

# Facts about mergekit 0.1.x. The methods whose parameters map one to one onto a recipe's (its
# other methods take parameters a recipe lacks, or evomerge does not implement them).
_MERGEKIT_METHODS = frozenset({
    "breadcrumbs", "breadcrumbs_ties", "dare_linear", "dare_ties", "della", "della_linear",
    "linear", "model_stock", "slerp", "task_arithmetic", "ties"})
# Methods that take no base: mergekit would add a configured base_model to their inputs.
_BASELESS = frozenset({"linear"})
# mergekit defaults that differ from ours (None: mergekit has no default, the key is required).
# Exports always write these keys; imports fill in mergekit's value when a config omits them.
_MERGEKIT_DEFAULTS: dict[str, dict[str, float | None]] = {
    "della": {"epsilon": 0.15}, "della_linear": {"epsilon": 0.15}, "slerp": {"t": None}}
# Top-level keys that do not change merged weights of same-vocabulary models (evomerge's pools
# require one vocabulary), and a parameter that only changes how masks are stored.
_MERGEKIT_IGNORED = ("tokenizer_source", "tokenizer", "chat_template", "out_dtype")
_IGNORED_PARAMS = ("int8_mask",)

# Tensor names standing for each kind when resolving a mergekit config's filters.
_PROBES = {
    "attn": tuple(f"self_attn.{p}_proj.weight" for p in "qkvo"),
    "mlp": tuple(f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")),
    "all": ("input_layernorm.weight", "post_attention_layernorm.weight"),
}
_PRE_WEIGHTS = ("model.embed_tokens.weight",)
_POST_WEIGHTS = ("model.norm.weight", "lm_head.weight")


def component_of(tensor_name: str) -> str:
    """Kind of a block tensor, as ``config_for`` and the mergekit filters understand it."""
    return next((kind for kind, mark in _FILTERS.items() if mark in tensor_name), "all")


@dataclass(frozen=True)
class ExpertParams:
    """Per-expert parameters, named as mergekit names them (methods ignore those they lack)."""

    weight: float = 1.0
    density: float = 1.0
    gamma: float = 0.01
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        for f in fields(self):
            object.__setattr__(self, f.name, _float(getattr(self, f.name), f.name))

    @classmethod
    def from_dict(cls, data: Any, where: str) -> ExpertParams:
        _mapping(data, where, optional=_EXPERT_KEYS)
        return cls(**{k: _float(v, f"{where}.{k}") for k, v in data.items()})


@dataclass(frozen=True)
class MethodConfig:
    """One merge method and its parameters; an expert left out takes no part."""

    method: str
    experts: dict[str, ExpertParams]
    lambda_: float = 1.0
    normalize: bool | None = None  # None: the method's default
    rescale: bool | None = None
    t: float = 0.5
    alpha: float | None = None  # None: the method's default, for these and the two above
    beta: float | None = None
    k: float | None = None
    lambda_tall: float | None = None
    filter_wise: bool | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.method, str) or not self.method:
            raise UserError(f"merge method must be a non-empty name, got {_short(self.method)}")
        if not isinstance(self.experts, Mapping):
            raise UserError(f"experts of a {self.method} config must map names to ExpertParams, "
                            f"got {_short(self.experts)}")
        for name, params in self.experts.items():
            if not isinstance(name, str) or not name or not isinstance(params, ExpertParams):
                raise UserError(f"experts of a {self.method} config must map names to "
                                f"ExpertParams, got {_short(name)}: {_short(params)}")
        object.__setattr__(self, "experts", dict(self.experts))  # the caller's dict stays theirs
        for key in _GLOBAL_KEYS:
            object.__setattr__(self, _attr(key), _converter(key)(self.get(key), key))

    def __hash__(self) -> int:
        # Cached, since a materialization looks its config up once per tensor (hundreds per
        # candidate); from sha256, not str hash, so a copy pickled to a worker stays valid there.
        if "_hash" not in self.__dict__:
            digest = hashlib.sha256(_canonical_json(self.to_dict()).encode()).digest()
            object.__setattr__(self, "_hash", int.from_bytes(digest[:8], "little"))
        return self.__dict__["_hash"]

    def get(self, key: str) -> Any:
        """A global parameter by its mergekit name (``lambda`` is ``lambda_`` in Python)."""
        return getattr(self, _attr(key))

    def to_dict(self) -> dict[str, Any]:
        shared = {k: self.get(k) for k in _GLOBAL_KEYS
                  if k not in _OPTIONAL_KEYS or self.get(k) is not None}
        return {"method": self.method, **shared,
                "experts": {name: asdict(p) for name, p in self.experts.items()}}

    @classmethod
    def from_dict(cls, data: Any, where: str = "config") -> MethodConfig:
        _mapping(data, where, required=("method",), optional=("experts",) + _GLOBAL_KEYS)
        experts = _mapping(data.get("experts", {}), f"{where}.experts")
        converted = {k: _converter(k)(data[k], f"{where}.{k}") for k in _GLOBAL_KEYS if k in data}
        return cls(method=data["method"],
                   experts={name: ExpertParams.from_dict(p, f"{where}.experts.{name}")
                            for name, p in experts.items()},
                   **{_attr(k): v for k, v in converted.items()})


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
                                f"{_short(getattr(self, name))}")
        if not 0 <= self.start < self.end:
            raise UserError(f"layer group [{self.start}, {self.end}) is empty or negative; "
                            f"need 0 <= start < end")
        if self.component not in COMPONENTS:
            raise UserError(f"layer group component {_short(self.component)} is not one of "
                            f"{', '.join(COMPONENTS)}")
        if not isinstance(self.config, MethodConfig):
            raise UserError(f"layer group config must be a MethodConfig, got {_short(self.config)}")

    @property
    def label(self) -> str:
        return f"{self.component} layers [{self.start}, {self.end})"

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "component": self.component,
                "config": self.config.to_dict()}

    @classmethod
    def from_dict(cls, data: Any, where: str) -> LayerGroup:
        _mapping(data, where, required=("start", "end", "config"), optional=("component",))
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
                                f"{_short(getattr(self, name))}")
        experts = tuple(self.experts) if isinstance(self.experts, (list, tuple)) else None
        if not experts or not all(isinstance(e, str) and e for e in experts):
            raise UserError(f"recipe experts must be a non-empty list of names, got "
                            f"{_short(self.experts)}")
        if len(set(experts)) != len(experts):
            raise UserError(f"recipe experts {list(experts)} name an expert twice")
        if not isinstance(self.num_layers, int) or isinstance(self.num_layers, bool) \
                or self.num_layers < 1:
            raise UserError(f"num_layers must be a positive integer, got {_short(self.num_layers)}")
        if not isinstance(self.outside, MethodConfig):
            raise UserError(f"recipe outside must be a MethodConfig, got {_short(self.outside)}")
        if not isinstance(self.groups, (list, tuple)) or \
                not all(isinstance(g, LayerGroup) for g in self.groups):
            raise UserError(f"recipe groups must be a list of LayerGroup, got "
                            f"{_short(self.groups)}")
        refs = self.expert_refs
        if not isinstance(refs, Mapping) or \
                not all(isinstance(v, str) and v for v in refs.values()):
            raise UserError(f"expert_refs must map expert names to model paths, got {_short(refs)}")
        for name in refs:
            if name not in experts:
                raise UserError(f"expert_refs names {_short(name)}, which is not one of the "
                                f"recipe's experts ({', '.join(experts)})")
        object.__setattr__(self, "experts", experts)
        # Order and identity refs carry no meaning, so equal plans compare (and hash) equal.
        object.__setattr__(self, "groups", tuple(sorted(
            self.groups, key=lambda g: (g.start, COMPONENTS.index(g.component), g.end))))
        object.__setattr__(self, "expert_refs", {k: v for k, v in refs.items() if k != v})
        self._check_coverage()
        for where, config in self._configs():
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

    def _configs(self) -> Iterator[tuple[str, MethodConfig]]:
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
        kinds = (component, "all") if component in _FILTERS else ("all",)
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
        _mapping(data, "recipe", required=("base", "experts", "num_layers", "groups", "outside"),
                 optional=("dtype", "expert_refs"))
        groups = data["groups"]
        if not isinstance(groups, list):
            raise UserError(f"recipe groups must be a list, got {_short(groups)}")
        return cls(base=data["base"], experts=data["experts"], num_layers=data["num_layers"],
                   groups=tuple(LayerGroup.from_dict(g, f"groups[{i}]")
                                for i, g in enumerate(groups)),
                   outside=MethodConfig.from_dict(data["outside"], "outside"),
                   dtype=data.get("dtype", "float32"),
                   expert_refs=_mapping(data.get("expert_refs") or {}, "expert_refs"))

    def to_yaml(self) -> str:
        return _dump_yaml(self.to_dict())

    @classmethod
    def from_yaml(cls, text: str) -> Recipe:
        return cls.from_dict(_load_yaml(text, "recipe"))

    @cached_property
    def hash(self) -> str:
        """Identity of the plan: what is merged how, not where the models live (base and
        expert_refs are left out), so a recipe moved to another machine keeps its identity and
        seed. Floats count to 12 significant digits, so arithmetic noise is no new candidate."""
        content = {k: v for k, v in self.to_dict().items() if k not in ("base", "expert_refs")}
        return hashlib.sha256(_canonical_json(content).encode()).hexdigest()[:16]

    @property
    def seed(self) -> int:
        """Seed for randomized methods (DARE, DELLA): the same recipe drops the same weights."""
        return int(self.hash[:8], 16)

    def summary(self) -> str:
        """One line for tables; '≈' marks a layer-weighted mean of values that vary by group."""
        spans = [(g.end - g.start, g.config) for g in self.groups]
        methods = dict.fromkeys(c.method for _, c in spans + [(1, self.outside)])
        parts = [f"{'+'.join(methods)} λ{_mean([(n, c.lambda_) for n, c in spans])}"]
        for name in self.experts:
            present = [(n, c.experts[name]) for n, c in spans if name in c.experts]
            if present:
                parts.append(f"{name} w{_mean([(n, p.weight) for n, p in present])} "
                             f"d{_mean([(n, p.density) for n, p in present])}")
        count = len(self.groups)
        return " · ".join(parts + [f"{count} layer group{'s' * (count != 1)}"])

    # --- mergekit --------------------------------------------------------------------------------

    def to_mergekit(self) -> dict[str, Any]:
        """A mergekit config doing the same merge: the ``models`` form when every block shares
        one layout, else one slice per run of layers between group boundaries. attn/mlp and
        outside values become ``filter`` lists (mergekit takes embeddings' parameters from the
        first slice and the final norm's and head's from the last, so outside values go there
        behind a ``layers.`` filter). Raises UserError for what mergekit cannot express: more than
        one method, a method mergekit lacks, experts merged in some places but not others, and
        normalize/rescale left to the default for some tensors of a slice but set for others."""
        labelled = list(self._configs())
        by_method: dict[str, list[str]] = {}
        for where, config in labelled:
            by_method.setdefault(config.method, []).append(where)
        if len(by_method) > 1:
            used = "; ".join(f"{m} for {', '.join(ws)}" for m, ws in by_method.items())
            raise UserError(f"mergekit applies one merge_method to the whole model, but this "
                            f"recipe uses {used}")
        method = self.outside.method
        if method not in _MERGEKIT_METHODS:
            raise UserError(f"merge method {method!r} has no mergekit equivalent; methods that "
                            f"export: {', '.join(sorted(_MERGEKIT_METHODS))}")
        names = [e for e in self.experts if e in self.outside.experts]
        for where, config in labelled:
            if set(config.experts) != set(names):
                raise UserError(f"mergekit merges the same models everywhere, but {where} merges "
                                f"{sorted(config.experts)} and outside merges {sorted(names)}")

        configs = [c for _, c in labelled]
        special = _MERGEKIT_DEFAULTS.get(method, {})
        expert_defaults, global_defaults = _defaults()
        expert_keys = [k for k in _EXPERT_KEYS if k == "weight" or k in special or any(
            getattr(p, k) != expert_defaults[k] for c in configs for p in c.experts.values())]
        global_keys = [k for k in _GLOBAL_KEYS if k in special or any(
            c.get(k) != global_defaults[k] for c in configs)]

        cuts = sorted({0, self.num_layers} | {g.start for g in self.groups}
                      | {g.end for g in self.groups})
        segments = list(zip(cuts, cuts[1:]))
        with_base = method not in _BASELESS
        out: dict[str, Any] = {"merge_method": method}
        if with_base:
            out["base_model"] = self.base
        out["dtype"] = self.dtype
        slices = []
        for index, (start, end) in enumerate(segments):
            kinds = {"attn": self.config_for(start, "attn"), "mlp": self.config_for(start, "mlp"),
                     "all": self.config_for(start, "all")}
            kinds["outside"] = self.outside if index in (0, len(segments) - 1) else kinds["all"]
            where = f"layers [{start}, {end})"
            sources = [{"model": self.base}] if with_base else []
            for name in names:
                params = _settings(expert_keys, where, kinds,
                                   lambda c, key: getattr(c.experts[name], key))
                sources.append({"model": self.expert_refs.get(name, name), "parameters": params})
            shared = _settings(global_keys, where, kinds, MethodConfig.get)
            slices.append((start, end, sources, shared))
        if len(slices) == 1:
            _, _, sources, shared = slices[0]
            if shared:
                out["parameters"] = shared
            out["models"] = sources
        else:
            out["slices"] = [{"sources": [{"model": s["model"], "layer_range": [start, end],
                                           **({"parameters": s["parameters"]} if "parameters" in s
                                              else {})} for s in sources],
                              **({"parameters": shared} if shared else {})}
                             for start, end, sources, shared in slices]
        return out

    def to_mergekit_yaml(self) -> str:
        return _dump_yaml(self.to_mergekit())

    @classmethod
    def from_mergekit(cls, config: dict[str, Any] | str,
                      expert_names: Mapping[str, str] | None = None,
                      num_layers: int | None = None, *, base: str | None = None) -> Recipe:
        """The recipe a mergekit config (``models`` or ``slices`` form, with filters and
        gradients) amounts to, resolved per layer exactly as mergekit resolves it; layers whose
        values vary along a gradient get one group each. ``expert_names`` maps model references
        to names (default: the reference's last path component); ``num_layers`` is needed for the
        ``models`` form, ``base`` when the config has no base_model (linear)."""
        data = _load_yaml(config, "mergekit config") if isinstance(config, str) else config
        _mapping(data, "mergekit config", required=("merge_method",),
                 optional=("base_model", "dtype", "parameters", "models", "slices")
                 + _MERGEKIT_IGNORED)
        method = data["merge_method"]
        if not isinstance(method, str):
            raise UserError(f"merge_method must be a name, got {_short(method)}")
        with_base = method not in _BASELESS
        if not with_base and data.get("base_model") is not None:
            raise UserError(f"a {method} merge in mergekit counts base_model "
                            f"{_short(data['base_model'])} as one more input, which a recipe "
                            f"cannot express; drop base_model and pass base=")
        base_ref = data.get("base_model", base)
        if base_ref is None:
            raise UserError("the mergekit config has no base_model; pass base= (the model the "
                            "experts were fine-tuned from)")
        base_ref = _ref(base_ref, "base_model")
        top = _params(data.get("parameters"), "parameters")
        if ("models" in data) == ("slices" in data):
            raise UserError("a mergekit config needs exactly one of 'models' or 'slices'")
        slices = (_read_models(data["models"], num_layers, base_ref if with_base else None)
                  if "models" in data else _read_slices(data["slices"], num_layers, base_ref))
        total = slices[-1][1]

        expert_refs = _expert_refs(slices, base_ref, with_base)
        given = dict(expert_names or {})
        for ref in given:
            if ref not in expert_refs:
                raise UserError(f"expert_names names {_short(ref)}, which is not an expert model "
                                f"of this config ({', '.join(expert_refs)})")
        names = {ref: given.get(ref) or ref.rstrip("/").rsplit("/", 1)[-1] for ref in expert_refs}
        seen: dict[str, str] = {}
        for ref, name in names.items():
            if name in seen:
                raise UserError(f"models {seen[name]!r} and {ref!r} would both be named {name!r}; "
                                f"pass expert_names={{reference: name}}")
            seen[name] = ref

        expert_defaults, global_defaults = _defaults()
        defaults = {**expert_defaults, **global_defaults, **{
            k: v for k, v in _MERGEKIT_DEFAULTS.get(method, {}).items() if v is not None}}

        def config_at(piece: _Slice, tensor: str, t: float) -> MethodConfig:
            def value(key: str, scopes: Sequence[Mapping[str, Any]]) -> Any:
                convert = _bool if key in _BOOL_KEYS else _float
                for scope in scopes:
                    if key in scope:
                        resolved = _evaluate(scope[key], tensor, t, convert, f"parameter {key!r}")
                        if resolved is not None:
                            return resolved
                return defaults[key]

            shared = (piece[3], top)
            experts = {names[ref]: ExpertParams(**{k: value(k, (params,) + shared)
                                                   for k in _EXPERT_KEYS})
                       for ref, params in piece[2] if ref != base_ref}
            return MethodConfig(method, experts, **{_attr(k): value(k, shared)
                                                    for k in _GLOBAL_KEYS})

        def resolve(probes: Sequence[tuple[_Slice, str, float]]) -> MethodConfig:
            found = {tensor: config_at(piece, tensor, t) for piece, tensor, t in probes}
            first, *rest = found
            for tensor in rest:
                if found[tensor] != found[first]:
                    raise UserError(f"this mergekit config gives {first} and {tensor} different "
                                    f"parameters; a recipe can differ only between attention, "
                                    f"MLP, the rest of a block, and the tensors outside blocks "
                                    f"(embeddings, final norm and lm_head alike)")
            return found[first]

        groups = []
        for piece in slices:
            start, end = piece[0], piece[1]
            length = end - start
            per_layer = []
            for layer in range(start, end):
                t = (layer - start) / (length - 1) if length > 1 else 1.0  # mergekit's choice
                per_layer.append({kind: resolve([(piece, f"model.layers.{layer}.{p}", t)
                                                 for p in probes])
                                  for kind, probes in _PROBES.items()})
            uniform = all(layer == per_layer[0] for layer in per_layer)
            spans = [(start, end)] if uniform else [(i, i + 1) for i in range(start, end)]
            for (s, e), kinds in zip(spans, per_layer):
                groups += [LayerGroup(s, e, kind, c) for kind, c in kinds.items()
                           if kind == "all" or c != kinds["all"]]
        # mergekit plans the tensors outside the blocks at t=0 of the first and last slice.
        outside = resolve([(slices[0], name, 0.0) for name in _PRE_WEIGHTS]
                          + [(slices[-1], name, 0.0) for name in _POST_WEIGHTS])
        return cls(base=base_ref, experts=tuple(names[r] for r in expert_refs), num_layers=total,
                   groups=tuple(groups), outside=outside, dtype=data.get("dtype") or "float32",
                   expert_refs={names[r]: r for r in expert_refs})


# (start, end, [(model reference, source parameters)], slice parameters)
_Slice = tuple[int, int, list[tuple[str, Mapping[str, Any]]], Mapping[str, Any]]


def _read_models(models: Any, num_layers: int | None, base_ref: str | None) -> list[_Slice]:
    """The ``models`` form is one slice over all layers; mergekit adds a missing base to it."""
    if num_layers is None:
        raise UserError("a mergekit config in the 'models:' form does not say how many layers "
                        "the model has; pass num_layers")
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise UserError(f"num_layers must be a positive integer, got {_short(num_layers)}")
    sources = []
    for i, entry in enumerate(_list(models, "models")):
        _mapping(entry, f"models[{i}]", required=("model",), optional=("parameters",))
        sources.append((_ref(entry["model"], f"models[{i}].model"),
                        _params(entry.get("parameters"), f"models[{i}].parameters")))
    if base_ref is not None and base_ref not in [ref for ref, _ in sources]:
        sources.append((base_ref, {}))
    return [(0, num_layers, sources, {})]


def _read_slices(slices: Any, num_layers: int | None, base_ref: str) -> list[_Slice]:
    """Output slices stacked in order; each source must feed its own layers (no frankenmerges)."""
    out: list[_Slice] = []
    position = 0
    for i, piece in enumerate(_list(slices, "slices")):
        where = f"slices[{i}]"
        _mapping(piece, where, required=("sources",),
                 optional=("parameters", "base_model", "residual_weight"))
        if piece.get("base_model") not in (None, base_ref):
            raise UserError(f"{where} has its own base_model {_short(piece['base_model'])}; a "
                            f"recipe has one base ({base_ref})")
        if piece.get("residual_weight") is not None:
            raise UserError(f"{where}.residual_weight {_short(piece['residual_weight'])} cannot "
                            f"be expressed in a recipe")
        sources, length = [], 0
        for j, source in enumerate(_list(piece["sources"], f"{where}.sources")):
            at = f"{where}.sources[{j}]"
            _mapping(source, at, required=("model", "layer_range"), optional=("parameters",))
            span = source["layer_range"]
            if not (isinstance(span, list) and len(span) == 2
                    and all(isinstance(x, int) and not isinstance(x, bool) for x in span)
                    and span[0] < span[1]):
                raise UserError(f"{at}.layer_range must be [start, end], got {_short(span)}")
            length = length or span[1] - span[0]
            if span != [position, position + length]:
                raise UserError(f"{at}.layer_range {span} would feed output layers "
                                f"[{position}, {position + length}); a recipe merges layer i of "
                                f"every model into layer i only")
            sources.append((_ref(source["model"], f"{at}.model"),
                            _params(source.get("parameters"), f"{at}.parameters")))
        out.append((position, position + length, sources, _params(piece.get("parameters"),
                                                                  f"{where}.parameters")))
        position += length
    if num_layers is not None and num_layers != position:
        raise UserError(f"the mergekit slices cover {position} layers, not num_layers={num_layers}")
    return out


def _expert_refs(slices: list[_Slice], base_ref: str, with_base: bool) -> list[str]:
    """The experts, which must be the same models in every slice, with the base where needed."""
    experts: list[str] | None = None
    for start, end, sources, _ in slices:
        refs = [ref for ref, _ in sources]
        where = f"layers [{start}, {end})"
        if len(set(refs)) != len(refs):
            raise UserError(f"the mergekit config lists a model twice for {where}: {refs}")
        if with_base and base_ref not in refs:
            raise UserError(f"the mergekit config does not merge base model {base_ref!r} into "
                            f"{where}; mergekit needs the base in every slice")
        if not with_base and base_ref in refs:
            raise UserError(f"base {base_ref!r} is an input of this merge at {where}; a recipe "
                            f"merges only its experts")
        others = [ref for ref in refs if ref != base_ref]
        if experts is None:
            experts = others
        elif set(others) != set(experts):
            raise UserError(f"the mergekit config merges {sorted(others)} at {where} but "
                            f"{sorted(experts)} before; a recipe merges the same experts "
                            f"everywhere")
    if not experts:
        raise UserError("the mergekit config merges no model besides the base")
    return experts


def _evaluate(setting: Any, tensor: str, t: float, convert: Callable[[Any, str], Any],
              where: str) -> Any:
    """One setting for one tensor at gradient position t, as mergekit evaluates it: the first
    filter contained in the tensor name wins (None when none does, so a lower scope decides);
    numeric gradients interpolate linearly between neighbouring entries, others pick one."""
    if isinstance(setting, Mapping) or (isinstance(setting, list) and setting
                                        and all(isinstance(c, Mapping) for c in setting)):
        for i, condition in enumerate([setting] if isinstance(setting, Mapping) else setting):
            _mapping(condition, f"{where} condition {i}", required=("value",),
                     optional=("filter",))
            mark = condition.get("filter")
            if mark is None or mark == "*" or (isinstance(mark, str) and mark in tensor):
                return _evaluate(condition["value"], tensor, t, convert, where)
        return None
    if isinstance(setting, list):
        if not setting:
            return None
        values = [convert(v, where) for v in setting]
        if any(isinstance(v, bool) for v in values):
            return values[int(t * (len(values) - 1))]
        scaled = t * (len(values) - 1)
        low = int(scaled)
        high = min(len(values) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * values[low] + frac * values[high]
    return convert(setting, where)


def _settings(keys: Sequence[str], where: str, kinds: Mapping[str, MethodConfig],
              get: Callable[[MethodConfig, str], Any]) -> dict[str, Any]:
    """mergekit settings for one slice: a scalar when every kind agrees, else a filter list
    (first match wins: attn, mlp, then other block tensors, then the tensors outside blocks)."""
    out: dict[str, Any] = {}
    for key in keys:
        values = {kind: get(config, key) for kind, config in kinds.items()}
        if all(v is None for v in values.values()):
            continue
        if any(v is None for v in values.values()):
            unset = ", ".join(k for k, v in values.items() if v is None)
            raise UserError(f"{key} is left to the method's default for {unset} tensors of "
                            f"{where} but set for others, which mergekit cannot express in one "
                            f"slice; set {key} explicitly")
        block, outside = values["all"], values["outside"]
        conditions = [{"filter": _FILTERS[k], "value": values[k]} for k in _FILTERS
                      if values[k] != block]
        if outside != block:
            conditions.append({"filter": _IN_BLOCK, "value": block})
        out[key] = conditions + [{"value": outside}] if conditions else outside
    return out


def _defaults() -> tuple[dict[str, Any], dict[str, Any]]:
    expert = {f.name: f.default for f in fields(ExpertParams)}
    shared = {k: f.default for k in _GLOBAL_KEYS for f in fields(MethodConfig)
              if f.name == _attr(k)}
    return expert, shared


def _converter(key: str) -> Callable[[Any, str], Any]:
    """How a global parameter's value is checked: booleans may be None (the method's default),
    as may the optional numbers; lambda and t always hold a number."""
    if key in _BOOL_KEYS:
        return _opt_bool
    return _opt_float if key in _OPTIONAL_KEYS else _float


def _attr(key: str) -> str:
    return "lambda_" if key == "lambda" else key


def _params(data: Any, where: str) -> Mapping[str, Any]:
    return _mapping(data if data is not None else {}, where,
                    optional=_EXPERT_KEYS + _GLOBAL_KEYS + _IGNORED_PARAMS)


def _mapping(data: Any, where: str, required: Sequence[str] = (),
             optional: Sequence[str] | None = None) -> dict[str, Any]:
    """``data`` as a dict with string keys; with ``optional`` given, no keys beyond the valid."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {_short(data)}")
    for key in data:
        if not isinstance(key, str):
            raise UserError(f"{where} has a non-string key {_short(key)}")
        if optional is not None and key not in required and key not in optional:
            raise UserError(f"unknown key {key!r} in {where}; valid keys: "
                            f"{', '.join(sorted([*required, *optional]))}")
    for key in required:
        if key not in data:
            raise UserError(f"{where} is missing {key!r}")
    return data


def _list(data: Any, where: str) -> list[Any]:
    if not isinstance(data, list) or not data:
        raise UserError(f"{where} must be a non-empty list, got {_short(data)}")
    return data


def _ref(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise UserError(f"{where} must be a model path or hub id, got {_short(value)}")
    return value


def _float(value: Any, where: str) -> float:
    """A finite float; numeric strings count because YAML reads ``1e-3`` as a string."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UserError(f"{where} must be a finite number, got {_short(value)}")
    return float(value)


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UserError(f"{where} must be true or false, got {_short(value)}")
    return value


def _opt_bool(value: Any, where: str) -> bool | None:
    return None if value is None else _bool(value, where)


def _opt_float(value: Any, where: str) -> float | None:
    return None if value is None else _float(value, where)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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
    mean = sum(n * v for n, v in values) / total
    return f"{'=' if len({v for _, v in values}) == 1 else '≈'}{mean:.2f}"


def _canonical_json(data: Any) -> str:
    def canon(x: Any) -> Any:
        if isinstance(x, float):
            return float(f"{x:.12g}") + 0.0  # + 0.0 turns -0.0 into 0.0
        if isinstance(x, dict):
            return {k: canon(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return x
    return json.dumps(canon(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _dump_yaml(data: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None, allow_unicode=True)


def _load_yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"malformed {what} YAML{at}: {' '.join(problem.split())}") from None
