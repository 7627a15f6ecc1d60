"""What a run says, read from its folder: objectives, the front, picks, held-out scores, the
reference models, and the summary ``inspect`` prints.

Everything here reads the run folder only, never a live search, so it works on a finished run
and on one still going: the front is recomputed from ``archive.jsonl`` (which can be ahead of
``pareto.json``), and held-out test scores are taken from ``pareto.json`` where the search has
measured them. A torn last archive line (a search killed mid-write) is skipped.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import numpy as np

from evomerge import front as fronts
from evomerge.errors import UserError, first_line
from evomerge.fitness.objectives import Objective, hypervolume
from evomerge.report.candidates import candidate_row
from evomerge.run import ArchiveEntry, RunDir

_ID = re.compile(r"^\d+$")


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
        raise UserError(f"archive id {wanted} failed ({first_line(found.error)}); pick an entry without an error, "
                        f"e.g. knee")
    return found


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
    specs = {e.id: named for e, named in fronts.named_picks(valid, objs)}
    chosen = next((i for i, named in specs.items() if "knee" in named), None)
    top = next((i for i, named in specs.items() if "best:mean" in named), None)
    row = lambda e: candidate_row(e, tests.get(e.recipe_hash), specs.get(e.id, ()))  # noqa: E731
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


def task_names(run: RunDir, entries: Sequence[ArchiveEntry]) -> list[str]:
    """Task names in the config's order, else in the order the archive first scores them."""
    listed = run.config().get("tasks")
    if isinstance(listed, list) and all(isinstance(t, str) for t in listed):
        return list(listed)
    return list(dict.fromkeys(t for e in entries for t in e.scores))
