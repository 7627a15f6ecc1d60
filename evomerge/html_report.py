"""The run report: one self-contained HTML page to look at a run and point at what to export.

``evomerge report RUN`` writes ``RUN/report.html``, and the search rewrites it after every
generation, so a browser refreshed during a run shows it as it goes. Like ``inspect`` it reads the
run folder only (config.yaml, archive.jsonl, history.jsonl, pareto.json, probes.json and, where
someone computed it, kinship.json), never a model and never a live search.

Plotted with plotly.js, inlined once for the whole page: one file that opens offline (no CDN),
with hover, zoom and click on every panel. Chosen over altair/vega-lite because plotly.js ships
inside the Python package (one ~4.8 MB bundle, nothing to fetch), while altair inlines its three
JavaScript bundles only through a further package (vl-convert) and embeds each chart's data in
its own spec, where pairwise panels want one copy of the data shared by all of them.

The page is data plus a little JavaScript. Every figure is a plain plotly spec built here, in
Python (so tests check it without a browser); the large arrays (objective values and hover text
of every candidate) are stored once in the page's data and referenced from the figures as
``{"$ref": "front/groups/evaluated/values/zoo_add"}``, because a four-objective run draws each
candidate in six pairwise panels, and copying its hover text six times would multiply the file.

Speed: the search calls :func:`write_report` after every generation, so building a page must stay
cheap (a 2,000-candidate archive in well under a second, ``experiments/bench_report.py``): hover
recipes are summarized from the archive's dicts directly (validating each through
``Recipe.from_dict`` costs 2.4 ms, 5 s for 2,000 candidates), and only the few picks are read as
recipes for their heatmaps.
"""

from __future__ import annotations

import html
import json
import math
import shlex
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from evomerge import front as fronts
from evomerge.errors import UserError
from evomerge.fitness.objectives import Objective
from evomerge.layer_path import BASE, KIND, summary_line
from evomerge.recipe import COMPONENTS, Recipe
from evomerge.report import held_out_scores, objectives, task_names
from evomerge.run import ArchiveEntry, RunDir, atomic_write

PARENT_KINDS = ("base", "experts", "grid")  # how the front marks the models a run starts from
DIGITS = 4  # enough for accuracies on a few hundred items; what keeps 2,000 candidates small


# --- numbers ---------------------------------------------------------------------------------------


def _num(value: Any) -> float | None:
    """A finite number rounded for the page, else None (JSON has no NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return round(float(value), DIGITS)


def _fmt(value: Any, spec: str = ".3f") -> str:
    number = _num(value)
    return "-" if number is None else format(number, spec)


# --- recipes ---------------------------------------------------------------------------------------


def short_recipe(recipe: Mapping[str, Any]) -> str:
    """One line for a hover: the method(s) and each expert's layer-weighted mean weight (and
    density), or a layer path's slices. Read from the archive's dict without validating it
    through ``Recipe.from_dict`` (see the module's note on speed); never raises."""
    try:
        kind = recipe.get("kind")
        if kind == KIND:
            return _path_line(recipe)
        if kind is not None:
            return f"({kind} candidate)"
        spans = [(g["end"] - g["start"], g["config"]) for g in recipe.get("groups", [])]
        methods = dict.fromkeys(c.get("method", "?") for _, c in [*spans, (1, recipe.get("outside", {}))])
        parts = ["+".join(methods)]
        for name in recipe.get("experts", []):
            shown = []
            for letter, key in (("w", "weight"), ("d", "density")):
                values = [(n, c["experts"][name][key]) for n, c in spans
                          if key in c.get("experts", {}).get(name, {})]
                if values:
                    total = sum(n for n, _ in values)
                    mean = sum(n * v for n, v in values) / max(total, 1)
                    varies = len({v for _, v in values}) > 1
                    shown.append(f"{letter}{'≈' if varies else '='}{mean:.2f}")
            if shown:
                parts.append(" ".join([name, *shown]))
        return " · ".join(parts + [f"{len(spans)} layer group{'s' * (len(spans) != 1)}"])
    except (AttributeError, KeyError, TypeError, ValueError, ZeroDivisionError):
        return "(unreadable recipe)"


def _path_line(recipe: Mapping[str, Any]) -> str:
    return summary_line(recipe.get("slices") or [], recipe.get("outside", BASE))


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
                z.append([_num(c.experts[expert].get(param)) if expert in c.experts else None for c in configs])
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
    z = [[_num(scale) if source == s else None for s, _, scale in steps] for source in sources]
    blocks = [[block if source == s else None for s, block, _ in steps] for source in sources]
    return {"kind": "path", "columns": [str(i) for i in range(len(steps))], "rows": sources, "z": z,
            "blocks": blocks, "outside": str(recipe.get("outside", "base")), "summary": _path_line(recipe)}


# --- what the page shows, as plain data -------------------------------------------------------------


def report_data(run: RunDir, entries: Iterable[ArchiveEntry] | None = None) -> dict[str, Any]:
    """Everything the page shows, from the run folder (``entries``: the archive, where the caller
    holds it already, as the search does)."""
    objs = objectives(run)
    entries = list(run.archive() if entries is None else entries)
    tasks = task_names(run, entries)
    valid = fronts.competing(entries, objs)
    members = fronts.front(valid, objs)
    roles = pick_roles(entries, objs)
    by_id = {e.id: e for e in entries}
    tests = held_out_scores(run)
    history = run.history()
    command = f"evomerge export {shlex.quote(str(run.root))} --pick"
    picks = []
    for entry_id, specs in roles.items():
        entry = by_id[entry_id]
        picks.append({"id": entry.id, "picks": specs, "generation": entry.generation, "fidelity": entry.fidelity,
                      "objectives": {o.name: _num(entry.objectives.get(o.name)) for o in objs},
                      "scores": {t: _num(v) for t, v in entry.scores.items()},
                      "test_scores": {t: _num(v) for t, v in (tests.get(entry.recipe_hash) or {}).items()},
                      "recipe": short_recipe(entry.recipe), "export": f"{command} {specs[0]}",
                      "view": recipe_view(entry)})
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
        "picks": sorted(picks, key=lambda p: p["id"]),
        "estimates": estimate_view(entries, tasks),
        "kinship": kinship_view(run),
    }


def pick_roles(entries: Sequence[ArchiveEntry], objs: Sequence[Objective]) -> dict[int, list[str]]:
    """The picks a user would export (``front.picks``), each with the ``--pick`` specs that name
    it: ``knee``, ``best:<objective>``, ``best:mean``; the first is what its command uses."""
    members = fronts.front(entries, objs)
    if not members:
        return {}
    roles: dict[int, list[str]] = {}
    named = [("knee", fronts.knee(members, objs)), *((f"best:{o.name}", fronts.best(o, members)) for o in objs)]
    if fronts.averageable(objs):
        named.append(("best:mean", fronts.pick_mean(entries, objs)))
    for spec, entry in named:
        roles.setdefault(entry.id, []).append(spec)
    return dict(sorted(roles.items()))


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
                group["values"][n].append(_num(entry.objectives[n]))
    best: dict[str, Any] = {"id": [], "values": {n: [] for n in names}}
    if len(objs) == 1:
        (o,) = objs
        running = None
        for entry in valid:
            value = entry.objectives[o.name]
            if running is None or o.minimized(value) < o.minimized(running):
                running = value
            best["id"].append(entry.id)
            best["values"][o.name].append(_num(running))
    return {"objectives": [o.to_dict() for o in objs], "groups": groups, "best": best}


def _hover(entry: ArchiveEntry, versions: Mapping[str, ArchiveEntry], names: Sequence[str],
           specs: Sequence[str] | None, parent: ArchiveEntry | None) -> str:
    lines = [f"id {entry.id} · generation {entry.generation}" + (f" · {parent_label(parent)}" if parent else "")]
    for fidelity in fronts.FIDELITIES:
        version = versions.get(fidelity)
        if version is None:
            continue
        label = "estimate" if fidelity == "estimate" else "all items"
        values = version.scores or {n: version.objectives.get(n) for n in names}
        lines.append(f"{label} (id {version.id}): " + " ".join(f"{t} {_fmt(v)}" for t, v in values.items()))
    lines.append(short_recipe(entry.recipe))
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
            "best": {n: [_num((h.get("best") or {}).get(n)) for h in rows] for n in names},
            "hypervolume": [_num(h.get("hypervolume")) for h in rows],
            "rate": [_num(h.get("candidates_per_min")) for h in rows]}


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
            a, b = _num(estimate.scores.get(task)), _num(verified.scores.get(task))
            if a is not None and b is not None:
                ids.append(verified.id)
                est.append(a)
                full.append(b)
        if ids:
            gaps = [x - y for x, y in zip(est, full)]
            out["tasks"][task] = {"id": ids, "estimate": est, "full": full,
                                  "mae": _num(sum(map(abs, gaps)) / len(gaps)), "bias": _num(sum(gaps) / len(gaps))}
    return out


def kinship_view(run: RunDir) -> dict[str, Any]:
    """The experts' kinship (cosine of task vectors, and top singular subspace overlap) as
    ``evomerge report RUN --kinship`` or ``evomerge pool ... --json`` stored it in the run folder;
    a note where it is not there, since computing it needs the models, which a report never loads."""
    data = run.read_json(run.kinship_path)
    try:
        experts = [str(e) for e in data["experts"]]
        cosine = [[_num(v) for v in row] for row in data["cosine"]]
        if len(cosine) != len(experts) or any(len(row) != len(experts) for row in cosine):
            raise ValueError
        overlap = data.get("overlap")
        overlap = [[_num(v) for v in row] for row in overlap] if isinstance(overlap, list) else None
    except (KeyError, TypeError, ValueError):
        return {"note": f"{run.kinship_path.name} is not in the run folder: `evomerge report {run.root} --kinship` "
                        f"computes the experts' kinship once from their weights"}
    return {"experts": experts, "cosine": cosine, "overlap": overlap, "chance": _num(data.get("overlap_chance"))}


# --- plotly figures ----------------------------------------------------------------------------------

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
            "#17becf"]
_GROUP_STYLE = {  # name, marker; the order is the drawing order, so picks are on top
    "evaluated": ("evaluated", {"size": 5, "color": "rgba(120,120,120,0.45)"}),
    "front": ("Pareto front", {"size": 7, "color": "#1f77b4"}),
    "grid": ("uniform merges", {"size": 10, "color": "#2ca02c", "symbol": "triangle-up",
                                "line": {"width": 1, "color": "white"}}),
    "experts": ("experts", {"size": 10, "color": "#ff7f0e", "symbol": "diamond", "line": {"width": 1, "color": "white"}}),
    "base": ("base", {"size": 10, "color": "black", "symbol": "square", "line": {"width": 1, "color": "white"}}),
    "picks": ("picks", {"size": 15, "color": "#d62728", "symbol": "star", "line": {"width": 1, "color": "white"}}),
}
_HOVER = "%{text}<extra></extra>"


def _ref(*path: str | int) -> dict[str, str]:
    return {"$ref": "/".join(map(str, path))}


def figures(data: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every plot of the page: ``{"id", "panel", "figure": {"data", "layout"}}`` or, where there
    is nothing to draw yet, ``{"id", "panel", "note"}``."""
    plots = [_front_plot(data), _progress_plot(data)]
    for pick in data["picks"]:
        plots.append(_recipe_plot(pick))
    if not data["picks"]:
        plots.append({"id": "plot-recipe", "panel": "recipes", "note": "no picks yet (no finished generation)"})
    plots += [_estimate_plot(data), _kinship_plot(data)]
    return plots


def _front_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["front"]
    names = [o["name"] for o in view["objectives"]]
    groups = view["groups"]
    plot: dict[str, Any] = {"id": "plot-front", "panel": "front"}
    if not names:
        return {**plot, "note": "objectives not known yet: no generation has finished"}
    if not any(groups[g]["id"] for g in groups):
        return {**plot, "note": "no successful evaluation yet"}
    label = {o["name"]: f"{o['name']} ({o['direction']})" for o in view["objectives"]}
    traces: list[dict[str, Any]] = []
    layout: dict[str, Any] = {"height": 460, "hovermode": "closest", "margin": {"t": 30, "r": 10, "b": 50, "l": 60},
                              "legend": {"orientation": "h", "y": 1.08, "x": 0}}

    def scatter(group: str, x: Any, y: Any, axes: int, first: bool) -> dict[str, Any]:
        name, marker = _GROUP_STYLE[group]
        return {"type": "scatter", "mode": "markers", "name": name, "x": x, "y": y, "text": _ref("front", "groups", group, "hover"),
                "hovertemplate": _HOVER, "marker": marker, "legendgroup": group, "showlegend": first,
                "xaxis": f"x{axes if axes > 1 else ''}", "yaxis": f"y{axes if axes > 1 else ''}",
                "customdata": _ref("front", "groups", group, "id")}

    present = [g for g in _GROUP_STYLE if groups[g]["id"]]
    if len(names) == 1:
        (o,) = names
        traces.append({"type": "scatter", "mode": "lines", "name": "best so far", "x": view["best"]["id"],
                       "y": view["best"]["values"][o], "line": {"shape": "hv", "color": "#1f77b4"},
                       "hoverinfo": "skip"})
        traces += [scatter(g, _ref("front", "groups", g, "id"), _ref("front", "groups", g, "values", o), 1, True)
                   for g in present if g != "front"]
        layout.update(xaxis={"title": {"text": "archive id"}}, yaxis={"title": {"text": label[o]}})
        return {**plot, "figure": {"data": traces, "layout": layout}}
    n = len(names)
    cells = [(row, col) for row in range(n - 1) for col in range(row + 1)]  # lower triangle
    size, gap = 1 / (n - 1), 0.06 if n > 2 else 0.0
    for k, (row, col) in enumerate(cells, start=1):
        x, y = names[col], names[row + 1]
        suffix = "" if k == 1 else str(k)
        layout[f"xaxis{suffix}"] = {"domain": [col * size + gap / 2, (col + 1) * size - gap / 2],
                                    "anchor": f"y{suffix}", "title": {"text": label[x] if row == n - 2 else ""},
                                    "zeroline": False}
        layout[f"yaxis{suffix}"] = {"domain": [1 - (row + 1) * size + gap / 2, 1 - row * size - gap / 2],
                                    "anchor": f"x{suffix}", "title": {"text": label[y] if col == 0 else ""},
                                    "zeroline": False}
        if n == 2 and groups["front"]["id"]:  # with two objectives the front is a staircase worth joining
            traces.append({"type": "scatter", "mode": "lines", "name": "front line", "showlegend": False,
                           "x": _staircase(groups["front"], x, y)[0], "y": _staircase(groups["front"], x, y)[1],
                           "line": {"color": "#1f77b4", "width": 1}, "hoverinfo": "skip"})
        traces += [scatter(g, _ref("front", "groups", g, "values", x), _ref("front", "groups", g, "values", y), k, k == 1)
                   for g in present]
    layout["height"] = 460 if n == 2 else min(260 * (n - 1), 900)
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _staircase(group: Mapping[str, Any], x: str, y: str) -> tuple[list, list]:
    points = sorted(zip(group["values"][x], group["values"][y]), key=lambda p: (p[0] is None, p))
    return [p[0] for p in points], [p[1] for p in points]


def _progress_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["progress"]
    plot: dict[str, Any] = {"id": "plot-progress", "panel": "progress"}
    if not view["generation"]:
        return {**plot, "note": "no generation finished yet"}
    gens = view["generation"]
    traces = [{"type": "scatter", "mode": "lines+markers", "name": f"best {name}", "x": gens, "y": values,
               "line": {"color": _PALETTE[i % len(_PALETTE)]}, "hovertemplate": f"generation %{{x}}<br>best {name} %{{y}}<extra></extra>"}
              for i, (name, values) in enumerate(view["best"].items())]
    traces.append({"type": "scatter", "mode": "lines+markers", "name": "hypervolume", "x": gens, "y": view["hypervolume"],
                   "yaxis": "y2", "line": {"color": "black"}, "hovertemplate": "generation %{x}<br>hypervolume %{y}<extra></extra>"})
    traces.append({"type": "bar", "name": "candidates/min", "x": gens, "y": view["rate"], "yaxis": "y3",
                   "customdata": view["evaluations"], "marker": {"color": "#9aa9bd"},
                   "hovertemplate": "generation %{x}<br>%{y} candidates/min<br>%{customdata} evaluations<extra></extra>"})
    layout = {"height": 520, "margin": {"t": 30, "r": 10, "b": 45, "l": 60}, "hovermode": "closest",
              "legend": {"orientation": "h", "y": 1.06, "x": 0},
              "xaxis": {"anchor": "y3", "title": {"text": "generation"}, "dtick": 1 if len(gens) <= 30 else None},
              "yaxis": {"domain": [0.58, 1], "title": {"text": "best per objective"}},
              "yaxis2": {"domain": [0.3, 0.52], "title": {"text": "hypervolume"}},
              "yaxis3": {"domain": [0, 0.24], "title": {"text": "cand./min"}, "type": "log"}}
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _recipe_plot(pick: Mapping[str, Any]) -> dict[str, Any]:
    view = pick["view"]
    plot: dict[str, Any] = {"id": f"plot-recipe-{pick['id']}", "panel": "recipes",
                            "title": f"id {pick['id']} · {', '.join(pick['picks'])}"}
    if view["kind"] == "note":
        return {**plot, "note": view["note"]}
    if view["kind"] == "path":
        text = [[f"step {i}: {source} block {b} · scale {s:g}" if b is not None else ""
                 for i, (b, s) in enumerate(zip(blocks, row))]
                for source, blocks, row in zip(view["rows"], view["blocks"], view["z"])]
        traces = [{"type": "heatmap", "x": view["columns"], "y": view["rows"], "z": view["z"], "text": text,
                   "hovertemplate": _HOVER, "colorscale": "Viridis", "colorbar": {"title": {"text": "scale"}},
                   "xgap": 1, "ygap": 1}]
        layout = {"height": 110 + 28 * len(view["rows"]), "margin": {"t": 30, "r": 10, "b": 40, "l": 110},
                  "title": {"text": view["summary"], "font": {"size": 12}},
                  "xaxis": {"title": {"text": "step of the path"}}, "yaxis": {"autorange": "reversed"}}
        return {**plot, "figure": {"data": traces, "layout": layout}}
    columns, rows, z = view["columns"], view["rows"], view["z"]
    method_rows = [f"method · {m['component']}" if m["component"] != "all" else "method" for m in view["methods"]]
    names = list(dict.fromkeys(name for m in view["methods"] for name in m["methods"]))
    text = [[f"{row} · layer {col}: {_fmt(v)}" for col, v in zip(columns, values)] for row, values in zip(rows, z)]
    method_text = [[f"layer {col}: {name}" + (f" ({g})" if g else "") for col, name, g in zip(columns, m["methods"], m["globals"])]
                   for m in view["methods"]]
    steps = max(len(names), 1)
    palette = [stop for i in range(steps) for stop in ([i / steps, _PALETTE[i % 10]], [(i + 1) / steps, _PALETTE[i % 10]])]
    traces = [{"type": "heatmap", "x": columns, "y": rows, "z": z, "text": text, "hovertemplate": _HOVER,
               "colorscale": "Viridis", "xgap": 1, "ygap": 1, "colorbar": {"title": {"text": "value"}, "len": 0.8, "y": 0.4}},
              {"type": "heatmap", "x": columns, "y": method_rows, "yaxis": "y2", "showscale": False, "xgap": 1,
               "z": [[names.index(name) + 0.5 for name in m["methods"]] for m in view["methods"]],
               "zmin": 0, "zmax": steps, "colorscale": palette, "text": method_text, "hovertemplate": _HOVER}]
    annotations = []
    for row, m in zip(method_rows, view["methods"]):  # the method's name once per run of layers using it
        start = 0
        for i in range(1, len(columns) + 1):
            if i == len(columns) or m["methods"][i] != m["methods"][start]:
                annotations.append({"x": columns[(start + i - 1) // 2], "y": row, "xref": "x", "yref": "y2",
                                    "text": m["methods"][start], "showarrow": False, "font": {"color": "white", "size": 11}})
                start = i
    band = 0.12 if len(rows) > 6 else 0.2
    layout = {"height": 140 + 22 * (len(rows) + len(method_rows)), "margin": {"t": 30, "r": 10, "b": 40, "l": 140},
              "xaxis": {"title": {"text": "layer"}, "type": "category"},
              "yaxis": {"domain": [0, 1 - band - 0.03], "autorange": "reversed", "type": "category"},
              "yaxis2": {"domain": [1 - band, 1], "type": "category"}, "annotations": annotations}
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _estimate_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["estimates"]
    plot: dict[str, Any] = {"id": "plot-estimates", "panel": "estimates"}
    if not view["tasks"]:
        return {**plot, "note": "no candidate was scored both ways yet: the search verifies its best estimates on "
                                "every validation item at the end (fitness.verify), and racing each generation "
                                "(fitness.multi_fidelity)"}
    traces, low, high = [], 1.0, 0.0
    for i, (task, pairs) in enumerate(view["tasks"].items()):
        low, high = min(low, *pairs["estimate"], *pairs["full"]), max(high, *pairs["estimate"], *pairs["full"])
        traces.append({"type": "scatter", "mode": "markers", "name": f"{task} (|gap| {_fmt(pairs['mae'])})",
                       "x": pairs["estimate"], "y": pairs["full"], "customdata": pairs["id"],
                       "marker": {"size": 9, "color": _PALETTE[i % 10]},
                       "hovertemplate": f"id %{{customdata}} · {task}<br>estimate %{{x}}<br>all items %{{y}}<extra></extra>"})
    traces.insert(0, {"type": "scatter", "mode": "lines", "name": "estimate = all items", "x": [low, high], "y": [low, high],
                      "line": {"dash": "dot", "color": "grey"}, "hoverinfo": "skip"})
    layout = {"height": 420, "margin": {"t": 30, "r": 10, "b": 50, "l": 60}, "hovermode": "closest",
              "xaxis": {"title": {"text": "estimate (the estimator's items)"}},
              "yaxis": {"title": {"text": "score on every validation item"}, "scaleanchor": "x"}}
    return {**plot, "figure": {"data": traces, "layout": layout}}


def _kinship_plot(data: Mapping[str, Any]) -> dict[str, Any]:
    view = data["kinship"]
    plot: dict[str, Any] = {"id": "plot-kinship", "panel": "kinship"}
    if "note" in view:
        return {**plot, "note": view["note"]}
    experts = view["experts"]
    matrices = [("cosine of task vectors", view["cosine"], "RdBu", -1, 1)]
    if view["overlap"] is not None:
        chance = f" (random: {_fmt(view['chance'])})" if view["chance"] is not None else ""
        matrices.append((f"top singular subspace overlap{chance}", view["overlap"], "Viridis", 0, 1))
    traces, layout = [], {"height": 150 + 45 * len(experts), "margin": {"t": 40, "r": 10, "b": 60, "l": 80},
                          "annotations": []}
    width = 1 / len(matrices)
    for k, (title, z, scale, low, high) in enumerate(matrices, start=1):
        suffix = "" if k == 1 else str(k)
        traces.append({"type": "heatmap", "x": experts, "y": experts, "z": z, "zmin": low, "zmax": high,
                       "colorscale": scale, "texttemplate": "%{z:.2f}", "showscale": False,
                       "xaxis": f"x{suffix}", "yaxis": f"y{suffix}",
                       "hovertemplate": f"{title}<br>%{{y}} · %{{x}}: %{{z}}<extra></extra>"})
        layout[f"xaxis{suffix}"] = {"domain": [(k - 1) * width + 0.04, k * width - 0.04], "anchor": f"y{suffix}"}
        layout[f"yaxis{suffix}"] = {"anchor": f"x{suffix}", "autorange": "reversed"}
        layout["annotations"].append({"text": title, "xref": "paper", "yref": "paper", "x": (k - 0.5) * width,
                                      "y": 1.08, "showarrow": False})
    return {**plot, "figure": {"data": traces, "layout": layout}}


# --- the page ----------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


_PANELS = [  # panel, heading, what it tells a user
    ("front", "Pareto front", "Every distinct candidate at its highest fidelity; hover a dot for its recipe and "
                              "scores, click it for its export command. Pairwise panels beyond two objectives."),
    ("progress", "Progress", "Best value per objective, the front's hypervolume and candidates per minute, per generation."),
    ("recipes", "The picks' recipes", "Per layer: each expert's parameters (and the method), or a layer path's steps."),
    ("estimates", "Estimates against every item", "Candidates scored on the estimator's items and on every validation "
                                                  "item: how far to trust an estimate."),
    ("kinship", "Kinship of the experts", "How alike the experts' task vectors are (alike ones interfere less)."),
]

_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1180px;padding:12px 20px;color:#222}
h1{font-size:20px;margin:8px 0 2px}h2{font-size:16px;margin:22px 0 2px}p.what{color:#666;margin:0 0 6px}
.note{color:#8a5a00;background:#fff8e6;border-left:3px solid #e0a800;padding:6px 10px}
table{border-collapse:collapse;font-size:12.5px}td,th{padding:3px 8px;text-align:left;vertical-align:top}
tr.pick td{border-top:1px solid #e4e4e4}td:last-child{max-width:420px}
code{background:#f3f3f3;padding:1px 4px;border-radius:3px;font-size:12px}.muted{color:#777}
#selected{min-height:1.5em;font-size:12.5px;margin-top:4px}h3{font-size:13px;margin:12px 0 0}
"""

_SCRIPT = """
(function () {
  var state = window.__report;
  function finish() {
    state.done = true;
    document.getElementById('report-status').textContent = JSON.stringify(state);
  }
  try {
    var DATA = JSON.parse(document.getElementById('report-data').textContent);
    var resolve = function (node) {
      if (Array.isArray(node)) return node.map(resolve);
      if (node && typeof node === 'object') {
        var keys = Object.keys(node);
        if (keys.length === 1 && keys[0] === '$ref')
          return node.$ref.split('/').reduce(function (o, k) { return o[k]; }, DATA);
        var out = {};
        keys.forEach(function (k) { out[k] = resolve(node[k]); });
        return out;
      }
      return node;
    };
    var marks = function (div) {  // what each plot drew: points, lines, heatmap images, bars
      return div.querySelectorAll('path.point, path.js-line, g.hm image, .barlayer path').length;
    };
    var started = performance.now();
    var jobs = DATA.plots.filter(function (p) { return p.figure; }).map(function (p) {
      var div = document.getElementById(p.id);
      var figure = resolve(p.figure);
      return Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false})
        .then(function () {
          state.plots[p.id] = marks(div);
          if (p.id === 'plot-front') div.on('plotly_click', function (event) {
            var point = event.points[0];
            document.getElementById('selected').innerHTML = point.text +
              '<br>export: <code>' + DATA.export_html + ' ' + point.customdata + '</code>';
          });
        });
    });
    Promise.all(jobs).then(function () {
      state.render_ms = performance.now() - started;  // drawing the plots
      state.load_ms = performance.now();  // since navigation began: parsing plotly.js and the data too
      state.plotly = Plotly.version;
    }, function (error) { state.errors.push('plot failed: ' + error); }).then(finish);
    var live = document.getElementById('live');
    live.checked = location.hash === '#live';
    live.onchange = function () { location.hash = live.checked ? 'live' : ''; };
    setInterval(function () { if (live.checked) location.reload(); }, 30000);
  } catch (error) {
    state.errors.push(String(error));
    finish();
  }
})();
"""

_CATCH = """
window.__report = {errors: [], plots: {}, done: false};
window.addEventListener('error', function (e) { window.__report.errors.push(String(e.message || e)); });
window.addEventListener('unhandledrejection', function (e) { window.__report.errors.push('unhandled: ' + e.reason); });
"""


def render_html(data: Mapping[str, Any], plots: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The page: a header, the picks with their export commands, then one section per panel."""
    plots = figures(data) if plots is None else plots
    esc = lambda value: html.escape(str(value))  # noqa: E731
    counts = data["counts"]
    objs = ", ".join(f"{o['name']} ({o['direction']})" for o in data["objectives"]) or "not known yet"
    head = (f"<h1>evomerge run <code>{esc(data['run'])}</code></h1>"
            f"<p class=muted>{counts['evaluations']} evaluations ({counts['distinct']} distinct recipes, "
            f"{counts['errors']} failed), {counts['generations']} generations, {counts['front']} on the front, "
            f"{counts['verified']} scored on every validation item · objectives {esc(objs)} · written "
            f"{esc(data['written'])} <label><input type=checkbox id=live> reload every 30 s</label></p>")
    body = [head, "<h2>Picks</h2>", _picks_table(data)]
    by_panel: dict[str, list[Mapping[str, Any]]] = {}
    for plot in plots:
        by_panel.setdefault(plot["panel"], []).append(plot)
    for panel, heading, what in _PANELS:
        body.append(f"<section data-panel={panel}><h2>{esc(heading)}</h2><p class=what>{esc(what)}</p>")
        for plot in by_panel.get(panel, []):
            if plot.get("title"):
                body.append(f"<h3>{esc(plot['title'])}</h3>")
            if "note" in plot:
                body.append(f"<p class=note id={plot['id']} data-note>{esc(plot['note'])}</p>")
            else:
                body.append(f"<div class=plot id={plot['id']}></div>")
        if panel == "front":
            body.append("<div id=selected class=muted>click a candidate for its export command</div>")
        body.append("</section>")
    blob = {**data, "plots": list(plots), "export_html": esc(data["export"])}
    # Every "<" as \u003c: the data can neither end its script element nor open a comment in it.
    payload = json.dumps(blob, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return "\n".join([
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<title>evomerge · {esc(data['run'])}</title><style>{_STYLE}</style>",
        f"<script>{_CATCH}</script><script>{_plotly_js()}</script></head><body>",
        *body,
        "<pre id=report-status hidden></pre>",
        f"<script type=application/json id=report-data>{payload}</script>",
        f"<script>{_SCRIPT}</script></body></html>"])


def _picks_table(data: Mapping[str, Any]) -> str:
    if not data["picks"]:
        return "<p class=note>no picks yet: the front needs a finished generation</p>"
    esc = lambda value: html.escape(str(value))  # noqa: E731
    tasks = data["tasks"]
    extra = [o["name"] for o in data["objectives"] if o["name"] not in tasks]
    has_test = any(p["test_scores"] for p in data["picks"])
    header = ["pick", "id", "gen", "scored on", *extra, *(f"{t} val" for t in tasks),
              *(f"{t} test" for t in tasks if has_test), "recipe"]
    rows = []
    for p in data["picks"]:
        cells = [", ".join(p["picks"]), p["id"], p["generation"], "all items" if p["fidelity"] == "full" else "estimate",
                 *(_fmt(p["objectives"].get(o)) for o in extra),
                 *(_fmt(p["scores"].get(t, p["objectives"].get(t))) for t in tasks),
                 *(_fmt(p["test_scores"].get(t)) for t in tasks if has_test), p["recipe"]]
        rows.append("<tr class=pick>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>"
                    f"<tr><td></td><td colspan={len(header) - 1}><code>{esc(p['export'])}</code></td></tr>")
    return ("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>" + "".join(rows) + "</table>")


def write_report(run: RunDir, out: str | Path | None = None, entries: Iterable[ArchiveEntry] | None = None) -> Path:
    """Write the page to ``out`` (default ``RUN/report.html``) atomically, so a browser refreshing
    it during a search never reads half a file; returns its path."""
    path = Path(out) if out is not None else run.report_path
    if path.is_dir():
        raise UserError(f"--out {path} is a folder; give a file path such as {path / 'report.html'}")
    if not path.parent.is_dir():
        raise UserError(f"--out {path}: folder {path.parent} does not exist; create it or write elsewhere")
    atomic_write(path, render_html(report_data(run, entries)))
    return path
