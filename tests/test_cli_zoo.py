"""A user's session on the real zoo, through the command line: search, inspect, export, and the
exported folder reloaded with transformers scoring what the archive says."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.zoo
TASKS = ("zoo_add", "zoo_upper")


def cli(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                          env={**os.environ}, timeout=timeout)


@pytest.fixture(scope="module")
def zoo_run(zoo, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    # Two of the four skills: the held-out test scoring of the knee (the full test split) is half the run.
    done = cli("search", f"runs_dir={runs}", "name=tiny", "algorithm=ga", "fitness=random", "refine=none", f"tasks=[{','.join(TASKS)}]",
               "fitness.objectives=[mean]", "fitness.items_per_task=10", "fitness.probe_merges=0",
               "space.granularity=0", "space.knots=0", "space.parents=false", "fitness.multi_fidelity=0",
               "fitness.verify=0",  # the front holds the 10-item estimates the export is checked against
               "space.methods=[task_arithmetic]",  # its export is checked against real mergekit
               "algorithm.pop_size=4", "algorithm.generations=2",
               "runtime.workers=1")  # a second worker would load the pool again for 8 candidates
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "tiny"


def test_inspect_shows_the_front_and_draws_real_plots(zoo_run, evomerge_main):
    done = evomerge_main("inspect", str(zoo_run), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout)
    assert summary["progress"]["evaluations"] == 8 and summary["front"]
    # One objective: the front is the recipes tied at the best mean; the knee among them is tested.
    best = max(r["objectives"]["mean"] for r in summary["front"])
    assert all(r["objectives"]["mean"] == best for r in summary["front"])
    assert any(r["test_scores"] is not None for r in summary["front"] if r["knee"])
    from PIL import Image

    for name in ("pareto.png", "hypervolume.png"):
        image = Image.open(zoo_run / "plots" / name).convert("RGB")
        assert image.size[0] > 300 and len(set(image.getdata())) > 20, name


def test_exported_model_scores_what_the_archive_says(zoo_run, zoo, tmp_path, evomerge_main):
    summary = json.loads(evomerge_main("inspect", str(zoo_run), "--json").stdout)
    best = summary["front"][0]
    done = evomerge_main("export", str(zoo_run), "--pick", str(best["id"]), "--out", str(tmp_path / "merge"))
    assert done.returncode == 0, done.stderr[-2000:]
    assert {p.name for p in (tmp_path / "merge").iterdir()} >= {"recipe.yaml", "mergekit.yaml", "model"}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.config import FitnessConfig
    from evomerge.fitness.evaluator import Evaluator

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merge" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merge" / "model")
    evaluator = Evaluator(FitnessConfig(estimator="random", objectives=("mean",), items_per_task=10),
                          list(TASKS), tokenizer, include_path=str(zoo.task_dir))
    evaluation = evaluator.score(model)
    assert evaluation.objectives["mean"] == pytest.approx(best["objectives"]["mean"], abs=1e-9)
    assert evaluation.scores == pytest.approx(best["scores"], abs=1e-9)
