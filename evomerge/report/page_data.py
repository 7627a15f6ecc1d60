"""What the run report page shows, as plain data read from the run folder: the front in the
groups its panel draws, progress, the picks with their recipes per layer, estimates against every
item, kinship. Plain data so that tests check it without a browser, and so the page's figures
(``figures``) and tables (``html``) read one model.

Speed: the search rewrites the page after every generation, so this stays cheap (a
2,000-candidate archive in well under a second, ``experiments/bench_report.py``): hover recipes are
summarized from the archive's dicts directly (``candidate_line``; validating each through
``Recipe.from_dict`` costs 2.4 ms, 5 s for 2,000 candidates), and only the few picks are read as
recipes for their heatmaps.
"""

from __future__ import annotations

import html
import math
import shlex
from datetime import datetime, timezone
from typing import Any, Iterable, Mapping, Sequence

from evomerge import front as fronts
from evomerge.errors import UserError
from evomerge.fitness.objectives import Objective
from evomerge.layer_path import KIND, candidate_line
from evomerge.recipe import COMPONENTS, Recipe
from evomerge.report.candidates import FIDELITY_LABELS, candidate_row, number
from evomerge.report.run_data import held_out_scores, objectives, task_names
from evomerge.run import ArchiveEntry, RunDir

PARENT_KINDS = ("base", "experts", "grid")  # how the front marks the models a run starts from
DIGITS = 4  # enough for accuracies on a few hundred items; what keeps 2,000 candidates small


def rounded(value: Any) -> float | None:
    """A finite number rounded for the page, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(float(value), DIGITS)


def parent_kind(entry: ArchiveEntry) -> str | None:
    """Which of the models a run starts from (generation -1) ``entry`` is: ``base``, ``experts``
    (one expert alone) or ``grid`` (a uniform merge, ``space.uniform``); None for a searched one.
    Read from the recipe, since the archive does not name its parents. (A parent verified on every
    item is a later entry of the same recipe: ``front_view`` goes by the recipe's hash.)"""
    if entry.generation != -1:
        return None
    recipe = entry.recipe
    if recipe.get("kind") == KIND:  # a source model whole
        slices = recipe.get("slices") or [{}]
        source = slices[0].get("source")
        return "base" if source == "base" else "experts" if source in recipe.get("experts", []) else "grid"
    try:
        configs = [g["config"] for g in recipe["groups"]] + [recipe["outside"]]
        weights = {tuple(sorted((n, p.get("weight", 0.0)) for n, p in c.get("experts", {}).items()))
                   for c in configs}
    except (KeyError, TypeError, AttributeError):
        return "grid"
    if len(weights) != 1:
        return "grid"
    values = [w for _, w in next(iter(weights))]
    if all(w == 0 for w in values):
        return "base"
    if sorted(values)[-1] == 1 and all(w == 0 for w in sorted(values)[:-1]):
        return "experts"
    return "grid"


def parent_label(entry: ArchiveEntry) -> str:
    """``base``, ``expert add`` or ``uniform 0.5`` (the grid's weight)."""
    kind = parent_kind(entry)
    recipe = entry.recipe
    if kind == "base":
        return "base"
    if recipe.get("kind") == KIND:
        return f"{(recipe.get('slices') or [{}])[0].get('source', '?')} (whole)"
    weights = (recipe.get("outside") or {}).get("experts", {})
    if kind == "experts":
        return "expert " + next((n for n, p in weights.items() if p.get("weight") == 1), "?")
    first = next(iter(weights.values()), {}).get("weight")
    return f"uniform {first:g}" if isinstance(first, (int, float)) else "uniform"


def recipe_view(entry: ArchiveEntry) -> dict[str, Any]:
    """What a pick's heatmap shows, dispatched on the candidate's kind: a recipe as each
    expert's parameters per layer (columns: blocks, then ``outside``) with the method per layer;
    a layer path as its steps (which source's block, at which entry scale); anything else as a
    note, so a candidate of a kind this page does not know never breaks the page."""
    kind = entry.recipe.get("kind")
    if kind == KIND:
        return _path_view(entry.recipe)
    if kind is not None:
        return {"kind": "note", "note": f"no recipe view for candidates of kind {kind!r}"}
    try:
        recipe = Recipe.from_dict(entry.recipe)
    except (UserError, AttributeError, KeyError, TypeError, ValueError) as error:
        return {"kind": "note", "note": f"no recipe view: unreadable recipe ({error})"}
    components = ["all", *(c for c in COMPONENTS[1:] if any(g.component == c for g in recipe.groups))]
    columns = [str(layer) for layer in range(recipe.num_layers)] + ["outside"]
    layers: list[int | None] = [*range(recipe.num_layers), None]
    rows, z, methods = [], [], []
    for component in components:
        configs = [recipe.config_for(layer, component) for layer in layers]
        params = list(dict.fromkeys(k for c in configs for p in c.experts.values() for k in p))
        params.sort(key=lambda k: (k != "weight", k))
        for param in params:
            for expert in recipe.experts:
                rows.append(f"{expert} {param}" + ("" if component == "all" else f" · {component}"))
                z.append([rounded(c.experts[expert].get(param)) if expert in c.experts else None for c in configs])
        methods.append({"component": component, "methods": [c.method for c in configs],
                        "globals": [", ".join(f"{k}={v:g}" for k, v in c.params.items() if isinstance(v, (int, float)))
                                    for c in configs]})
    return {"kind": "recipe", "columns": columns, "rows": rows, "z": z, "methods": methods}


def _path_view(recipe: Mapping[str, Any]) -> dict[str, Any]:
    """A layer path's steps: for each block of the path, which source it comes from and the
    entry scale of its slice; read from the dict's ``slices`` so a path from a newer evomerge
    still shows as long as it has them."""
    slices = recipe.get("slices")
    if not isinstance(slices, list) or not slices:
        return {"kind": "note", "note": "no recipe view: this path lists no slices"}
    try:
        steps = [(str(s["source"]), int(block), float(s.get("scale", 1.0)))
                 for s in slices for block in range(int(s["start"]), int(s["end"]))]
    except (KeyError, TypeError, ValueError):
        return {"kind": "note", "note": "no recipe view: this path's slices are unreadable"}
    known = ["base", *recipe.get("experts", []), "merge"]
    sources = sorted({s for s, _, _ in steps}, key=lambda s: (known.index(s) if s in known else len(known), s))
    z = [[rounded(scale) if source == s else None for s, _, scale in steps] for source in sources]
    blocks = [[block if source == s else None for s, block, _ in steps] for source in sources]
    return {"kind": "path", "columns": [str(i) for i in range(len(steps))], "rows": sources, "z": z,
            "blocks": blocks, "outside": str(recipe.get("outside", "base")), "summary": candidate_line(recipe)}


# --- what the page shows, as plain data -------------------------------------------------------------


def report_data(run: RunDir, entries: Iterable[ArchiveEntry] | None = None) -> dict[str, Any]:
    """Everything the page shows, from the run folder (``entries``: the archive, where the caller
    holds it already, as the search does)."""
    objs = objectives(run)
    entries = list(run.archive() if entries is None else entries)
    tasks = task_names(run, entries)
    valid = fronts.competing(entries, objs)
    members = fronts.front(valid, objs)
    named = fronts.named_picks(entries, objs)
    roles = {entry.id: specs for entry, specs in named}
    tests = held_out_scores(run)
    history = run.history()
    command = f"evomerge export {shlex.quote(str(run.root))} --pick"
    picks = []
    for entry, specs in named:
        row = candidate_row(entry, tests.get(entry.recipe_hash), specs)
        picks.append({**row, "objectives": {o.name: rounded(entry.objectives.get(o.name)) for o in objs},
                      "scores": {t: rounded(v) for t, v in entry.scores.items()},
                      "test_scores": {t: rounded(v) for t, v in (row["test_scores"] or {}).items()} or None,
                      "export": f"{command} {specs[0]}", "view": recipe_view(entry)})
    return {
        "run": str(run.root),
        "written": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "objectives": [o.to_dict() for o in objs],
        "tasks": tasks,
        "counts": {"evaluations": len(entries), "distinct": len({e.recipe_hash for e in entries}),
                   "errors": sum(e.error is not None for e in entries), "generations": len(history),
                   "front": len(members), "verified": sum(e.fidelity == "full" for e in valid)},
        "export": command,
        "front": front_view(entries, valid, members, objs, roles),
        "progress": progress_view(history, objs),
        "picks": picks,
        "estimates": estimate_view(entries, tasks),
        "kinship": kinship_view(run),
    }


def front_view(entries: Sequence[ArchiveEntry], valid: Sequence[ArchiveEntry], members: Sequence[ArchiveEntry],
               objs: Sequence[Objective], roles: Mapping[int, list[str]]) -> dict[str, Any]:
    """The competing candidates in groups the front panel draws apart: ``evaluated`` (dominated),
    ``front``, the run's starting points (``base``, ``experts``, ``grid``), ``picks``; each group
    with ids, objective values and hover text (id, generation, scores at each fidelity, method,
    recipe, and for a pick its specs). With one objective, ``best`` is the running best by id."""
    on_front = {e.id for e in members}
    by_fidelity: dict[str, dict[str, ArchiveEntry]] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        if entry.error is None and entry.cached_from is None:
            by_fidelity.setdefault(entry.recipe_hash, {}).setdefault(entry.fidelity, entry)
    parents = {e.recipe_hash: e for e in sorted(entries, key=lambda e: e.id) if e.generation == -1}
    names = [o.name for o in objs]
    groups: dict[str, dict[str, Any]] = {g: {"id": [], "values": {n: [] for n in names}, "hover": []}
                                         for g in ("evaluated", "front", *PARENT_KINDS, "picks")}
    for entry in valid:
        parent = parents.get(entry.recipe_hash)
        hover = _hover(entry, by_fidelity.get(entry.recipe_hash, {}), names, roles.get(entry.id), parent)
        chosen = ["front" if entry.id in on_front else "evaluated"]
        chosen += [kind] if parent is not None and (kind := parent_kind(parent)) else []
        chosen += ["picks"] if entry.id in roles else []
        for name in chosen:
            group = groups[name]
            group["id"].append(entry.id)
            group["hover"].append(hover)
            for n in names:
                group["values"][n].append(rounded(entry.objectives[n]))
    best: dict[str, Any] = {"id": [], "values": {n: [] for n in names}}
    if len(objs) == 1:
        (o,) = objs
        running = None
        for entry in valid:
            value = entry.objectives[o.name]
            if running is None or o.minimized(value) < o.minimized(running):
                running = value
            best["id"].append(entry.id)
            best["values"][o.name].append(rounded(running))
    return {"objectives": [o.to_dict() for o in objs], "groups": groups, "best": best}


def _hover(entry: ArchiveEntry, versions: Mapping[str, ArchiveEntry], names: Sequence[str],
           specs: Sequence[str] | None, parent: ArchiveEntry | None) -> str:
    lines = [f"id {entry.id} · generation {entry.generation}" + (f" · {parent_label(parent)}" if parent else "")]
    for fidelity in fronts.FIDELITIES:
        version = versions.get(fidelity)
        if version is None:
            continue
        label = FIDELITY_LABELS[fidelity]
        values = version.scores or {n: version.objectives.get(n) for n in names}
        lines.append(f"{label} (id {version.id}): " + " ".join(f"{t} {number(v)}" for t, v in values.items()))
    lines.append(candidate_line(entry.recipe))
    if specs:
        lines.append("pick: " + ", ".join(specs))
    return "<br>".join(html.escape(line, quote=False) for line in lines)


def progress_view(history: Sequence[Mapping[str, Any]], objs: Sequence[Objective]) -> dict[str, Any]:
    """Per finished generation: the best value on each objective, the front's hypervolume and
    candidates per minute, from history.jsonl."""
    rows = [h for h in history if isinstance(h.get("generation"), int)]
    names = list(dict.fromkeys([o.name for o in objs] + [k for h in rows for k in (h.get("best") or {})]))
    return {"generation": [h["generation"] for h in rows],
            "evaluations": [h.get("evaluations") for h in rows],
            "best": {n: [rounded((h.get("best") or {}).get(n)) for h in rows] for n in names},
            "hypervolume": [rounded(h.get("hypervolume")) for h in rows],
            "rate": [rounded(h.get("candidates_per_min")) for h in rows]}


def estimate_view(entries: Sequence[ArchiveEntry], tasks: Sequence[str]) -> dict[str, Any]:
    """Candidates scored both ways, the estimator's items and every validation item (racing
    promotions, the end's verification): per task their pairs of scores, and how far apart.
    Only archive pairs count: the probe population also has full-split scores, but the estimators
    are fitted on it, so its estimates would flatter the estimator."""
    first: dict[str, dict[str, ArchiveEntry]] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        if entry.error is None:
            first.setdefault(entry.recipe_hash, {}).setdefault(entry.fidelity, entry)
    pairs = [(v["estimate"], v["full"]) for v in first.values() if "estimate" in v and "full" in v]
    out: dict[str, Any] = {"tasks": {}, "pairs": len(pairs)}
    for task in tasks:
        ids, est, full = [], [], []
        for estimate, verified in pairs:
            a, b = rounded(estimate.scores.get(task)), rounded(verified.scores.get(task))
            if a is not None and b is not None:
                ids.append(verified.id)
                est.append(a)
                full.append(b)
        if ids:
            gaps = [x - y for x, y in zip(est, full)]
            out["tasks"][task] = {"id": ids, "estimate": est, "full": full,
                                  "mae": rounded(sum(map(abs, gaps)) / len(gaps)), "bias": rounded(sum(gaps) / len(gaps))}
    return out


def kinship_view(run: RunDir) -> dict[str, Any]:
    """The experts' kinship (cosine of task vectors, and top singular subspace overlap) as
    ``evomerge report RUN --kinship`` or ``evomerge pool ... --json`` stored it in the run folder;
    a note where it is not there, since computing it needs the models, which a report never loads."""
    data = run.read_json(run.kinship_path)
    try:
        experts = [str(e) for e in data["experts"]]
        cosine = [[rounded(v) for v in row] for row in data["cosine"]]
        if len(cosine) != len(experts) or any(len(row) != len(experts) for row in cosine):
            raise ValueError
        overlap = data.get("overlap")
        overlap = [[rounded(v) for v in row] for row in overlap] if isinstance(overlap, list) else None
    except (KeyError, TypeError, ValueError):
        return {"note": f"{run.kinship_path.name} is not in the run folder: `evomerge report {run.root} --kinship` "
                        f"computes the experts' kinship once from their weights"}
    return {"experts": experts, "cosine": cosine, "overlap": overlap, "chance": rounded(data.get("overlap_chance"))}
