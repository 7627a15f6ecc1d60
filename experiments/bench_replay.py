"""What a resume costs now that it replays the archive instead of unpickling a checkpoint.

A resumed search builds a fresh algorithm from the run's seed and replays every archived
generation through it (ask, look the candidates up by id, tell), evaluating nothing. This
measures that replay per candidate, against what evaluating a candidate costs: a finished pico
search of about 2,000 candidates is resumed (everything is replayed, nothing is left to
evaluate), and so is a finished one of a single generation (the fixed start-up: Ray, workers,
tokenizer, probes reused); the difference over the difference in candidates is the replay cost
per candidate. Printed beside it: the mean worker seconds per candidate of the pico run itself
and of a zoo search's estimates (a run of experiments/zoo_pareto, when one is on disk).

    python experiments/bench_replay.py                      # NSGA-II and CMA-ES, 2,000 candidates
    python experiments/bench_replay.py --pop 10 --generations 5 --algorithms cmaes   # quick
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cli(*args: str) -> float:
    """Wall seconds of ``evomerge ARGS`` (which must succeed)."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                          env={**os.environ, "RAY_ADDRESS": "local"})
    if done.returncode != 0:
        raise SystemExit(f"evomerge {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def worker_seconds(archive: Path) -> float:
    rows = [json.loads(line) for line in archive.read_text().splitlines() if line.strip()]
    seconds = [r["merge_seconds"] + r["eval_seconds"] for r in rows
               if r.get("cached_from") is None and r.get("fidelity", "estimate") == "estimate" and not r.get("error")]
    return statistics.mean(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pop", type=int, default=50)
    parser.add_argument("--generations", type=int, default=40)
    # Not CMA-ES: on the pico zoo, whose random models all score alike, it stops early.
    parser.add_argument("--algorithms", default="nsga2,ga")
    args = parser.parse_args()
    zoo_archive = next(iter(sorted((HERE / "zoo_pareto" / "runs").glob("*/b*/default-tsv-s0/archive.jsonl"))), None)
    with tempfile.TemporaryDirectory() as tmp:
        for algorithm in args.algorithms.split(","):
            common = ["zoo=pico", f"runs_dir={tmp}", f"algorithm={algorithm}", "fitness=random",
                      "fitness.items_per_task=2", "fitness.verify=0", "space.methods=[task_arithmetic]",
                      f"algorithm.pop_size={args.pop}", "runtime.workers=1"]
            rows = {}
            for name, generations in (("one", 1), ("long", args.generations)):
                run = Path(tmp) / f"{algorithm}-{name}"
                search = cli("search", *common, f"name={run.name}", f"algorithm.generations={generations}")
                candidates = len((run / "archive.jsonl").read_text().splitlines())
                rows[name] = {"candidates": candidates, "search": search, "resume": cli("resume", str(run)),
                              "per_candidate": worker_seconds(run / "archive.jsonl")}
            replay = (rows["long"]["resume"] - rows["one"]["resume"]) / (rows["long"]["candidates"]
                                                                           - rows["one"]["candidates"])
            print(f"{algorithm}: search of {rows['long']['candidates']} candidates {rows['long']['search']:.1f} s, "
                  f"its resume {rows['long']['resume']:.1f} s; resume of {rows['one']['candidates']} candidates "
                  f"{rows['one']['resume']:.1f} s (start-up)")
            print(f"{algorithm}: replay {1000 * replay:.2f} ms per candidate = "
                  f"{replay / rows['long']['per_candidate']:.3f} of a pico evaluation "
                  f"({1000 * rows['long']['per_candidate']:.1f} ms worker time)"
                  + (f", {replay / worker_seconds(zoo_archive):.4f} of a zoo estimate "
                     f"({worker_seconds(zoo_archive):.2f} s)" if zoo_archive else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
