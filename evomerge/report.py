"""What a run found, read from its folder: the Pareto front, picks from it, tables and plots.

Everything here reads the run folder only, never a live search, so it works on a finished run
and on one still going: the front is recomputed from ``archive.jsonl`` (which can be ahead of
``pareto.json``), and held-out test scores are taken from ``pareto.json`` where the search has
measured them. A torn last archive line (a search killed mid-write) is skipped.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge import front as fronts
from evomerge.errors import UserError
from evomerge.fitness.objectives import Objective, hypervolume
from evomerge.layer_path import plan_from_dict
from evomerge.run import ArchiveEntry, RunDir, atomic_write

_ID = re.compile(r"^\d+$")


# --- the front ------------------------------------------------------------------------------------


def objectives(run: RunDir) -> list[Objective]:
    """The run's objectives, from ``pareto.json`` (written after every generation); empty before
    the first generation finishes, because without directions no entry can be said to beat
    another."""
    pareto = run.read_json(run.pareto_path)
    listed = pareto.get("objectives") if isinstance(pareto, dict) else None
    if not isinstance(listed, list) or not all(isinstance(o, dict) for o in listed):
        return []
    try:
        return [Objective.from_dict(o) for o in listed]
    except (KeyError, TypeError, ValueError):
        return []


def front(run: RunDir) -> list[ArchiveEntry]:
    """The run's current Pareto front, computed from the archive itself."""
    return fronts.front(run.archive(), objectives(run))


def pick(run: RunDir, spec: str) -> ArchiveEntry:
    """The entry ``spec`` names: ``knee``, ``best:<objective>`` (``best:mean`` also where the
    objectives are task accuracies) or an archive id."""
    spec = spec.strip()
    if _ID.match(spec):
        return _by_id(run, int(spec))
    objs = objectives(run)
    if not objs:
        raise UserError(f"{run.root} has no finished generation yet, so no front to pick "
                        f"{spec!r} from; pick an archive id or wait for the first generation")
    entries = run.archive()
    members = fronts.front(entries, objs)
    if spec == "knee":
        return fronts.knee(members, objs)
    if spec.startswith("best:"):
        name = spec.removeprefix("best:")
        by_name = {o.name: o for o in objs}
        if name == "mean" and fronts.averageable(objs) and members:
            # The tasks' mean (or the mean objective): what a single-objective search was told to
            # maximize; the best verified candidate where the search verified any.
            return fronts.pick_mean(entries, objs)
        if name not in by_name:
            raise UserError(f"unknown objective {name!r} in --pick {spec}; objectives of this run: "
                            f"{', '.join(by_name)}")
        if not members:
            raise UserError(f"{run.root} has no successful evaluation yet; nothing to pick")
        return fronts.best(by_name[name], members)
    raise UserError(f"--pick {spec!r} is not valid; use knee, best:<objective> or an archive id")


def pick_label(spec: str) -> str:
    """A folder name for a pick: ``knee``, ``best-<objective>`` or ``id-<n>``."""
    spec = spec.strip()
    if _ID.match(spec):
        return f"id-{int(spec)}"
    return re.sub(r"[^\w.-]+", "-", spec.replace(":", "-"))


def _by_id(run: RunDir, wanted: int) -> ArchiveEntry:
    entries = run.archive()
    found = next((e for e in entries if e.id == wanted), None)
    if found is None:
        ids = sorted(e.id for e in entries)
        have = f"ids {ids[0]}-{ids[-1]}" if ids else "no entries yet"
        raise UserError(f"archive id {wanted} is not in {run.archive_path} ({have}); "
                        f"or pick knee or best:<objective>")
    if found.error is not None:
        reason = (found.error.strip().splitlines() or ["error"])[0]
        raise UserError(f"archive id {wanted} failed ({reason}); pick an entry without an error, "
                        f"e.g. knee")
    return found


# --- summary --------------------------------------------------------------------------------------


def held_out_scores(run: RunDir) -> dict[str, dict[str, float]]:
    """Held-out test scores by recipe hash, for the members ``pareto.json`` has them for."""
    pareto = run.read_json(run.pareto_path)
    members = pareto.get("members", []) if isinstance(pareto, dict) else []
    verified = pareto.get("verified", []) if isinstance(pareto, dict) else []
    return {m["recipe_hash"]: m["test_scores"] for m in [*members, *verified]
            if isinstance(m, dict) and m.get("test_scores") and "recipe_hash" in m}


def summary(run: RunDir) -> dict[str, Any]:
    """The front and the run's progress as plain data (what ``inspect --json`` prints)."""
    objs = objectives(run)
    entries = run.archive()
    valid = fronts.competing(entries, objs)
    members = fronts.front(valid, objs)
    tests = held_out_scores(run)
    chosen = fronts.knee(members, objs).id if members else None
    top = fronts.pick_mean(valid, objs).id if valid and fronts.averageable(objs) else None

    def row(e: ArchiveEntry) -> dict[str, Any]:
        return {"id": e.id, "generation": e.generation, "recipe_hash": e.recipe_hash,
                "objectives": e.objectives, "scores": e.scores,
                "test_scores": tests.get(e.recipe_hash), "recipe": _recipe_summary(e),
                "knee": e.id == chosen, "best_mean": e.id == top, "fidelity": e.fidelity}
    history = run.history()
    return {
        "run": str(run.root),
        "references": references(run),
        "objectives": [o.to_dict() for o in objs],
        "tasks": task_names(run, entries),
        "front": [row(e) for e in members],
        "knee": chosen,
        "verified": [row(e) for e in fronts.verified(valid, objs)],
        "best_mean": top,
        "progress": {
            "evaluations": len(entries),
            "unique": len({e.recipe_hash for e in entries}),
            "errors": sum(e.error is not None for e in entries),
            "generations": len(history),
            "best": fronts.best_values(objs, valid),
            "hypervolume": hypervolume(objs, [e.objectives for e in members]) if objs else None,
            "history": history,
            "torn_lines": run.dropped_archive_lines(),
        },
    }


def references(run: RunDir) -> list[dict[str, Any]]:
    """Base, experts and random merges of the probe population, on the full validation split:
    the yardstick a front is read against (is it better than the experts?)."""
    probes = run.read_json(run.probes_path)
    rows = []
    for probe in (probes or {}).get("probes", []):
        scores = probe.get("evaluation", {}).get("scores", {})
        rows.append({"name": probe["name"], "scores": scores,
                     "mean": float(np.mean(list(scores.values()))) if scores else None})
    return rows


def _recipe_summary(entry: ArchiveEntry) -> str:
    try:
        return plan_from_dict(entry.recipe).summary()
    except UserError as error:
        return f"(unreadable recipe: {error})"


def task_names(run: RunDir, entries: Sequence[ArchiveEntry]) -> list[str]:
    """Task names in the config's order, else in the order the archive first scores them."""
    listed = run.config().get("tasks")
    if isinstance(listed, list) and all(isinstance(t, str) for t in listed):
        return list(listed)
    return list(dict.fromkeys(t for e in entries for t in e.scores))


def render(data: dict[str, Any]) -> str:
    """``summary`` as text: the front (knee marked *), the verified candidates (best:mean marked
    +), then progress per generation."""
    objs = [o["name"] for o in data["objectives"]]
    tasks = data["tasks"]
    verified = data.get("verified", [])
    table = _candidates(data["front"], tasks, objs)
    progress = data["progress"]
    lines = [f"run {data['run']}"]
    if not objs:
        lines.append("objectives not known yet (no generation finished); no front to show")
    else:
        directions = ", ".join(f"{o['name']} ({o['direction']})" for o in data["objectives"])
        lines += [f"Pareto front: {len(table[1])} of {progress['unique']} distinct recipes "
                  f"(* knee, + best:mean); objectives {directions}", _table(*table)]
    lines.append(f"evaluations {progress['evaluations']} ({progress['errors']} failed), "
                 f"generations {progress['generations']}, hypervolume "
                 f"{_num(progress['hypervolume'])}, best "
                 + (", ".join(f"{k} {_num(v)}" for k, v in progress["best"].items()) or "-"))
    if verified:
        header, rows = _candidates(verified, tasks, objs)
        lines += ["", f"scored on every validation item: {len(rows)} candidate(s), best mean first "
                      f"(+ best:mean, what `export --pick best:mean` takes)", _table(header, rows)]
    if data.get("references"):
        rows = [[r["name"], *(_num(r["scores"].get(t)) for t in tasks), _num(r["mean"])]
                for r in data["references"]]
        lines += ["", "reference models (full validation split)", _table(["model", *tasks, "mean"], rows)]
    if progress["torn_lines"]:
        lines.append(f"skipped {progress['torn_lines']} torn archive line(s)")
    if progress["history"]:
        rows = [[str(h.get("generation")), str(h.get("evaluations")), _num(h.get("hypervolume")),
                 ", ".join(f"{k} {_num(v)}" for k, v in (h.get("best") or {}).items()),
                 _num(h.get("candidates_per_min"), ".1f")] for h in progress["history"]]
        lines += ["", "progress per generation",
                  _table(["generation", "evaluations", "hypervolume", "best", "cand/min"], rows)]
    return "\n".join(lines)


def _candidates(rows: Sequence[dict[str, Any]], tasks: Sequence[str], objs: Sequence[str]
                ) -> tuple[list[str], list[list[str]]]:
    """Header and cells of a candidate table: id (* knee, + best:mean), generation, the items
    scored where any row was verified, objectives that are not a task, validation (and test) per
    task, the recipe."""
    extra = [o for o in objs if o not in tasks]  # objectives that are not a task's score
    has_test = any(r["test_scores"] for r in rows)
    raced = any(r.get("fidelity") == "full" for r in rows)
    header = ["id", "gen", *(["val items"] if raced else []), *extra]
    for task in tasks:
        header += [f"{task} val"] + ([f"{task} test"] if has_test else [])
    header.append("recipe")
    table = []
    for row in rows:
        marks = ("*" if row["knee"] else "") + ("+" if row.get("best_mean") else "")
        cells = [f"{row['id']}{marks}", str(row["generation"])]
        cells += [("all" if row.get("fidelity") == "full" else "estimate")] if raced else []
        cells += [_num(row["objectives"].get(o)) for o in extra]
        for task in tasks:
            cells.append(_num(row["scores"].get(task, row["objectives"].get(task))))
            if has_test:
                cells.append(_num((row["test_scores"] or {}).get(task)))
        cells.append(row["recipe"])
        table.append(cells)
    return header, table


def _num(value: Any, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


# --- plots ----------------------------------------------------------------------------------------


def write_plots(run: RunDir) -> list[Path]:
    """Write ``plots/pareto.png`` and ``plots/hypervolume.png``; return their paths. Files are
    replaced atomically, so a viewer refreshing them during a run never reads half a PNG."""
    objs = objectives(run)
    valid = fronts.competing(run.archive(), objs)
    members = fronts.front(valid, objs)
    run.plots.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in (("pareto.png", _pareto_figure(objs, valid, members)),
                         ("hypervolume.png", _hypervolume_figure(run.history()))):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        atomic_write(run.plots / name, buffer.getvalue())
        written.append(run.plots / name)
    return written


def _pareto_figure(objs: Sequence[Objective], valid: Sequence[ArchiveEntry],
                   members: Sequence[ArchiveEntry]):
    """2 objectives: one scatter; more: pairwise panels; 1: objective by evaluation id."""
    from matplotlib.figure import Figure

    if not valid:
        return _message("no successful evaluation yet" if objs else
                        "objectives not known yet (no generation finished)")
    chosen = fronts.knee(members, objs)
    value = lambda entries, o: [e.objectives[o.name] for e in entries]
    if len(objs) == 1:
        figure = Figure(figsize=(6, 4.5), layout="constrained")
        ax = figure.add_subplot()
        (o,) = objs
        ids = [e.id for e in valid]
        running = (np.maximum if o.direction == "max" else np.minimum).accumulate(value(valid, o))
        ax.scatter(ids, value(valid, o), s=12, c="0.65", label="evaluations")
        ax.step(ids, running, where="post", c="tab:blue", label="best so far")
        ax.scatter([chosen.id], [chosen.objectives[o.name]], s=90, marker="*", c="tab:red",
                   label=f"best (id {chosen.id})", zorder=3)
        ax.set(xlabel="evaluation id", ylabel=f"{o.name} ({o.direction})")
        ax.legend(fontsize=8)
        return figure
    n = len(objs)
    if n == 2:
        figure = Figure(figsize=(5.5, 5.5), layout="constrained")
        panels = [(figure.add_subplot(), objs[0], objs[1])]
    else:  # row i, column j plots objective i against objective j; the diagonal, histograms
        figure = Figure(figsize=(2.6 * n, 2.6 * n), layout="constrained")
        grid = figure.subplots(n, n, squeeze=False)
        panels = [(grid[i][j], objs[j], objs[i]) for i in range(n) for j in range(n)]
    for ax, x, y in panels:
        ax.tick_params(labelsize=7)
        if x == y:
            bins = np.histogram_bin_edges(value(valid, x), bins=20)
            ax.hist(value(valid, x), bins=bins, color="0.65")
            ax.hist(value(members, x), bins=bins, color="tab:blue")
            ax.set_xlabel(f"{x.name} ({x.direction}): count", fontsize=8)
            continue
        ordered = sorted(members, key=lambda e: e.objectives[x.name])
        ax.scatter(value(valid, x), value(valid, y), s=10, c="0.7", label="evaluations")
        ax.scatter(value(ordered, x), value(ordered, y), s=22, c="tab:blue", label="front")
        if n == 2:  # with two objectives the front is a staircase worth connecting
            ax.plot(value(ordered, x), value(ordered, y), c="tab:blue", lw=0.8)
        ax.scatter([chosen.objectives[x.name]], [chosen.objectives[y.name]], s=110, marker="*",
                   c="tab:red", label=f"knee (id {chosen.id})", zorder=3)
        ax.set_xlabel(f"{x.name} ({x.direction})", fontsize=8)
        ax.set_ylabel(f"{y.name} ({y.direction})", fontsize=8)
    panels[0 if n == 2 else n][0].legend(fontsize=7)  # the first scatter panel
    figure.suptitle(f"{len(members)} non-dominated of {len(valid)} distinct recipes", fontsize=10)
    return figure


def _hypervolume_figure(history: Sequence[dict[str, Any]]):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    points = [(h["generation"], h["hypervolume"]) for h in history
              if h.get("generation") is not None and h.get("hypervolume") is not None]
    if not points:
        return _message("no generation finished yet")
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    x, y = zip(*points)
    ax.plot(x, y, marker="o", c="tab:blue")
    ax.set(xlabel="generation", ylabel="hypervolume", title="hypervolume of the front")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return figure


def _message(text: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    return figure


# --- export ---------------------------------------------------------------------------------------


def export_pick(run: RunDir, spec: str, out_dir: str | Path | None = None, *,
                device: str = "cpu", force: bool = False) -> tuple[ArchiveEntry, Path]:
    """Materialize the picked recipe from its own base and experts and export it (model folder,
    recipe.yaml, mergekit.yaml) to ``out_dir`` (default: ``RUN/exports/<pick label>``); the
    model card lists its objectives and its validation and test scores. An existing folder is
    refused before anything loads, unless ``force``."""
    import torch

    from evomerge.merge.engine import Merger
    from evomerge.merge.export import check_destination, export
    from evomerge.pool import ModelPool

    entry = pick(run, spec)
    out = check_destination(out_dir if out_dir is not None else run.export_dir(pick_label(spec)), force)
    recipe = plan_from_dict(entry.recipe)
    dtype = getattr(torch, recipe.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise UserError(f"recipe dtype {recipe.dtype!r} is not a torch dtype (e.g. float32, bfloat16)")
    pool = ModelPool(recipe.base, {n: recipe.expert_refs.get(n, n) for n in recipe.experts},
                     device=device)
    merger = Merger(pool, device=device, dtype=dtype)
    tests = held_out_scores(run).get(entry.recipe_hash) or {}
    scores = {**{f"{t} (validation)": v for t, v in entry.scores.items()},
              **{f"{t} (test)": v for t, v in tests.items()},
              **{o: v for o, v in entry.objectives.items() if o not in entry.scores}}
    return entry, export(recipe, merger, out, scores=scores, provenance=provenance(entry), force=force)


def provenance(entry: ArchiveEntry) -> str | None:
    """How a candidate no algorithm asked for was made, for its model card: enough to redo it."""
    refine = (entry.origin or {}).get("refine")
    if not refine:
        return None
    return (f"**Refined** from archive entry {entry.origin['parent']} by {refine['steps']} Adam steps "
            f"(learning rate {refine['lr']:g}, {refine['signal']} signal, seed {refine['seed']}) on per-block "
            f"expert weights; the recipe above is the result, so the merge redoes without the steps.")
