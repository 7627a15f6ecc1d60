"""Reports on a run folder: the front, picks, tables, plots, and export, on synthetic runs written
straight into the folder layout (no search needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from evomerge.errors import UserError
from evomerge.recipe import ExpertParams, MethodConfig, Recipe
from evomerge.front import knee
from evomerge.report.plots import write_plots
from evomerge.report.run_data import front, objectives, pick, pick_label, summary
from evomerge.report.text import render
from evomerge.run import ArchiveEntry, RunDir

torch.set_num_threads(1)

MAX2 = [{"name": "add", "direction": "max", "reference": 0.0},
        {"name": "sort", "direction": "max", "reference": 0.0}]
# id: (add, sort, error, same recipe as)
ROWS = {0: (0.2, 0.2, None, None),   # dominated by 1
        1: (0.5, 0.5, None, None),   # knee: nearest the ideal after scaling
        2: (0.9, 0.1, None, None),   # best add
        3: (0.1, 0.8, None, None),   # best sort
        4: (1.0, 1.0, "NaN weights", None),  # would dominate everything, but failed
        5: (0.99, 0.99, None, 1)}    # a re-evaluation of recipe 1: only the first counts


def recipe(weight: float, base="base", refs=None, experts=("add", "sort")) -> Recipe:
    config = MethodConfig("task_arithmetic", {e: ExpertParams(weight=weight) for e in experts})
    return Recipe.uniform(base, experts, 4, config, expert_refs=refs)


def entry(i: int, values: dict, recipe_: Recipe, error=None, generation=0, cached_from=None):
    return ArchiveEntry(id=i, generation=generation, genome=[0.1 * i], recipe_hash=recipe_.hash,
                        recipe=recipe_.to_dict(), objectives=values, scores=dict(values),
                        error=error, cached_from=cached_from)


def write_run(root, objs, entries, history=(), members=None, config=None):
    run = RunDir.create(root, config or {"tasks": [o["name"] for o in objs], "seed": 0})
    for e in entries:
        run.append(e)
    for h in history:
        run.append_history(h)
    if members is not None:
        run.write_json(run.pareto_path, {"generation": 0, "objectives": objs, "members": members})
    return run


@pytest.fixture
def run(tmp_path):
    recipes = {i: recipe(0.1 + 0.1 * i) for i in ROWS}
    entries = [entry(i, {"add": a, "sort": s}, recipes[same if same is not None else i], err,
                     generation=i // 3, cached_from=same)
               for i, (a, s, err, same) in ROWS.items()]
    history = [{"generation": 0, "evaluations": 3, "best": {"add": 0.9, "sort": 0.2},
                "hypervolume": 0.2, "seconds": 10.0, "candidates_per_min": 18.0},
               {"generation": 1, "evaluations": 6, "best": {"add": 0.9, "sort": 0.8},
                "hypervolume": 0.4, "seconds": 20.0, "candidates_per_min": 18.0}]
    members = [{"id": 1, "recipe_hash": recipes[1].hash, "objectives": {"add": 0.5, "sort": 0.5},
                "scores": {"add": 0.5, "sort": 0.5}, "test_scores": {"add": 0.45, "sort": 0.55}}]
    return write_run(tmp_path / "run", MAX2, entries, history, members)


def test_front_excludes_dominated_failed_and_repeated_entries(run):
    assert [e.id for e in front(run)] == [1, 2, 3]


def test_picks(run):
    assert pick(run, "knee").id == 1
    assert pick(run, "best:add").id == 2 and pick(run, "best:sort").id == 3
    assert pick(run, "0").id == 0  # any archive id, dominated or not
    assert pick_label("best:add") == "best-add" and pick_label("7") == "id-7"


@pytest.mark.reliability("bad input", "export --pick of an unknown objective, an id not in the archive, a failed candidate, or nonsense")
@pytest.mark.parametrize("spec, named", [("best:nope", "add, sort"), ("42", "ids 0-5"),
                                         ("middle", "knee, best:<objective>"),
                                         ("4", "NaN weights")])
def test_bad_picks_are_one_line_errors(run, spec, named):
    with pytest.raises(UserError) as caught:
        pick(run, spec)
    message = str(caught.value)
    assert "\n" not in message and named in message and spec.split(":")[-1] in message


def test_knee_of_a_minimized_objective_and_of_a_single_objective():
    objs = objectives_of([{"name": "acc", "direction": "max", "reference": 0.0},
                          {"name": "err", "direction": "min", "reference": 1.0}])
    r = recipe(0.5)
    points = [entry(0, {"acc": 0.9, "err": 0.9}, r), entry(1, {"acc": 0.7, "err": 0.2}, r),
              entry(2, {"acc": 0.2, "err": 0.1}, r)]
    assert knee(points, objs).id == 1
    assert knee(points, objs[1:]).id == 2  # one objective: the knee is simply the best


def objectives_of(dicts):
    from evomerge.fitness.objectives import Objective

    return [Objective.from_dict(d) for d in dicts]


def test_summary_and_table(run):
    data = summary(run)
    assert [r["id"] for r in data["front"]] == [1, 2, 3] and data["knee"] == 1
    assert data["front"][0]["test_scores"] == {"add": 0.45, "sort": 0.55}
    assert data["front"][1]["test_scores"] is None
    assert data["front"][0]["recipe"] == recipe(0.2).summary()
    progress = data["progress"]
    assert (progress["evaluations"], progress["unique"], progress["errors"]) == (6, 5, 1)
    assert progress["best"] == {"add": 0.9, "sort": 0.8}  # the failed entry's 1.0 does not count
    # front (0.1,0.8), (0.5,0.5), (0.9,0.1) against reference (0,0), as a staircase of rectangles
    assert progress["hypervolume"] == pytest.approx(0.1 * 0.8 + 0.4 * 0.5 + 0.4 * 0.1)
    assert [h["hypervolume"] for h in progress["history"]] == [0.2, 0.4]
    text = render(data)
    lines = text.splitlines()
    assert lines[2].split() == ["id", "gen", "add", "val", "add", "test", "sort", "val", "sort",
                                "test", "recipe"]
    rows = lines[4:7]
    assert [row.split()[0] for row in rows] == ["1*+", "2", "3"]  # knee and best:mean
    assert "(* knee, + best:mean)" in lines[1] and "every validation item" not in text  # nothing verified
    assert rows[0].split()[2:6] == ["0.5000", "0.4500", "0.5000", "0.5500"]
    assert rows[1].split()[2:6] == ["0.9000", "-", "0.1000", "-"] and "task_arithmetic" in rows[1]
    assert lines[7].startswith("evaluations 6 (1 failed), generations 2")


def test_inspect_while_the_run_goes_on(tmp_path):
    """pareto.json is from generation 0, the archive already holds a better generation-1 entry
    and a torn last line: the front comes from the archive."""
    r = recipe(0.3)
    run = write_run(tmp_path / "run", MAX2, [entry(0, {"add": 0.3, "sort": 0.3}, r),
                                             entry(1, {"add": 0.6, "sort": 0.6}, recipe(0.4), generation=1)],
                    members=[{"id": 0, "recipe_hash": r.hash, "objectives": {}, "scores": {},
                              "test_scores": None}])
    with open(run.archive_path, "a") as out:
        out.write('{"id": 2, "generation": 1, "gen')
    data = summary(run)
    assert [row["id"] for row in data["front"]] == [1] and data["progress"]["torn_lines"] == 1
    assert all(p.stat().st_size > 5000 for p in write_plots(run))


def test_before_the_first_generation(tmp_path):
    """No pareto.json yet: no objectives, so no front, but ids, the table and plots still work."""
    run = write_run(tmp_path / "run", MAX2, [entry(0, {"add": 0.3, "sort": 0.3}, recipe(0.3))])
    assert objectives(run) == [] and summary(run)["front"] == []
    assert "not known yet" in render(summary(run)) and summary(run)["progress"]["evaluations"] == 1
    with pytest.raises(UserError, match="no finished generation"):
        pick(run, "knee")
    assert pick(run, "0").id == 0
    assert all(p.stat().st_size > 5000 for p in write_plots(run))


def image_colors(path) -> int:
    from PIL import Image

    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    return len(np.unique(pixels, axis=0))


@pytest.mark.parametrize("count", [1, 2, 3])
def test_plots_are_real_pictures(tmp_path, count):
    names = ["add", "sort", "reverse"][:count]
    objs = [{"name": n, "direction": "max", "reference": 0.0} for n in names]
    rng = np.random.default_rng(0)
    entries = [entry(i, dict(zip(names, map(float, rng.random(count)))), recipe(0.01 * (i + 1)),
                     generation=i // 10) for i in range(30)]
    history = [{"generation": g, "evaluations": 10 * (g + 1), "best": {}, "hypervolume": 0.1 * g,
                "seconds": 1.0, "candidates_per_min": 1.0} for g in range(3)]
    run = write_run(tmp_path / "run", objs, entries, history, members=[])
    paths = write_plots(run)
    assert [p.name for p in paths] == ["pareto.png", "hypervolume.png"]
    for path in paths:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        assert image_colors(path) > 20


# --- the command line -----------------------------------------------------------------------------


def test_inspect_command(run, evomerge_main):
    cli = evomerge_main
    done = cli("inspect", str(run.root), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert [r["id"] for r in data["front"]] == [1, 2, 3] and data["knee"] == 1
    assert data["plots"] == [str(run.plots / "pareto.png"), str(run.plots / "hypervolume.png")]
    text = cli("inspect", str(run.root))
    assert text.returncode == 0 and "1*" in text.stdout and "pareto.png" in text.stdout


def test_inspect_and_report_read_the_run_folder_without_torch(run):
    """They read JSON: importing torch (seconds) would be all their time. A subprocess, since
    this one has torch loaded."""
    code = ("import sys; from evomerge.cli import main; "
            f"assert main(['inspect', {str(run.root)!r}, '--json']) == 0; "
            f"assert main(['report', {str(run.root)!r}]) == 0; "
            "loaded = sorted(m for m in sys.modules if m.split('.')[0] == 'torch'); assert not loaded, loaded")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert (run.root / "report.html").is_file()


@pytest.mark.parametrize("args, named", [(["inspect", "nowhere"], "nowhere"),
                                         (["export", "RUN", "--pick", "best:speed"], "speed"),
                                         (["export", "RUN", "--pick", "99"], "99")])
def test_command_errors_are_one_line(run, args, named, evomerge_main):
    done = evomerge_main(*[str(run.root) if a == "RUN" else a for a in args])
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and named in lines[0], done.stderr


def test_help_shows_examples(evomerge_main):
    for command in ("inspect", "export", "pool"):
        done = evomerge_main(command, "--help")
        assert done.returncode == 0 and "example" in done.stdout, command


@pytest.mark.reliability("safety", "`evomerge export` into an existing folder: refused in one line unless --force, "
                                   "which replaces it whole")
def test_export_command_writes_a_model_equal_to_the_merge(pico_zoo, pico_cache, tmp_path, evomerge_main):
    cli = evomerge_main
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.merge.engine import Merger
    from evomerge.pool import ModelPool

    refs = {k: str(v) for k, v in pico_zoo.experts.items()}
    experts = tuple(refs)
    config = MethodConfig("ties", {e: ExpertParams(weight=0.3 + 0.1 * i, density=0.6) for i, e in enumerate(experts)})
    chosen = Recipe.uniform(str(pico_zoo.base), experts, 4, config, expert_refs=refs)
    other = recipe(0.5, base=str(pico_zoo.base), refs=refs, experts=experts)
    objs = [{"name": "zoo_add", "direction": "max", "reference": 0.0}]
    run = write_run(tmp_path / "run", objs, [entry(0, {"zoo_add": 0.2}, other),
                                             entry(1, {"zoo_add": 0.7}, chosen)], members=[])
    done = cli("export", str(run.root), "--pick", "best:zoo_add", cache=pico_cache)
    assert done.returncode == 0, done.stderr
    out = run.export_dir("best-zoo_add")
    assert {"recipe.yaml", "mergekit.yaml", "model"} <= {p.name for p in out.iterdir()}
    assert Recipe.from_yaml((out / "recipe.yaml").read_text()).hash == chosen.hash
    assert "| zoo_add (validation) | 0.7000 |" in (out / "model" / "README.md").read_text()
    again = cli("export", str(run.root), "--pick", "best:zoo_add", cache=pico_cache)
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1
    assert "already exists; replace it with --force" in again.stderr
    assert cli("export", str(run.root), "--pick", "best:zoo_add", "--force", cache=pico_cache).returncode == 0
    loaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    tokens = AutoTokenizer.from_pretrained(out / "model")("add: 12+30 =", return_tensors="pt").input_ids
    merged = Merger(ModelPool(str(pico_zoo.base), refs)).materialize(chosen)
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, merged(tokens).logits, atol=1e-5, rtol=0)


def test_one_front_rule_for_the_search_the_report_and_the_experiments(run):
    """evomerge.front is what the search's history and test scoring, inspect and the experiments
    all read: an entry with a non-finite objective never competes (its sort of 2.0 would
    dominate every other), archive order does not matter, ties go to the lower id."""
    from evomerge import front as fronts

    objs = objectives(run)
    entries = [*run.archive(), entry(6, {"add": float("nan"), "sort": 2.0}, recipe(0.95))]
    members = fronts.front(reversed(entries), objs)
    assert [e.id for e in members] == [1, 2, 3]
    assert [e.id for e in fronts.picks(members, objs)] == [1, 2, 3]  # knee, best add, best sort
    assert fronts.best_values(objs, members) == {"add": 0.9, "sort": 0.8}
    rows = [{"add": 1.0, "sort": 0.0}, {"add": 1.0, "sort": 0.0}, {"add": 0.5, "sort": 0.0}]
    assert fronts.non_dominated(objs, rows) == [0, 1]  # equal rows are both kept
    err = objectives_of([{"name": "err", "direction": "min", "reference": 1.0}])[0]
    tied = [entry(i, {"err": 0.1}, recipe(0.5)) for i in (4, 2, 7)]
    assert fronts.best(err, tied).id == 2


def test_a_promotion_replaces_the_estimate_it_verified(tmp_path):
    """Racing's full-split value of a recipe is what competes, not its earlier estimate (whatever
    their ids), and ``best:mean`` picks among the verified candidates by the tasks' mean on a
    per-task run, even where an unverified estimate has the higher mean."""
    from evomerge import front as fronts

    recipes = {i: recipe(0.1 + 0.1 * i) for i in ROWS}
    entries = [entry(i, {"add": a, "sort": s}, recipes[same if same is not None else i], err, cached_from=same)
               for i, (a, s, err, same) in ROWS.items()]
    promoted = entry(6, {"add": 0.6, "sort": 0.05}, recipes[2])
    promoted.fidelity = "full"
    run = write_run(tmp_path / "raced", MAX2, [*entries, promoted], members=[])
    objs = objectives_of(MAX2)
    assert [e.id for e in fronts.competing(run.archive(), objs)] == [0, 1, 3, 6]
    assert [e.id for e in front(run)] == [1, 3, 6]
    assert pick(run, "best:add").id == 6 and pick(run, "best:mean").id == 6
    assert fronts.averageable(objs) and not fronts.averageable(
        objectives_of([{"name": "err", "direction": "min", "reference": 1.0}]))


def test_best_mean_is_the_best_verified_candidate_and_inspect_lists_them(tmp_path):
    """Estimates 0.9 (lucky) and 0.6 verified at 0.55 and 0.58: best:mean is the 0.58 one, not the
    best estimate nor the first verified; summary and text list the verified candidates best
    first with their test scores, best:mean marked +, and the knee stays a front member."""
    from evomerge import front as fronts

    r = {i: recipe(0.1 * i) for i in range(1, 5)}
    entries = [entry(0, {"add": 0.9, "sort": 0.9}, r[1]), entry(1, {"add": 0.6, "sort": 0.6}, r[2]),
               entry(2, {"add": 0.2, "sort": 0.3}, r[3])]
    for i, (source, value) in enumerate([(r[1], 0.55), (r[2], 0.58)], start=3):
        verified = entry(i, {"add": value, "sort": value}, source, generation=1)
        verified.fidelity = "full"
        entries.append(verified)
    members = [{"id": 4, "recipe_hash": r[2].hash, "test_scores": {"add": 0.5, "sort": 0.52}}]
    run = write_run(tmp_path / "verified", MAX2, entries, members=[], config={"tasks": ["add", "sort"]})
    run.write_json(run.pareto_path, {"generation": 1, "objectives": MAX2, "members": [], "verified": members})
    objs = objectives_of(MAX2)
    assert [e.id for e in fronts.verified(run.archive(), objs)] == [4, 3]
    assert pick(run, "best:mean").id == 4
    assert [e.id for e in fronts.picks(run.archive(), objs)] == [4]  # knee, best add/sort and mean agree
    data = summary(run)
    assert data["best_mean"] == 4 and [v["id"] for v in data["verified"]] == [4, 3]
    assert data["verified"][0]["test_scores"] == {"add": 0.5, "sort": 0.52}
    text = render(data).splitlines()
    at = next(i for i, line in enumerate(text) if "scored on every validation item: 2 candidate(s)" in line)
    assert [line.split()[0] for line in text[at + 3:at + 5]] == ["4*+", "3"]
    assert [c.strip() for c in text[at + 1].split("  ") if c.strip()][:3] == ["id", "gen", "scored on"]  # the HTML report's column, spelled alike
    assert text[at + 3].split()[2:8] == ["all", "items", "0.5800", "0.5000", "0.5800", "0.5200"]
