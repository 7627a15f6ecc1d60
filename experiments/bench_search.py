"""Where a search's time goes, and how it scales from one worker to two.

On the real zoo (the search config with the random estimator, which needs no probe fit and
evaluates as many items as the default anchors estimator), the same
random candidates are evaluated by a pool of 1 and then of 2 Ray workers, each pinned to one
torch thread. Printed, measured in this one run:

* candidates per minute with 1 and with 2 workers, and their ratio (target >= 1.8x on 2 cores:
  the framework's own parallel overhead must stay small);
* the share of worker time spent outside the model's forward passes: merging, lm-eval /
  tokenization / decoding bookkeeping, Ray scheduling and idle time (target <= 10%).

    python experiments/bench_search.py fitness=random    # 24 candidates per pool size
    python experiments/bench_search.py --candidates 8 fitness=random   # quick
    python experiments/bench_search.py fitness=random space=dataflow   # layer paths instead of merges
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import time

from evomerge.config import compose
from evomerge.layer_path import Plan
from evomerge.search.settings import build_zoo_for, read_settings
from evomerge.search.workers import EvalRequest, EvalResult, WorkerPool
from evomerge.search.space import search_space


def measure(settings, recipes: list[Plan], workers: int) -> dict[str, float]:
    import ray

    spec = settings.worker_spec()
    spec.runtime = dataclasses.replace(spec.runtime, workers=workers, threads_per_worker=1)
    pool = WorkerPool(spec, log=lambda _: None)
    try:
        warm: dict[int, EvalResult] = {}  # each worker's first candidate pays one-time set-up (lm-eval task objects)
        pool.run({i: EvalRequest(recipes[i]) for i in range(workers)}, warm.__setitem__)
        results: dict[int, EvalResult] = {}
        started = time.perf_counter()
        pool.run({i: EvalRequest(r) for i, r in enumerate(recipes)}, results.__setitem__)
        wall = time.perf_counter() - started
    finally:
        pool.shutdown()
        ray.shutdown()
    errors = [r.error for r in results.values() if r.evaluation is None]
    if errors:
        raise SystemExit(f"candidates failed: {errors[:3]}")
    forward = sum(r.forward_seconds for r in results.values())
    merge = sum(r.merge_seconds for r in results.values())
    evaluate = sum(r.eval_seconds for r in results.values())
    worker_time = wall * workers
    return {"workers": workers, "wall": wall, "per_min": 60 * len(recipes) / wall, "forward": forward,
            "merge": merge, "eval": evaluate, "outside": 1 - forward / worker_time,
            "merge_share": merge / worker_time, "idle_share": 1 - (merge + evaluate) / worker_time}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=24)
    parser.add_argument("overrides", nargs="*", help="hydra overrides of the search config")
    args = parser.parse_args()
    config = compose(args.overrides)
    build_zoo_for(config)
    settings = read_settings(config)
    space = search_space(settings.space, settings.base, tuple(settings.experts), settings.num_layers,
                         expert_refs=dict(settings.experts))
    rng = random.Random(0)
    recipes = [space.decode(space.random(rng)) for _ in range(args.candidates)]
    rows = [measure(settings, recipes, w) for w in (1, 2)]
    print(f"{args.candidates} random candidates, estimator {settings.fitness.estimator} "
          f"({settings.fitness.items_per_task} items/task), tasks {', '.join(settings.tasks)}\n")
    print("| workers | candidates/min | wall s | in forward passes | merging | outside forward passes |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} | {r['per_min']:.1f} | {r['wall']:.1f} | {1 - r['outside']:.0%} | "
              f"{r['merge_share']:.1%} | {r['outside']:.1%} |")
    print(f"\nspeed-up with 2 workers: {rows[1]['per_min'] / rows[0]['per_min']:.2f}x")


if __name__ == "__main__":
    main()
