"""`evomerge search` with and without gradient refinement, at a budget counted as curves.py counts it.

    python experiments/refine/search_refine.py --name search6-refine12 -- algorithm.generations=6 \
        refine.at=final refine.steps=12
    python experiments/refine/search_refine.py --zoo pico --seeds 1 --name p -- algorithm.generations=1

Each seed runs the CLI (``evomerge search zoo=... seed=S refine.seed=S OVERRIDES``) into
``runs/refine/<name>-s<seed>/`` (a finished run is read, not re-run). Cost, in
estimator-equivalents: an estimate 1, a duplicate served from the archive 0, an entry scored on
every validation item (verification) its worker seconds over the run's mean estimate seconds,
and a refinement the estimator-equivalents its entry records (its seconds over the same mean).
The pick is `best:mean` (the best verified candidate), its test score the run's own (full test
split, decoded). Normalized: pick / expert on each expert's own skill (test), averaged; the
experts' test scores are the zoo card's (card.json).
Writes ``<out>/<name>.json`` and ``<out>/<name>.md``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cost(rows: list[dict]) -> tuple[float, float]:
    """(total estimator-equivalents, of which refinement)."""
    estimates = [r["merge_seconds"] + r["eval_seconds"] for r in rows
                 if r.get("fidelity", "estimate") == "estimate" and r.get("cached_from") is None and not r.get("error")]
    unit = statistics.mean(estimates) if estimates else 1.0
    total = refined = 0.0
    for r in rows:
        if r.get("cached_from") is not None:
            continue
        if r.get("fidelity", "estimate") == "estimate":
            total += 1.0
        else:
            total += (r["merge_seconds"] + r["eval_seconds"]) / unit
        made = ((r.get("origin") or {}).get("refine") or {}).get("estimator_equivalents")
        if made:
            total += made
            refined += made
    return total, refined


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--zoo", default="smollm2")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--name", required=True)
    parser.add_argument("--runs", default="runs/refine")
    parser.add_argument("--out", default=str(HERE))
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()

    from evomerge.config import zoo_config
    from evomerge.zoo.build import Zoo

    zoo = Zoo.at(zoo_config([f"zoo={args.zoo}"]))
    card = json.loads((zoo.root / "card.json").read_text()) if (zoo.root / "card.json").exists() else None
    results = []
    for seed in range(args.seeds):
        name = f"{args.name}-s{seed}"
        folder = Path(args.runs) / name
        started = time.perf_counter()
        if not (folder / "pareto.json").exists() or not json.loads((folder / "pareto.json").read_text()).get("verified"):
            command = [sys.executable, "-m", "evomerge.cli", "search", f"zoo={args.zoo}", f"seed={seed}",
                       f"refine.seed={seed}", f"runs_dir={args.runs}", f"name={name}", *args.overrides]
            print(" ".join(command[2:]), flush=True)
            subprocess.run(command, check=True)
        wall = time.perf_counter() - started
        rows = [json.loads(line) for line in (folder / "archive.jsonl").read_text().splitlines() if line.strip()]
        pareto = json.loads((folder / "pareto.json").read_text())
        pick = pareto["verified"][0]
        by_id = {r["id"]: r for r in rows}
        total, refined = cost(rows)
        test = pick["test_scores"]
        results.append({"seed": seed, "pick": pick["id"], "refined_pick": "origin" in by_id[pick["id"]],
                        "validation_mean": statistics.mean(pick["scores"].values()),
                        "test_mean": statistics.mean(test.values()) if test else None, "test": test,
                        "cost": total, "refinement_cost": refined, "wall_seconds": wall,
                        "evaluations": len(rows)})
        print(results[-1], flush=True)
    own = _own_skill(card, results[0]["test"]) if card else None
    for r in results:
        if own and r["test"]:
            r["normalized"] = statistics.mean(r["test"][t] / own[t] for t in own if own[t] > 0)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "runs": results}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(table(result))
    print(table(result))


def _own_skill(card: dict, tasks: dict) -> dict[str, float] | None:
    """Each expert's test accuracy on its own skill (task zoo_<skill>), from the zoo's card.json."""
    scores = card.get("scores") if isinstance(card, dict) else None
    if not scores:
        return None
    own = {}
    for task in tasks:
        skill = task.removeprefix("zoo_")
        value = ((scores.get(skill) or {}).get("test") or {}).get(skill)
        if value is None:
            return None
        own[task] = float(value)
    return own


def table(result: dict) -> str:
    runs = result["runs"]

    def cell(values: list[float], scale: float = 100) -> str:
        values = [v * scale for v in values if v is not None]
        if not values:
            return "–"
        return f"{statistics.mean(values):.1f}" + (f" ± {statistics.stdev(values):.1f}" if len(values) > 1 else "")

    lines = [f"# `evomerge search {' '.join(result['args']['overrides'])}`", "",
             "| seed | pick | refined pick | cost | of which refinement | full validation | test | normalized | wall min |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['pick']} | {'yes' if r['refined_pick'] else 'no'} | {r['cost']:.0f} | "
                     f"{r['refinement_cost']:.0f} | {100 * r['validation_mean']:.1f} | "
                     f"{cell([r['test_mean']])} | {cell([r.get('normalized')])} | {r['wall_seconds'] / 60:.1f} |")
    lines.append(f"| mean | | | {statistics.mean(r['cost'] for r in runs):.0f} | "
                 f"{statistics.mean(r['refinement_cost'] for r in runs):.0f} | "
                 f"{cell([r['validation_mean'] for r in runs])} | {cell([r['test_mean'] for r in runs])} | "
                 f"{cell([r.get('normalized') for r in runs])} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
