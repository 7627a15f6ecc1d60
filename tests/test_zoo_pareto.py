"""experiments/zoo_pareto/run.py end to end on the pico zoo, tiny: every searcher runs, the table
has a row of numbers per searcher, and a second invocation reuses everything instead of redoing it."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "zoo_pareto" / "run.py"
SEARCHES = ("random", "cmaes")  # per-task objectives and one mean: the plumbing both kinds take


def run(out: Path, cache: Path) -> subprocess.CompletedProcess:
    # RAY_ADDRESS=local: a private Ray instance even when another test has a cluster running.
    env = {**os.environ, "EVOMERGE_CACHE": str(cache), "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--zoo", "pico", "--workers", "1",
                           "--searchers", ",".join(SEARCHES), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def experiment(pico_zoo, pico_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo_pareto")
    done = run(out, pico_cache)
    assert done.returncode == 0, done.stderr[-4000:]
    return out, pico_cache


def main_table(markdown: str) -> dict[str, list[str]]:
    """The first markdown table's rows, by searcher name."""
    block = markdown.split("## Best-on-validation pick, held-out test", 1)[1].split("\n\n")[1]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in block.splitlines()[2:]]
    return {r[0].strip("`"): r for r in rows}


def test_the_table_has_a_row_of_numbers_per_searcher(experiment):
    out, _ = experiment
    results = json.loads((out / "results.json").read_text())
    tasks = results["tasks"]
    assert results["probe_tasks"] == ["zoo_shout"]  # from the zoo config, not hard-coded here
    rows = main_table((out / "results.md").read_text())
    expected = ["base", *(f"expert:{e}" for e in results["experts"]), "grid:task_arithmetic", "grid:ties", *SEARCHES]
    assert list(rows) == expected
    number = re.compile(r"^\*{0,2}\d+(\.\d+)?( ± \d+(\.\d+)?)?\*{0,2}$")
    for name, cells in rows.items():
        accuracy = cells[2:2 + len(tasks) + 2]  # per task, mean, probe
        assert all(number.match(c) for c in accuracy), (name, cells)
        assert number.match(cells[2 + len(tasks) + 2]), (name, "hypervolume", cells)
    searches = [r for r in results["rows"] if r["kind"] == "search"]
    assert sorted(r["searcher"] for r in searches) == sorted(SEARCHES)
    budget = results["settings"]["budget"]
    for row in searches:
        # CMA-ES may stop early on a flat fitness (the pico zoo's random models all score ~0).
        low = 1 if row["searcher"] == "cmaes" else budget
        assert low <= row["evaluations"] < budget + results["settings"]["pop_size"], row["searcher"]
        assert row["pick"]["val"] is not None and row["pick"]["test"] is not None
        assert set(row["pick"]["test"]) == {*tasks, "zoo_shout"}
        assert row["front"] and all(m["test"] is not None for m in row["front"])
        assert 0.0 <= row["hv_test"] <= 1.0 and row["search_seconds"] > 0
    assert (out / "fronts.png").stat().st_size > 0 and (out / "accuracy.png").stat().st_size > 0
    assert "## Targets" in (out / "results.md").read_text()


def test_a_second_invocation_reuses_every_search_and_score(experiment):
    out, cache = experiment
    before = json.loads((out / "results.json").read_text())
    again = run(out, cache)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "run folder:" not in again.stderr and "scoring" not in again.stderr
    after = json.loads((out / "results.json").read_text())
    assert [r["pick"] for r in after["rows"]] == [r["pick"] for r in before["rows"]]


def test_the_readme_block_is_replaced_by_the_generated_summary(experiment, tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import table

    out, _ = experiment
    results = json.loads((out / "results.json").read_text())
    readme = tmp_path / "README.md"
    readme.write_text(f"# Experiments\n\n{table.README_BEGIN}\nstale numbers\n{table.README_END}\n\n## Next\n")
    written = table.render(results, tmp_path / "report", readme)
    text = readme.read_text()
    assert readme in written and "stale numbers" not in text
    assert text.startswith("# Experiments\n\n") and text.endswith(f"{table.README_END}\n\n## Next\n")
    block = text.split(table.README_BEGIN)[1].split(table.README_END)[0]
    assert list(main_table("## Best-on-validation pick, held-out test\n\n" + block.split("\n\n", 2)[2])) == \
        list(main_table((out / "results.md").read_text()))
    assert "## Targets" in block
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert plain not in table.render(results, tmp_path / "report", plain) and plain.read_text() == "no markers\n"


def test_learning_curves_read_each_run_at_every_budget(experiment):
    """curves.py on the same tiny runs (plus the default search, which races): a pick per
    budget per run, each scored on validation and test; costs never decrease along a run; the
    default's promotions are counted by their measured cost; the table has a row per searcher."""
    out, cache = experiment
    env = {**os.environ, "EVOMERGE_CACHE": str(cache), "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT.parent / "curves.py"), "--quick", "--zoo", "pico",
                           "--searchers", "default,cmaes,random",  # the TSV-M rows add time, not plumbing
                           "--workers", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    curves = json.loads((out / "curves.json").read_text())
    assert curves["budgets"] == [4, 8]
    assert sorted({r["searcher"] for r in curves["rows"]}) == ["cmaes", "default", "random"]
    for row in curves["rows"]:
        assert [p["budget"] for p in row["points"]] == [4, 8]
        assert all(p["pick"]["val"] is not None and p["pick"]["test"] is not None for p in row["points"])
    sys.path.insert(0, str(SCRIPT.parent))
    import curves as module

    from evomerge.run import RunDir

    default = next(r for r in curves["rows"] if r["searcher"] == "default")
    steps = module.cumulative_costs(RunDir(default["folder"]).archive())
    costs = [c for _, c in steps]
    assert costs == sorted(costs) and default["promotions"] >= 1
    promoted = [c - before for (e, c), (_, before) in zip(steps[1:], steps)
                if e.fidelity == "full" and e.cached_from is None]
    assert promoted and all(step > 0 for step in promoted)
    # A searcher that verifies its best estimates pays for them out of the budget it is read at.
    verifying = module.Curve("default", 0, Path(default["folder"]), curves["tasks"], 2, 3, verify=3, verify_cost=1.5)
    assert verifying.searched(8) == 8 - 4.5 and verifying.searched(1) == steps[0][1]
    cost = {e.id: c for e, c in steps}
    shortlist = verifying.shortlist(8)
    assert len(shortlist) == 3 and all(cost[e.id] <= 3.5 for e in shortlist)
    table = (out / "curves.md").read_text()
    assert all(f"| `{name}` |" in table for name in ("default", "cmaes", "random"))
