"""``evomerge inspect``'s text: the front, the verified candidates, the reference models and the
progress per generation, from ``run_data.summary``."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from evomerge.report.candidates import candidate_table, number


def render(data: dict[str, Any]) -> str:
    """``summary`` as text: the front (knee marked *), the verified candidates (best:mean marked
    +), then progress per generation."""
    objs = [o["name"] for o in data["objectives"]]
    tasks = data["tasks"]
    verified = data.get("verified", [])
    table = _marked(data["front"], tasks, objs)
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
                 f"{number(progress['hypervolume'])}, best "
                 + (", ".join(f"{k} {number(v)}" for k, v in progress["best"].items()) or "-"))
    if verified:
        header, rows = _marked(verified, tasks, objs)
        lines += ["", f"scored on every validation item: {len(rows)} candidate(s), best mean first "
                      f"(+ best:mean, what `export --pick best:mean` takes)", _table(header, rows)]
    if data.get("references"):
        rows = [[r["name"], *(number(r["scores"].get(t)) for t in tasks), number(r["mean"])]
                for r in data["references"]]
        lines += ["", "reference models (full validation split)", _table(["model", *tasks, "mean"], rows)]
    if progress["torn_lines"]:
        lines.append(f"skipped {progress['torn_lines']} torn archive line(s)")
    if progress["history"]:
        rows = [[str(h.get("generation")), str(h.get("evaluations")), number(h.get("hypervolume")),
                 ", ".join(f"{k} {number(v)}" for k, v in (h.get("best") or {}).items()),
                 _rate(h.get("candidates_per_min"))] for h in progress["history"]]
        lines += ["", "progress per generation",
                  _table(["generation", "evaluations", "hypervolume", "best", "cand/min"], rows)]
    return "\n".join(lines)


def _marked(rows: Sequence[Mapping[str, Any]], tasks: Sequence[str], objs: Sequence[str]
            ) -> tuple[list[str], list[list[str]]]:
    """The candidate table with the knee marked * and best:mean + after the id."""
    header, cells = candidate_table(rows, tasks, objs)
    for row, line in zip(rows, cells):
        line[0] += ("*" if row["knee"] else "") + ("+" if row["best_mean"] else "")
    return header, cells


def _rate(value: Any) -> str:
    return "-" if value is None else format(value, ".1f")


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])
