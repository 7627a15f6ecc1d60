"""The run report page (``evomerge report``, rewritten by the search each generation): what it
takes from the run folder, checked without a browser, and one load of a pico run's page in real
headless Chromium (no JavaScript error, every plot drew its marks, a screenshot kept)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import pytest
import torch

from evomerge import front as fronts
from evomerge.fitness.objectives import Objective, hypervolume
from evomerge.layer_path import candidate_line
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe
from evomerge.report.figures import figures
from evomerge.report.html import render_html, write_report
from evomerge.report.page_data import parent_kind, recipe_view, report_data
from evomerge.report.run_data import pick
from evomerge.run import ArchiveEntry, RunDir

torch.set_num_threads(1)  # the kinship of the pico models: 0.05 s on one thread, 12 s on two busy cores
GENERATIONS, POP, VERIFY = 4, 6, 3


@pytest.fixture(scope="module")
def pico_run(pico_zoo, tmp_path_factory) -> RunDir:
    """A run folder as a pico search over per-group methods writes it: its composed config, the
    parents (base, experts, uniform merges), generations of recipes the pico search space decodes
    from random genomes, the best three estimates verified on every item, history, pareto.json
    with held-out scores for the picks, and kinship.json computed from the pico models. Scores
    are made up (running models is test_search.py's business), so the folder takes a second."""
    from evomerge.config import compose, read_config
    from evomerge.kinship import write_run_kinship
    from evomerge.search.space import search_space

    experts = {name: str(path) for name, path in pico_zoo.experts.items()}
    config = compose(["zoo=pico", "space=methods", "space.granularity=2", "algorithm=nsga2"])
    layers = json.loads((Path(pico_zoo.base) / "config.json").read_text())["num_hidden_layers"]
    space = search_space(read_config(config).space, str(pico_zoo.base), tuple(experts), layers, expert_refs=experts)
    tasks = [f"zoo_{e}" for e in experts]
    objs = [Objective(t, "max", 0.0) for t in tasks]
    rng = random.Random(0)
    run = RunDir.create(tmp_path_factory.mktemp("report") / "pico-run", {**config, "tasks": tasks})

    def scored(i, generation, recipe, genome, fidelity="estimate", like=None):
        values = {t: round(rng.randrange(17) / 16, 4) for t in tasks} if like is None else \
            {t: min(1.0, max(0.0, v + rng.choice([-2, -1, 0, 1]) / 16)) for t, v in like.items()}
        return ArchiveEntry(i, generation, genome, recipe.hash, recipe.to_dict(), values, dict(values), 0.1, 0.4, "w1",
                            fidelity=fidelity)

    entries = [scored(i, -1, recipe, []) for i, recipe in enumerate(space.parent_recipes().values())]
    history = []
    for generation in range(GENERATIONS):
        for _ in range(POP):
            genome = space.random(rng)
            entries.append(scored(len(entries), generation, space.decode(genome), list(genome.values())))
        members = fronts.front(entries, objs)
        history.append({"generation": generation, "evaluations": len(entries), "errors": 0,
                        "best": fronts.best_values(objs, members), "seconds": 10.0 * (generation + 1),
                        "hypervolume": hypervolume(objs, [e.objectives for e in members]), "candidates_per_min": 36.0})
    for estimate in fronts.by_mean(fronts.competing(entries, objs), objs)[:VERIFY]:
        entries.append(scored(len(entries), GENERATIONS, Recipe.from_dict(estimate.recipe), [], "full", estimate.scores))
    for entry in entries:
        run.append(entry)
    for record in history:
        run.append_history(record)
    tests = [{"id": e.id, "recipe_hash": e.recipe_hash, "test_scores": {t: 0.5 for t in tasks}}
             for e in fronts.picks(entries, objs)]
    run.write_json(run.pareto_path, {"generation": GENERATIONS - 1, "objectives": [o.to_dict() for o in objs],
                                     "members": tests, "verified": []})
    write_run_kinship(run)
    return run


def test_the_front_panel_groups_candidates_as_the_front_and_picks_do(pico_run):
    """Front members, the run's starting points (base, four experts, three uniform merges) and
    the picks are those of evomerge.front, and each pick's export command picks that very entry."""
    from evomerge.report.run_data import objectives

    data = report_data(pico_run)
    objs, entries = objectives(pico_run), pico_run.archive()
    groups = data["front"]["groups"]
    assert groups["front"]["id"] == [e.id for e in fronts.front(entries, objs)]
    assert set(groups["front"]["id"]).isdisjoint(groups["evaluated"]["id"])
    assert len(groups["front"]["id"]) + len(groups["evaluated"]["id"]) == len(fronts.competing(entries, objs))
    by_id = {e.id: e for e in entries}
    parent = {e.recipe_hash: e.id for e in entries if e.generation == -1}  # a verified parent is a later id
    assert [sorted(parent[by_id[i].recipe_hash] for i in groups[g]["id"]) for g in ("base", "experts", "grid")] \
        == [[0], [1, 2, 3, 4], [5, 6, 7]]
    assert [p["id"] for p in data["picks"]] == [e.id for e in fronts.picks(entries, objs)] == groups["picks"]["id"]
    for row in data["picks"]:
        spec = row["export"].split("--pick ")[1]
        assert row["export"] == f"evomerge export {pico_run.root} --pick {spec}" and spec == row["picks"][0]
        assert pick(pico_run, spec).id == row["id"] and row["test_scores"] == {t: 0.5 for t in data["tasks"]}
    verified = next(e for e in entries if e.fidelity == "full")
    hover = groups["front"]["hover"] + groups["evaluated"]["hover"]
    shown = next(h for h in hover if h.startswith(f"id {verified.id} "))
    assert "estimate (id" in shown and f"all items (id {verified.id})" in shown and "layer group" in shown
    assert data["counts"] == {"evaluations": len(entries), "distinct": len(entries) - VERIFY, "errors": 0,
                              "generations": GENERATIONS, "front": len(groups["front"]["id"]), "verified": VERIFY}


def test_progress_estimates_and_kinship_come_from_the_folder(pico_run):
    data = report_data(pico_run)
    assert data["progress"]["generation"] == list(range(GENERATIONS))
    assert set(data["progress"]["best"]) == set(data["tasks"]) and all(h > 0 for h in data["progress"]["hypervolume"])
    estimates = data["estimates"]
    assert estimates["pairs"] == VERIFY and set(estimates["tasks"]) == set(data["tasks"])
    for pairs in estimates["tasks"].values():  # each verified score lies within 2/16 of its estimate
        assert len(pairs["full"]) == VERIFY and all(abs(a - b) <= 0.126 for a, b in zip(pairs["estimate"], pairs["full"]))
    kinship = data["kinship"]
    assert kinship["experts"] == ["add", "reverse", "sort", "upper"]
    assert [row[i] for i, row in enumerate(kinship["cosine"])] == [1.0] * 4 and kinship["overlap"] is not None


def test_recipe_views_per_kind():
    """A recipe split by attention/MLP: a row per expert, parameter and component, a column per
    layer and outside, the method per column; a layer path: its steps by source and scale; an
    unknown kind or an unreadable recipe: a note, never an exception."""
    ties = MethodConfig("ties", {"a": ExpertParams(weight=0.2, density=0.5), "b": ExpertParams(weight=0.8, density=0.7)})
    linear = MethodConfig("linear", {"a": ExpertParams(weight=0.4), "b": ExpertParams(weight=0.6)})
    recipe = Recipe("base", ("a", "b"), 3, (LayerGroup(0, 3, "all", linear), LayerGroup(1, 3, "attn", ties)), linear)
    view = recipe_view(entry(0, recipe.to_dict()))
    assert view["kind"] == "recipe" and view["columns"] == ["0", "1", "2", "outside"]
    assert view["rows"][:2] == ["a weight", "b weight"]
    assert "a density · attn" in view["rows"] and len(view["z"]) == len(view["rows"])
    assert view["z"][view["rows"].index("a weight · attn")] == [0.4, 0.2, 0.2, 0.4]
    assert [m["methods"] for m in view["methods"]] == [["linear"] * 4, ["linear", "ties", "ties", "linear"]]
    path = {"kind": "path", "base": "base", "experts": ["a", "b"], "num_layers": 4, "outside": "b",
            "slices": [{"source": "b", "start": 0, "end": 3, "scale": 1.0}, {"source": "a", "start": 2, "end": 4, "scale": 0.8}]}
    view = recipe_view(entry(1, path))
    assert view["kind"] == "path" and view["rows"] == ["a", "b"] and view["columns"] == ["0", "1", "2", "3", "4"]
    assert view["z"] == [[None, None, None, 0.8, 0.8], [1.0, 1.0, 1.0, None, None]]
    assert view["blocks"][0] == [None, None, None, 2, 3]
    assert candidate_line(path) == "path of 5 blocks: b[0-2] → a[2-3]×0.80 · outside: b"
    assert "kind 'tree'" in recipe_view(entry(2, {"kind": "tree"}))["note"]
    assert "unreadable" in recipe_view(entry(3, {"base": "base"}))["note"]
    assert candidate_line({"groups": 3}) == "(unreadable recipe)" and candidate_line({"kind": "tree"}) == "(tree candidate)"
    assert parent_kind(entry(4, path, generation=-1)) == "experts"


def entry(i, recipe, generation=0, values=None):
    values = values or {"t": 0.5}
    return ArchiveEntry(i, generation, [], f"h{i}", recipe, values, dict(values))


def resolve(node: Any, data: Mapping[str, Any]) -> Any:
    """A figure with its ``$ref``s replaced by what they point at in ``data``: what the page's
    JavaScript does before plotting, so plotly's own schema can validate the figure."""
    if isinstance(node, list):
        return [resolve(item, data) for item in node]
    if isinstance(node, dict):
        if set(node) == {"$ref"}:
            target: Any = data
            for key in node["$ref"].split("/"):
                target = target[int(key)] if isinstance(target, list) else target[key]
            return target
        return {key: resolve(value, data) for key, value in node.items()}
    return node


def test_every_figure_is_valid_plotly(pico_run, tmp_path):
    """Each figure, its references resolved as the page resolves them, passes plotly's own
    schema; the run's, and a data-flow run's with a single objective."""
    import plotly.graph_objects as go

    data = report_data(pico_run)
    plots = figures(data)
    assert [p["id"] for p in plots if "note" in p] == []
    path = {"kind": "path", "base": "base", "experts": ["a"], "num_layers": 2, "outside": "base",
            "slices": [{"source": "a", "start": 0, "end": 2, "scale": 1.2}]}
    flow = RunDir.create(tmp_path / "flow", {"tasks": ["t"]})
    for i in range(3):
        flow.append(entry(i, path, generation=i - 1, values={"t": 0.1 * i}))
    flow.write_json(flow.pareto_path, {"objectives": [{"name": "t", "direction": "max", "reference": 0.0}]})
    flow_data = report_data(flow)
    flow_plots = figures(flow_data)
    assert {p["id"]: "note" in p for p in flow_plots} == {"plot-front": False, "plot-progress": True, "plot-recipe-2": False,
                                                         "plot-estimates": True, "plot-kinship": True}
    for source, figs in ((data, plots), (flow_data, flow_plots)):
        for plot in figs:
            if "figure" in plot:
                go.Figure(resolve(plot["figure"], source))  # raises on any invalid property


def test_a_run_before_its_first_generation_still_gets_a_page(tmp_path):
    run = RunDir.create(tmp_path / "new", {"tasks": ["t"]})
    page = write_report(run).read_text()
    notes = [p for p in figures(report_data(run)) if "note" in p]
    assert len(notes) == 5 and "objectives not known yet" in page and "no picks yet" in page


@pytest.mark.reliability("bad input", "`evomerge report` of a folder that is not a run, or with --out in a missing "
                                      "folder or naming a folder")
def test_the_command_writes_the_page_and_refuses_bad_input_in_one_line(pico_run, tmp_path, capsys):
    from evomerge.cli import main

    assert main(["report", str(pico_run.root), "--out", str(tmp_path / "page.html")]) == 0
    assert "wrote" in capsys.readouterr().out and (tmp_path / "page.html").stat().st_size > 1_000_000
    for args, named in [(["report", str(tmp_path / "nowhere")], "nowhere"),
                        (["report", str(pico_run.root), "--out", str(tmp_path / "no" / "page.html")], "no"),
                        (["report", str(pico_run.root), "--out", str(tmp_path)], str(tmp_path))]:
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("evomerge: error:") and named in lines[0], args


def test_the_page_is_self_contained_and_escapes_what_it_shows(pico_run):
    """plotly.js is inlined once and nothing is fetched (no src or href); text from the run
    folder cannot close the data's script element."""
    from evomerge.report.html import _plotly_js

    data = report_data(pico_run)
    data["run"] = "</script><script>alert(1)</script>"
    page = render_html(data)
    assert page.count(_plotly_js()) == 1
    own = page.replace(_plotly_js(), "")
    assert " src=" not in own and " href=" not in own and "<script>alert(1)" not in own
    assert own.count("<script") == 4  # error catcher, plotly.js, the data, the drawing


def test_the_page_draws_in_headless_chromium(pico_run):
    """The pico run's page in real Chromium: no JavaScript error, every plot drew marks (points,
    lines, heatmap cells, bars), nothing left as a note, with every host unreachable (so nothing
    came from a CDN). The screenshot is kept under
    $EVOMERGE_ARTIFACTS (default: beside the page) and its path printed."""
    from headless import chromium, load

    if chromium() is None:
        pytest.skip("no chromium binary on PATH (CI installs Debian's chromium in .ci/run)")
    page = write_report(pico_run)
    where = Path(os.environ.get("EVOMERGE_ARTIFACTS", page.parent))
    where.mkdir(parents=True, exist_ok=True)
    shot = where / "report-pico.png"
    status = load(page, screenshot=shot, size=(1200, 2600))
    print(f"screenshot: {shot}")
    expected = [p["id"] for p in figures(report_data(pico_run))]
    assert status["done"] and status["errors"] == [], status
    assert sorted(status["plots"]) == sorted(expected) and all(n > 0 for n in status["plots"].values()), status
    assert status["plots"]["plot-front"] >= len(pico_run.archive()) - VERIFY  # every distinct candidate drawn
    assert shot.stat().st_size > 20_000
