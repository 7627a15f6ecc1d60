"""Learning curves: how good is each searcher's pick after 25, 50, 100, 150, 200, 300 evaluations?

    python experiments/zoo_pareto/curves.py               # every searcher below; 3 seeds
    python experiments/zoo_pareto/curves.py --quick --zoo pico --workers 1 --out /tmp/zc   # plumbing

Each searcher runs once per seed to the largest budget, in run.py's run folders (the same
searches run.py's table is made of, shared with it); a smaller budget b is a prefix of that run:
the candidates it had evaluated while its cost stayed within b. Cost is counted in
estimator-equivalents: an evaluation on the estimator's items costs 1, a duplicate served from
the archive 0, and a racing promotion (every validation item, scored the way the estimator
scores) its worker seconds over the run's mean estimate seconds. Parents count where a searcher
evaluates them (the default search does: base, experts and uniform merges open its archive).

At every budget, every searcher's pick is made by one rule: its ``--rescore`` best candidates by
the search's own value (the highest fidelity the candidate reached) are scored on the FULL
validation split, decoded, and the best of those is the pick, scored on the full test split. A
searcher that verifies its best estimates itself (``VERIFYING``: `evomerge search`'s
``fitness.verify``) has its ``verify`` best re-scored instead, and pays for them out of the budget
(``VERIFY_COST`` each), as a run of that length would.
At the largest budget the test front (validation front capped at ``--front-cap`` by mean, plus
the pick) is scored on test for its hypervolume. "Evaluations to match the grid": the cost at
which a searcher first evaluated a candidate whose full-validation mean reaches the best uniform
grid point's. Full-split scores are cached by recipe hash (run.py's ``scores.json``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Mapping, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as zp  # noqa: E402  (experiments/zoo_pareto/run.py: searchers, scoring, baselines)

# evomerge search as it ships (TSV-M), CMA-ES over global TSV-M weights, then the eighth session's
# task-arithmetic default and its baselines.
SEARCHERS = ("default-tsv", "cmaes-tsv", "default", "cmaes", "ga", "random")
BUDGETS = (25, 50, 100, 150, 200, 300)
MATCH_CHECKS = 2  # candidates per run checked on full validation for "matches the grid"
# `evomerge search` ends by verifying its best estimates (fitness.verify); the runs here are made
# without it (common_overrides), and its cost is paid out of the budget where the pick is read.
VERIFYING = ("default-tsv", "dfs", "psdfs100", "psdfs150")
# A verification's cost in estimator-equivalents: default-tsv-race-s0's 24 promotions (every
# validation item, teacher-forced, TSV-M) took 5.23x its mean estimate's worker seconds.
VERIFY_COST = 5.2


def cumulative_costs(archive) -> list[tuple[Any, float]]:
    """(entry, cost spent once it was evaluated) in id order; see the module docstring."""
    seconds = [e.merge_seconds + e.eval_seconds for e in archive
               if e.fidelity == "estimate" and e.cached_from is None and e.error is None]
    unit = statistics.mean(seconds) if seconds else 1.0
    total, out = 0.0, []
    for entry in sorted(archive, key=lambda e: e.id):
        if entry.cached_from is None:
            total += 1.0 if entry.fidelity == "estimate" else (entry.merge_seconds + entry.eval_seconds) / unit
        out.append((entry, total))
    return out


class Curve:
    """One search run read at several budgets."""

    def __init__(self, name: str, seed: int, folder: Path, skills: list[str], rescore: int, front_cap: int,
                 verify: int = 0, verify_cost: float = VERIFY_COST) -> None:
        from evomerge.report.run_data import objectives
        from evomerge.run import RunDir

        self.name, self.seed, self.folder, self.skills = name, seed, folder, skills
        self.rescore, self.front_cap, self.verify, self.verify_cost = rescore, front_cap, verify, verify_cost
        run = RunDir(folder)
        self.objectives = objectives(run)
        self.steps = cumulative_costs(run.archive())
        self.spent = self.steps[-1][1] if self.steps else 0.0
        history = run.history()  # the search's own wall clock, whichever invocation ran it
        self.seconds = float(history[-1]["seconds"]) if history else 0.0

    def value(self, entry) -> float:
        return zp.mean_of(entry.scores, self.skills)

    def searched(self, budget: float) -> float:
        """What the search itself may spend of ``budget``: all of it, less the verification of
        its best estimates for a searcher that verifies them (the pick rule then costs it); at
        least its first candidate."""
        first = self.steps[0][1] if self.steps else 0.0
        return max(first, budget - self.verify * self.verify_cost)

    def competing(self, budget: float) -> list:
        from evomerge import front

        prefix = [e for e, cost in self.steps if cost <= self.searched(budget) + 1e-9]
        return [e for e in front.competing(prefix, self.objectives) if all(t in e.scores for t in self.skills)]

    def shortlist(self, budget: float) -> list:
        return sorted(self.competing(budget), key=lambda e: (-self.value(e), e.id))[:self.verify or self.rescore]

    def front(self, budget: float) -> list:
        members = self.competing(budget)
        keep = zp.non_dominated([e.scores for e in members], self.skills)
        return sorted((members[i] for i in keep), key=lambda e: (-self.value(e), e.id))[:self.front_cap]

    def match_candidates(self, target: float) -> list[tuple[Any, float]]:
        """The first candidates whose search value reaches ``target``, with their cost."""
        found = [(e, c) for e, c in self.steps
                 if e.error is None and e.cached_from is None and all(t in e.scores for t in self.skills)
                 and self.value(e) >= target]
        return found[:MATCH_CHECKS]


def val_mean(scorer, entry, skills) -> float | None:
    scores = scorer.get(entry.recipe_hash, "validation")
    return None if scores is None else zp.mean_of(scores, skills)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="smollm2")
    parser.add_argument("--seeds", type=int, default=None, help="seeds 0..N-1 (default 3; --quick 1)")
    parser.add_argument("--budgets", default=None, help="comma-separated (default 25,50,100,150; --quick 4,8)")
    parser.add_argument("--pop", type=int, default=None, help="population per generation (default 12; --quick 4)")
    parser.add_argument("--items", type=int, default=10)
    parser.add_argument("--rescore", type=int, default=2)
    parser.add_argument("--front-cap", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--searchers", default=",".join(SEARCHERS))
    parser.add_argument("--verify-cost", type=float, default=None,
                        help=f"estimator-equivalents per verification (default {VERIFY_COST:g}; --quick 1)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--search-only", action="store_true",
                        help="run (or resume) the searches and stop: nothing scored, no table")
    parser.add_argument("--name", default="curves", help="stem of the files written: NAME.json, NAME.md, NAME.png")
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    budgets = [int(b) for b in (args.budgets or ("4,8" if args.quick else ",".join(map(str, BUDGETS)))).split(",")]
    pop = args.pop if args.pop is not None else (4 if args.quick else 12)
    verify_cost = args.verify_cost if args.verify_cost is not None else (1.0 if args.quick else VERIFY_COST)
    budget = max(budgets)
    chosen = [s.strip() for s in args.searchers.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in zp.SEARCHERS]
    if unknown:
        parser.error(f"unknown searcher {unknown[0]!r}; valid: {', '.join(zp.SEARCHERS)}")

    from evomerge.config import FitnessConfig

    log = zp.log
    started = time.perf_counter()
    setup = zp.Setup.make(args.zoo, args.items, args.workers, pop, budget, args.out)
    common, settings, zoo, skills = setup.common, setup.settings, setup.zoo, setup.skills
    runs, scorer = setup.runs, setup.scorer
    try:
        zp.probe_population(settings, scorer, runs / "probes.json", log)
    finally:
        scorer.close()

    if any(name.startswith("psdfs") for name in chosen):
        zp.write_ps_picks(runs)
    curves: list[Curve] = []
    for name in chosen:
        for seed in range(seeds):
            # --quick: every searcher, the default too, cut to the tiny budget.
            config = zp.search_config(name, seed, common, budget, pop, runs, own_length=not args.quick,
                                      experts=len(settings.experts))
            folder = runs / f"{name}-s{seed}"
            zp.run_search(config, folder, runs / "probes.json", log)
            curves.append(Curve(name, seed, folder, skills, args.rescore, args.front_cap,
                                verify=FitnessConfig().verify if name in VERIFYING else 0, verify_cost=verify_cost))
    if args.search_only:
        return 0

    baselines = zp.Baselines(settings, "quick" if args.quick else "full", skills, args.front_cap)
    try:
        # Validation: grids and parents, every shortlist, then the grid-matching candidates.
        scorer.score(baselines.to_validate(), "validation")
        test_todo = baselines.choose(scorer)
        target = max(zp.mean_of(pick["val"], skills) for pick, _, _ in baselines.chosen.values())
        todo = {}
        for curve in curves:
            for b in budgets:
                todo.update({e.recipe_hash: e.recipe for e in curve.shortlist(b)})
            todo.update({e.recipe_hash: e.recipe for e, _ in curve.match_candidates(target)})
        scorer.score(todo, "validation")
        rows = []
        for curve in curves:
            points = []
            for b in budgets:
                scored = [e for e in curve.shortlist(b) if val_mean(scorer, e, skills) is not None]
                pick = max(scored, key=lambda e: (val_mean(scorer, e, skills), -e.id))
                points.append({"budget": b, "pick": pick, "front": curve.front(b) if b == budget else []})
            match = next((c for e, c in curve.match_candidates(target)
                          if (val_mean(scorer, e, skills) or 0.0) >= target), None)
            rows.append((curve, points, match))
            for p in points:
                test_todo.update({e.recipe_hash: e.recipe for e in [p["pick"], *p["front"]]})
        scorer.score(test_todo, "test")
        parent_rows = {r["searcher"]: r for r in baselines.rows(scorer)}
    finally:
        scorer.close()

    own = {t: parent_rows[f"expert:{t.removeprefix('zoo_')}"]["pick"]["test"][t] for t in skills
           if f"expert:{t.removeprefix('zoo_')}" in parent_rows}

    def member(e, verified: bool = False) -> dict:
        """A verified pick's search value is its full validation score: what the search reports."""
        from evomerge.layer_path import plan_from_dict

        val = scorer.get(e.recipe_hash, "validation")
        return {"id": e.id, "recipe_hash": e.recipe_hash, "fidelity": "verified" if verified else e.fidelity,
                "search_value": dict(val) if verified else {t: e.scores[t] for t in skills},
                "summary": plan_from_dict(e.recipe).summary(),
                "val": val, "test": scorer.get(e.recipe_hash, "test")}

    out_rows = []
    for curve, points, match in rows:
        final = points[-1]
        front = [m for m in map(member, final["front"] + [final["pick"]]) if m["test"] is not None]
        out_rows.append({
            "searcher": curve.name, "seed": curve.seed, "folder": str(curve.folder), "spent": curve.spent,
            "evaluations": len(curve.steps), "search_seconds": curve.seconds,
            "promotions": sum(e.fidelity == "full" and e.cached_from is None for e, _ in curve.steps),
            "match_grid_at": match,
            "verify": curve.verify,
            "points": [{"budget": p["budget"], "pick": member(p["pick"], verified=curve.verify > 0)} for p in points],
            "hv_test": zp.hv(skills, [m["test"] for m in front]), "front": front})
    results = {
        "zoo": zoo.root.name, "tasks": skills, "experts": list(settings.experts), "budgets": budgets,
        "searchers": {n: zp.SEARCHERS[n][0] for n in chosen}, "overrides": {n: zp.SEARCHERS[n][1] for n in chosen},
        "common_overrides": common, "seeds": seeds, "pop_size": pop, "rescore": args.rescore,
        "front_cap": args.front_cap, "grid_best": {"val_mean": target},
        "verifying": [n for n in chosen if n in VERIFYING], "verify": FitnessConfig().verify, "verify_cost": verify_cost,
        "experts_own_test": own, "parents": {k: v["pick"] for k, v in parent_rows.items()},
        "rows": out_rows, "seconds": time.perf_counter() - started, "finished": time.strftime("%Y-%m-%d %H:%M"),
        "command": "python experiments/zoo_pareto/curves.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    zp.write_json(args.out / f"{args.name}.json", results)
    written = render(results, args.out, args.name)
    log(f"wrote {', '.join(str(p) for p in written)}")
    return 0


# --- rendering ---------------------------------------------------------------------------------------


def _spread(values: Sequence[float], digits: int = 1) -> str:
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def _mean_test(point: Mapping[str, Any], skills: Sequence[str]) -> float | None:
    test = point["pick"]["test"]
    return None if test is None else 100 * zp.mean_of(test, skills)


def render(results: Mapping[str, Any], out: Path, name: str = "curves") -> list[Path]:
    skills, budgets = results["tasks"], results["budgets"]
    by: dict[str, list[dict]] = {}
    for row in results["rows"]:
        by.setdefault(row["searcher"], []).append(row)

    def at(name: str, b: int) -> list[float]:
        return [v for r in by.get(name, []) for p in r["points"] if p["budget"] == b
                for v in [_mean_test(p, skills)] if v is not None]

    lines = ["# Learning curves on the zoo: the pick's held-out accuracy per evaluation budget", "",
             f"Generated by `{results['command'].strip()}` (finished {results['finished']}) from `curves.json`; "
             f"do not edit by hand. Zoo `{results['zoo']}`, tasks {', '.join(f'`{t}`' for t in skills)}, "
             f"{results['seeds']} seed(s), {results['pop_size']} candidates per generation. Budgets count "
             "estimator-equivalents: an estimate (anchors, 10 items per task) is 1, a duplicate served from "
             "the archive 0, a racing promotion (every validation item) its measured seconds over the run's "
             "mean estimate seconds. The pick at every budget: the "
             f"{results['rescore']} best candidates by the search's own value re-scored on the full validation "
             "split (decoded), the best of them scored on the full test split; for a searcher that verifies "
             f"its best estimates itself ({', '.join(f'`{n}`' for n in results.get('verifying', [])) or 'none'}: "
             f"`evomerge search`, fitness.verify), its {results.get('verify', 0)} best are re-scored instead, "
             f"paid out of its budget at {results.get('verify_cost', 0):g} estimator-equivalents each, so its "
             "pick at budget b comes from the candidates of its first b minus that. Mean test accuracy in "
             "points, mean ± sd over seeds.", "",
             "## Pick's mean test accuracy by budget", "",
             "| searcher | " + " | ".join(str(b) for b in budgets) + " | test-front HV at "
             f"{budgets[-1]} | evaluations to match the best grid (median) | search wall min |",
             "|---|" + "---|" * (len(budgets) + 3)]
    for searcher, rows in by.items():
        hvs = [r["hv_test"] for r in rows]
        matches = [r["match_grid_at"] for r in rows]
        reached = sorted(m for m in matches if m is not None)
        median = (f"{statistics.median(reached):.0f}" if len(reached) == len(matches) and reached
                  else f"{len(reached)}/{len(matches)} seeds within {budgets[-1]}")
        lines.append(f"| `{searcher}` | " + " | ".join(_spread(at(searcher, b)) for b in budgets)
                     + f" | {_spread(hvs, 4)} | {median} | "
                     + _spread([r["search_seconds"] / 60 for r in rows if r["search_seconds"] > 0]) + " |")
    lines += ["", f"Best grid-searched uniform merge: validation mean {100 * results['grid_best']['val_mean']:.1f}.",
              "", "Searchers:", ""]
    lines += [f"- `{n}`: {d}: `{' '.join(results['overrides'][n])}`" for n, d in results["searchers"].items()]
    own = results["experts_own_test"]
    lines += ["", "## Every run at the largest budget", "",
              "Search value: what the search itself measured for its pick (its highest fidelity: a racing "
              "promotion's full-split value, else the estimate); gap = search value − full validation "
              "(decoded), the winner's curse. Skill kept: the pick's test accuracy on each task over that "
              "task's expert's own test accuracy, averaged.", "",
              "| searcher | seed | pick id | fidelity | search value | full val | gap | test | skill kept | "
              "test HV | promotions | cost spent | pick recipe |", "|---|" + "---|" * 12]
    for row in results["rows"]:
        p = row["points"][-1]["pick"]
        search = 100 * zp.mean_of(p["search_value"], skills)
        val = None if p["val"] is None else 100 * zp.mean_of(p["val"], skills)
        test = None if p["test"] is None else 100 * zp.mean_of(p["test"], skills)
        shares = [min(1.0, p["test"][t] / own[t]) for t in skills if p["test"] and own.get(t)]
        kept = statistics.mean(shares) if shares else None
        fmt = lambda v, d=1: "–" if v is None else f"{v:.{d}f}"  # noqa: E731
        lines.append(f"| `{row['searcher']}` | {row['seed']} | {p['id']} | {p['fidelity']} | {search:.1f} | "
                     f"{fmt(val)} | {fmt(None if val is None else search - val)} | {fmt(test)} | "
                     f"{fmt(None if kept is None else 100 * kept, 0)}% | {row['hv_test']:.4f} | {row['promotions']} | "
                     f"{row['spent']:.0f} | {p['summary']} |")
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    written = [path]
    try:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(6.5, 4.2), layout="constrained")
        ax = figure.add_subplot()
        for searcher in by:
            means = [statistics.mean(at(searcher, b)) if at(searcher, b) else float("nan") for b in budgets]
            sds = [statistics.stdev(at(searcher, b)) if len(at(searcher, b)) > 1 else 0.0 for b in budgets]
            ax.errorbar(budgets, means, yerr=sds, marker="o", capsize=3, label=searcher)
        ax.axhline(100 * results["grid_best"]["val_mean"], color="grey", ls=":", label="best uniform grid (val)")
        ax.set_xlabel("budget (estimator-equivalents)")
        ax.set_ylabel("pick's mean test accuracy (%)")
        ax.legend(fontsize=8)
        figure.savefig(out / f"{name}.png", dpi=110)
        written.append(out / f"{name}.png")
    except ImportError:
        pass
    return written


if __name__ == "__main__":
    sys.exit(main())
