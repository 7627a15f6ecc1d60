"""Do quantized task vectors cost the zoo accuracy? The same merges from fp32, int8 and int4 deltas.

    python experiments/quantized_deltas.py            # the real zoo, FULL validation split
    python experiments/quantized_deltas.py --quick    # the pico zoo: does it all run? (seconds)

Task-vector quantization (Cheng et al. 2025) stores each expert's delta, not its weights, in a few
bits; evomerge's ``runtime.delta_dtype=int8|int4`` does it group-wise (128 elements, one fp32
scale each; see evomerge/merge/quantized.py). This script builds one merge worker per delta format,
exactly as a search's worker is built from the runtime config, and scores three uniform merges of
all the zoo's experts on every item of the validation split of the zoo's skill tasks (estimator
``full``, as experiments/zoo_methods scores its grids):

* task arithmetic, weight 0.5 each;
* TIES, weight 0.5, density 0.5;
* DARE-TIES, weight 0.5, density 0.5 (its masks are drawn from the recipe's seed and each
  element's position, so every format drops the same elements).

TIES and DARE-TIES run with ``normalize=false``, as experiments/zoo_pareto's TIES grid does, so
the weight is the scale of the merged delta in all three. It prints a markdown table of mean
accuracy per method and format, with the difference to fp32, then per-task accuracies and each
worker's memory plan; ``--out FILE`` also writes the markdown there. One worker at a time holds
the pool (the fp32 one, the largest, about 3 GB for the real zoo).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
import time
from pathlib import Path
from typing import Any, Sequence

FORMATS = ("float32", "int8", "int4")
# name -> (method, density)
MERGES = {"task arithmetic": ("task_arithmetic", 1.0), "TIES": ("ties", 0.5), "DARE-TIES": ("dare_ties", 0.5)}
WEIGHT = 0.5


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def settings_for(zoo: str, threads: int):
    """The zoo's settings, read without building anything (a zoo that is not built is an error)."""
    from evomerge.config import compose, read_config
    from evomerge.search.settings import build_zoo_for, read_settings
    from evomerge.zoo.build import Zoo

    config = compose([f"zoo={zoo}", "runtime.workers=1", f"runtime.threads_per_worker={threads}"])
    built = Zoo.at(read_config(config).zoo)
    if not built.is_built():
        raise SystemExit(f"the {zoo} zoo is not built ({built.root}); run `evomerge zoo build zoo={zoo}` first")
    build_zoo_for(config, log=log)  # on a built zoo: writes its scored task folder if missing, nothing else
    return read_settings(config)


def recipes(settings) -> dict[str, Any]:
    from evomerge.recipe import ExpertParams, MethodConfig, Recipe

    experts = tuple(settings.experts)
    out = {}
    for name, (method, density) in MERGES.items():
        extra = {} if method == "task_arithmetic" else {"normalize": False}
        config = MethodConfig(method, {e: ExpertParams(weight=WEIGHT, density=density) for e in experts}, **extra)
        out[name] = Recipe.uniform(settings.base, experts, settings.num_layers, config,
                                   expert_refs=dict(settings.experts))
    return out


def score_format(settings, fmt: str, merges: dict[str, Any]) -> dict[str, Any]:
    """One worker with ``runtime.delta_dtype=fmt`` scoring every merge on the full validation split."""
    from evomerge.search.workers import EvalRequest, MergeWorker

    fitness = dataclasses.replace(settings.fitness, estimator="full", objectives=["tasks"])
    runtime = dataclasses.replace(settings.runtime, delta_dtype=None if fmt == "float32" else fmt)
    spec = dataclasses.replace(settings.worker_spec(), fitness=fitness, runtime=runtime)
    started = time.perf_counter()
    worker = MergeWorker(spec, fmt)
    plan = worker.merger.memory_plan()
    log(f"{fmt}: worker built in {time.perf_counter() - started:.0f} s; {plan.summary()}")
    scores, seconds = {}, {}
    for name, recipe in merges.items():
        result = worker.evaluate(EvalRequest(recipe, split="validation", full=True))
        if result.evaluation is None:
            raise SystemExit(f"{name} from {fmt} deltas failed: {result.error}")
        scores[name] = {t: float(result.evaluation.scores[t]) for t in settings.tasks}
        seconds[name] = result.seconds
        log(f"{fmt} {name}: mean {100 * mean(scores[name]):.1f} ({result.merge_seconds:.2f} s merge, "
            f"{result.eval_seconds:.0f} s eval)")
    del worker
    gc.collect()
    return {"scores": scores, "seconds": seconds, "delta_bytes": plan.deltas, "plan": plan.summary()}


def mean(scores: dict[str, float]) -> float:
    return sum(scores.values()) / len(scores)


def render(results: dict[str, dict[str, Any]], tasks: Sequence[str], command: str, zoo: str) -> str:
    formats = list(results)
    pts = lambda v: f"{100 * v:.1f}"  # noqa: E731
    lines = [f"Generated by `{command}` (zoo `{zoo}`, full validation split of {', '.join(tasks)}; "
             f"accuracy in points, mean over the tasks; difference to fp32 in points).", "",
             "| merge | " + " | ".join(f"{f}" + ("" if f == "float32" else f" | Δ {f}") for f in formats) + " |",
             "|---|" + "---|" * (2 * len(formats) - ("float32" in formats))]
    for name in MERGES:
        reference = mean(results["float32"]["scores"][name]) if "float32" in results else None
        cells = []
        for f in formats:
            value = mean(results[f]["scores"][name])
            cells.append(pts(value))
            if f != "float32":
                cells.append(f"{100 * (value - reference):+.1f}" if reference is not None else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Per task:", "", "| merge | deltas | " + " | ".join(t.removeprefix("zoo_") for t in tasks) + " |",
              "|---|---|" + "---|" * len(tasks)]
    for name in MERGES:
        for f in formats:
            lines.append(f"| {name} | {f} | " + " | ".join(pts(results[f]["scores"][name][t]) for t in tasks) + " |")
    lines += ["", "Memory plans:", ""] + [f"- {f}: {results[f]['plan']}" for f in formats]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from evomerge.config import DELTA_DTYPES

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="smollm2", help="the zoo config (conf/zoo): smollm2 or pico")
    parser.add_argument("--quick", action="store_true", help="the pico zoo: a check that it all runs")
    parser.add_argument("--formats", default=",".join(FORMATS), help="comma-separated delta dtypes")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the worker")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = parser.parse_args(argv)
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in DELTA_DTYPES]
    if bad:
        parser.error(f"--formats {bad[0]!r} is not one of {', '.join(DELTA_DTYPES)}")
    zoo = "pico" if args.quick else args.zoo
    settings = settings_for(zoo, args.threads)
    merges = recipes(settings)
    started = time.perf_counter()
    results = {fmt: score_format(settings, fmt, merges) for fmt in formats}
    command = "python experiments/quantized_deltas.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = render(results, settings.tasks, command.strip(), zoo)
    text += f"\n{(time.perf_counter() - started) / 60:.1f} min, {time.strftime('%Y-%m-%d %H:%M')}.\n"
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
