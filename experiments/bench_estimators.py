"""Do cheap fitness estimates rank merge candidates the way a full evaluation does?

On a built zoo, random layer-wise task-arithmetic recipes are each scored once on the whole
validation split of every skill's generate-until task (the cross-skill probe task is left out:
no model in the zoo solves it, so it ranks nothing). Then, for each estimator and item budget,
the estimator picks its items, estimates every recipe's per-task score from the cached per-item
results, and the estimates are compared with the full scores: Spearman rank correlation (per
task over recipes, then averaged over tasks; and of the mean over tasks) and mean absolute
error in points. Anchors and IRT are fitted on a probe population built the way a search builds
it (base, experts, a few random merges from a different seed), never on the recipes they are
judged on. Random subsets and anchor choices depend on the seed, so every number is a mean
over ``--repeats`` seeds.

Each estimator runs twice: its items decoded (what the full score does), and teacher-forced
(``fitness.teacher_forcing=true``: one forward pass over prompt + reference per item, right when
greedy decoding would reproduce the reference). A teacher-forced answer is the sign of the
margin the decoded run recorded (the two compute the same margin: tested), and the first
``--timed`` recipes are re-run teacher-forced to check that on every item. The cost column is
measured, not counted: seconds to run an estimator's items (decoded or teacher-forced, on the
timed recipes, in this process) over seconds of the full decoded validation split.

Per-item results are cached in ``$EVOMERGE_CACHE/bench_estimators/<zoo>.jsonl`` keyed by recipe
hash, so a rerun (or a larger ``--recipes``) only scores what is missing. ``--validation-size``
scores a larger validation split (``zoo.validation_size``: the built items first, then fresh
ones; no rebuild) and caches it beside the first (``<zoo>-validation<N>.jsonl``); a recipe the
smaller split already scored runs only its new items.

    python experiments/bench_estimators.py --quick        # 8 recipes, 2 probe merges
    python experiments/bench_estimators.py                # 100 recipes: 15-35 s each on 2 cores
    python experiments/bench_estimators.py --validation-size 400   # 400 items per task
    python experiments/bench_estimators.py --zoo ~/.cache/evomerge/zoo/smollm2-c69aec97bfdd
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from evomerge.config import FitnessConfig
from evomerge.fitness.evaluator import Evaluation, Evaluator
from evomerge.fitness.estimators import make_estimator
from evomerge.merge.engine import Merger
from evomerge.pool import ModelPool
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe
from evomerge.zoo.build import cache_dir
from evomerge.zoo.card import task_arithmetic

ESTIMATORS = ("random", "anchors", "irt")
MODES = ("decoded", "teacher-forced")
GROUP_LAYERS = 5  # layers per recipe group: 6 groups on SmolLM2's 30 layers


def random_recipe(rng: random.Random, experts: list[str], num_layers: int) -> Recipe:
    """Task arithmetic with a weight per expert per group of ``GROUP_LAYERS`` layers.

    Each expert gets a level c ~ U(0, 1)^3 and each group a weight c * U(0.6, 1.4) (clipped to
    [0, 1]): usually one or two experts dominate, so scores spread over the whole range. Uniform
    weights in [0, 1] would not do: on the zoo's first build (skills add/reverse/sort/cipher),
    recipes with a total weight near 2 scored about 0 on every skill, which ranks nothing."""
    level = {e: rng.random() ** 3 for e in experts}

    def config() -> MethodConfig:
        return MethodConfig("task_arithmetic", {e: ExpertParams(weight=min(1.0, level[e] * rng.uniform(0.6, 1.4)))
                                                for e in experts})

    groups = tuple(LayerGroup(s, min(num_layers, s + GROUP_LAYERS), "all", config())
                   for s in range(0, num_layers, GROUP_LAYERS))
    return Recipe("base", tuple(experts), num_layers, groups, config())


def zoo_layout(root: Path) -> tuple[list[str], Path]:
    """Skills and task folder of a built zoo, read from its folder (any zoo format)."""
    config = json.loads((root / "config.json").read_text())
    if not (root / "card.json").exists():
        sys.exit(f"{root} is not a finished zoo (no card.json); build it with 'evomerge zoo build'")
    return list(config["skills"]), root / "tasks"


def load_cache(path: Path) -> dict[str, Evaluation]:
    if not path.exists():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {row["hash"]: Evaluation.from_dict(row["evaluation"]) for row in rows}


def extend(evaluation: Evaluation, model, evaluator: Evaluator) -> Evaluation:
    """``evaluation`` of the first items of each validation task, completed with the rest."""
    started = time.perf_counter()
    sizes = {t: len(task) for t, task in evaluator.suite.tasks("validation").items()}
    have = {t: len(cols["ids"]) for t, cols in evaluation.items.items()}
    results = evaluator.suite.run(model, "validation", {t: range(have[t], n) for t, n in sizes.items()})
    items = {t: {k: list(evaluation.items[t][k]) + list(getattr(results[t], k)) for k in evaluation.items[t]}
             for t in sizes}
    scores = {t: float(np.mean(cols["correct"])) for t, cols in items.items()}
    # The bench's evaluator has one objective per task (asserted in main), so objectives are the scores.
    return Evaluation(dict(scores), scores, items, evaluation.seconds + time.perf_counter() - started)


def score_all(recipes: dict[str, Recipe], merger: Merger, evaluator: Evaluator,
              cache_path: Path, prefix_cache: Path | None = None) -> dict[str, Evaluation]:
    cached = load_cache(cache_path)
    prefix = load_cache(prefix_cache) if prefix_cache else {}
    missing = [label for label, r in recipes.items() if r.hash not in cached]
    started = time.perf_counter()
    with open(cache_path, "a") as out:
        for done, label in enumerate(missing, 1):
            model = merger.materialize(recipes[label])
            known = prefix.get(recipes[label].hash)
            evaluation = (extend(known, model, evaluator) if known else evaluator.score(model, full=True))
            cached[recipes[label].hash] = evaluation
            out.write(json.dumps({"hash": recipes[label].hash, "label": label,
                                  "evaluation": evaluation.to_dict()}) + "\n")
            out.flush()
            eta = (time.perf_counter() - started) / done * (len(missing) - done)
            print(f"  scored {label}: " + " ".join(f"{v:.2f}" for v in evaluation.scores.values())
                  + f"  ({evaluation.seconds:.0f} s, {done}/{len(missing)}, ~{eta / 60:.0f} min left)",
                  file=sys.stderr, flush=True)
    return {label: cached[r.hash] for label, r in recipes.items()}


def matrix(evaluations: list[Evaluation], task: str, column: str = "correct") -> np.ndarray:
    """Models x items of one per-item column (NaN where an evaluation lacks it)."""
    rows = []
    for e in evaluations:
        got = e.items[task]
        row = np.full(len(got["ids"]), np.nan)
        row[got["ids"]] = got.get(column, [np.nan] * len(got["ids"]))
        rows.append(row)
    return np.array(rows, dtype=float)


def assess(name: str, budget: int, seed: int, probes: dict[str, np.ndarray], answers: dict[str, np.ndarray],
           truth: dict[str, np.ndarray]) -> dict[str, float]:
    """One estimator at one budget and seed: estimates from ``answers`` (the recipes' per-item
    answers as the estimator's scoring mode gives them) against the full decoded scores."""
    estimator = make_estimator(name, budget, seed)
    estimator.fit(probes)
    tasks = list(truth)
    estimate = {}
    for task in tasks:
        ids = estimator.select(task, truth[task].shape[1])
        estimate[task] = np.array([estimator.estimate(task, ids, row[ids]) for row in answers[task]])
    full = {t: truth[t].mean(1) for t in tasks}
    rhos = [spearmanr(estimate[t], full[t])[0] for t in tasks if np.ptp(full[t]) > 0]
    mean_est = np.mean([estimate[t] for t in tasks], axis=0)
    mean_true = np.mean([full[t] for t in tasks], axis=0)
    return {
        "rho_task": float(np.nanmean(rhos)) if rhos else float("nan"),
        "rho_mean": float(spearmanr(mean_est, mean_true)[0]),
        "mae_task": 100 * float(np.mean([np.abs(estimate[t] - full[t]).mean() for t in tasks])),
        "mae_mean": 100 * float(np.abs(mean_est - mean_true).mean()),
    }


def forced_answers(evaluations: list[Evaluation], task: str) -> np.ndarray:
    """Teacher-forced answers: right where the decoded run's margin was positive (the decoded
    answer where an item has no margin)."""
    margins, decoded = matrix(evaluations, task, "margin"), matrix(evaluations, task)
    return np.where(np.isnan(margins), decoded, (margins > 0).astype(float))


def measure_costs(merger: Merger, evaluator: Evaluator, timed: list[Recipe], cached: list[Evaluation],
                  probes: dict[str, np.ndarray], budgets: list[int]) -> tuple[dict, str]:
    """Seconds of each (estimator items, scoring mode) over seconds of the full decoded split,
    summed over the ``timed`` recipes, all run here and now; and how often a teacher-forced
    re-run agrees with the cached decoded run. IRT runs the anchors' items, so it costs what
    anchors cost."""
    suite = evaluator.suite
    sizes = {t: len(task) for t, task in suite.tasks("validation").items()}
    selections = {}
    for name in ("random", "anchors"):
        for budget in budgets:
            estimator = make_estimator(name, budget, 0)
            estimator.fit(probes)
            selections[name, budget] = {t: estimator.select(t, n) for t, n in sizes.items()}
    spent = {key: 0.0 for key in [(n, b, m) for (n, b) in selections for m in MODES]}
    full_seconds = 0.0
    agree_margin = agree_decoded = total = 0
    everything = {t: list(range(n)) for t, n in sizes.items()}
    for recipe, evaluation in zip(timed, cached):
        model = merger.materialize(recipe)
        started = time.perf_counter()
        suite.run(model, "validation", everything)
        full_seconds += time.perf_counter() - started
        forced = suite.run(model, "validation", everything, teacher_forcing=True)
        for t, result in forced.items():
            agree_margin += int(((np.array(result.margin) > 0) == (matrix([evaluation], t, "margin")[0] > 0)).sum())
            agree_decoded += int((np.array(result.correct) == matrix([evaluation], t)[0]).sum())
            total += len(result.correct)
        for (name, budget), selection in selections.items():
            for mode in MODES:
                started = time.perf_counter()
                suite.run(model, "validation", selection, teacher_forcing=mode == "teacher-forced")
                spent[name, budget, mode] += time.perf_counter() - started
    costs = {(n, b, m): seconds / full_seconds for (n, b, m), seconds in spent.items()}
    for budget in budgets:
        for mode in MODES:
            costs["irt", budget, mode] = costs["anchors", budget, mode]
    note = (f"Teacher-forced re-runs of {len(timed)} recipes ({total} items): the margin's sign agreed with the "
            f"decoded run's on {agree_margin}/{total} items, the answer with decoded exact match on "
            f"{agree_decoded}/{total}; the full decoded split took {full_seconds / len(timed):.1f} s per recipe here.")
    return costs, note


def table(rows: list[tuple[str, str, int, float, dict[str, float]]]) -> str:
    lines = ["| estimator | items scored | items/task | cost (measured) | ρ per task | ρ of mean "
             "| MAE per task (pts) | MAE of mean (pts) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, mode, budget, cost, r in rows:
        lines.append(f"| {name} | {mode} | {budget} | {cost:.3f} | {r['rho_task']:.3f} | {r['rho_mean']:.3f} "
                     f"| {r['mae_task']:.2f} | {r['mae_mean']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", type=Path, help="a built zoo folder (default: the configured zoo)")
    parser.add_argument("--validation-size", type=int, help="validation items per task (default: the zoo's)")
    parser.add_argument("--recipes", type=int, default=100, help="random recipes to judge on (default 100)")
    parser.add_argument("--probe-merges", type=int, default=4, help="random merges in the probe population")
    parser.add_argument("--budgets", default="10,25,35,50", help="items per task, comma-separated")
    parser.add_argument("--timed", type=int, default=5, help="recipes re-run to measure costs (default 5)")
    parser.add_argument("--repeats", type=int, default=5, help="estimator seeds averaged per number")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="8 recipes and 2 probe merges: shows it works")
    args = parser.parse_args(argv)
    if args.quick:
        args.recipes, args.probe_merges = 8, 2
    if args.zoo is None:
        from evomerge.config import zoo_config
        from evomerge.zoo.build import Zoo

        args.zoo = Zoo.at(zoo_config()).root
    root = args.zoo.expanduser()
    skills, task_dir = zoo_layout(root)
    cache_path = cache_dir() / "bench_estimators" / f"{root.name}.jsonl"
    prefix_cache = None
    if args.validation_size is not None:
        from evomerge.config import parse
        from evomerge.zoo_config import ZooConfig
        from evomerge.zoo.build import Zoo, write_validation_tasks

        built = json.loads((root / "config.json").read_text())
        zoo = Zoo(parse(ZooConfig, {**built, "validation_size": args.validation_size}), root)
        task_dir = write_validation_tasks(zoo)
        if task_dir != zoo.data_dir:
            prefix_cache = cache_path
            cache_path = cache_path.with_name(f"{root.name}-validation{args.validation_size}.jsonl")
    tasks = [f"zoo_{s}" for s in skills]
    pool = ModelPool(str(root / "models" / "base"), {s: str(root / "models" / s) for s in skills})
    merger = Merger(pool)
    evaluator = Evaluator(FitnessConfig(estimator="full", batch_size=args.batch_size), tasks, merger.tokenizer,
                          include_path=str(task_dir))
    assert evaluator.config.objectives == ["tasks"]  # extend() relies on it
    probe_recipes = {"base": task_arithmetic(merger.experts, merger.num_layers, {})}
    probe_recipes |= {f"expert {s}": task_arithmetic(merger.experts, merger.num_layers, {s: 1.0}) for s in skills}
    rng = random.Random(10_000)  # probes' merges come from their own stream, never the judged recipes'
    probe_recipes |= {f"probe merge {i}": random_recipe(rng, merger.experts, merger.num_layers)
                      for i in range(args.probe_merges)}
    rng = random.Random(0)
    judged = {f"recipe {i}": random_recipe(rng, merger.experts, merger.num_layers) for i in range(args.recipes)}
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    print(f"zoo {root.name}: tasks {', '.join(tasks)}; {len(probe_recipes)} probes, {len(judged)} recipes; "
          f"cache {cache_path}", file=sys.stderr, flush=True)
    scored = score_all(probe_recipes | judged, merger, evaluator, cache_path, prefix_cache)
    probes = {t: matrix([scored[k] for k in probe_recipes], t) for t in tasks}
    truth = {t: matrix([scored[k] for k in judged], t) for t in tasks}
    answers = {"decoded": truth,
               "teacher-forced": {t: forced_answers([scored[k] for k in judged], t) for t in tasks}}
    budgets = [int(b) for b in args.budgets.split(",")]
    timed = list(judged)[:args.timed]
    costs, note = measure_costs(merger, evaluator, [judged[k] for k in timed], [scored[k] for k in timed],
                                probes, budgets)
    full_items = sum(truth[t].shape[1] for t in tasks)
    print(f"\nzoo `{root.name}`, {len(judged)} random recipes, probes: base + {len(skills)} experts + "
          f"{args.probe_merges} random merges; full validation = {full_items} items. Mean of {args.repeats} "
          f"estimator seeds; costs measured on {len(timed)} recipes.")
    spread = ", ".join(f"{t} {truth[t].mean(1).min():.2f}–{truth[t].mean(1).max():.2f}" for t in tasks)
    print(f"Full-score range over the recipes: {spread}. {note}\n")
    rows = []
    for mode in MODES:
        for name in ESTIMATORS:
            for budget in budgets:
                runs = [assess(name, budget, seed, probes, answers[mode], truth) for seed in range(args.repeats)]
                rows.append((name, mode, budget, costs[name, budget, mode],
                             {k: float(np.nanmean([r[k] for r in runs])) for k in runs[0]}))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
