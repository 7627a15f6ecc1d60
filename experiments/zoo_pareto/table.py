"""Renders ``results.json`` (written by ``run.py``) into ``results.md``, ``fronts.png`` and
``accuracy.png``. Every number in them comes from the JSON; nothing is typed by hand.

    python experiments/zoo_pareto/table.py              # re-render from experiments/zoo_pareto/results.json
    python experiments/zoo_pareto/table.py --out DIR    # from DIR/results.json into DIR
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

HERE = Path(__file__).resolve().parent
GRID_MARGIN = 0.03  # evomerge's best mean test accuracy must beat the best grid by this much
HV_MARGIN = 0.10  # and NSGA-II's test-front hypervolume random search's by this share


# --- numbers ---------------------------------------------------------------------------------------


def label(task: str) -> str:
    return task.removeprefix("zoo_")


def mean_of(scores: Mapping[str, float], tasks: Sequence[str]) -> float:
    return sum(float(scores[t]) for t in tasks) / len(tasks)


def spread(values: Sequence[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """``mean ± sd`` over seeds (sample sd), or the value alone when there is one."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def count(values: Sequence[float]) -> str:
    """A count over seeds: the value when every seed agrees, else its range."""
    low, high = min(values), max(values)
    return f"{low:.0f}" if low == high else f"{low:.0f}–{high:.0f}"


def colours(names: Sequence[str]) -> dict[str, Any]:
    """One distinct colour per searcher, the same in every plot."""
    from matplotlib import colormaps

    palette = colormaps["tab20"].colors
    return {name: palette[(2 * i) % 20 + (2 * i) // 20 % 2] for i, name in enumerate(names)}


def groups(results: Mapping[str, Any]) -> dict[str, list[dict]]:
    """Rows by searcher, in table order: parents, grids, searches."""
    out: dict[str, list[dict]] = {}
    for kind in ("parent", "grid", "search"):
        for row in results["rows"]:
            if row["kind"] == kind:
                out.setdefault(row["searcher"], []).append(row)
    return out


def pick_mean(row: Mapping[str, Any], tasks: Sequence[str], split: str = "test") -> float | None:
    scores = row["pick"].get(split)
    return None if scores is None else mean_of(scores, tasks)


def tested(row: Mapping[str, Any]) -> list[dict]:
    """Every merge of a row that was scored on test (its pick and its front)."""
    seen, out = set(), []
    for m in [row["pick"], *row["front"]]:
        if m.get("test") is not None and m["recipe_hash"] not in seen:
            seen.add(m["recipe_hash"])
            out.append(m)
    return out


def verdicts(results: Mapping[str, Any]) -> dict[str, Any]:
    """The issue's targets, computed: best mean vs grid, hypervolume vs random, the probe task."""
    tasks = results["tasks"]
    by = groups(results)
    seed_mean = {name: statistics.mean(pick_mean(r, tasks) for r in rows) for name, rows in by.items()
                 if all(r["pick"].get("test") for r in rows)}
    hv = {name: statistics.mean(r["hv_test"] for r in rows) for name, rows in by.items()}
    grids = {n: v for n, v in seed_mean.items() if by[n][0]["kind"] == "grid"}
    ours = {n: seed_mean[n] for n in results.get("evomerge_searchers", []) if n in seed_mean}
    out: dict[str, Any] = {"seed_mean": seed_mean, "hv": hv}
    if grids and ours:
        best_grid = max(grids, key=grids.get)
        best_ours = max(ours, key=ours.get)
        out["accuracy"] = {"grid": best_grid, "grid_mean": grids[best_grid], "ours": best_ours,
                           "ours_mean": ours[best_ours], "all_ours": ours,
                           "met": ours[best_ours] >= grids[best_grid] + GRID_MARGIN}
    if "nsga2" in hv and "random" in hv:
        beats = lambda ours, theirs: ours > 0 and ours >= (1 + HV_MARGIN) * theirs  # noqa: E731
        per_seed = {r["seed"]: r["hv_test"] for r in by["random"]}
        out["hypervolume"] = {"nsga2": hv["nsga2"], "random": hv["random"],
                              "ratio": hv["nsga2"] / hv["random"] if hv["random"] > 0 else None,
                              "met": beats(hv["nsga2"], hv["random"]),
                              "seeds_met": sum(beats(r["hv_test"], per_seed[r["seed"]])
                                               for r in by["nsga2"] if r["seed"] in per_seed),
                              "seeds": len(by["nsga2"])}
    probes = results.get("probe_tasks") or []
    if probes:
        probe = probes[0]
        parents = {n: rows[0]["pick"]["test"][probe] for n, rows in by.items() if rows[0]["kind"] == "parent"}
        best_parent = max(parents, key=parents.get)
        found = {}
        for name, rows in by.items():
            if rows[0]["kind"] == "parent":
                continue
            best = [max((m["test"][probe] for m in tested(r)), default=None) for r in rows]
            found[name] = {"pick": [r["pick"]["test"][probe] for r in rows if r["pick"].get("test")],
                           "best": best, "beats": sum(b is not None and b > parents[best_parent] for b in best),
                           "runs": len(rows)}
        out["probe"] = {"task": probe, "parent": best_parent, "parent_score": parents[best_parent], "found": found}
    return out


# --- markdown ----------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(results: Mapping[str, Any]) -> str:
    tasks, probes = results["tasks"], results.get("probe_tasks") or []
    s = results["settings"]
    by = groups(results)
    v = verdicts(results)
    stages = results["seconds"]["stages"]
    total = sum(stages.values())
    lines = [
        "# Evolutionary search vs hand-tuned merges on the zoo (held-out test)",
        "",
        f"Generated by `{results['command']}` (finished {results['finished']}) from `results.json`; "
        f"do not edit by hand. Zoo `{results['zoo']}`: experts {', '.join(results['experts'])}; "
        f"optimized tasks {', '.join(f'`{t}`' for t in tasks)}"
        + (f"; cross-skill probe {', '.join(f'`{t}`' for t in probes)} (scored, never optimized)." if probes else "."),
        "",
        f"Every search: a budget of {s['budget']} candidates, {s['pop_size']} per generation (generations: "
        + ", ".join(f"{n} {g}" for n, g in s["generations"].items()) + "), "
        f"{s['seeds']} seed(s), fitness = the {s['estimator']} estimator on {s['items_per_task']} items per task "
        f"(fitted once on a shared probe population: base, experts, {s['probe_merges']} random merges), "
        f"{s['workers']} Ray worker(s) x 1 thread. "
        f"Best-on-validation pick: the {s['rescore']} best candidates by estimated mean are re-scored on the "
        f"full validation split and the best of those is scored on the full test split. Test front: the "
        f"validation front (non-dominated on per-task validation scores), capped at the {s['front_cap']} members "
        f"with the best mean, plus the pick, scored on test; HV = its hypervolume over the {len(tasks)} tasks' "
        f"test accuracy, reference 0. Grids are scored on the full validation split, so their pick needs no "
        f"re-scoring. Accuracy in points (%), mean ± sd over seeds.",
        "",
        f"Wall time: {total / 60:.1f} min in all (probe population {stages.get('probes', 0) / 60:.1f}, "
        f"searches {stages.get('searches', 0) / 60:.1f}, full-split scoring of parents, grids and picks and "
        f"fronts {stages.get('scoring', 0) / 60:.1f}), summed over the invocations that built these results.",
        "",
        "## Best-on-validation pick, held-out test",
        "",
    ]
    header = ["searcher", "runs", *map(label, tasks), "mean", *(f"{label(p)} (probe)" for p in probes),
              "test-front HV", "candidates / search", "full-split evals val + test", "search wall min"]
    rows = []
    for name, group in by.items():
        picks = [r["pick"] for r in group]
        rows.append([
            f"`{name}`", str(len(group)),
            *(spread([p["test"][t] if p.get("test") else None for p in picks], 100) for t in tasks),
            f"**{spread([pick_mean(r, tasks) for r in group], 100)}**",
            *(spread([p["test"][t] if p.get("test") else None for p in picks], 100) for t in probes),
            spread([r["hv_test"] for r in group], digits=4),
            count([r["evaluations"] for r in group]) if group[0]["kind"] != "parent" else "–",
            count([r["full_evals"]["validation"] for r in group]) + " + "
            + count([r["full_evals"]["test"] for r in group]),
            spread([r["search_seconds"] / 60 for r in group]) if group[0]["kind"] == "search" else "–",
        ])
    lines += _table(header, rows)
    described = {"grid:task_arithmetic": f"uniform task arithmetic, one weight for every expert in "
                                         f"{s['grid']['task_arithmetic']}",
                 "grid:ties": f"uniform TIES (normalize off), weight in {s['grid']['ties_weight']} x density in "
                              f"{s['grid']['ties_density']}",
                 **{n: f"{d}: `{' '.join(s['overrides'][n])}`" for n, d in results["searchers"].items()}}
    lines += ["", "- `base`, `expert:*`: each model alone (no merge)."]
    lines += [f"- `{n}`: {described[n]}" for n in by if n in described]
    lines.append("")

    lines += ["## Targets", ""]
    if "accuracy" in v:
        a = v["accuracy"]
        detail = ", ".join(f"`{n}` {m * 100:.1f}" for n, m in a["all_ours"].items())
        lines.append(f"- Best mean test accuracy of an evomerge search (`{a['ours']}`, {a['ours_mean'] * 100:.1f}; "
                     f"{detail}) vs the best grid-searched baseline (`{a['grid']}`, {a['grid_mean'] * 100:.1f}): "
                     f"{(a['ours_mean'] - a['grid_mean']) * 100:+.1f} points; target +{GRID_MARGIN * 100:.0f}: "
                     f"**{'met' if a['met'] else 'not met'}**.")
    if "hypervolume" in v:
        h = v["hypervolume"]
        ratio = "undefined (random search's front has no volume)" if h["ratio"] is None else f"{h['ratio']:.2f}"
        lines.append(f"- Test-front hypervolume, NSGA-II {h['nsga2']:.4f} vs random search {h['random']:.4f} at "
                     f"equal budget: ratio {ratio}; target ≥ {1 + HV_MARGIN:.2f}: "
                     f"**{'met' if h['met'] else 'not met'}** (on the means; per seed {h['seeds_met']} "
                     f"of {h['seeds']}).")
    if "probe" in v:
        p = v["probe"]
        winners = [f"`{n}` ({f['beats']}/{f['runs']} runs)" for n, f in p["found"].items() if f["beats"]]
        lines.append(f"- Cross-skill probe `{p['task']}`: the best parent is `{p['parent']}` at "
                     f"{p['parent_score'] * 100:.1f} on test. "
                     + (f"Merges that beat every parent on it: {', '.join(winners)}." if winners else
                        "No searcher found a merge (among those scored on test) that beats every parent on it."))
    lines.append("")

    if "probe" in v:
        p = v["probe"]
        lines += [f"## Cross-skill probe `{p['task']}` (test)", "",
                  f"The pick's score, and the best score among all merges of the run scored on test (its pick and "
                  f"test front: chosen on validation, so the best of them is selected on test and optimistic). "
                  f"Best parent: `{p['parent']}` {p['parent_score'] * 100:.1f}.", ""]
        lines += _table(["searcher", "pick", "best merge scored on test", "runs beating every parent"],
                        [[f"`{n}`", spread(f["pick"], 100), spread(f["best"], 100), f"{f['beats']} / {f['runs']}"]
                         for n, f in p["found"].items()])
        lines.append("")

    lines += ["## Every search run", "",
              "Estimated: the estimator's validation mean of the pick during the search; validation: the same "
              "merge on the full split. s / candidate: mean worker seconds (merge + estimator evaluation) "
              "per distinct candidate.", ""]
    run_rows = []
    for row in results["rows"]:
        if row["kind"] != "search":
            continue
        pick = row["pick"]
        run_rows.append([
            f"`{row['searcher']}`", str(row["seed"]), str(pick["id"]),
            f"{mean_of(pick['estimated_val'], tasks) * 100:.1f}",
            f"{mean_of(pick['val'], tasks) * 100:.1f}" if pick.get("val") else "–",
            f"{pick_mean(row, tasks) * 100:.1f}" if pick.get("test") else "–",
            f"{row['front_size']} → {len(row['front'])}", f"{row['hv_test']:.4f}",
            f"{row['evaluations']} ({row['unique']} distinct, {row['errors']} failed)",
            "–" if row["candidate_seconds"] is None else f"{row['candidate_seconds']:.1f}",
            f"{row['search_seconds'] / 60:.1f}", pick["summary"]])
    lines += _table(["searcher", "seed", "pick id", "estimated val", "val", "test", "front (val → test-scored)",
                     "test HV", "candidates", "s / candidate", "wall min", "pick recipe"], run_rows)

    lines += ["", "## Grid baselines (full validation split; test where scored)", ""]
    for name, group in by.items():
        if group[0]["kind"] != "grid":
            continue
        points = group[0]["grid"]
        lines += [f"`{name}`:", ""]
        lines += _table(["point", *map(label, tasks), "val mean", "test mean"],
                        [[f"**{g['label']}**" if g["recipe_hash"] == group[0]["pick"]["recipe_hash"] else g["label"],
                          *(f"{g['val'][t] * 100:.1f}" for t in tasks), f"{mean_of(g['val'], tasks) * 100:.1f}",
                          f"{mean_of(g['test'], tasks) * 100:.1f}" if g.get("test") else "–"] for g in points])
        lines.append("")
    lines += ["![test fronts](fronts.png)", "", "![pick accuracy](accuracy.png)", ""]
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------------


def fronts_figure(results: Mapping[str, Any]):
    """Test scores of every merge scored on test, per pair of tasks: searches as dots, grids as
    squares, picks as stars, each parent as a labelled black cross."""
    from itertools import combinations

    from matplotlib.figure import Figure

    tasks = results["tasks"]
    pairs = list(combinations(tasks, 2))[:6]
    by = groups(results)
    columns = min(3, len(pairs))
    rows = -(-len(pairs) // columns)
    figure = Figure(figsize=(4.2 * columns + 1.8, 4 * rows), layout="constrained")
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    colour = colours(list(by))
    for ax, (x, y) in zip(axes, pairs):
        for name, group in by.items():
            if group[0]["kind"] == "parent":
                p = group[0]["pick"]["test"]
                ax.scatter([p[x]], [p[y]], s=40, marker="x", c="black")
                ax.annotate(name.removeprefix("expert:"), (p[x], p[y]), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
                continue
            members = [m for r in group for m in tested(r)]
            picks = [r["pick"] for r in group if r["pick"].get("test")]
            ax.scatter([m["test"][x] for m in members], [m["test"][y] for m in members], s=16, alpha=0.55,
                       color=colour[name], marker="s" if group[0]["kind"] == "grid" else "o", label=name)
            ax.scatter([p["test"][x] for p in picks], [p["test"][y] for p in picks], s=110, marker="*",
                       color=colour[name], edgecolors="black", linewidths=0.6)
        ax.set(xlabel=f"{label(x)} test accuracy", ylabel=f"{label(y)} test accuracy", xlim=(-0.03, 1.03),
               ylim=(-0.03, 1.03))
        ax.grid(alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_axis_off()
    figure.legend(*axes[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    figure.suptitle("merges scored on test: test fronts (all seeds), stars = best-on-validation picks, "
                    "x = base and experts", fontsize=10)
    return figure


def accuracy_figure(results: Mapping[str, Any]):
    """The picks' test accuracy per task, mean and probe: one bar per searcher, sd as error bars."""
    import numpy as np
    from matplotlib.figure import Figure

    tasks, probes = results["tasks"], results.get("probe_tasks") or []
    columns = [*tasks, "mean", *probes]
    by = groups(results)
    figure = Figure(figsize=(max(8, 1.6 * len(columns)), 4.5), layout="constrained")
    ax = figure.add_subplot()
    width = 0.85 / len(by)
    colour = colours(list(by))
    for i, (name, group) in enumerate(by.items()):
        values = []
        for column in columns:
            picks = [r["pick"]["test"] for r in group if r["pick"].get("test")]
            seeds = [mean_of(p, tasks) if column == "mean" else p[column] for p in picks]
            values.append((np.mean(seeds) if seeds else 0.0, np.std(seeds, ddof=1) if len(seeds) > 1 else 0.0))
        ax.bar(np.arange(len(columns)) + i * width, [m * 100 for m, _ in values], width,
               yerr=[sd * 100 for _, sd in values], label=name, color=colour[name], capsize=2)
    ax.set_xticks(np.arange(len(columns)) + width * (len(by) - 1) / 2,
                  [label(c) + (" (probe)" if c in probes else "") for c in columns])
    ax.set(ylabel="test accuracy (%)", title="best-on-validation pick, held-out test (mean ± sd over seeds)")
    ax.legend(fontsize=7, ncol=2)
    ax.grid(axis="y", alpha=0.3)
    return figure


def render(results: Mapping[str, Any], out: Path) -> list[Path]:
    from evomerge.run import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    written = [out / "results.md"]
    atomic_write(written[0], markdown(results))
    for name, figure in (("fronts.png", fronts_figure(results)), ("accuracy.png", accuracy_figure(results))):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110)
        atomic_write(out / name, buffer.getvalue())
        written.append(out / name)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=HERE, help="folder holding results.json")
    args = parser.parse_args()
    results = json.loads((args.out / "results.json").read_text())
    for path in render(results, args.out):
        print(path)


if __name__ == "__main__":
    main()
