"""A long search under repeated faults ends with the archive an undisturbed search writes.

The same search runs twice from nothing: once undisturbed, once with every merge worker
SIGKILLed (``os._exit`` inside the candidate, as the kernel's OOM killer would) after every
``--kill-every`` candidates of its life, and the driver SIGKILLed ``--driver-kills`` times at
evenly spaced archive sizes, each time followed by ``evomerge resume``. The disturbed archive must
equal the undisturbed one row for row (timings and worker names aside). Printed: faults injected,
retries, wall time against the undisturbed run's.

    python experiments/soak.py                                    # pico zoo, ~500 candidates
    python experiments/soak.py --pop 6 --generations 3 --driver-kills 1 --kill-every 4   # quick
    python experiments/soak.py --zoo smollm2 --algorithm cmaes --pop 12 --generations 17 --kill-every 10 \
        fitness=random "space.methods=[task_arithmetic]"       # the zoo, 204 candidates

The faulty driver is this script in ``--drive`` mode, with the hooks described on its command
line (no pickle); its Ray workers import this module, so the experiments folder goes on their
PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from evomerge.search.hooks import SearchHooks  # noqa: E402


@dataclass
class KillWorkers(SearchHooks):
    """Each worker dies on the ``every``-th search candidate of its life (its copy of the hooks
    counts; the fresh worker that retries the candidate starts again from 0)."""

    every: int
    seen: int = field(default=0, init=False)

    def candidate_starts(self, worker: str, request) -> None:
        if request.split == "validation":
            self.seen += 1
            if self.seen == self.every:
                os._exit(1)


def drive(every: int, command: str, args: list[str]) -> int:
    from evomerge.config import compose
    from evomerge.errors import UserError
    from evomerge.search import driver as loop

    hooks = KillWorkers(every) if every else None
    try:
        if command == "search":
            loop.start(compose(args), hooks=hooks)
        else:
            loop.resume(args[0], hooks=hooks)
    except UserError as error:
        print(f"evomerge: error: {error}", file=sys.stderr)
        return 2
    return 0


def comparable(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines() if line.strip()]
    drop = ("merge_seconds", "eval_seconds", "worker")
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in rows), key=lambda r: r["id"])


def lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="pico")
    # NSGA-II: CMA-ES (the default) stops early on the pico zoo, whose random models all score
    # alike; a population-based algorithm also makes the replay rebuild its survivors.
    parser.add_argument("--algorithm", default="nsga2")
    parser.add_argument("--pop", type=int, default=20)
    parser.add_argument("--generations", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--kill-every", type=int, default=7, help="each worker dies on its Nth candidate")
    parser.add_argument("--driver-kills", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="more hydra overrides for both runs, e.g. fitness=random")
    parser.add_argument("--drive", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drive:
        every, command, *rest = args.drive
        return drive(int(every), command, rest)

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
           "RAY_ADDRESS": "local"}
    with tempfile.TemporaryDirectory() as tmp:
        common = [f"zoo={args.zoo}", f"runs_dir={tmp}", f"algorithm={args.algorithm}", f"algorithm.pop_size={args.pop}",
                  f"algorithm.generations={args.generations}", f"runtime.workers={args.workers}",
                  "runtime.max_retries=3", *args.overrides]

        def driver(every: int, *command: str, log: Path) -> subprocess.Popen:
            with open(log, "a") as out:
                return subprocess.Popen([sys.executable, __file__, "--drive", str(every), *command], env=env,
                                        stdout=out, stderr=out, start_new_session=True)

        started = time.perf_counter()
        calm = driver(0, "search", *common, "name=calm", log=Path(tmp) / "calm.log")
        if calm.wait() != 0:
            raise SystemExit((Path(tmp) / "calm.log").read_text()[-3000:])
        calm_seconds = time.perf_counter() - started
        total = lines(Path(tmp) / "calm" / "archive.jsonl")

        log = Path(tmp) / "soak.log"
        archive = Path(tmp) / "soak" / "archive.jsonl"
        started = time.perf_counter()
        process = driver(args.kill_every, "search", *common, "name=soak", log=log)
        cuts = [total * (k + 1) // (args.driver_kills + 1) for k in range(args.driver_kills)]
        for cut in cuts:
            while lines(archive) < cut and process.poll() is None:
                time.sleep(0.05)
            if process.poll() is not None:
                raise SystemExit(f"the driver ended before archive line {cut}:\n{log.read_text()[-3000:]}")
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            process = driver(args.kill_every, "resume", str(Path(tmp) / "soak"), log=log)
        if process.wait() != 0:
            raise SystemExit(log.read_text()[-3000:])
        soak_seconds = time.perf_counter() - started
        text = log.read_text()
        deaths = text.count(" died")
        same = comparable(Path(tmp) / "soak") == comparable(Path(tmp) / "calm")
        print(f"{args.zoo}: {total} candidates (archive lines), {args.algorithm}, {args.workers} workers, "
              f"pop {args.pop} x {args.generations} generations")
        print(f"faults: driver SIGKILLed {len(cuts)} times (at archive lines {cuts}) and resumed; "
              f"worker deaths reported by the driver: {deaths} (each worker dies on its candidate "
              f"{args.kill_every}); resumes: {text.count('evaluations replayed')}")
        print(f"wall: undisturbed {calm_seconds / 60:.1f} min, disturbed {soak_seconds / 60:.1f} min "
              f"({soak_seconds / calm_seconds:.2f}x)")
        print(f"archive equal to the undisturbed run's, row for row: {same}")
        return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
