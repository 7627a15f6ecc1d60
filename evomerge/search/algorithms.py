"""pymoo algorithms by name, set up for a search space and driven by ask/tell.

Evaluation is ours (Ray workers, the archive), so algorithms only ask for genomes and are told
objective values. A space with a method gene is a pymoo mixed-variable problem: the algorithms
that accept it get pymoo's mixed-variable sampling, mating and duplicate elimination; the
vector-only ones (DE, CMA-ES) refuse it with a clear message.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from evomerge.config import AlgorithmConfig
from evomerge.search.space import Space


def make_problem(space: Space, n_obj: int):
    from pymoo.core.problem import Problem

    if space.mixed:
        return Problem(vars=space.pymoo_vars(), n_obj=n_obj)
    xl, xu = space.bounds()
    return Problem(n_var=len(xl), n_obj=n_obj, xl=np.array(xl), xu=np.array(xu))


def _mixed_operators() -> dict[str, Any]:
    from pymoo.core.mixed import MixedVariableDuplicateElimination, MixedVariableMating, MixedVariableSampling

    return {"sampling": MixedVariableSampling(),
            "mating": MixedVariableMating(eliminate_duplicates=MixedVariableDuplicateElimination()),
            "eliminate_duplicates": MixedVariableDuplicateElimination()}


def _ref_dirs(n_obj: int, pop_size: int):
    from pymoo.util.ref_dirs import get_reference_directions

    if n_obj == 1:
        return np.ones((1, 1))
    return get_reference_directions("energy", n_obj, pop_size, seed=1)


def make_algorithm(config: AlgorithmConfig, space: Space, n_obj: int,
                   initial: list[dict[str, Any]] | None = None):
    """The pymoo algorithm ``config.name`` for ``space``.

    ``initial`` genomes (known recipes, encoded) open the first population, which random genomes
    fill up; CMA-ES, which has no population to seed, starts its mean at the first of them."""
    config.check_objectives(n_obj)
    if config.name in ("de", "cmaes"):
        space.bounds()  # raises the clear error for a mixed space
    mixed = _mixed_operators() if space.mixed else {}
    x0 = np.array(space.vector(initial[0])) if initial else None
    if initial and config.name != "cmaes":
        mixed = {**mixed, "sampling": _seeded_population(space, initial, config.pop_size)}
    builders: dict[str, Callable[[], Any]] = {
        "ga": lambda: _ga(config, space, mixed),
        "de": lambda: _import("pymoo.algorithms.soo.nonconvex.de", "DE")(pop_size=config.pop_size, **mixed),
        "cmaes": lambda: _import("pymoo.algorithms.soo.nonconvex.cmaes", "CMAES")(
            x0=x0, sigma=config.sigma, popsize=config.pop_size, restarts=0),
        "nsga2": lambda: _import("pymoo.algorithms.moo.nsga2", "NSGA2")(pop_size=config.pop_size, **mixed),
        "nsga3": lambda: _import("pymoo.algorithms.moo.nsga3", "NSGA3")(
            ref_dirs=_ref_dirs(n_obj, config.pop_size), pop_size=config.pop_size, **mixed),
        "smsemoa": lambda: _import("pymoo.algorithms.moo.sms", "SMSEMOA")(pop_size=config.pop_size, **mixed),
        "agemoea": lambda: _import("pymoo.algorithms.moo.age", "AGEMOEA")(pop_size=config.pop_size, **mixed),
        "moead": lambda: _import("pymoo.algorithms.moo.moead", "MOEAD")(
            ref_dirs=_ref_dirs(n_obj, config.pop_size), n_neighbors=max(2, min(8, config.pop_size // 2)), **mixed),
        "random": lambda: _random_search(config, space, mixed),
    }
    return builders[config.name]()


def setup(algorithm, problem, generations: int, seed: int) -> None:
    """``algorithm.setup`` for a search of ``generations`` generations, reproducible from ``seed``."""
    algorithm.setup(problem, termination=("n_gen", generations), seed=seed, verbose=False)
    if hasattr(algorithm, "es") and isinstance(getattr(algorithm, "options", None), dict):
        # pymoo hands CMA-ES the seed as its ``seed`` option, which the cma package reads as
        # "seed from the clock" when it is 0 (the default): no run, and no resume, would repeat.
        algorithm.options["seed"] = seed + 1


def _seeded_population(space: Space, initial: list[dict[str, Any]], size: int):
    import random

    from pymoo.core.population import Population

    rng = random.Random(0)
    genomes = [space.as_genome(g) for g in initial[:size]]
    genomes += [space.random(rng) for _ in range(size - len(genomes))]
    if space.mixed:
        return Population.new("X", genomes)
    return Population.new("X", np.array([space.vector(g) for g in genomes]))


def _ga(config: AlgorithmConfig, space: Space, mixed: dict[str, Any]):
    # ``mixed`` may hold only the seeded sampling of a real-valued space: the space decides.
    if space.mixed:
        from pymoo.core.mixed import MixedVariableGA

        return MixedVariableGA(pop_size=config.pop_size, **{k: v for k, v in mixed.items() if k == "sampling"})
    from pymoo.algorithms.soo.nonconvex.ga import GA

    return GA(pop_size=config.pop_size, eliminate_duplicates=True, **mixed)


def _random_search(config: AlgorithmConfig, space: Space, mixed: dict[str, Any]):
    """Random search: every generation asks ``pop_size`` fresh genomes drawn uniformly from the
    space (pymoo's sampling, so the run's seed decides them); the first generation opens with the
    initial genomes, as the other algorithms' do. It learns nothing from what it is told."""
    from pymoo.algorithms.soo.nonconvex.random_search import RandomSearch
    from pymoo.operators.sampling.rnd import FloatRandomSampling

    fresh = _mixed_operators()["sampling"] if space.mixed else FloatRandomSampling()
    return RandomSearch(n_points_per_iteration=config.pop_size, output=None,
                        sampling=_FirstThenRandom(mixed.get("sampling"), fresh))


class _FirstThenRandom:
    """A pymoo sampling (duck-typed): the seeded first population once, then fresh draws."""

    def __init__(self, first, fresh) -> None:
        self.first, self.fresh = first, fresh

    def do(self, problem, n_samples: int, **kwargs):
        from pymoo.core.population import Population

        if self.first is not None:
            first, self.first = self.first, None
            return Population.new("X", first.get("X"))
        return self.fresh.do(problem, n_samples, **kwargs)


def _import(module: str, name: str):
    import importlib

    return getattr(importlib.import_module(module), name)
