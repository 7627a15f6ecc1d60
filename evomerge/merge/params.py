"""A merge parameter as data: its name, scope (per expert or global), kind, default, valid range
and search range, declared once per method in the registry (``registry.py``) and read from
there by recipes, mergekit I/O, the engine and the search space; plus the parameters several
methods share."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Literal

from evomerge.errors import UserError
from evomerge.serialization import short_repr


class MergeParamError(UserError, ValueError):
    """A recipe asks a merge method for something it cannot do; the message says what is valid."""


@dataclass(frozen=True)
class ParamRange:
    """Where a parameter is meaningful, so recipes can be checked (and mutated) from data alone."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    integer: bool = False

    def complaint(self, value: float) -> str | None:
        """Why ``value`` is invalid, phrased to follow '<name> <value>', or None when it is valid."""
        if not math.isfinite(value):
            return "is not a finite number"
        if self.integer and value != int(value):
            return "is not an integer"
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return None if above and below else f"is outside {self}"

    def __str__(self) -> str:
        return (f"{'(' if self.low_open else '['}{self.low:g}, {self.high:g}"
                f"{')' if self.high_open else ']'}")


Scope = Literal["expert", "global"]
Kind = Literal["float", "bool"]


@dataclass(frozen=True)
class Param:
    """One parameter of one method.

    ``name`` is the key recipes use, which is mergekit's name wherever mergekit has the
    parameter (``mergekit`` says whether it does, so an export can refuse what mergekit would
    misread). ``scope`` says whether each expert gets its own value or the method takes one.
    ``default`` is what an unset value means (mergekit's default; None where the method derives
    it from the merge, as LiNeS' alpha is 1/K); ``mergekit_required`` marks
    parameters mergekit has no default for, which an export therefore always writes.
    ``search`` is the range a search evolves the parameter in; None keeps it out of genomes.
    """

    name: str
    scope: Scope
    default: float | bool | None
    kind: Kind = "float"
    range: ParamRange = ParamRange()
    mergekit: bool = True
    mergekit_required: bool = False
    search: tuple[float, float] | None = None
    help: str = ""

    @property
    def evolvable(self) -> bool:
        return self.search is not None

    def convert(self, value: Any, where: str) -> float | bool:
        """``value`` as this parameter's kind, or a one-line error naming ``where``; numeric
        strings count because YAML reads ``1e-3`` as a string. Ranges are the method's to
        check (:func:`resolve`), where the message can name the expert."""
        if self.kind == "bool":
            if not isinstance(value, bool):
                raise MergeParamError(f"{where} must be true or false, got {short_repr(value)}")
            return value
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                pass
        if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
            value = value.item()  # a 0-d tensor or numpy scalar
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise MergeParamError(f"{where} must be a finite number, got {short_repr(value)}")
        return float(value)


# The parameters several methods share, declared once; a method adjusts a default with ``replace``.
WEIGHT = Param("weight", "expert", 1.0, mergekit_required=True, search=(0.0, 1.0),
               help="how much of the expert's task vector goes in (mergekit requires it; 1 here)")
DENSITY = Param("density", "expert", 1.0, range=ParamRange(0.0, 1.0), search=(0.1, 1.0),
                help="fraction of the expert's delta kept by sparsification")
GAMMA = Param("gamma", "expert", 0.01, range=ParamRange(0.0, 1.0),
              help="fraction of largest-magnitude outliers breadcrumbs drops")
EPSILON = Param("epsilon", "expert", 0.15, range=ParamRange(0.0, 1.0, high_open=True),
                help="DELLA's keep probabilities spread over density +/- epsilon by magnitude rank")
LAMBDA = Param("lambda", "global", 1.0, help="scale of the combined task vector")
NORMALIZE = Param("normalize", "global", False, kind="bool",
                  help="divide by the total weight (of the agreeing experts, with sign election)")
RESCALE = Param("rescale", "global", False, kind="bool",
                help="restore each sparsified expert's L1 norm")


def normalize(default: bool) -> Param:
    return replace(NORMALIZE, default=default)


def rescale(default: bool) -> Param:
    return replace(RESCALE, default=default)
