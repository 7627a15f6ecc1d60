"""The ask/tell loop: pymoo proposes genomes, workers evaluate them, the archive remembers.

Order of events per generation, chosen so that a crash at any point loses nothing:
ask -> decode -> (archive hit? reuse : evaluate on a worker -> append to archive) -> tell ->
history line -> pareto.json. Candidate ids are fixed by (generation, position), and an algorithm
set up from the run's seed asks the same candidates when told the same results: so a resumed
run builds a fresh algorithm and replays the archive through it from the first generation
(asked candidates are found by id and told their archived results, nothing is evaluated), then
evaluates only what was never archived. The archive ends identical to an uninterrupted run's,
whatever the worker count or timing, and resume unpickles nothing: a run folder holds data
only (JSON, YAML, safetensors), so one received from someone else cannot run their code.
The parents (base, experts, uniform merges; ``space.parents``) come first, as generation -1 with
ids 0..P-1, so the algorithm's candidates are numbered from P; they also open the algorithm's
first population, best first (CMA-ES starts its mean at the best).

Racing (``fitness.multi_fidelity``): after a generation is evaluated on the estimator's items,
its most promising share is promoted, re-scored on every validation item, and appended as new
entries (``fidelity: full``) with the next ids, before the algorithm is told; it is told each
candidate's highest-fidelity value. Verification (``fitness.verify``): when the search ends,
its few best candidates by estimated mean are promoted the same way, and ``best:mean`` is the
best verified one, so the pick a user exports is not an estimate's lucky draw. Promotions
depend only on archived values, so a resumed run promotes the same ones.
"""

from __future__ import annotations

import dataclasses
import math
import random
import sys
import time
from typing import Any, Callable

from evomerge import front as fronts
from evomerge.config import SINGLE
from evomerge.errors import DiskError, UserError
from evomerge.fitness.objectives import Objective, hypervolume, minimized_matrix
from evomerge.report.html import write_report
from evomerge.layer_path import Plan, plan_from_dict
from evomerge.run import ArchiveEntry, RunDir
from evomerge.search.algorithms import make_algorithm, make_problem, setup
from evomerge.search.hooks import SearchHooks
from evomerge.search.settings import Settings
from evomerge.search.messages import EvalRequest, EvalResult, RefineRequest
from evomerge.search.workers import WorkerPool, worst_objectives
from evomerge.search.space import search_space

Log = Callable[[str], None]


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Search:
    def __init__(self, settings: Settings, log: Log = stderr_log, *, hooks: SearchHooks | None = None) -> None:
        from evomerge.fitness.evaluator import Evaluator

        self.settings = settings
        self.log = log
        self.hooks = hooks or SearchHooks()
        self.space = search_space(settings.space, settings.base, tuple(settings.experts), settings.num_layers,
                                  expert_refs=dict(settings.experts))
        # A driver-side evaluator validates the tasks and names the objectives before workers start.
        self.evaluator = Evaluator(settings.fitness, settings.tasks, _tokenizer(settings.base),
                                   include_path=settings.include_path)
        self.objectives: list[Objective] = list(self.evaluator.objectives)
        averageable = fronts.averageable(self.objectives)
        settings.algorithm.check_objectives(len(self.objectives), averageable)
        # A single-objective algorithm over several task accuracies is told their mean.
        self.told = 1 if settings.algorithm.name in SINGLE else len(self.objectives)
        if settings.fitness.multi_fidelity and not averageable:
            raise UserError(f"fitness.multi_fidelity={settings.fitness.multi_fidelity:g} promotes candidates by "
                            f"their mean accuracy, but objectives {[o.name for o in self.objectives]} do not "
                            f"average; use fitness.objectives=[tasks] or [mean], or multi_fidelity=0")
        if not settings.algorithm.generations and not settings.space.parents:
            raise UserError("algorithm.generations=0 scores the parents only, but space.parents=false leaves "
                            "nothing to score; set space.parents=true or algorithm.generations >= 1")
        self.initial = [self.space.encode(r) for r in self.space.initial_recipes()]
        make_algorithm(settings.algorithm, self.space, self.told, self.initial)  # fail fast
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
        self.by_hash: dict[str, ArchiveEntry] = {}  # the first estimate of each recipe
        self.verified: dict[str, ArchiveEntry] = {}  # the first promotion of each recipe
        for entry in sorted(archive, key=lambda e: e.id):
            if entry.cached_from is None:
                self._known(entry.fidelity).setdefault(entry.recipe_hash, entry)
        if archive:
            self.log(f"archive: {len(archive)} evaluations replayed, not re-evaluated")
        if not self.run_dir.pareto_path.exists():  # inspect learns the objectives from the start
            self._write_pareto([], -1)
        try:
            spec = dataclasses.replace(self.settings.worker_spec(), hooks=self.hooks)
            self.pool = WorkerPool(spec, log=self.log)
            self._probe_population()
            parents = self._parents()
            algorithm, generation, next_id = self._algorithm(parents)
            while self.settings.algorithm.generations and algorithm.has_next():
                generation_started = time.perf_counter()
                asked = algorithm.ask()
                population = _as_population(asked)
                entries = self._evaluate_generation(population, generation, next_id)
                next_id += len(entries)
                next_id += len(self._race(entries, generation, next_id))
                told = [(self._verified(e.recipe_hash, next_id) or e) if e.error is None else e for e in entries]
                F = minimized_matrix(self.objectives, [e.objectives for e in told])
                if F.shape[1] != self.told:
                    F = F.mean(axis=1, keepdims=True)
                from pymoo.core.evaluator import Evaluator as PymooEvaluator
                from pymoo.problems.static import StaticProblem

                PymooEvaluator().eval(StaticProblem(algorithm.problem, F=F), population)
                algorithm.tell(infills=asked)  # MOEA/D wants back the very individual it asked
                self._after_generation(generation, next_id, started, generation_started, len(entries))
                generation += 1
            next_id = self._verify(generation, next_id)
            self._refine_final(generation, next_id)
            self._test_front()
        finally:
            if self.pool is not None:
                self.pool.shutdown()

    def _algorithm(self, parents: list[ArchiveEntry]):
        """A fresh algorithm, set up from the run's seed, whose candidates take ids after the
        parents' and whose first population opens with them. A resumed run replays its archive
        through it (see the module docstring); returns (algorithm, first generation, first id)."""
        algorithm = make_algorithm(self.settings.algorithm, self.space, self.told,
                                   self._parent_genomes(parents) + self.initial)
        setup(algorithm, make_problem(self.space, self.told), self.settings.algorithm.generations,
              self.settings.seed)
        return algorithm, 0, len(parents)

    def _parent_genomes(self, parents: list[ArchiveEntry]) -> list[dict[str, Any]]:
        """The parents the space can spell, best mean first where the objectives average (the
        order they were scored in otherwise): a search starts from the best model it was given
        instead of from nothing. Parents outside the space (another method) are left out."""
        if fronts.averageable(self.objectives):  # failed parents last (a stable sort keeps by_mean's order)
            parents = sorted(fronts.by_mean(parents, self.objectives), key=lambda e: e.error is not None)
        genomes = []
        for entry in parents:
            try:
                genomes.append(self.space.encode(plan_from_dict(entry.recipe)))
            except UserError:
                continue
        return genomes

    # --- evaluation ------------------------------------------------------------------------------
    def _evaluate_generation(self, population, generation: int, first_id: int) -> list[ArchiveEntry]:
        genomes = [self.space.as_genome(x) for x in population.get("X")]
        return self._evaluate([self.space.decode(g) for g in genomes], [self.space.vector(g) for g in genomes],
                              generation, first_id)

    def _known(self, fidelity: str) -> dict[str, ArchiveEntry]:
        return self.verified if fidelity == "full" else self.by_hash

    def _evaluate(self, recipes: list[Plan], vectors: list[list[float]], generation: int,
                  first_id: int, fidelity: str = "estimate") -> list[ArchiveEntry]:
        """Archive entries for ``recipes`` with ids from ``first_id``, at ``fidelity`` (the
        estimator's items, or every validation item scored alike): replayed when archived
        already, served from the archive when an earlier entry has the same recipe and fidelity,
        else evaluated by the workers (each appended the moment its result arrives)."""
        entries: dict[int, ArchiveEntry] = {}
        jobs: dict[int, EvalRequest] = {}
        twins, claimed = [], set()
        known = self._known(fidelity)
        for position, recipe in enumerate(recipes):
            entry_id = first_id + position
            if entry_id in self.by_id:  # evaluated before an interruption: replayed
                entries[entry_id] = self._replayed(entry_id, recipe)
            elif recipe.hash in known or recipe.hash in claimed:
                twins.append(position)  # served from the archive once its original is there
            else:
                claimed.add(recipe.hash)
                jobs[entry_id] = EvalRequest(recipe, full=fidelity == "full", like_estimates=True)
        progress = _Progress(len(recipes), len(entries) + len(twins), generation)

        def on_result(entry_id: int, result: EvalResult) -> None:
            position = entry_id - first_id
            entries[entry_id] = self._record(
                self._entry(entry_id, generation, vectors[position], recipes[position], result, fidelity))
            progress.step()

        self.pool.run(jobs, on_result)
        progress.close()
        for position in twins:
            recipe, entry_id = recipes[position], first_id + position
            earlier = known[recipe.hash]
            entries[entry_id] = self._record(ArchiveEntry(
                entry_id, generation, vectors[position], recipe.hash, recipe.to_dict(),
                dict(earlier.objectives), dict(earlier.scores), error=earlier.error, cached_from=earlier.id,
                fidelity=fidelity))
        return [entries[first_id + i] for i in range(len(recipes))]

    def _replayed(self, entry_id: int, recipe: Plan) -> ArchiveEntry:
        """The archived entry ``entry_id``, which must hold the recipe asked for at that point:
        an algorithm that does not ask again what it asked before would be told other
        candidates' results, silently; a clear refusal is better."""
        entry = self.by_id[entry_id]
        if entry.recipe_hash != recipe.hash:
            raise UserError(f"archive entry {entry_id} of {self.run_dir.root} holds recipe {entry.recipe_hash}, but "
                            f"the resumed search asks for {recipe.hash} there: this run does not replay (made by "
                            f"another evomerge version, or CMA-ES seeded 0 before its seed was fixed); start a new run")
        return entry

    def _race(self, entries: list[ArchiveEntry], generation: int, first_id: int) -> list[ArchiveEntry]:
        """Promote the best ``fitness.multi_fidelity`` share of a generation (by estimated mean,
        each recipe once) to every validation item; returns the promotions' entries."""
        share = self.settings.fitness.multi_fidelity
        if not share:
            return []
        chosen = self._unverified(entries, first_id)[:math.ceil(share * len(entries))]
        return self._evaluate([plan_from_dict(e.recipe) for e in chosen], [e.genome for e in chosen],
                              generation, first_id, "full")

    def _verified(self, recipe_hash: str, before: int) -> ArchiveEntry | None:
        """The recipe's promotion if it has one with an id below ``before``. A resumed run knows
        the whole archive from the start; it must see, as it replays, only what the run it
        repeats had seen at that point, or it would promote (and tell) differently."""
        entry = self.verified.get(recipe_hash)
        return entry if entry is not None and entry.id < before else None

    def _unverified(self, entries, before: int) -> list[ArchiveEntry]:
        """The entries among ``entries`` not promoted before id ``before``, one per recipe, best
        mean first."""
        pending = [e for e in entries if self._verified(e.recipe_hash, before) is None]
        return fronts.by_mean(fronts.competing(pending, self.objectives), self.objectives)

    def _verify(self, generation: int, next_id: int) -> int:
        """The last step of a search: the ``fitness.verify`` best candidates by estimated mean
        (each recipe once) are re-scored on every validation item, so that ``best:mean`` is the
        best verified candidate instead of the luckiest of many estimates. Returns the next id."""
        count = self.settings.fitness.verify
        if not count or self.settings.fitness.estimator == "full":
            return next_id  # nothing asked, or every estimate already scored every validation item
        if not fronts.averageable(self.objectives):
            self.log(f"fitness.verify={count}: objectives {[o.name for o in self.objectives]} do not average, "
                     f"so there is no best mean to verify; nothing verified")
            return next_id
        seen = [e for e in self.by_id.values() if e.id < next_id]
        chosen = self._unverified(seen, next_id)[:count]
        entries = self._evaluate([plan_from_dict(e.recipe) for e in chosen], [e.genome for e in chosen],
                                 generation, next_id, "full")
        if not entries:
            return next_id
        gaps = [fronts.mean(e, self.objectives) - fronts.mean(v, self.objectives)
                for e, v in zip(chosen, entries) if v.error is None]
        top = fronts.pick_mean(self.by_id.values(), self.objectives)
        self.log(f"verified the {len(entries)} best estimates on every validation item (estimates were "
                 f"{min(gaps):+.3f} to {max(gaps):+.3f} off); best:mean is id {top.id} at "
                 f"{fronts.mean(top, self.objectives):.3f}" if gaps else
                 f"verifying the {len(entries)} best estimates failed; best:mean stays an estimate")
        return next_id + len(entries)

    def _refine_final(self, generation: int, next_id: int) -> None:
        """``refine.at=final``: refine ``best:mean`` by gradient steps and verify the result,
        archived as a candidate of its own (parent and steps in its ``origin``), so best:mean is
        the refined recipe only where it scores better on every validation item. A resumed run
        finds the refined entry archived and redoes nothing."""
        config = self.settings.refine
        if config.at != "final" or not fronts.averageable(self.objectives):
            return
        try:
            parent = fronts.pick_mean([e for e in self.by_id.values() if e.id < next_id], self.objectives)
        except UserError:
            return  # nothing succeeded: nothing to refine
        if next_id in self.by_id:
            made = self.by_id[next_id]
            if (made.origin or {}).get("parent") != parent.id:
                raise UserError(f"archive entry {next_id} of {self.run_dir.root} is not the refinement of "
                                f"best:mean (id {parent.id}) that this search makes there; start a new run")
            return
        refined: dict[int, Any] = {}
        self.pool.run({parent.id: RefineRequest(plan_from_dict(parent.recipe), config.seed)}, refined.__setitem__)
        result = refined[parent.id]
        if result.refinement is None:
            self.log(f"refining best:mean (id {parent.id}) failed: {result.error}; best:mean stays as it was")
            return
        refinement = result.refinement
        scored: dict[int, EvalResult] = {}
        self.pool.run({next_id: EvalRequest(refinement.recipe, full=True, like_estimates=True)}, scored.__setitem__)
        estimates = [e.merge_seconds + e.eval_seconds for e in self.by_id.values()
                     if e.fidelity == "estimate" and e.cached_from is None and e.error is None]
        per_estimate = sum(estimates) / len(estimates) if estimates else float("nan")
        origin = refinement.record(parent.id)
        origin["refine"]["estimator_equivalents"] = refinement.cost_seconds / per_estimate if estimates else None
        entry = dataclasses.replace(self._entry(next_id, generation, [], refinement.recipe, scored[next_id], "full"),
                                    origin=origin)
        self._record(entry)
        if entry.error is None:
            self.log(f"refined best:mean (id {parent.id}, {fronts.mean(parent, self.objectives):.3f}) by "
                     f"{refinement.steps} gradient steps in {refinement.cost_seconds:.0f} s (~"
                     f"{origin['refine']['estimator_equivalents'] or float('nan'):.0f} estimates' time): "
                     f"id {entry.id} at {fronts.mean(entry, self.objectives):.3f} on every validation item")

    def _parents(self) -> list[ArchiveEntry]:
        """Score the input models and uniform merges of them (``space.parents``) as the
        archive's first candidates, generation -1, so the front and every pick compete with them
        on the search's own data: a search never hands back something worse than a model the
        user brought. They have no genome; the algorithm meets them as its first population's
        opening genomes. Returns their entries."""
        if not self.settings.space.parents:
            return []
        recipes = list(self.space.parent_recipes().values())
        return self._evaluate(recipes, [[] for _ in recipes], -1, 0)

    def _entry(self, entry_id: int, generation: int, vector: list[float], recipe: Plan,
               result: EvalResult, fidelity: str) -> ArchiveEntry:
        if result.evaluation is not None:
            objectives, scores = result.evaluation.objectives, result.evaluation.scores
        else:
            objectives, scores = worst_objectives(self.objectives), {}
        return ArchiveEntry(entry_id, generation, vector, recipe.hash, recipe.to_dict(),
                            dict(objectives), dict(scores), result.merge_seconds, result.eval_seconds,
                            result.worker, result.error, fidelity=fidelity)

    def _record(self, entry: ArchiveEntry) -> ArchiveEntry:
        """Append to the archive first: only then does anything else learn of the result."""
        self.hooks.before_archive_line(self.run_dir, entry)
        self.run_dir.append(entry)
        self.by_id[entry.id] = entry
        if entry.cached_from is None:
            self._known(entry.fidelity).setdefault(entry.recipe_hash, entry)
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

    def _probe_recipes(self) -> dict[str, Plan]:
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
        replayed = generation in {h["generation"] for h in self.run_dir.history()}
        if not replayed:
            self.run_dir.append_history(record)
        self._write_pareto(front, generation)
        if not replayed:  # a replay holds the whole archive already; the next new generation draws it
            self._write_report()
        eta = f", ~{left * count / max(rate, 1e-9):.1f} min left" if left > 0 else ""
        mean = ""
        if front and len(self.objectives) > 1 and fronts.averageable(self.objectives):
            top = fronts.best_mean(front, self.objectives)  # what a single-objective algorithm chases
            mean = f"mean {fronts.mean(top, self.objectives):.3f} ({'all items' if top.fidelity == 'full' else 'estimated'}), "
        self.log(f"generation {generation}: {next_id} evaluations ({errors} failed), best " + mean
                 + ", ".join(f"{k} {v:.3f}" for k, v in best.items())
                 + f", hypervolume {hv:.4f}, {rate:.1f} candidates/min{eta}")
        self.hooks.after_generation(generation, front)

    def _write_pareto(self, front: list[ArchiveEntry], generation: int, tests: dict[int, dict] | None = None) -> None:
        old = self.run_dir.read_json(self.run_dir.pareto_path) or {}
        known = {m["id"]: m.get("test_scores") for m in old.get("members", [])}
        known.update({m["id"]: m.get("test_scores") for m in old.get("verified", [])})
        tests = tests or {}

        def member(e: ArchiveEntry) -> dict[str, Any]:
            return {"id": e.id, "recipe_hash": e.recipe_hash, "objectives": e.objectives, "scores": e.scores,
                    "test_scores": tests.get(e.id, known.get(e.id))}

        self.run_dir.write_json(self.run_dir.pareto_path, {
            "generation": generation,
            "objectives": [o.to_dict() for o in self.objectives],
            "members": [member(e) for e in sorted(front, key=lambda e: e.id)],
            # scored on every validation item, best mean first: where best:mean comes from
            "verified": [member(e) for e in fronts.verified(self.by_id.values(), self.objectives)]})

    def _test_front(self) -> None:
        """Held-out test scores (full test split) for what a user would pick: the front's knee and
        best on each objective, and ``best:mean``. Scoring every member of a 4-objective front would
        cost more than the search itself; ``inspect`` marks the others' test scores as unknown."""
        front = self._front()
        if not front:
            return
        old = self.run_dir.read_json(self.run_dir.pareto_path) or {}
        known = {m["id"]: m.get("test_scores") for m in old.get("members", []) + old.get("verified", [])
                 if m.get("test_scores")}
        todo = self.hooks.before_test_scoring([e for e in fronts.picks(self.by_id.values(), self.objectives)
                                               if e.id not in known])
        if todo:
            self.log(f"test split: scoring {len(todo)} pick(s) (the knee, the best per objective, best:mean)")
        results: dict[int, EvalResult] = {}
        self.pool.run({e.id: EvalRequest(plan_from_dict(e.recipe), split="test", full=True) for e in todo},
                      results.__setitem__)
        tests = dict(known)
        tests.update({k: r.evaluation.scores for k, r in results.items() if r.evaluation is not None})
        history = self.run_dir.history()
        self._write_pareto(front, history[-1]["generation"] if history else 0, tests)
        self._write_report()  # with the picks' held-out test scores

    def _write_report(self) -> None:
        """Rewrite report.html so a browser refreshed during the run shows it as it goes. From the
        archive the driver holds (equal to archive.jsonl, whose every line it appended), so a
        generation does not pay for reading it back. A full disk stops the run like any write;
        a bug in drawing the page costs the page, never the search."""
        try:
            write_report(self.run_dir, entries=self.by_id.values())
        except DiskError:
            raise
        except Exception as error:  # noqa: BLE001 - the page is a view; the search goes on
            self.log(f"report.html not updated: {type(error).__name__}: {error}")


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
