"""What a search optimizes: named objectives with a direction and a worst value.

pymoo minimizes; objectives keep their natural direction here (accuracy up, calibration error
down) and ``minimized`` turns a value into what the algorithm sees. ``reference`` is the worst
value an objective can sensibly take: hypervolume is measured against it, so fronts of
different runs compare on one scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Mapping, Sequence

import numpy as np

from evomerge.errors import UserError

Direction = Literal["max", "min"]


@dataclass(frozen=True)
class Objective:
    name: str
    direction: Direction
    reference: float

    def __post_init__(self) -> None:
        if self.direction not in ("max", "min"):
            raise UserError(f"objective {self.name!r} direction {self.direction!r} is not max or min")

    def minimized(self, value: float) -> float:
        return -value if self.direction == "max" else value

    def to_dict(self) -> dict:
        return {"name": self.name, "direction": self.direction, "reference": self.reference}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Objective":
        return cls(str(data["name"]), data["direction"], float(data["reference"]))


def minimized_matrix(objectives: Sequence[Objective], rows: Sequence[Mapping[str, float]]) -> np.ndarray:
    """F matrix (rows × objectives) in pymoo's minimize-everything convention."""
    return np.array([[o.minimized(float(r[o.name])) for o in objectives] for r in rows], dtype=float).reshape(
        len(rows), len(objectives))


def hypervolume(objectives: Sequence[Objective], rows: Sequence[Mapping[str, float]]) -> float:
    """Hypervolume of ``rows`` against each objective's reference, via pymoo's indicator.

    Points worse than the reference on some objective add nothing (pymoo ignores them)."""
    from pymoo.indicators.hv import HV

    if not rows:
        return 0.0
    F = minimized_matrix(objectives, rows)
    ref = np.array([o.minimized(o.reference) for o in objectives], dtype=float)
    return float(HV(ref_point=ref)(F))
