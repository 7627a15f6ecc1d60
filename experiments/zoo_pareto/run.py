"""Does evolutionary search beat hand-tuned merges? Every searcher on the zoo, held-out numbers.

One command reproduces ``results.md`` (tables generated, never typed) and the plots beside it:

    python experiments/zoo_pareto/run.py                  # 3 seeds, 72 candidates per search
    python experiments/zoo_pareto/run.py --quick          # 1 seed, 8 candidates: does it all run?
    python experiments/zoo_pareto/run.py --quick --zoo pico --workers 1 --out /tmp/zp   # plumbing
    python experiments/zoo_pareto/table.py                # re-render results.md from results.json

The default size (3 seeds x 4 searches x 72 candidates, anchor estimates on 10 items per task,
2 re-scored and 3 + 1 test-scored per run) took 80 minutes on 2 idle CPU cores (2026-11-23:
probes 3, searches 49, full-split scoring 28); results.md states the time a run really took.
``--budget 150`` (the issue's lower range) would take about 2.2 hours by those timings.

Searchers, all on the same zoo and tasks (the zoo config's skill tasks; its probe tasks are only
scored, never optimized):

1. ``base`` and each expert alone;
2. ``grid:task_arithmetic`` (one weight for every expert, 0.1 .. 1.0) and ``grid:ties`` (weight x
   density, ``normalize: false``: with mergekit's default ``normalize: true`` a uniform weight
   cancels out and a weight grid would change nothing), every point scored on the full
   validation split: what a practitioner tunes by hand;
3-6. four evomerge searches with the same candidate budget, each through the search API
   (``evomerge.search.driver.start`` / ``resume``) into ``runs/<zoo>/<settings>/<searcher>-s<seed>/``:
   ``random`` (random search, ``algorithm=random``, over the same layer-wise genome with method
   gene that NSGA-II searches, so the hypervolume comparison isolates the algorithm),
   ``cmaes`` (one global weight per expert, mean accuracy: the mergekit-evolve setting; it starts
   its mean at uniform task arithmetic 0.3, the known recipe the others' first population holds),
   ``ga`` (layer-wise task-arithmetic genes, mean accuracy) and ``nsga2`` (layer-wise genes with the
   method gene, one objective per task).

How a searcher's numbers are measured (the same rule for all):

* The search ranks candidates with the anchor-point estimator (``--items`` items per task, a
  tenth of the zoo's validation split by default). Estimates are noisy, so the ``--rescore`` best
  candidates by estimated mean accuracy are re-scored on the FULL validation split and the pick is
  the best of those: the best-on-validation pick. Grid baselines are scored on the full validation
  split throughout and their pick is simply the best.
* The pick is scored on the full TEST split, on the skill tasks and the cross-skill probe (the
  probe is scored on test only: it never informs a choice).
* Test-set front: the searcher's validation front (non-dominated on per-task validation scores,
  estimated for searches, full for grids), capped at the ``--front-cap`` members with the best
  mean, plus the pick, scored on test; its hypervolume is over the skill tasks' test accuracy
  with reference 0 (evomerge's ``hypervolume``). Single-objective searches get the same treatment:
  their archive holds every candidate's per-task scores.
* All searches share one probe population (base, experts and 4 random layer-wise merges, scored
  once on the full validation split), so every searcher's estimator is fitted on the same data
  and the runs do not re-measure it. The searches' own held-out scoring of knee and best members
  is skipped: the experiment scores its own, larger set on test.

Everything is resumable and cached: a finished search is skipped, an interrupted one resumed,
and full-split scores are kept by recipe hash in ``runs/<zoo>/scores.json``. Wall times are
measured and summed over the invocations that built the results.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import table  # noqa: E402  (experiments/zoo_pareto/table.py renders results.json)

from evomerge.run import ArchiveEntry  # noqa: E402
from evomerge.search.hooks import SearchHooks  # noqa: E402

# name -> (what it is, its overrides of evomerge's search config, candidates in its first
# generation: None = a population like every later one)
SEARCHERS: dict[str, tuple[str, list[str], int | None]] = {
    # `evomerge search` as a user ran it in the eighth session (its own length: 12 generations of
    # 12): parents first, CMA-ES from the best of them over smooth depth profiles of task
    # arithmetic weights, told the tasks' mean, racing. The default method is now TSV-M and
    # racing is off: "default-tsv" is what `evomerge search` runs.
    "default": ("CMA-ES from the best parent over 3-knot depth profiles of task arithmetic told the tasks' mean, "
                "racing 1 of 12 per generation to the full validation split (the default of the eighth session)",
                ["space.parents=true", "fitness.multi_fidelity=0.08", "space.methods=[task_arithmetic]"], 1),
    "random": ("random search, layer-wise genes + method gene, per-task objectives",
               ["space=methods", "algorithm=random", "fitness.multi_fidelity=0"], None),
    # CMA-ES starts its mean at the first known recipe and asks only that one in generation 0
    # (without one, pymoo would spend 20 samples choosing a start).
    "cmaes": ("CMA-ES from uniform task arithmetic 0.3, one global weight per expert, mean accuracy",
              ["space=global", "algorithm=cmaes", "fitness.objectives=[mean]", "fitness.multi_fidelity=0",
               "space.methods=[task_arithmetic]", "space.initial=[{method:task_arithmetic,weight:0.3}]"], 1),
    "ga": ("evomerge GA, layer-wise task-arithmetic genes, mean accuracy",
           ["space=layerwise", "algorithm=ga", "fitness.objectives=[mean]", "fitness.multi_fidelity=0",
            "space.methods=[task_arithmetic]"], None),
    "nsga2": ("evomerge NSGA-II, layer-wise genes + method gene, per-task objectives",
              ["space=methods", "algorithm=nsga2", "fitness.multi_fidelity=0"], None),
    # Ablations of the default: one ingredient taken out each.
    "default-global": ("the default with one global weight per expert instead of depth profiles",
                       ["space.parents=true", "space=global", "fitness.multi_fidelity=0.08",
                        "space.methods=[task_arithmetic]"], 1),
    "default-norace": ("the default without racing, task arithmetic: `evomerge search` of the eighth session",
                       ["space.parents=true", "fitness.multi_fidelity=0", "space.methods=[task_arithmetic]"], 1),
    # The subspace method TSV-M (experiments/zoo_methods) as the searched method: `evomerge search`
    # as it now ships.
    "default-tsv": ("the default without racing, merging by TSV-M instead of task arithmetic: `evomerge search` "
                    "as it now ships", ["space.parents=true", "fitness.multi_fidelity=0", "space.methods=[tsv_m]"], 1),
    "default-tsv-race": ("`evomerge search` as it ships (TSV-M) with racing 1 of 12: does verifying the best close "
                         "the winner's curse at a price worth paying?",
                         ["space.parents=true", "fitness.multi_fidelity=0.08", "space.methods=[tsv_m]"], 1),
    "cmaes-tsv": ("CMA-ES from uniform TSV-M 1.0, one global weight per expert, mean accuracy",
                  ["space=global", "algorithm=cmaes", "fitness.objectives=[mean]", "fitness.multi_fidelity=0",
                   "space.methods=[tsv_m]", "space.initial=[{method:tsv_m,weight:1.0}]"], 1),
    # Data-flow space (issue 21): `evomerge search space=dataflow`, the default search over layer
    # paths of the base's and experts' blocks; PS+DFS adds the default search's pick at budget B
    # of the same seed (``ps_picks``) as one more source, so its total budget is B + its own.
    "dfs": ("`evomerge search space=dataflow`: CMA-ES from the best parent over 3-slice layer paths "
            "of the base's and the experts' blocks", ["space=dataflow", "space.parents=true",
                                                       "fitness.multi_fidelity=0"], 1),
    **{f"psdfs{b}": (f"PS+DFS: `space=dataflow` with the default search's pick at budget {b} (same seed) as one "
                     f"more source", ["space=dataflow", "space.parents=true", "fitness.multi_fidelity=0",
                                      f"space.merge={{picks}}/default-tsv-b{b}-s{{seed}}.yaml"], 1)
       for b in (100, 150)},
}
OWN_LENGTH = ("default", "default-global", "default-norace", "default-tsv", "default-tsv-race", "dfs")  # as long as `evomerge search` runs
EVOMERGE = ("ga", "nsga2")  # the searchers the targets speak of
PROBE_MERGES = 4
GRIDS = {  # full: what the table uses; quick: enough to see it run
    "full": {"task_arithmetic": [round(0.1 * i, 1) for i in range(1, 11)],
             "ties_weight": [0.3, 0.6, 1.0], "ties_density": [0.2, 0.5, 0.8]},
    "quick": {"task_arithmetic": [0.3, 0.6], "ties_weight": [0.5], "ties_density": [0.5]},
}

Log = Callable[[str], None]


def log(message: str) -> None:
    print(f"[zoo_pareto {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- small helpers ----------------------------------------------------------------------------------


def write_json(path: Path, data: Any) -> None:
    from evomerge.run import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1, sort_keys=True))


def read_json(path: Path, default: Any = None) -> Any:
    return json.loads(path.read_text()) if path.exists() else default


def mean_of(scores: Mapping[str, float], tasks: Sequence[str]) -> float:
    return sum(float(scores[t]) for t in tasks) / len(tasks)


def accuracies(tasks: Sequence[str]) -> list:
    """Each task's accuracy as an objective (maximized, reference 0): what fronts are judged on."""
    from evomerge.fitness.objectives import Objective

    return [Objective(t, "max", 0.0) for t in tasks]


def hv(tasks: Sequence[str], rows: Iterable[Mapping[str, float]]) -> float:
    from evomerge.fitness.objectives import hypervolume

    return hypervolume(accuracies(tasks), [{t: r[t] for t in tasks} for r in rows])


def non_dominated(rows: Sequence[Mapping[str, float]], tasks: Sequence[str]) -> list[int]:
    """Indices of the rows no other row dominates on the tasks' accuracies."""
    from evomerge import front

    return front.non_dominated(accuracies(tasks), rows)


# --- full-split scoring, cached by recipe hash --------------------------------------------------------


class Scorer:
    """Scores recipes on a whole split with evomerge's Ray workers: validation on the optimized
    tasks, test on those and the probe tasks (a probe never informs a choice). Every result is kept
    in ``scores.json`` by recipe hash, so nothing is scored twice, across runs and invocations."""

    def __init__(self, settings, tasks: Mapping[str, Sequence[str]], cache: Path, log: Log) -> None:
        self.settings, self.tasks, self.path, self.log = settings, dict(tasks), cache, log
        self.cache: dict[str, dict[str, Any]] = read_json(cache, {})
        self.pool, self.pool_split = None, None
        self.used: set[tuple[str, str]] = set()  # (hash, split) the table relies on

    def _pool(self, split: str):
        if self.pool_split != split:  # one pool at a time: the workers take every core
            self.close()
            from evomerge.search.workers import WorkerPool

            s = self.settings
            fitness = dataclasses.replace(s.fitness, estimator="full", objectives=["tasks"])
            spec = dataclasses.replace(s.worker_spec(), tasks=list(self.tasks[split]), fitness=fitness)
            self.pool, self.pool_split = WorkerPool(spec, log=self.log), split
        return self.pool

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
        self.pool, self.pool_split = None, None

    def get(self, recipe_hash: str, split: str) -> dict[str, float] | None:
        return (self.cache.get(recipe_hash) or {}).get(split)

    def worker_seconds(self) -> dict[str, float]:
        """Worker seconds (merge + evaluation) behind the scores used, per split, whichever
        invocation measured them."""
        out = {"validation": 0.0, "test": 0.0}
        for h, split in self.used:
            out[split] += (self.cache.get(h) or {}).get(f"{split}_seconds", 0.0)
        return out

    def score(self, recipes: Mapping[str, dict], split: str, *, items: bool = False) -> dict[str, Any]:
        """``{hash: scores}`` for ``recipes`` (hash -> recipe dict) on ``split``; a recipe whose merge
        or evaluation fails gets None. With ``items`` the full evaluations come back (not cached)."""
        self.used.update((h, split) for h in recipes)
        todo = {h: r for h, r in recipes.items() if items or split not in self.cache.get(h, {})}
        out: dict[str, Any] = {}
        if todo:
            from evomerge.layer_path import plan_from_dict
            from evomerge.search.workers import EvalRequest, EvalResult

            self.log(f"scoring {len(todo)} recipe(s) on the full {split} split")

            def done(key: str, result: EvalResult) -> None:
                entry = self.cache.setdefault(key, {})
                if result.evaluation is None:
                    self.log(f"recipe {key} failed on {split}: {result.error}")
                    entry[split], entry[f"{split}_error"] = None, result.error
                else:
                    entry[split] = dict(result.evaluation.scores)
                    if items:
                        out[key] = result.evaluation.to_dict()
                entry[f"{split}_seconds"] = result.seconds
                write_json(self.path, self.cache)  # a crash loses at most the evaluations running

            self._pool(split).run({h: EvalRequest(plan_from_dict(r), split=split, full=True)
                                   for h, r in todo.items()}, done)
        if items:
            return out
        return {h: self.get(h, split) for h in recipes}


# --- baselines: parents, grids and the shared probe population ------------------------------------


def uniform(settings, method: str, weights: Mapping[str, float], density: float = 1.0, **extra):
    from evomerge.recipe import ExpertParams, MethodConfig, Recipe

    experts = tuple(settings.experts)
    config = MethodConfig(method, {e: ExpertParams(weight=weights[e], density=density) for e in experts}, **extra)
    return Recipe.uniform(settings.base, experts, settings.num_layers, config, expert_refs=dict(settings.experts))


def parents(settings) -> dict[str, Any]:
    """The base and each expert alone, as recipes (task arithmetic with weights 0 / 1)."""
    experts = tuple(settings.experts)
    only = lambda chosen: uniform(settings, "task_arithmetic", {e: float(e == chosen) for e in experts})  # noqa: E731
    return {"base": only(None), **{f"expert:{e}": only(e) for e in experts}}


def grids(settings, which: str) -> dict[str, dict[str, Any]]:
    grid = GRIDS[which]
    every = lambda w: {e: w for e in settings.experts}  # noqa: E731
    return {
        "grid:task_arithmetic": {f"weight {w:g}": uniform(settings, "task_arithmetic", every(w))
                                 for w in grid["task_arithmetic"]},
        "grid:ties": {f"weight {w:g} density {d:g}": uniform(settings, "ties", every(w), d, normalize=False)
                      for w in grid["ties_weight"] for d in grid["ties_density"]},
    }


def probe_population(settings, scorer: Scorer, path: Path, log: Log) -> None:
    """The probes every search's estimator is fitted on, measured once and written in the format
    evomerge search writes to a run folder's probes.json (a search that finds one reuses it):
    base, experts and ``PROBE_MERGES`` random layer-wise merges, as a seed-0 search draws them."""
    if path.exists():
        return
    from transformers import AutoTokenizer

    from evomerge.fitness.evaluator import Evaluation, Evaluator
    from evomerge.pool import resolve
    from evomerge.search.space import SearchSpace

    space = SearchSpace(settings.space, settings.base, tuple(settings.experts), settings.num_layers,
                        expert_refs=dict(settings.experts))
    recipes = parents(settings)
    rng = random.Random(0)
    recipes.update({f"random:{i}": space.decode(space.random(rng)) for i in range(PROBE_MERGES)})
    evaluations = scorer.score({r.hash: r.to_dict() for r in recipes.values()}, "validation", items=True)
    failed = [n for n, r in recipes.items() if r.hash not in evaluations]
    if failed:
        raise SystemExit(f"probe model {failed[0]} could not be evaluated; see the log above")
    folder, gguf_file = resolve(settings.base)
    tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
    evaluator = Evaluator(settings.fitness, settings.tasks, tokenizer,
                          include_path=settings.include_path)
    state = evaluator.fit([Evaluation.from_dict(evaluations[r.hash]) for r in recipes.values()])
    write_json(path, {"estimator": state, "probes": [
        {"name": n, "recipe": r.to_dict(), "evaluation": evaluations[r.hash],
         "seconds": evaluations[r.hash].get("seconds", 0.0)} for n, r in recipes.items()]})
    log(f"probe population: {len(recipes)} models, shared by every search ({path})")


class Baselines:
    """The parents and the grids: one row each, with its pick (best full-validation mean) and
    test front; scored in two steps, like the searches, so one pool serves every validation
    score and another every test score."""

    def __init__(self, settings, which: str, skills: list[str], front_cap: int) -> None:
        self.models, self.families = parents(settings), grids(settings, which)
        self.skills, self.front_cap = skills, front_cap
        everything = [*self.models.values(), *(r for points in self.families.values() for r in points.values())]
        self.recipes = {r.hash: r for r in everything}

    def to_validate(self) -> dict[str, dict]:
        return {h: r.to_dict() for h, r in self.recipes.items()}

    def choose(self, scorer: Scorer) -> dict[str, dict]:
        """Each grid's pick and capped front from the validation scores; returns what to score on test."""
        self.chosen = {}
        for name, points in self.families.items():
            scored = [{"label": label, "recipe_hash": r.hash, "summary": r.summary(),
                       "val": scorer.get(r.hash, "validation")} for label, r in points.items()]
            scored = [s for s in scored if s["val"] is not None]
            front = [scored[i] for i in non_dominated([s["val"] for s in scored], self.skills)]
            front = sorted(front, key=lambda s: -mean_of(s["val"], self.skills))[:self.front_cap]
            pick = max(scored, key=lambda s: mean_of(s["val"], self.skills))  # the best mean is on the front
            self.chosen[name] = (pick, front, scored)
        wanted = {r.hash for r in self.models.values()}
        wanted |= {s["recipe_hash"] for _, front, _ in self.chosen.values() for s in front}
        return {h: self.recipes[h].to_dict() for h in wanted}

    def rows(self, scorer: Scorer) -> list[dict]:
        rows = []
        for name, recipe in self.models.items():
            pick = {"label": name, "recipe_hash": recipe.hash, "summary": recipe.summary(),
                    "val": scorer.get(recipe.hash, "validation"), "test": scorer.get(recipe.hash, "test")}
            rows.append({"searcher": name, "kind": "parent", "seed": None, "pick": pick, "front": [pick],
                         "hv_test": hv(self.skills, [pick["test"]]), "evaluations": 0,
                         "full_evals": {"validation": 1, "test": 1}, "search_seconds": 0.0})
        for name, (pick, front, scored) in self.chosen.items():
            for s in scored:
                s["test"] = scorer.get(s["recipe_hash"], "test")
            front = [s for s in front if s["test"] is not None]
            rows.append({"searcher": name, "kind": "grid", "seed": None, "pick": pick, "front": front,
                         "hv_test": hv(self.skills, [s["test"] for s in front]), "evaluations": len(scored),
                         "full_evals": {"validation": len(self.families[name]), "test": len(front)},
                         "search_seconds": 0.0, "grid": scored})
        return rows


# --- the searches -----------------------------------------------------------------------------------


class OwnTestScoring(SearchHooks):
    """A search ends by scoring its knee and best-per-objective members on test; the experiment
    scores its own larger set (with the probe task) instead, so its searches score none."""

    def before_test_scoring(self, members: Sequence[ArchiveEntry]) -> list[ArchiveEntry]:
        return []


def common_overrides(zoo: str, items: int, workers: int, pop: int) -> list[str]:
    """The settings every searcher shares. Parents off: this experiment scores the input models
    and the uniform grids itself, and its budgets count the candidates each searcher chose (a
    searcher whose own settings turn them on counts them too)."""
    # verify=0: every searcher's pick is made by this experiment's own rule (curves.py counts the
    # default's verification in its budget, as `evomerge search` spends it).
    return [f"zoo={zoo}", "fitness=anchors", f"fitness.items_per_task={items}", "fitness.verify=0",
            f"fitness.probe_merges={PROBE_MERGES}", f"runtime.workers={workers}", "runtime.threads_per_worker=1",
            f"algorithm.pop_size={pop}", "space.parents=false",
            "refine=none"]  # searchers as they were measured; refinement has its own experiment (refine/)


def generations(name: str, budget: int, pop: int) -> int:
    """Generations that spend ``budget`` candidates (whole generations, so rounded up)."""
    first = SEARCHERS[name][2]
    return max(1, math.ceil(budget / pop)) if first is None else 1 + max(0, math.ceil((budget - first) / pop))


def search_config(name: str, seed: int, common: list[str], budget: int, pop: int, runs: Path,
                  own_length: bool = True, experts: int = 0) -> dict:
    from evomerge.config import compose

    # placeholders by name, not str.format: overrides hold braces of their own ({method: ...})
    own = [o.replace("{seed}", str(seed)).replace("{picks}", str(ps_picks(runs))) for o in SEARCHERS[name][1]]
    overrides = common + own + [f"runs_dir={runs}", f"name={name}-s{seed}", f"seed={seed}"]
    config = compose(overrides)
    if not (own_length and name in OWN_LENGTH):
        return compose(overrides + [f"algorithm.generations={generations(name, budget, pop)}"])
    # A searcher with its own length runs it, or longer where the budget asks for more; its
    # parents (base, experts, uniform merges; a path's sources) count in its budget.
    space = config["space"]
    extra = (1 if space.get("merge") else 0) if space.get("kind") == "dataflow" else len(space["uniform"])
    parents = 1 + experts + extra if space["parents"] else 0
    needed = math.ceil(max(0, budget - parents) / pop)
    if config["algorithm"]["generations"] < needed:
        config = compose(overrides + [f"algorithm.generations={needed}"])
    return config


def ps_picks(runs: Path) -> Path:
    """Where PS+DFS searchers find their PS merge: ``default-tsv-b<B>-s<seed>.yaml`` beside the
    budget folders, written by :func:`write_ps_picks`."""
    return runs.parent / "ps-picks"


def write_ps_picks(runs: Path, curves: Path = HERE / "curves-300.json") -> None:
    """The default search's pick per seed at each budget of the learning curves (curves.py's
    rule, recorded in ``curves``) as recipe files, the PS source of the PS+DFS searchers."""
    from evomerge.recipe import Recipe
    from evomerge.run import RunDir

    out = ps_picks(runs)
    for row in read_json(curves, {}).get("rows", []):
        if row["searcher"] != "default-tsv":
            continue
        by_hash = {e.recipe_hash: e.recipe for e in RunDir(Path(row["folder"])).archive()}
        for point in row["points"]:
            file = out / f"default-tsv-b{point['budget']}-s{row['seed']}.yaml"
            if not file.exists():
                out.mkdir(parents=True, exist_ok=True)
                file.write_text(Recipe.from_dict(by_hash[point["pick"]["recipe_hash"]]).to_yaml())


@dataclasses.dataclass
class Setup:
    """What every experiment over the zoo's searches shares: the overrides, the settings, the
    zoo, its tasks, where the runs of one budget live and the cached full-split scorer."""

    common: list[str]
    settings: Any
    zoo_config: Any
    zoo: Any
    skills: list[str]
    probes: list[str]
    runs: Path
    scorer: Scorer

    @classmethod
    def make(cls, zoo_name: str, items: int, workers: int, pop: int, budget: int, out: Path) -> "Setup":
        from evomerge.config import compose, read_config
        from evomerge.search.settings import build_zoo_for, read_settings
        from evomerge.zoo.build import Zoo
        from evomerge.zoo.tasks import task_name

        common = common_overrides(zoo_name, items, workers, pop)
        config = compose(common + ["space=layerwise"])
        build_zoo_for(config, log=log)
        settings = read_settings(config)
        zoo_config = read_config(compose(common)).zoo
        zoo = Zoo.at(zoo_config)
        skills = list(settings.tasks)
        probes = [task_name(p) for p in zoo_config.probes]
        root = out / "runs" / zoo.root.name
        scorer = Scorer(settings, {"validation": skills, "test": skills + probes}, root / "scores.json", log)
        return cls(common, settings, zoo_config, zoo, skills, probes, root / f"b{budget}-p{pop}-i{items}", scorer)


def run_search(config: dict, folder: Path, probes: Path, log: Log) -> float:
    """Start, resume or skip the search in ``folder``; returns the wall seconds spent now."""
    import yaml

    from evomerge.run import RunDir, atomic_write
    from evomerge.search import driver as loop
    from evomerge.search.settings import search_fingerprint

    state = read_json(folder / loop.RUN_STATE)
    # A run made before a setting existed reads it as that setting's "off" (as a resume does).
    if state is not None and search_fingerprint(loop.resumed_config(RunDir(folder))) != search_fingerprint(config):
        raise SystemExit(f"{folder} holds a search with other settings than this command asks for; "
                         f"delete it or choose another --out")
    done = folder / "zoo_pareto_done"  # written once the search returns: nothing left to run
    if state is not None:
        run = RunDir(folder)
        recorded = run.config()
        asked = config["algorithm"]["generations"]
        if recorded["algorithm"]["generations"] < asked:
            # A larger budget extends the run: its generations are what a resume may change.
            recorded["algorithm"]["generations"] = asked
            atomic_write(run.config_path, yaml.safe_dump(recorded, sort_keys=False))
            done.unlink(missing_ok=True)
    if state is not None and done.exists():
        return 0.0
    started = time.perf_counter()
    prefix = lambda message: log(f"{folder.name}: {message}")  # noqa: E731
    if state is None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "probes.json").write_bytes(probes.read_bytes())
        loop.start(config, prefix, hooks=OwnTestScoring())
    else:
        loop.resume(folder, prefix, hooks=OwnTestScoring())
    done.write_text("finished\n")
    return time.perf_counter() - started


class RunResult:
    """What one finished search contributes to the table, measured in two steps so that every
    run's validation scoring shares one pool and every run's test scoring another."""

    def __init__(self, name: str, seed: int, folder: Path, skills: list[str], rescore: int, front_cap: int) -> None:
        from evomerge import front
        from evomerge.report.run_data import objectives
        from evomerge.run import RunDir

        self.name, self.seed, self.folder, self.skills, self.front_cap = name, seed, folder, skills, front_cap
        self.run = RunDir(folder)
        self.archive = self.run.archive()
        self.unique = [e for e in front.competing(self.archive, objectives(self.run))
                       if all(t in e.scores for t in skills)]
        if not self.unique:
            raise SystemExit(f"{folder}: no successful candidate to pick from")
        ranked = sorted(self.unique, key=lambda e: (-self.estimated(e), e.id))
        self.shortlist = ranked[:rescore]  # re-scored on the full validation split
        keep = non_dominated([e.scores for e in self.unique], skills)
        self.front = sorted((self.unique[i] for i in keep), key=lambda e: (-self.estimated(e), e.id))

    def estimated(self, entry) -> float:
        return mean_of(entry.scores, self.skills)

    def to_validate(self) -> dict[str, dict]:
        return {e.recipe_hash: e.recipe for e in self.shortlist}

    def choose(self, scorer: Scorer) -> dict[str, dict]:
        """The pick from the shortlist's full validation scores; returns what to score on test."""
        scored = [e for e in self.shortlist if scorer.get(e.recipe_hash, "validation") is not None]
        if not scored:
            raise SystemExit(f"{self.folder}: every re-scored candidate failed on the full validation split")
        self.pick = max(scored, key=lambda e: (mean_of(scorer.get(e.recipe_hash, "validation"), self.skills), -e.id))
        self.members = self.front[:self.front_cap]
        if self.pick.recipe_hash not in {e.recipe_hash for e in self.members}:
            self.members.append(self.pick)
        return {e.recipe_hash: e.recipe for e in self.members}

    def row(self, scorer: Scorer, seconds: float) -> dict:
        from evomerge.layer_path import plan_from_dict

        def member(e) -> dict:
            return {"id": e.id, "recipe_hash": e.recipe_hash, "summary": plan_from_dict(e.recipe).summary(),
                    "estimated_val": {t: e.scores[t] for t in self.skills},
                    "val": scorer.get(e.recipe_hash, "validation"), "test": scorer.get(e.recipe_hash, "test")}

        front = [m for m in map(member, self.members) if m["test"] is not None]
        archive = self.archive
        return {"searcher": self.name, "kind": "search", "seed": self.seed, "folder": str(self.folder),
                "pick": member(self.pick), "front": front, "front_size": len(self.front),
                "rescored": [{"id": e.id, "recipe_hash": e.recipe_hash, "estimated_mean": self.estimated(e),
                              "val_mean": (None if scorer.get(e.recipe_hash, "validation") is None
                                           else mean_of(scorer.get(e.recipe_hash, "validation"), self.skills))}
                             for e in self.shortlist],
                "hv_test": hv(self.skills, [m["test"] for m in front]),
                "evaluations": len(archive), "unique": len({e.recipe_hash for e in archive}),
                "errors": sum(e.error is not None for e in archive), "generations": len(self.run.history()),
                "candidate_seconds": _mean([e.merge_seconds + e.eval_seconds for e in archive
                                            if e.cached_from is None and e.error is None]),
                "full_evals": {"validation": len(self.shortlist), "test": len(self.members)},
                "search_seconds": seconds}


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# --- main ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="smollm2", help="the zoo config (conf/zoo): smollm2 or pico")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 per search (default 3; --quick 1)")
    parser.add_argument("--budget", type=int, default=None,
                        help="candidate evaluations per search (default 72; --quick 8), "
                             "rounded up to whole generations")
    parser.add_argument("--pop", type=int, default=None, help="population per generation (default 12; --quick 4)")
    parser.add_argument("--items", type=int, default=10, help="anchor items per task the searches' estimator runs")
    parser.add_argument("--rescore", type=int, default=None,
                        help="best candidates by estimate re-scored on full validation (default 2)")
    parser.add_argument("--front-cap", type=int, default=None,
                        help="validation-front members (best mean first) scored on test, besides the pick "
                             "(default 3)")
    parser.add_argument("--workers", type=int, default=2, help="Ray workers (one torch thread each)")
    parser.add_argument("--searchers", default="random,cmaes,ga,nsga2",
                        help="comma-separated subset of " + ",".join(SEARCHERS))
    parser.add_argument("--quick", action="store_true", help="1 seed, tiny budget and grids: a check that it all runs")
    parser.add_argument("--out", type=Path, default=HERE, help="where runs/, results.json, results.md and plots go")
    args = parser.parse_args(argv)
    quick = args.quick
    seeds = args.seeds if args.seeds is not None else (1 if quick else 3)
    pop = args.pop if args.pop is not None else (4 if quick else 12)
    budget = args.budget if args.budget is not None else (8 if quick else 72)
    rescore = args.rescore if args.rescore is not None else 2
    front_cap = args.front_cap if args.front_cap is not None else 3

    chosen = [s.strip() for s in args.searchers.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SEARCHERS]
    if unknown:
        parser.error(f"unknown searcher {unknown[0]!r}; valid: {', '.join(SEARCHERS)}")

    started = time.perf_counter()
    setup = Setup.make(args.zoo, args.items, args.workers, pop, budget, args.out)
    common, settings, zoo_config, zoo = setup.common, setup.settings, setup.zoo_config, setup.zoo
    skills, probes, runs, scorer = setup.skills, setup.probes, setup.runs, setup.scorer

    log(f"zoo {zoo.root.name}: experts {', '.join(settings.experts)}; tasks {', '.join(skills)}; "
        f"probe tasks {', '.join(probes) or 'none'}")
    log(f"{len(chosen)} searcher(s) x {seeds} seed(s), {budget} candidates each ({pop} per generation); "
        f"runs under {runs}")
    # Wall seconds, summed over every invocation that built these results: {"stages": ..., "runs": ...}
    timings_path = runs / "seconds.json"
    timings: dict[str, dict[str, float]] = read_json(timings_path, {"stages": {}, "runs": {}})

    def spent(kind: str, key: str, seconds: float) -> None:
        timings[kind][key] = timings[kind].get(key, 0.0) + seconds
        write_json(timings_path, timings)

    t = time.perf_counter()
    try:
        probe_population(settings, scorer, runs / "probes.json", log)
    finally:
        scorer.close()
    spent("stages", "probes", time.perf_counter() - t)

    t = time.perf_counter()
    folders = {}
    for name in chosen:
        for seed in range(seeds):
            label = f"{name}-s{seed}"
            config = search_config(name, seed, common, budget, pop, runs, experts=len(setup.settings.experts))
            folders[(name, seed)] = runs / label
            spent("runs", label, run_search(config, runs / label, runs / "probes.json", log))
    spent("stages", "searches", time.perf_counter() - t)

    # Full-split scoring of everything the table shows: every validation score first (the grids,
    # each search's shortlist), then every test score (parents, grid and search fronts, picks).
    t = time.perf_counter()
    try:
        baselines = Baselines(settings, "quick" if quick else "full", skills, front_cap)
        finished = [RunResult(name, seed, folder, skills, rescore, front_cap)
                    for (name, seed), folder in folders.items()]
        todo = baselines.to_validate()
        for f in finished:
            todo.update(f.to_validate())
        scorer.score(todo, "validation")
        todo = baselines.choose(scorer)
        for f in finished:
            todo.update(f.choose(scorer))
        scorer.score(todo, "test")
        rows = baselines.rows(scorer) + [f.row(scorer, timings["runs"].get(f.folder.name, 0.0)) for f in finished]
    finally:
        scorer.close()
    spent("stages", "scoring", time.perf_counter() - t)

    results = {
        "zoo": zoo.root.name, "zoo_kind": zoo_config.kind, "experts": list(settings.experts),
        "tasks": skills, "probe_tasks": probes, "searchers": {n: SEARCHERS[n][0] for n in chosen},
        "evomerge_searchers": [s for s in EVOMERGE if s in chosen],
        "settings": {"seeds": seeds, "pop_size": pop, "generations": {n: generations(n, budget, pop) for n in chosen},
                     "budget": budget,
                     "estimator": "anchors", "items_per_task": args.items, "rescore": rescore,
                     "front_cap": front_cap, "workers": args.workers, "probe_merges": PROBE_MERGES,
                     "grid": GRIDS["quick" if quick else "full"], "quick": quick,
                     "overrides": {n: SEARCHERS[n][1] for n in chosen}, "common_overrides": common},
        "command": "python experiments/zoo_pareto/run.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "rows": rows,
        "seconds": {"stages": dict(timings["stages"]), "this_invocation": time.perf_counter() - started,
                    "scoring_worker_seconds": scorer.worker_seconds()},
        "finished": time.strftime("%Y-%m-%d %H:%M"),
    }
    write_json(args.out / "results.json", results)
    written = table.render(results, args.out, table.README if args.out.resolve() == HERE else None)
    log(f"wrote {', '.join(str(p) for p in written)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
