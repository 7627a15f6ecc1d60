"""How close can any estimator that reads k answers per task come to the full validation score?

Reads the per-item results ``bench_estimators.py`` cached (no model runs) and fits an
estimator far richer than anchors or IRT get to fit: for each task, the k items and the linear
rule over their answers (least squares, with an intercept) that best predict the full score on
a training set of models, the items chosen greedily one at a time. Trained on the probe
population alone (what a search has) and on the probes plus half of the judged recipes (50
more fully scored models than any search pays for), tested on the other half. Where even the
second misses an error target at a small budget, reading that many right-or-wrong answers is
unlikely to meet it. Not a bound at larger budgets: there the greedy choice overfits, and
anchors' cluster-weighted mean does better.

    python experiments/estimator_bound.py            # the configured zoo's cache
    python experiments/estimator_bound.py --budgets 10,25,35 --splits 5
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from bench_estimators import forced_answers, matrix  # this folder: run as a script

from evomerge.fitness.evaluator import Evaluation
from evomerge.zoo.build import cache_dir

PROBES = 9  # base, 4 experts, 4 probe merges: the cache's first rows, as bench_estimators writes them


def load(path: Path) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Labels in cache order and, per task, models x items of teacher-forced answers (what an
    estimator reads) and of decoded answers (what the full score counts), as the bench reads them."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evaluations = [Evaluation.from_dict(row["evaluation"]) for row in rows]
    tasks = list(evaluations[0].items)
    return ([row["label"] for row in rows], {t: forced_answers(evaluations, t) for t in tasks},
            {t: matrix(evaluations, t) for t in tasks})


def fit(x: np.ndarray, y: np.ndarray, ridge: float = 1e-3) -> np.ndarray:
    design = np.c_[np.ones(len(y)), x]
    return np.linalg.solve(design.T @ design + ridge * np.eye(design.shape[1]), design.T @ y)


def predict(weights: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.clip(np.c_[np.ones(len(x)), x] @ weights, 0.0, 1.0)


def greedy_items(x: np.ndarray, y: np.ndarray, k: int) -> list[int]:
    """The k columns whose least-squares fit has the smallest training error, one at a time."""
    chosen: list[int] = []
    for _ in range(k):
        errors = {j: np.abs(predict(fit(x[:, chosen + [j]], y), x[:, chosen + [j]]) - y).mean()
                  for j in range(x.shape[1]) if j not in chosen}
        chosen.append(min(errors, key=errors.get))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, help="a bench_estimators cache (default: the configured zoo's)")
    parser.add_argument("--budgets", default="10,25", help="items per task, comma-separated")
    parser.add_argument("--splits", type=int, default=3, help="random halvings of the judged recipes averaged")
    args = parser.parse_args(argv)
    if args.cache is None:
        from evomerge.config import zoo_config
        from evomerge.zoo.build import Zoo

        args.cache = cache_dir() / "bench_estimators" / f"{Zoo.at(zoo_config()).root.name}.jsonl"
    if not args.cache.exists():
        sys.exit(f"{args.cache} does not exist; run experiments/bench_estimators.py first")
    labels, answers, decoded = load(args.cache)
    judged = np.arange(PROBES, len(labels))
    rng = np.random.default_rng(0)
    print(f"{args.cache.name}: {PROBES} probes ({', '.join(labels[:PROBES])}), {len(judged)} judged recipes; "
          f"mean over {args.splits} halvings of the judged recipes, tested on one half")
    print("| items/task | trained on | MAE per task (pts) | MAE of mean (pts) |\n|---|---|---|---|")
    for budget in [int(b) for b in args.budgets.split(",")]:
        for extra in (0, len(judged) // 2):
            per_task, of_mean = [], []
            for _ in range(args.splits):
                order = rng.permutation(judged)
                train = np.r_[np.arange(PROBES), order[:extra]]
                test = order[len(judged) // 2:]
                estimates, truths = [], []
                for task, x in answers.items():
                    y = decoded[task].mean(1)
                    items = greedy_items(x[train], y[train], budget)
                    estimates.append(predict(fit(x[train][:, items], y[train]), x[test][:, items]))
                    truths.append(y[test])
                per_task.append(100 * np.mean([np.abs(e - t).mean() for e, t in zip(estimates, truths)]))
                of_mean.append(100 * np.abs(np.mean(estimates, 0) - np.mean(truths, 0)).mean())
            print(f"| {budget} | {PROBES} probes{f' + {extra} recipes' if extra else ''} "
                  f"| {np.mean(per_task):.2f} | {np.mean(of_mean):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
