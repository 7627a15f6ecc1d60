"""experiments/zoo_methods/run.py end to end on the pico zoo, tiny: every method's grid is scored
on validation, each pick on test, and the table has a row of numbers per method."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "zoo_methods" / "run.py"


def test_every_method_gets_a_validated_pick_scored_on_test(pico_zoo, pico_cache, tmp_path):
    env = {**os.environ, "EVOMERGE_CACHE": str(pico_cache), "RAY_ADDRESS": "local", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--quick", "--zoo", "pico", "--workers", "1",
                           "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads((tmp_path / "results.json").read_text())
    methods = [r["method"] for r in results["rows"]]
    assert methods == ["task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "star", "cabs"]
    for row in results["rows"]:
        assert all(point["val"] is not None for point in row["grid"])
        best = max(row["grid"], key=lambda p: sum(p["val"][t] for t in results["tasks"]))
        assert row["pick"]["recipe_hash"] == best["recipe_hash"]  # the pick is the best on validation
        assert set(row["pick"]["test"]) == set(results["tasks"]) | set(results["probe_tasks"])
    table = (tmp_path / "results.md").read_text()
    assert all(f"| `{m}` |" in table for m in methods) and "Target of the issue" in table
