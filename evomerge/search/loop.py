"""The ask/tell loop: pymoo proposes genomes, workers evaluate them, the archive remembers.

Order of events per generation, chosen so that a crash at any point loses nothing:
ask -> decode -> (archive hit? reuse : evaluate on a worker -> append to archive) -> tell ->
history line -> pareto.json -> checkpoint. Candidate ids are fixed by (generation, position), so
a resumed run re-asks the interrupted generation from the last checkpoint (the algorithm's random
state is inside it), finds the candidates already in the archive by id, and evaluates only the
rest: the archive ends identical to an uninterrupted run's, whatever the worker count or timing.
The parents (base, experts, uniform merges; ``space.parents``) come first, as generation -1 with
ids 0..P-1, so the algorithm's candidates are numbered from P.
"""

from __future__ import annotations

import dataclasses
import random
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from evomerge import front as fronts
from evomerge.errors import UserError
from evomerge.fitness.objectives import Objective, hypervolume, minimized_matrix
from evomerge.recipe import Recipe
from evomerge.run import ArchiveEntry, RunDir, atomic_write
from evomerge.search import checkpoint
from evomerge.search.algorithms import make_algorithm, make_problem
from evomerge.search.hooks import SearchHooks
from evomerge.search.settings import Settings, changed_keys, read_settings, search_fingerprint
from evomerge.search.workers import EvalRequest, EvalResult, WorkerPool, worst_objectives
from evomerge.space import SearchSpace

Log = Callable[[str], None]
RUN_STATE = "run.json"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def start(config: dict[str, Any], log: Log = _stderr, *, hooks: SearchHooks | None = None) -> RunDir:
    """Check ``config``, create its run folder and search; returns the folder."""
    search = Search(read_settings(config), log, hooks=hooks)  # every check passes before a file is written
    name = config.get("name") or datetime.now().strftime("%Y%m%d-%H%M%S")
    run = RunDir.create(Path(config.get("runs_dir") or "runs") / str(name), config)
    run.write_json(run.root / RUN_STATE, {"fingerprint": search_fingerprint(config), "config": config})
    log(f"run folder: {run.root}")
    search.run(run)
    return run


def resume(folder: str | Path, log: Log = _stderr, *, hooks: SearchHooks | None = None) -> RunDir:
    """Continue the run in ``folder`` from its archive and newest checkpoint."""
    run = RunDir.open(folder)
    Search(read_settings(resumed_config(run)), log, hooks=hooks).run(run)
    return run


def resumed_config(run: RunDir) -> dict[str, Any]:
    """``run``'s config as it resumes; refused when edited in a way that changes the search."""
    config = run.config()
    state = run.read_json(run.root / RUN_STATE)
    if state is None:
        raise UserError(f"{run.root} has no readable {RUN_STATE}; it was not written by evomerge search")
    if search_fingerprint(config) != state["fingerprint"]:
        keys = changed_keys(state["config"], config)
        raise UserError(f"{run.config_path} was edited in a way that changes the search "
                        f"({', '.join(keys) or 'structure'}); only {', '.join(('runtime.*', 'algorithm.generations'))} "
                        f"may change on resume. Start a new run instead")
    if isinstance(config.get("fitness"), dict):
        # Runs made before teacher forcing existed decoded their estimator items (their
        # fingerprint has no such key): a resumed run goes on estimating as it began.
        config["fitness"].setdefault("teacher_forcing", False)
    if isinstance(config.get("space"), dict):
        # Runs made before parents were candidates numbered their first generation from 0.
        config["space"].setdefault("parents", False)
    return config


class Search:
    def __init__(self, settings: Settings, log: Log = _stderr, *, hooks: SearchHooks | None = None) -> None:
        from evomerge.fitness import Evaluator

        self.settings = settings
        self.log = log
        self.hooks = hooks or SearchHooks()
        self.space = SearchSpace(settings.space, settings.base, tuple(settings.experts), settings.num_layers,
                                 expert_refs=dict(settings.experts))
        # A driver-side evaluator validates the tasks and names the objectives before workers start.
        self.evaluator = Evaluator(settings.fitness, settings.tasks, _tokenizer(settings.base),
                                   include_path=settings.include_path)
        self.objectives: list[Objective] = list(self.evaluator.objectives)
        settings.algorithm.check_objectives(len(self.objectives))
        self.initial = [self.space.encode(r) for r in self.space.initial_recipes()]
        make_algorithm(settings.algorithm, self.space, len(self.objectives), self.initial)  # fail fast
        self.pool: WorkerPool | None = None

    # --- the run ---------------------------------------------------------------------------------
    def run(self, run_dir: RunDir) -> None:
        self.run_dir = run_dir
        started = time.perf_counter()
        dropped = self.run_dir.repair_archive()
        if dropped:
            self.log(f"archive: dropped {dropped} unreadable line(s) left by an interrupted write; "
                     f"those candidates are evaluated again")
        archive = self.run_dir.archive()
        self.by_id = {e.id: e for e in archive}
        self.by_hash: dict[str, ArchiveEntry] = {}
        for entry in sorted(archive, key=lambda e: e.id):
            self.by_hash.setdefault(entry.recipe_hash, entry)
        if archive:
            self.log(f"archive: {len(archive)} evaluations replayed, not re-evaluated")
        if not self.run_dir.pareto_path.exists():  # inspect learns the objectives from the start
            self._write_pareto([], -1)
        try:
            spec = dataclasses.replace(self.settings.worker_spec(), hooks=self.hooks)
            self.pool = WorkerPool(spec, log=self.log)
            self._probe_population()
            algorithm, generation, next_id = self._algorithm(first_id=self._parents())
            while algorithm.has_next():
                generation_started = time.perf_counter()
                asked = algorithm.ask()
                population = _as_population(asked)
                entries = self._evaluate_generation(population, generation, next_id)
                next_id += len(entries)
                F = minimized_matrix(self.objectives, [e.objectives for e in entries])
                from pymoo.core.evaluator import Evaluator as PymooEvaluator
                from pymoo.problems.static import StaticProblem

                PymooEvaluator().eval(StaticProblem(algorithm.problem, F=F), population)
                algorithm.tell(infills=asked)  # MOEA/D wants back the very individual it asked
                self._after_generation(generation, next_id, started, generation_started, len(entries))
                self._checkpoint(algorithm, generation + 1, next_id)
                generation += 1
            self._test_front()
        finally:
            if self.pool is not None:
                self.pool.shutdown()

    def _algorithm(self, first_id: int):
        """The newest intact checkpoint, or a fresh algorithm whose candidates take ids from
        ``first_id``."""
        for path in sorted(self.run_dir.checkpoints.glob("generation-*.pkl"), reverse=True):
            try:
                state = checkpoint.loads(path.read_bytes())
            except Exception as error:
                self.log(f"checkpoint {path.name} is unreadable ({type(error).__name__}); trying an older one")
                continue
            algorithm = state["algorithm"]
            from pymoo.termination import get_termination

            algorithm.termination = get_termination("n_gen", self.settings.algorithm.generations)
            self.log(f"resuming after generation {state['generation']} ({state['next_id']} candidates)")
            return algorithm, state["generation"], state["next_id"]
        algorithm = make_algorithm(self.settings.algorithm, self.space, len(self.objectives), self.initial)
        problem = make_problem(self.space, len(self.objectives))
        algorithm.setup(problem, termination=("n_gen", self.settings.algorithm.generations),
                        seed=self.settings.seed, verbose=False)
        return algorithm, 0, first_id

    def _checkpoint(self, algorithm, generation: int, next_id: int) -> None:
        path = self.run_dir.checkpoints / f"generation-{generation:04d}.pkl"
        data = checkpoint.dumps(algorithm, generation=generation, next_id=next_id)
        if data is None:
            if generation == 1:
                self.log(f"algorithm {self.settings.algorithm.name} cannot be checkpointed; a resume "
                         f"replays the archive from the first generation instead (nothing is re-evaluated)")
            return
        self.hooks.before_checkpoint(generation, path, data)
        atomic_write(path, data)
        for old in sorted(self.run_dir.checkpoints.glob("generation-*.pkl"))[:-2]:
            old.unlink()  # two kept: the newest may be the one a crash corrupts

    # --- evaluation ------------------------------------------------------------------------------
    def _evaluate_generation(self, population, generation: int, first_id: int) -> list[ArchiveEntry]:
        genomes = [self.space.as_genome(x) for x in population.get("X")]
        return self._evaluate([self.space.decode(g) for g in genomes], [self.space.vector(g) for g in genomes],
                              generation, first_id)

    def _evaluate(self, recipes: list[Recipe], vectors: list[list[float]], generation: int,
                  first_id: int) -> list[ArchiveEntry]:
        """Archive entries for ``recipes`` with ids from ``first_id``: replayed when archived
        already, served from the archive when an earlier entry has the same recipe, else
        evaluated by the workers (each appended the moment its result arrives)."""
        entries: dict[int, ArchiveEntry] = {}
        jobs: dict[int, EvalRequest] = {}
        twins, claimed = [], set()
        for position, recipe in enumerate(recipes):
            entry_id = first_id + position
            if entry_id in self.by_id:  # evaluated before an interruption: replayed
                entries[entry_id] = self.by_id[entry_id]
            elif recipe.hash in self.by_hash or recipe.hash in claimed:
                twins.append(position)  # served from the archive once its original is there
            else:
                claimed.add(recipe.hash)
                jobs[entry_id] = EvalRequest(recipe)
        progress = _Progress(len(recipes), len(entries) + len(twins), generation)

        def on_result(entry_id: int, result: EvalResult) -> None:
            position = entry_id - first_id
            entries[entry_id] = self._record(
                self._entry(entry_id, generation, vectors[position], recipes[position], result))
            progress.step()

        self.pool.run(jobs, on_result)
        progress.close()
        for position in twins:
            recipe, entry_id = recipes[position], first_id + position
            earlier = self.by_hash[recipe.hash]
            entries[entry_id] = self._record(ArchiveEntry(
                entry_id, generation, vectors[position], recipe.hash, recipe.to_dict(),
                dict(earlier.objectives), dict(earlier.scores), error=earlier.error, cached_from=earlier.id))
        return [entries[first_id + i] for i in range(len(recipes))]

    def _parents(self) -> int:
        """Score the input models and uniform merges of them (``space.parents``) as the
        archive's first candidates, generation -1, so the front and every pick compete with them
        on the search's own data: a search never hands back something worse than a model the
        user brought. They have no genome and the algorithm is not told of them. Returns how
        many ids they take."""
        if not self.settings.space.parents:
            return 0
        recipes = list(self.space.parent_recipes().values())
        self._evaluate(recipes, [[] for _ in recipes], -1, 0)
        return len(recipes)

    def _entry(self, entry_id: int, generation: int, vector: list[float], recipe: Recipe,
               result: EvalResult) -> ArchiveEntry:
        if result.evaluation is not None:
            objectives, scores = result.evaluation.objectives, result.evaluation.scores
        else:
            objectives, scores = worst_objectives(self.objectives), {}
        return ArchiveEntry(entry_id, generation, vector, recipe.hash, recipe.to_dict(),
                            dict(objectives), dict(scores), result.merge_seconds, result.eval_seconds,
                            result.worker, result.error)

    def _record(self, entry: ArchiveEntry) -> ArchiveEntry:
        """Append to the archive first: only then does anything else learn of the result."""
        self.hooks.before_archive_line(self.run_dir, entry)
        self.run_dir.append(entry)
        self.by_id[entry.id] = entry
        if entry.cached_from is None:
            self.by_hash.setdefault(entry.recipe_hash, entry)
        return entry

    # --- probes: the population the estimators are fitted on -------------------------------------
    def _probe_population(self) -> None:
        if not self.evaluator.estimator.needs_probes:
            return  # full and random subsets need no fit: skip the most expensive minutes of a short run
        saved = self.run_dir.read_json(self.run_dir.probes_path)
        if saved is not None:
            self.log(f"probe population: reusing {len(saved['probes'])} evaluations from {self.run_dir.probes_path.name}")
            self.pool.load_state(saved["estimator"])
            return
        recipes = self._probe_recipes()
        self.log(f"probe population: {len(recipes)} models on the full validation split "
                 f"(fits the {self.settings.fitness.estimator} estimator)")
        results: dict[str, EvalResult] = {}
        self.pool.run({name: EvalRequest(r, full=True) for name, r in recipes.items()}, results.__setitem__)
        failed = {n: r.error for n, r in results.items() if r.evaluation is None}
        if failed:
            name = sorted(failed)[0]
            raise UserError(f"probe model {name} could not be evaluated: {failed[name]}")
        state = self.evaluator.fit([results[n].evaluation for n in recipes])
        self.run_dir.write_json(self.run_dir.probes_path, {
            "estimator": state,
            "probes": [{"name": n, "recipe": recipes[n].to_dict(), "evaluation": results[n].evaluation.to_dict(),
                        "seconds": results[n].seconds} for n in recipes]})
        self.pool.load_state(state)

    def _probe_recipes(self) -> dict[str, Recipe]:
        """Base, experts and a few random candidates: answers that differ, for the fit."""
        parents = self.space.parent_recipes()
        recipes = {name: parents[name] for name in ["base", *(f"expert:{e}" for e in self.space.experts)]}
        rng = random.Random(self.settings.seed)
        for i in range(self.settings.fitness.probe_merges):
            recipes[f"random:{i}"] = self.space.decode(self.space.random(rng))
        return recipes

    # --- bookkeeping -----------------------------------------------------------------------------
    def _front(self) -> list[ArchiveEntry]:
        return fronts.front(self.by_id.values(), self.objectives)

    def _after_generation(self, generation: int, next_id: int, started: float, generation_started: float,
                          count: int) -> None:
        front = self._front()
        elapsed = time.perf_counter() - started
        rate = count / max(1e-9, (time.perf_counter() - generation_started) / 60)
        best = fronts.best_values(self.objectives, front)
        hv = hypervolume(self.objectives, [e.objectives for e in front])
        errors = sum(1 for e in self.by_id.values() if e.error)
        left = self.settings.algorithm.generations - generation - 1
        record = {"generation": generation, "evaluations": next_id, "errors": errors, "best": best,
                  "hypervolume": hv, "seconds": elapsed, "candidates_per_min": rate}
        if generation not in {h["generation"] for h in self.run_dir.history()}:  # not when replayed
            self.run_dir.append_history(record)
        self._write_pareto(front, generation)
        eta = f", ~{left * count / max(rate, 1e-9):.1f} min left" if left > 0 else ""
        self.log(f"generation {generation}: {next_id} evaluations ({errors} failed), best "
                 + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
                 + f", hypervolume {hv:.4f}, {rate:.1f} candidates/min{eta}")
        self.hooks.after_generation(generation, front)

    def _write_pareto(self, front: list[ArchiveEntry], generation: int, tests: dict[int, dict] | None = None) -> None:
        old = self.run_dir.read_json(self.run_dir.pareto_path) or {}
        known = {m["id"]: m.get("test_scores") for m in old.get("members", [])}
        tests = tests or {}
        self.run_dir.write_json(self.run_dir.pareto_path, {
            "generation": generation,
            "objectives": [o.to_dict() for o in self.objectives],
            "members": [{"id": e.id, "recipe_hash": e.recipe_hash, "objectives": e.objectives,
                         "scores": e.scores, "test_scores": tests.get(e.id, known.get(e.id))}
                        for e in sorted(front, key=lambda e: e.id)]})

    def _test_front(self) -> None:
        """Held-out test scores (full test split) for the front members a user would pick: the
        knee and the best on each objective. Scoring every member of a 4-objective front would
        cost more than the search itself; ``inspect`` marks the others' test scores as unknown."""
        front = self._front()
        if not front:
            return
        old = self.run_dir.read_json(self.run_dir.pareto_path) or {}
        known = {m["id"]: m.get("test_scores") for m in old.get("members", []) if m.get("test_scores")}
        todo = self.hooks.before_test_scoring([e for e in fronts.picks(front, self.objectives) if e.id not in known])
        if todo:
            self.log(f"test split: scoring {len(todo)} front member(s) (the knee and the best per objective)")
        results: dict[int, EvalResult] = {}
        self.pool.run({e.id: EvalRequest(Recipe.from_dict(e.recipe), split="test", full=True) for e in todo},
                      results.__setitem__)
        tests = dict(known)
        tests.update({k: r.evaluation.scores for k, r in results.items() if r.evaluation is not None})
        history = self.run_dir.history()
        self._write_pareto(front, history[-1]["generation"] if history else 0, tests)


class _Progress:
    """A progress bar per generation on stderr (tqdm), quiet when stderr is not a terminal."""

    def __init__(self, total: int, done: int, generation: int) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=done, desc=f"generation {generation}", unit="cand",
                        disable=not sys.stderr.isatty(), leave=False)

    def step(self) -> None:
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _as_population(asked):
    """MOEA/D asks for one individual at a time; everything downstream expects a population."""
    from pymoo.core.individual import Individual
    from pymoo.core.population import Population

    if isinstance(asked, Individual):
        return Population.create(asked)
    return asked


def _tokenizer(base: str):
    from transformers import AutoTokenizer

    from evomerge.pool import resolve

    folder, gguf_file = resolve(base)
    return AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}))
