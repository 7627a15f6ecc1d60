"""Fitness: lm-eval tasks scored on a resident model, objectives, and estimators that rank
candidates like a full evaluation at a fraction of its cost.

Import the modules themselves (``evomerge.fitness.evaluator``, ``.objectives``, ...): this
package loads none of them, so reading objectives from a run folder does not load torch."""
