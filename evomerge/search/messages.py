"""What the driver and the merge workers say to each other: a request to score a plan, and
what comes back.

A module of its own because both sides and the hooks that watch them speak it: the workers
answer requests, the loop sends them, and a ``SearchHooks`` is told of each one; none of them
needs the others to know what a request is.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from evomerge.fitness.evaluator import Evaluation
    from evomerge.layer_path import Plan


@dataclass(frozen=True)
class EvalRequest:
    """What the driver asks a worker: score ``recipe`` on ``split``, with the estimator's subset
    of items (a search's candidates) or on every item (``full``: probes, test scoring).
    ``like_estimates``: score every item the way the estimator scores its own (teacher-forced
    where the fitness config says so), so a promoted candidate's full-split value measures
    exactly what its estimate estimated, at a fraction of decoding's cost."""

    recipe: Plan
    split: str = "validation"
    full: bool = False
    like_estimates: bool = False


@dataclass
class EvalResult:
    """What comes back: the evaluation, or why there is none (``error``), and where the time went
    (``forward_seconds``: inside the model's forward passes, so benchmarks can tell evaluation
    from overhead)."""

    worker: str
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    forward_seconds: float = 0.0
    evaluation: Evaluation | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return self.merge_seconds + self.eval_seconds


@dataclass(frozen=True)
class RefineRequest:
    """Refine ``recipe``'s expert weights by gradient steps (``evomerge.search.refine``) from
    ``seed``; the refined recipe comes back, to be scored like any candidate."""

    recipe: Plan
    seed: int


@dataclass
class RefineResult:
    """The :class:`~evomerge.search.refine.Refinement` (None, with ``error``, when it failed) and
    the worker that made it."""

    worker: str
    refinement: Any = None
    error: str | None = None
