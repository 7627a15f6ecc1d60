"""Fitness: lm-eval tasks scored on a resident model, objectives, and estimators that rank
candidates like a full evaluation at a fraction of its cost."""

from evomerge.fitness.estimators import ESTIMATORS
from evomerge.fitness.evaluator import OBJECTIVES, Evaluation, Evaluator
from evomerge.fitness.objectives import Objective, hypervolume, minimized_matrix

__all__ = ["ESTIMATORS", "OBJECTIVES", "Evaluation", "Evaluator", "Objective",
           "hypervolume", "minimized_matrix"]
