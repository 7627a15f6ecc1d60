"""Gradient refinement alone, from a parent merge, on the zoo: accuracy against cost.

    python experiments/refine/run.py                                 # 3 seeds, 40 steps, TSV-M@1
    python experiments/refine/run.py --signal entropy --name entropy  # AdaMerging's label-free signal
    python experiments/refine/run.py --signal fda --start task_arithmetic:0.6 --name fda-ta  # data-free
    python experiments/refine/run.py --zoo pico --seeds 1 --steps 4 --checkpoints 0,2,4 --out /tmp/r

One process, no Ray, 2 threads. The start is a uniform merge (``--start METHOD:WEIGHT``, default
TSV-M at weight 1: the zoo's best parent); each seed refines it for ``--steps`` steps
(:class:`evomerge.search.refine.Refiner`, per-block expert weights, ``--items`` validation items
per task per step). At each checkpoint the current recipe is scored on the FULL validation split
and the FULL test split, decoded (exact match, as lm-eval scores it). Cost is counted in
estimator-equivalents measured in this run: the seconds of the steps so far over the seconds of
one estimate (a merge plus 10 items per task, teacher-forced, as `evomerge search` estimates);
``budget`` adds what a run needs besides the steps: the parents that find the start (8
estimates) and one verification of the result (``VERIFY_COST``, curves.py's figure); for ``fda``
also the seconds of building the anchors (each seed builds its own, from its seed).
Normalized accuracy: merge / expert on each expert's own skill (test), averaged over skills.
Writes ``<out>/<name>.json`` and ``<out>/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PARENTS = 8  # base, 4 experts, 3 uniform merges: what a search scores to find its best parent
VERIFY_COST = 5.2  # experiments/zoo_pareto/curves.py: a verification in estimator-equivalents


def main() -> None:
    from evomerge.config import RefineConfig

    defaults = RefineConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="smollm2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--checkpoints", default="0,5,10,20,40")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument("--signal", default="supervised")
    parser.add_argument("--split-components", action="store_true")
    parser.add_argument("--anchors", type=int, default=defaults.anchors)
    parser.add_argument("--anchor-steps", type=int, default=defaults.anchor_steps)
    parser.add_argument("--anchor-init", default=defaults.anchor_init)
    parser.add_argument("--start", default="tsv_m:1")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("--name", default="refine-alone")
    args = parser.parse_args()

    import torch

    from evomerge.config import FitnessConfig, zoo_config
    from evomerge.fitness.evaluator import Evaluator
    from evomerge.merge.engine import Merger
    from evomerge.pool import ModelPool
    from evomerge.recipe import ExpertParams, MethodConfig, Recipe
    from evomerge.search.refine import Refiner
    from evomerge.zoo.build import Zoo
    from evomerge.zoo.tasks import task_name

    torch.set_num_threads(2)
    started = time.perf_counter()
    zoo = Zoo.at(zoo_config([f"zoo={args.zoo}"]))
    if not zoo.is_built():
        raise SystemExit(f"build the zoo first: evomerge zoo build zoo={args.zoo}")
    skills = list(zoo.config.skills)
    tasks = [task_name(s) for s in skills]
    merger = Merger(ModelPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}))
    full = Evaluator(FitnessConfig(estimator="full"), tasks, merger.tokenizer, include_path=str(zoo.task_dir))
    estimator = Evaluator(FitnessConfig(estimator="random", items_per_task=10), tasks, merger.tokenizer,
                          include_path=str(zoo.task_dir))
    method, weight = args.start.split(":")
    start = Recipe.uniform("base", merger.experts, merger.num_layers,
                           MethodConfig(method, {e: ExpertParams(weight=float(weight)) for e in merger.experts}))

    scores: dict[tuple[str, str], dict[str, float]] = {}

    def score(recipe: Recipe, split: str) -> dict[str, float]:
        key = (recipe.hash, split)
        if key not in scores:
            scores[key] = dict(full.score(merger.materialize(recipe), split=split, full=True).scores)
        return scores[key]

    # One estimate's cost, as a search pays it: merge plus the estimator's items, teacher-forced.
    times = []
    for _ in range(5):
        t = time.perf_counter()
        estimator.score(merger.materialize(start))
        times.append(time.perf_counter() - t)
    estimate_seconds = statistics.median(times)
    own = {}
    for skill, name in zip(skills, tasks):
        alone = Recipe.alone("base", merger.experts, merger.num_layers, skill)
        own[name] = score(alone, "test")[name]

    checkpoints = sorted({int(c) for c in args.checkpoints.split(",")} | {args.steps})
    runs = []
    for seed in range(args.seeds):
        rows = []
        config = RefineConfig(steps=args.steps, lr=args.lr, signal=args.signal, items_per_task=args.items,
                              split_components=args.split_components, seed=seed, anchors=args.anchors,
                              anchor_steps=args.anchor_steps, anchor_init=args.anchor_init)
        refiner = Refiner(merger, full.suite, config)

        def checkpoint(step: int, recipe: Recipe, seconds: float) -> None:
            if step not in checkpoints:
                return
            validation, test = score(recipe, "validation"), score(recipe, "test")
            equivalents = seconds / estimate_seconds
            rows.append({"step": step, "seconds": seconds, "equivalents": equivalents,
                         "budget": PARENTS + equivalents + (VERIFY_COST if step else 0),
                         "validation": validation, "test": test,
                         "validation_mean": statistics.mean(validation.values()),
                         "test_mean": statistics.mean(test.values()),
                         "normalized": statistics.mean(test[t] / own[t] for t in tasks if own[t] > 0)})
            print(f"seed {seed} step {step:3d}: {equivalents:6.1f} estimates, validation "
                  f"{rows[-1]['validation_mean']:.3f}, test {rows[-1]['test_mean']:.3f} "
                  f"({', '.join(f'{k} {v:.2f}' for k, v in test.items())})", flush=True)

        done = refiner.refine(start, on_step=checkpoint)
        for row in rows:  # the anchors were built before the first step: every checkpoint paid them
            row["equivalents"] += done.anchor_seconds / estimate_seconds
            row["budget"] += done.anchor_seconds / estimate_seconds
        runs.append({"seed": seed, "rows": rows, "losses": done.losses, "seconds": done.seconds,
                     "anchor_seconds": done.anchor_seconds, "anchors": done.anchors, "recipe": done.recipe.to_dict()})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "estimate_seconds": estimate_seconds, "own_skill_test": own,
              "runs": runs, "wall_seconds": time.perf_counter() - started}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(table(result, tasks))
    print(table(result, tasks))


def table(result: dict, tasks: list[str]) -> str:
    """Mean ± sd over seeds at each checkpoint."""
    args = result["args"]
    lines = [f"# Refinement alone from {args['start']} ({args['signal']}, lr {args['lr']}, "
             + (f"{args['anchors']} anchors per expert and block, {args['anchor_steps']} construction steps, "
              f"{args['anchor_init']} init" if args['signal'] == 'fda' else
              f"{args['items']} items per task per step") + f", {'attn/mlp' if args['split_components'] else 'per block'})",
             "",
             f"{len(result['runs'])} seeds; one estimate = {result['estimate_seconds']:.2f} s; "
             f"wall {result['wall_seconds'] / 60:.1f} min. Test: full split, decoded.", "",
             "| step | estimator-eq. of steps | budget | validation mean | test mean | normalized | "
             + " | ".join(tasks) + " |", "|" + "---|" * (6 + len(tasks))]
    steps = [r["step"] for r in result["runs"][0]["rows"]]
    for i, step in enumerate(steps):
        rows = [run["rows"][i] for run in result["runs"]]

        def cell(values: list[float], scale: float = 100) -> str:
            values = [v * scale for v in values]
            return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")

        lines.append(f"| {step} | {statistics.mean(r['equivalents'] for r in rows):.1f} | "
                     f"{statistics.mean(r['budget'] for r in rows):.0f} | {cell([r['validation_mean'] for r in rows])} | "
                     f"{cell([r['test_mean'] for r in rows])} | {cell([r['normalized'] for r in rows])} | "
                     + " | ".join(cell([r['test'][t] for r in rows]) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
