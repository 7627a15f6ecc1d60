"""The merge-method registry: every method declares its parameters once, as data.

A parameter is read in many places: a recipe checks and serializes it, mergekit configs are
written and read with it, the engine hands it to the tensor function, and a search space turns
it into a gene. When each of those kept its own list of names, defaults and ranges, the copies
drifted (DELLA's ``epsilon`` defaulted to 0.15 in the methods and 0.0 in recipes, so one recipe
merged two ways). Here a method's registry entry holds its :class:`Param` schema, and all of
those derive from it: registering a method with a new parameter is one entry, in one place.

Defaults are mergekit's wherever mergekit has the method, so a recipe and the mergekit config it
exports merge alike. This module stays free of torch: recipes, which cross every boundary,
read their parameters from it; the tensor functions are named by import path and loaded on
first use.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal, Mapping

from evomerge.merge.params import (DENSITY, EPSILON, GAMMA, LAMBDA, NORMALIZE, WEIGHT, MergeParamError, Param, ParamRange,
                                   Scope, normalize, rescale)
from evomerge.serialization import short_repr


# --- the generalized task-arithmetic family ----------------------------------------------------

Sparsification = Literal["none", "magnitude", "band", "random", "rank"]
"""How each expert's delta is thinned before combining: kept whole, its top magnitudes (TIES), a
magnitude band below the outliers (breadcrumbs), a uniform random keep (DARE), or a random keep
whose probability rises with magnitude rank within each row (DELLA)."""


@dataclass(frozen=True)
class TaskArithmeticVariant:
    """One member of mergekit's generalized task arithmetic family, as data: every member
    sparsifies each expert's delta, optionally rescales it to its original L1 norm, and adds the
    weighted deltas to the base scaled by ``lambda``, optionally keeping only the elements that
    agree with an elected sign. ``methods.generalized_task_arithmetic`` merges every variant.
    ``reference`` says why the variant exists and where mergekit's behaviour is followed."""

    sparsification: Sparsification
    elect_sign: bool
    default_normalize: bool
    default_rescale: bool | None  # None where nothing is dropped, so there is no norm to restore
    reference: str

    @property
    def reads_stats(self) -> bool:
        """Whether the merge reads magnitude statistics: magnitude cuts, in-row ranks, or (any
        sparsification that rescales) the deltas' L1 norms."""
        return self.sparsification != "none"

    @property
    def randomized(self) -> bool:
        return self.sparsification in ("random", "rank")

    @property
    def params(self) -> tuple[Param, ...]:
        """The variant's parameters: what it sparsifies by, and rescale only where it drops."""
        by_rule: dict[Sparsification, tuple[Param, ...]] = {
            "none": (WEIGHT,), "magnitude": (WEIGHT, DENSITY), "band": (WEIGHT, DENSITY, GAMMA),
            "random": (WEIGHT, DENSITY), "rank": (WEIGHT, DENSITY, EPSILON)}
        shared = (LAMBDA, normalize(self.default_normalize))
        if self.default_rescale is not None:
            shared += (rescale(self.default_rescale),)
        return by_rule[self.sparsification] + shared


TASK_ARITHMETIC_VARIANTS: dict[str, TaskArithmeticVariant] = {
    "task_arithmetic": TaskArithmeticVariant(
        "none", elect_sign=False, default_normalize=False, default_rescale=None,
        reference="Task arithmetic (Ilharco et al. 2023, arXiv:2212.04089): fine-tuning directions add "
                  "up, so the base plus a scaled sum of task vectors gains several skills at once."),
    "ties": TaskArithmeticVariant(
        "magnitude", elect_sign=True, default_normalize=True, default_rescale=False,
        reference="TIES (Yadav et al. 2023, arXiv:2306.01708): most of a task vector is noise that "
                  "interferes with other experts, so keep each expert's largest density fraction, elect "
                  "a sign per element, and average only the values that agree with it."),
    "dare_linear": TaskArithmeticVariant(
        "random", elect_sign=False, default_normalize=False, default_rescale=True,
        reference="DARE (Yu et al. 2024, arXiv:2311.03099): task vectors are so redundant that dropping "
                  "most elements at random and rescaling the rest barely changes an expert, while it "
                  "makes experts interfere less. Keep probability is density; rescale divides by it, as "
                  "the paper does, which restores the expert's L1 norm in expectation (mergekit matches "
                  "the realized norm: the two differ by the mask's noise, ~0.1% on a large matrix)."),
    "dare_ties": TaskArithmeticVariant(
        "random", elect_sign=True, default_normalize=False, default_rescale=True,
        reference="DARE's random drop followed by TIES' sign election (Yu et al. 2024, "
                  "arXiv:2311.03099), for experts whose surviving elements still disagree in sign."),
    "breadcrumbs": TaskArithmeticVariant(
        "band", elect_sign=False, default_normalize=False, default_rescale=False,
        reference="Model Breadcrumbs (Davari & Belilovsky 2023, arXiv:2312.06795): the very largest "
                  "changes are outliers that hurt other tasks as much as the smallest are noise, so drop "
                  "the top gamma fraction by magnitude and keep the next density fraction (mergekit's "
                  "band)."),
    "breadcrumbs_ties": TaskArithmeticVariant(
        "band", elect_sign=True, default_normalize=False, default_rescale=False,
        reference="Breadcrumbs' magnitude band followed by TIES' sign election (mergekit's combination)."),
    "della": TaskArithmeticVariant(
        "rank", elect_sign=True, default_normalize=True, default_rescale=True,
        reference="DELLA (Deep et al. 2024, arXiv:2406.11617): a random drop that spares large elements "
                  "works better than DARE's uniform one. Within each row, an element's keep probability "
                  "rises linearly with its magnitude rank from density - epsilon to density + epsilon; "
                  "then TIES' sign election. Rescale restores each expert's L1 norm in expectation, with one "
                  "factor per expert as mergekit's does for the realized norm (the paper divides each "
                  "element by its own keep probability)."),
    "della_linear": TaskArithmeticVariant(
        "rank", elect_sign=False, default_normalize=False, default_rescale=True,
        reference="DELLA's rank-based drop without sign election (mergekit's della_linear)."),
}
"""The generalized task-arithmetic family by recipe name: one function, eight variants as data."""


# Methods whose merged tensors are base + sum_k weight_k * scale * component_k given their masks
# or cached components, so that dL/d(weight) is an inner product (evomerge.merge.weight_grad):
# what gradient refinement can refine. A name list, so a config is checked without torch.
DIFFERENTIABLE_METHODS = ("task_arithmetic", "tsv_m")


# --- what a method is --------------------------------------------------------------------------

MergeFn = Callable[..., Any]
"""Every method's signature: ``(base, deltas, params, generator, stats, *, out=None) -> merged``
with ``params`` resolved (:func:`resolve`); methods ignore the generator or stats they have no
use for, so callers need no per-method cases. Each computes in float32 for half-precision inputs
and writes the merged tensor, in the base's dtype, into ``out`` when given."""

Check = Callable[["MergeParams", Sequence[str]], None]
"""A method's own check across parameters (one expert label per expert), after each value has
passed its range: raises :class:`MergeParamError`."""


@dataclass(frozen=True)
class MethodSpec:
    """A merge method: its tensor function, its parameters, and how it maps onto mergekit.

    ``fn`` is the tensor function or its import path (``"module:name"``), so this registry
    stays importable without torch. ``mergekit`` is mergekit's ``merge_method`` name where
    mergekit has the method with the same parameters, else None (an export then refuses).
    ``needs_base`` is False for methods that merge the experts' full weights (mergekit would
    count a configured base as one more input). ``variant`` is set for the generalized
    task-arithmetic family, whose members differ only in it. ``reads_stats`` says whether the
    function reads the per-tensor statistics no candidate changes (magnitude tables, SVDs), which
    the merger then builds once and hands it."""

    name: str
    fn: MergeFn | str
    params: tuple[Param, ...]
    description: str
    randomized: bool = False
    needs_base: bool = True
    mergekit: str | None = None
    min_experts: int = 1
    max_experts: int | None = None
    variant: TaskArithmeticVariant | None = None
    check: Check | None = None
    reads_stats: bool = False
    _loaded: list[MergeFn] = field(default_factory=list, compare=False, repr=False)

    def __post_init__(self) -> None:
        names = [p.name for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"method {self.name} declares a parameter twice: {names}")

    @property
    def function(self) -> MergeFn:
        """The tensor function, imported on first use."""
        if not self._loaded:
            fn = self.fn
            if isinstance(fn, str):
                module, _, attribute = fn.partition(":")
                fn = getattr(importlib.import_module(module), attribute)
            self._loaded.append(partial(fn, self.variant) if self.variant is not None else fn)
        return self._loaded[0]

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)

    def reads_rows(self, params: Mapping[str, object]) -> bool:
        """Whether the merge treats a weight's rows as units (DELLA's in-row ranks, Model Stock's
        ``filter_wise`` ratios), so a weight stored transposed (GPT-2's Conv1D) merges
        differently wherever rows are taken as stored rather than as output rows."""
        if self.variant is not None:
            return self.variant.sparsification == "rank"
        return self.name == "model_stock" and bool(params.get("filter_wise"))

    @property
    def expert_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "expert")

    @property
    def global_params(self) -> tuple[Param, ...]:
        return tuple(p for p in self.params if p.scope == "global")


def _variant(name: str, description: str) -> MethodSpec:
    """The registry entry of a task-arithmetic variant, its parameters read off the variant."""
    variant = TASK_ARITHMETIC_VARIANTS[name]
    check = _della_check if variant.sparsification == "rank" else None
    return MethodSpec(name, "evomerge.merge.methods:generalized_task_arithmetic", variant.params,
                      description, randomized=variant.randomized, mergekit=name, variant=variant,
                      check=check, reads_stats=variant.reads_stats)


def _della_check(params: MergeParams, labels: Sequence[str]) -> None:
    for label, d, e in zip(labels, params["density"], params["epsilon"]):
        if 0 < d < 1 and not (d - e > 0 and d + e < 1):
            raise MergeParamError(f"epsilon {e:g} for {label} is too wide for density {d:g}: keep probabilities "
                                  f"density +/- epsilon must lie in (0, 1), so epsilon < {min(d, 1 - d):g}")


def _linear_check(params: MergeParams, labels: Sequence[str]) -> None:
    if params["normalize"] and abs(math.fsum(params["weight"])) < 1e-8:
        raise MergeParamError("linear weights sum to 0 and cannot be normalized; "
                              "use weights with a non-zero sum or normalize false")


_METHODS_MODULE = "evomerge.merge.methods"
_SUBSPACE_MODULE = "evomerge.merge.subspace"

FRACTION = ParamRange(0.0, 1.0, low_open=True)

METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("linear", f"{_METHODS_MODULE}:linear", (WEIGHT, normalize(True)),
               "weighted average of the experts", needs_base=False, mergekit="linear", check=_linear_check),
    _variant("task_arithmetic", "base plus lambda times the weighted sum of task vectors"),
    _variant("ties", "top-density magnitudes, sign election, disjoint mean"),
    _variant("dare_linear", "random drop (keep probability density), rescale, weighted sum"),
    _variant("dare_ties", "random drop, rescale, sign election"),
    _variant("breadcrumbs", "drop the top gamma and keep the next density by magnitude, weighted sum"),
    _variant("breadcrumbs_ties", "breadcrumbs band, sign election"),
    _variant("della", "magnitude-rank keep probabilities density +/- epsilon, rescale, sign election"),
    _variant("della_linear", "magnitude-rank keep probabilities, rescale, weighted sum"),
    MethodSpec("slerp", f"{_METHODS_MODULE}:slerp",
               (Param("t", "global", 0.5, range=ParamRange(0.0, 1.0), mergekit_required=True,
                      help="0 is the base, 1 the expert"),),
               "spherical interpolation from the base (t=0) to one expert (t=1)", mergekit="slerp",
               max_experts=1),
    MethodSpec("model_stock", f"{_METHODS_MODULE}:model_stock",
               (Param("filter_wise", "global", False, kind="bool", help="one ratio per row"),),
               "move toward the experts' average by a ratio set by their angle", mergekit="model_stock",
               min_experts=2),
    MethodSpec("magmax", f"{_METHODS_MODULE}:magmax", (WEIGHT, LAMBDA),
               "per element, the delta of largest magnitude"),
    MethodSpec("consensus", f"{_METHODS_MODULE}:consensus",
               (WEIGHT, LAMBDA, NORMALIZE,
                Param("k", "global", 2.0, range=ParamRange(0.0, math.inf, high_open=True, integer=True),
                      mergekit=False, help="experts whose TALL mask must hold for an element to stay"),
                Param("lambda_tall", "global", 0.4, range=ParamRange(0.0, math.inf, high_open=True),
                      mergekit=False, help="TALL mask threshold")),
               "task arithmetic on the elements at least k experts' TALL masks keep"),
    MethodSpec("lines", f"{_METHODS_MODULE}:lines",
               (WEIGHT, NORMALIZE,
                Param("alpha", "global", None, mergekit=False, help="scale at depth 0 (default 1/K)"),
                Param("beta", "global", 0.5, mergekit=False, help="extra scale at the last block")),
               "task arithmetic scaled by alpha + beta * depth"),
    # The subspace family: no mergekit equivalent, so an export writes no mergekit.yaml for them.
    MethodSpec("tsv_m", f"{_SUBSPACE_MODULE}:tsv_m",
               (WEIGHT, LAMBDA,
                Param("rank_fraction", "global", None, range=FRACTION, mergekit=False,
                      help="share of each expert's singular directions kept per matrix (default 1/K)")),
               "each expert's top singular directions, orthonormalized together, rebuilt", reads_stats=True),
    MethodSpec("iso_c", f"{_SUBSPACE_MODULE}:iso_c", (WEIGHT, LAMBDA),
               "the weighted sum of task vectors with its singular values flattened to their mean"),
    MethodSpec("iso_cts", f"{_SUBSPACE_MODULE}:iso_cts",
               (WEIGHT, LAMBDA,
                Param("common_fraction", "global", 0.8, range=FRACTION, mergekit=False, search=(0.5, 1.0),
                      help="share of the rank given to the sum's top directions; the rest is split "
                           "among the experts' own")),
               "Iso-C over a common subspace plus each expert's own directions"),
    MethodSpec("star", f"{_SUBSPACE_MODULE}:star",
               (WEIGHT, LAMBDA,
                Param("eta", "global", 0.4, range=FRACTION, mergekit=False, search=(0.1, 1.0),
                      help="share of each expert's nuclear norm its kept singular components hold")),
               "each expert truncated to its top singular components, rescaled to its nuclear norm, averaged",
               reads_stats=True),
    MethodSpec("cabs", f"{_METHODS_MODULE}:cabs",
               (WEIGHT, DENSITY, LAMBDA,
                Param("block", "global", 32.0, range=ParamRange(1.0, math.inf, integer=True), mergekit=False,
                      help="n:m block size m: density * m elements are kept in every block")),
               "experts pruned in turn, each only where earlier ones kept nothing, n:m balanced"),
)}
"""Every merge method by its recipe name (mergekit's name where mergekit has the method)."""


def register(spec: MethodSpec) -> MethodSpec:
    """Add a method: recipes, mergekit export, the engine and search spaces take it from here."""
    if spec.name in METHODS:
        raise ValueError(f"merge method {spec.name!r} is registered already")
    METHODS[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    METHODS.pop(name, None)


def method(name: Any) -> MethodSpec:
    """The registry entry named ``name``, or a one-line error listing the valid names."""
    spec = METHODS.get(name) if isinstance(name, str) else None
    if spec is None:
        raise MergeParamError(f"unknown merge method {name!r}; valid: {', '.join(METHODS)}")
    return spec


def known_params(scope: Scope) -> dict[str, Param]:
    """Every parameter of ``scope`` some registered method takes, by name: the keys a recipe
    may carry for any method (a method ignores the ones it does not take)."""
    found: dict[str, Param] = {}
    for spec in METHODS.values():
        for param in spec.params:
            if param.scope == scope:
                found.setdefault(param.name, param)
    return found


# --- a method's arguments for one tensor -------------------------------------------------------


class MergeParams:
    """What a method reads when merging one tensor, by parameter name.

    Built with keywords (``MergeParams(weight=[0.5, 0.5], density=0.5, lambda_=1.0)``; ``lambda_``
    is ``lambda``, a Python keyword): per-expert values as K numbers, one number for every expert,
    or None for the default. :func:`resolve` checks them against a method's schema and returns
    the method's view: every parameter it takes present, per-expert ones as K floats, defaults
    filled in. Two fields are context the engine gives, not recipe parameters:
    ``layer_fraction`` is the tensor's depth (0 for embeddings, 1 for the last block), for
    layer-aware methods; ``in_block`` says whether the tensor belongs to a transformer block
    (False for embeddings, final norm and head; None where unknown), for methods that treat a
    block's weight matrices in their singular-vector basis and the rest as the papers do."""

    __slots__ = ("values", "layer_fraction", "in_block", "method")

    def __init__(self, *, layer_fraction: float | None = None, in_block: bool | None = None,
                 **values: Any) -> None:
        self.values = {("lambda" if k == "lambda_" else k): v for k, v in values.items() if v is not None}
        self.layer_fraction = layer_fraction
        self.in_block = in_block
        self.method: str | None = None  # set once resolved for that method

    def __getitem__(self, name: str) -> Any:
        return self.values[name]

    def __getattr__(self, name: str) -> Any:
        """A value by name (None where unset), so methods read ``params.t``."""
        if name.startswith("__"):
            raise AttributeError(name)
        return self.values.get("lambda" if name == "lambda_" else name)

    def in_context(self, *, layer_fraction: float | None, in_block: bool | None) -> MergeParams:
        """The same values, placed at one tensor of a model (see the class docstring)."""
        copy = MergeParams(layer_fraction=layer_fraction, in_block=in_block)
        copy.values = dict(self.values)  # keeps the None a method derives (LiNeS' alpha)
        copy.method = self.method
        return copy

    def __repr__(self) -> str:
        return (f"MergeParams({self.values!r}, layer_fraction={self.layer_fraction!r}, "
                f"in_block={self.in_block!r}, method={self.method!r})")


def _floats(raw: Any) -> float | list[float]:
    """A per-expert value as Python floats: one float when it applies to every expert."""
    if hasattr(raw, "tolist"):  # a tensor or array
        raw = raw.tolist()
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        return float(raw)
    if isinstance(raw, (list, tuple)):
        return [float(v) for v in raw]
    raise MergeParamError(f"per-expert value {short_repr(raw)} is neither a number nor one number per expert")


def _labels(spec: MethodSpec, params: MergeParams, experts: Sequence[str] | int | None) -> list[str] | None:
    """How messages name each expert; None when neither ``experts`` nor any parameter says K."""
    if isinstance(experts, int):
        return [f"expert {i}" for i in range(experts)]
    if experts is not None:
        return [f"expert {name!r}" for name in experts]
    for param in spec.expert_params:
        raw = params.values.get(param.name)
        values = None if raw is None else _floats(raw)
        if isinstance(values, list):
            return [f"expert {i}" for i in range(len(values))]
    return None


def resolve(method: str, params: MergeParams, experts: Sequence[str] | int | None = None) -> MergeParams:
    """``params`` as ``method`` reads them: checked against its schema, defaults filled in,
    per-expert values one float per expert. Raises :class:`MergeParamError` naming the first
    value the method cannot use. ``experts`` gives the experts' names (or their number) for
    messages and expert-count checks; without it K is taken from the per-expert sequences.
    Parameters the method does not take are ignored. Resolving resolved params is free."""
    if params.method == method:
        return params
    spec = METHODS.get(method)
    if spec is None:
        raise MergeParamError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    labels = _labels(spec, params, experts)
    if labels is not None:
        count = len(labels)
        if count < spec.min_experts or (spec.max_experts is not None and count > spec.max_experts):
            if spec.max_experts is None:
                wanted = f"at least {spec.min_experts} experts"
            else:
                wanted = f"exactly {spec.max_experts} expert{'s' if spec.max_experts > 1 else ''}"
            raise MergeParamError(f"{method} merges the base with {wanted}, got {count}: {', '.join(labels)}")
    resolved: dict[str, Any] = {}
    for param in spec.expert_params:
        raw = params.values.get(param.name)
        values = param.default if raw is None else _floats(raw)
        if isinstance(values, float):
            values = [values] * (len(labels) if labels is not None else 1)
        if labels is not None and len(values) != len(labels):
            raise MergeParamError(f"{param.name} has {len(values)} values for {len(labels)} experts")
        for label, value in zip(labels or ["every expert"], values):
            problem = param.range.complaint(value)
            if problem:
                raise MergeParamError(f"{param.name} {value:g} for {label} {problem}")
        resolved[param.name] = values
    for param in spec.global_params:
        raw = params.values.get(param.name)
        if raw is None:
            resolved[param.name] = param.default
        elif param.kind == "bool":
            if not isinstance(raw, bool):
                raise MergeParamError(f"{param.name} {raw!r} for {method} must be true or false")
            resolved[param.name] = raw
        else:
            value = float(raw)
            problem = param.range.complaint(value)
            if problem:
                raise MergeParamError(f"{param.name} {value:g} for {method} {problem}")
            resolved[param.name] = value
    out = MergeParams(layer_fraction=params.layer_fraction, in_block=params.in_block)
    out.values = resolved  # None stays: a default the method derives (LiNeS' alpha)
    if spec.check is not None:
        spec.check(out, labels or ["every expert"])
    out.method = method
    return out


def validate(method: str, params: MergeParams, experts: Sequence[str] | int | None = None) -> None:
    """Raise :class:`MergeParamError` (a ValueError) naming the first value ``method`` cannot use."""
    resolve(method, params, experts)
