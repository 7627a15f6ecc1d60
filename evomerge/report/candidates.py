"""A candidate as every view shows it: one row of plain data, and the table both the terminal
(``inspect``) and the HTML report print from such rows.

One home for the spelling, because two copies had drifted (one said ``all`` where the other said
``all items``, one summary dropped λ): the columns, how a fidelity and a number read, and the
recipe's summary line (``layer_path.candidate_line``) are decided here once.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from evomerge.layer_path import candidate_line
from evomerge.run import ArchiveEntry

FIDELITY_LABELS = {"estimate": "estimate", "full": "all items"}  # what each fidelity scored


def candidate_row(entry: ArchiveEntry, test_scores: Mapping[str, float] | None,
                  picks: Sequence[str] = ()) -> dict[str, Any]:
    """``entry`` as plain data (what ``inspect --json`` prints per candidate): its scores at its
    fidelity, its held-out test scores where measured, its summary line, and the ``--pick``
    specs that name it (``knee`` and ``best_mean`` flag the two a table marks)."""
    return {"id": entry.id, "generation": entry.generation, "recipe_hash": entry.recipe_hash,
            "objectives": entry.objectives, "scores": entry.scores,
            "test_scores": dict(test_scores) if test_scores else None, "recipe": candidate_line(entry.recipe),
            "fidelity": entry.fidelity, "picks": list(picks), "knee": "knee" in picks,
            "best_mean": "best:mean" in picks}


def number(value: Any) -> str:
    """A score as a table cell: four decimals, ``-`` where there is none."""
    return "-" if not isinstance(value, (int, float)) or isinstance(value, bool) else format(value, ".4f")


def candidate_table(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], objectives: Sequence[str]
                    ) -> tuple[list[str], list[list[str]]]:
    """Header and cells of a candidate table: id, generation, what it was scored on where any row
    was verified, the objectives that are not a task, validation (and test, where any row has it)
    per task, the recipe."""
    extra = [o for o in objectives if o not in tasks]
    has_test = any(r["test_scores"] for r in rows)
    raced = any(r["fidelity"] == "full" for r in rows)
    header = ["id", "gen", *(["scored on"] if raced else []), *extra]
    for task in tasks:
        header += [f"{task} val", *([f"{task} test"] if has_test else [])]
    header.append("recipe")
    cells = []
    for row in rows:
        line = [str(row["id"]), str(row["generation"])]
        line += [FIDELITY_LABELS.get(row["fidelity"], row["fidelity"])] if raced else []
        line += [number(row["objectives"].get(o)) for o in extra]
        for task in tasks:
            line.append(number(row["scores"].get(task, row["objectives"].get(task))))
            if has_test:
                line.append(number((row["test_scores"] or {}).get(task)))
        cells.append([*line, row["recipe"]])
    return header, cells
