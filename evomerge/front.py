"""The Pareto front of a set of evaluations, and the picks a user makes from it.

One home for these rules, because the search (history, ``pareto.json``, which members get
held-out test scores), ``inspect``/``export`` and the experiments must agree on what "the front",
"the knee" and "the best on an objective" are; two copies once disagreed on ties and on
non-finite values. It reads archive entries and objectives only, never a model.

Which entries compete: one per recipe, without an error, with every objective finite: the
recipe's highest-fidelity evaluation (a racing promotion, scored on every validation item,
beats the estimate it verified), the first (lowest id) among equals. Other entries of the same
recipe are cache hits or re-evaluations of the same merge, and a NaN objective (a metric with
nothing to measure) can neither dominate nor be dominated meaningfully. Ties between equally
good entries always go to the lower id.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence

import numpy as np

from evomerge.errors import UserError
from evomerge.fitness.objectives import Objective, minimized_matrix
from evomerge.run import ArchiveEntry

Row = Mapping[str, float]
FIDELITIES = ("estimate", "full")  # lowest first


def non_dominated(objectives: Sequence[Objective], rows: Sequence[Row]) -> list[int]:
    """Indices (ascending) of the rows no other row dominates; equal rows are all kept."""
    from pymoo.util.nds.non_dominated_sorting import NonDominatedSorting

    if not rows or not objectives:
        return []
    F = minimized_matrix(objectives, rows)
    return sorted(int(i) for i in NonDominatedSorting().do(F, only_non_dominated_front=True))


def competing(entries: Iterable[ArchiveEntry], objectives: Sequence[Objective]) -> list[ArchiveEntry]:
    """The entries that compete for the front (see the module's rule), in id order. None while
    the objectives are unknown: without directions nothing can be said to beat anything."""
    if not objectives:
        return []
    chosen: dict[str, ArchiveEntry] = {}
    for entry in sorted(entries, key=lambda e: e.id):
        if entry.error is not None or not _finite(entry, objectives):
            continue
        held = chosen.get(entry.recipe_hash)
        if held is None or FIDELITIES.index(entry.fidelity) > FIDELITIES.index(held.fidelity):
            chosen[entry.recipe_hash] = entry
    return sorted(chosen.values(), key=lambda e: e.id)


def front(entries: Iterable[ArchiveEntry], objectives: Sequence[Objective]) -> list[ArchiveEntry]:
    """The non-dominated competing entries, in id order."""
    valid = competing(entries, objectives)
    return [valid[i] for i in non_dominated(objectives, [e.objectives for e in valid])]


def knee(entries: Sequence[ArchiveEntry], objectives: Sequence[Objective]) -> ArchiveEntry:
    """The entry closest (Euclidean) to the ideal point once each objective is scaled to [0, 1]
    over ``entries``: the balanced compromise. Chosen over the distance-to-the-hyperplane-of-
    extremes definition because that hyperplane is undefined when extremes coincide or with one
    objective, while this is defined for any front."""
    if not entries:
        raise UserError("the front is empty; no entry to pick")
    F = minimized_matrix(objectives, [e.objectives for e in entries])
    low, span = F.min(axis=0), np.ptp(F, axis=0)
    scaled = (F - low) / np.where(span > 0, span, 1.0)
    distance = np.sqrt((scaled ** 2).sum(axis=1))
    return min(zip(distance, (e.id for e in entries), entries), key=lambda t: (t[0], t[1]))[2]


def best(objective: Objective, entries: Sequence[ArchiveEntry]) -> ArchiveEntry:
    """The entry best on ``objective``."""
    return min(entries, key=lambda e: (objective.minimized(e.objectives[objective.name]), e.id))


def averageable(objectives: Sequence[Objective]) -> bool:
    """Whether the objectives are accuracies on one scale (maximized from 0: the tasks, or their
    mean), so that their mean ranks candidates: what a single-objective algorithm is told when
    there are several, what racing promotes by, and what ``best:mean`` picks by."""
    return bool(objectives) and all(o.direction == "max" and o.reference == 0.0 for o in objectives)


def mean(entry: ArchiveEntry, objectives: Sequence[Objective]) -> float:
    """The mean of an entry's (averageable) objectives."""
    return float(np.mean([entry.objectives[o.name] for o in objectives]))


def by_mean(entries: Iterable[ArchiveEntry], objectives: Sequence[Objective]) -> list[ArchiveEntry]:
    """Entries best mean first; among equal means a verified (higher-fidelity) one first, then
    the lower id."""
    return sorted(entries, key=lambda e: (-mean(e, objectives), -FIDELITIES.index(e.fidelity), e.id))


def best_mean(entries: Sequence[ArchiveEntry], objectives: Sequence[Objective]) -> ArchiveEntry:
    """The entry with the highest mean objective (see ``by_mean`` for ties)."""
    return by_mean(entries, objectives)[0]


def verified(entries: Iterable[ArchiveEntry], objectives: Sequence[Objective]) -> list[ArchiveEntry]:
    """The competing entries scored on every validation item (racing promotions and the end's
    verification), best mean first where the objectives average, else in id order."""
    chosen = [e for e in competing(entries, objectives) if e.fidelity == "full"]
    return by_mean(chosen, objectives) if averageable(objectives) else chosen


def pick_mean(entries: Iterable[ArchiveEntry], objectives: Sequence[Objective]) -> ArchiveEntry:
    """What ``best:mean`` hands a user: the best verified entry by mean where any was verified,
    else the best competing one. Not simply the best mean: the top of many few-item estimates is
    mostly the luckiest, and a verified score is the one that holds up on held-out data."""
    entries = list(entries)
    pool = verified(entries, objectives) or competing(entries, objectives)
    if not pool:
        raise UserError("no successful evaluation yet; nothing to pick")
    return best_mean(pool, objectives)


def best_values(objectives: Sequence[Objective], entries: Sequence[ArchiveEntry]) -> dict[str, float]:
    """The best value reached on each objective; empty when there is no entry."""
    return {o.name: best(o, entries).objectives[o.name] for o in objectives} if entries else {}


def named_picks(entries: Iterable[ArchiveEntry], objectives: Sequence[Objective]) -> list[tuple[ArchiveEntry, list[str]]]:
    """What a user would pick from ``entries``, each once, in id order, with the ``--pick``
    specs that name it: the front's ``knee``, ``best:<objective>`` on each objective and, where
    the objectives average, ``best:mean`` (``pick_mean``: verified where any was). The first spec
    is what an export command names it by. These get held-out test scores at the end of a
    search, and every view marks them from here."""
    entries = list(entries)
    members = front(entries, objectives)
    if not members:
        return []
    named = [("knee", knee(members, objectives)), *((f"best:{o.name}", best(o, members)) for o in objectives)]
    if averageable(objectives):
        named.append(("best:mean", pick_mean(entries, objectives)))
    chosen: dict[int, tuple[ArchiveEntry, list[str]]] = {}
    for spec, entry in named:
        chosen.setdefault(entry.id, (entry, []))[1].append(spec)
    return [chosen[i] for i in sorted(chosen)]


def picks(entries: Iterable[ArchiveEntry], objectives: Sequence[Objective]) -> list[ArchiveEntry]:
    """The entries of ``named_picks``."""
    return [entry for entry, _ in named_picks(entries, objectives)]


def _finite(entry: ArchiveEntry, objectives: Sequence[Objective]) -> bool:
    values = [entry.objectives.get(o.name) for o in objectives]
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)
