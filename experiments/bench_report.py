"""How long the run report of a large run takes to write, how big it is, and how long a browser
takes to draw it: a synthetic run folder of N candidates (default 2,000) shaped like a zoo run
(four task objectives, 30-layer TSV-M recipes with a group per layer, parents, a verified few),
then ``write_report`` timed cold (reading the archive, as ``evomerge report`` does) and warm (the
archive handed over, as the search does after every generation), and where Chromium is
installed, the page loaded headless and its own render time read back.

    python experiments/bench_report.py            # 2,000 candidates
    python experiments/bench_report.py 5000 /tmp/big-run

Measured on 2 CPU cores shared with other jobs (load 3-5), Chromium 150 headless with software
rendering, 2,000 candidates (a 15.2 MB archive): report.html 5.23 MB; written in 0.28 s from
the archive the search holds (what a generation pays) and 0.93 s from the folder (``evomerge
report``, most of it parsing the archive); the page ready 1.77-1.86 s after navigation began,
1.1-1.2 s of it drawing the plots (six pairwise panels of 1,990 points each).
"""

from __future__ import annotations

import copy
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from evomerge.report.html import write_report
from evomerge.recipe import ExpertParams, MethodConfig, Recipe
from evomerge.run import ArchiveEntry, RunDir

EXPERTS = ("add", "reverse", "sort", "upper")
TASKS = [f"zoo_{e}" for e in EXPERTS]
LAYERS, POP = 30, 12


def synthetic_run(root: Path, count: int, seed: int = 0) -> RunDir:
    """A run folder of ``count`` candidates: 8 parents, then generations of ``POP``, and the
    three best estimates verified at the end."""
    rng = random.Random(seed)
    template = Recipe.uniform("/models/base", EXPERTS, LAYERS, MethodConfig("tsv_m", {e: ExpertParams(weight=0.5) for e in EXPERTS}),
                              expert_refs={e: f"/models/{e}" for e in EXPERTS}).to_dict()
    objectives = [{"name": t, "direction": "max", "reference": 0.0} for t in TASKS]
    run = RunDir.create(root, {"tasks": TASKS, "seed": seed, "name": root.name})
    entries = []
    for i in range(count - 3):
        recipe = copy.deepcopy(template)
        parent = i < 8
        weights = ([0.0] * 4 if i == 0 else [float(j == i - 1) for j in range(4)] if i < 5 else [(0.3, 0.5, 1.0)[i - 5]] * 4
                   if parent else [rng.uniform(0.2, 1.2) for _ in EXPERTS])
        slope = [0.0] * 4 if parent else [rng.uniform(-0.01, 0.01) for _ in EXPERTS]
        recipe["groups"] = [{"start": layer, "end": layer + 1, "component": "all",
                             "config": {"method": "tsv_m" if i >= 5 else "task_arithmetic", "lambda": 1.0,
                                        "experts": {e: {"weight": round(w + s * layer, 6)} for e, w, s in zip(EXPERTS, weights, slope)}}}
                            for layer in range(LAYERS)]
        recipe["outside"]["experts"] = {e: {"weight": w} for e, w in zip(EXPERTS, weights)}
        scores = {t: round(min(1.0, max(0.0, rng.gauss(0.5 + 0.3 * w, 0.15))), 2) for t, w in zip(TASKS, weights)}
        entries.append(ArchiveEntry(i, -1 if parent else (i - 8) // POP, [] if parent else [rng.random() for _ in range(16)],
                                    f"{i:016x}", recipe, dict(scores), dict(scores), 0.5, 2.0, "w1",
                                    error="NaN weights" if i % 97 == 50 else None))
    generations = entries[-1].generation + 1
    best = sorted(entries[8:], key=lambda e: -sum(e.objectives.values()))[:3]
    for k, e in enumerate(best):
        full = {t: round(v - rng.uniform(0, 0.15), 2) for t, v in e.scores.items()}
        entries.append(ArchiveEntry(count - 3 + k, generations, [], e.recipe_hash, e.recipe, dict(full), dict(full),
                                    fidelity="full"))
    for e in entries:
        run.append(e)
    for g in range(generations):
        run.append_history({"generation": g, "evaluations": 8 + POP * (g + 1), "errors": 0, "hypervolume": 0.3 + 0.1 * g / generations,
                            "best": {t: 0.9 + 0.1 * g / generations for t in TASKS}, "seconds": 10.0 * g,
                            "candidates_per_min": rng.uniform(50, 70)})
    run.write_json(run.pareto_path, {"generation": generations - 1, "objectives": objectives, "members": [], "verified": []})
    run.write_json(run.kinship_path, {"experts": list(EXPERTS), "cosine": [[1.0 if i == j else 0.1 for j in range(4)] for i in range(4)],
                                      "overlap": [[1.0 if i == j else 0.3 for j in range(4)] for i in range(4)], "overlap_chance": 0.25})
    return run


def timed(call, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    root = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(tempfile.mkdtemp()) / "bench-run"
    run = synthetic_run(root, count)
    entries = run.archive()
    cold = timed(lambda: write_report(run))
    warm = timed(lambda: write_report(run, entries=entries))
    size = run.report_path.stat().st_size
    print(f"{count} candidates ({run.archive_path.stat().st_size / 2**20:.1f} MB archive): report.html "
          f"{size / 2**20:.2f} MB, written in {cold:.2f} s from the folder, {warm:.2f} s from the search's archive")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from headless import chromium, load

    if chromium() is None:
        print("no chromium: the browser's render time is not measured")
        return
    started = time.perf_counter()
    status = load(run.report_path)
    print(f"chromium (headless, software rendering): page ready {status['load_ms']:.0f} ms after navigation began "
          f"(plots drawn in {status['render_ms']:.0f} ms of it; {time.perf_counter() - started:.1f} s with the "
          f"browser's own start), plotly.js {status['plotly']}, "
          f"marks per plot {status['plots']}, JavaScript errors: {status['errors'] or 'none'}")

if __name__ == "__main__":
    main()
