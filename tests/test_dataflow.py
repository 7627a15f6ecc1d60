"""Data-flow merging: layer paths as data, as models over resident sources, folded into plain
model folders (checked against the unfolded path, against real mergekit's passthrough, and
against plain transformers), the genome that spells them, and a dataflow search from the CLI."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from evomerge.config import SpaceConfig, parse
from evomerge.errors import UserError
from evomerge.layer_path import LayerPath, Slice, plan_from_dict
from evomerge.merge.engine import Merger
from evomerge.merge.export import export
from evomerge.mergekit_config import to_mergekit
from evomerge.merge.path_model import PathSources, folded, path_model
from evomerge.search.path_space import PathSpace
from evomerge.pool import ModelPool
from evomerge.recipe import ExpertParams, MethodConfig, Recipe

torch.set_num_threads(1)

EXPERTS = ("add", "reverse", "sort", "upper")
IDS = torch.tensor([[1, 5, 7, 9, 11, 3, 2, 8]])


def path(*slices: Slice, outside: str = "base", merge: Recipe | None = None, layers: int = 4) -> LayerPath:
    return LayerPath("base", EXPERTS, layers, tuple(slices), outside, merge)


# --- the data ------------------------------------------------------------------------------------

def test_a_path_round_trips_and_equal_paths_hash_alike():
    p = path(Slice("add", 0, 3), Slice("upper", 1, 4, 0.8), outside="add")
    assert plan_from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert plan_from_dict(yaml.safe_load(p.to_yaml())).hash == p.hash
    # a slice that just continues the previous one is the same path; empty slices are nothing
    split = path(Slice("add", 0, 2), Slice("add", 2, 3), Slice("sort", 2, 2, 1.7), Slice("upper", 1, 4, 0.8),
                 outside="add")
    assert split.slices == p.slices and split.hash == p.hash
    assert path(Slice("add", 0, 2), Slice("add", 2, 3, 0.5)).hash != path(Slice("add", 0, 3)).hash
    assert p.length == 6 and [s[:2] for s in p.steps()] == [("add", 0), ("add", 1), ("add", 2),
                                                            ("upper", 1), ("upper", 2), ("upper", 3)]
    assert p.summary() == "path of 6 blocks: add[0-2] → upper[1-3]×0.80 · outside: add"


@pytest.mark.parametrize("change, message", [
    ({"slices": [{"source": "poet", "start": 0, "end": 2}]}, "source 'poet' is not one of base, add"),
    ({"slices": [{"source": "add", "start": 0, "end": 9}]}, r"slices\[0\].end=9 must be an integer in 0..4"),
    ({"slices": [{"source": "add", "start": 0, "end": 2, "scale": 0}]}, r"scale=0 must be a finite number > 0"),
    ({"slices": [{"source": "add", "start": 2, "end": 2}]}, "at least one non-empty slice"),
    ({"outside": "merge"}, "outside source 'merge' is not one of"),
    ({"slices": [{"source": "add", "start": 0, "end": 2, "stride": 2}]}, "unknown key 'stride'"),
])
def test_a_bad_path_is_a_one_line_error(change, message):
    data = {**path(Slice("add", 0, 4)).to_dict(), **change}
    with pytest.raises(UserError, match=message) as info:
        plan_from_dict(data)
    assert "\n" not in str(info.value)


def test_mergekit_config_folds_the_scales_or_says_why_it_cannot():
    p = path(Slice("add", 0, 3, 1.25), Slice("sort", 1, 2, 0.5), Slice("add", 2, 4), outside="add")
    config = to_mergekit(p)
    assert config["merge_method"] == "passthrough"
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[0, 3], [1, 2], [2, 4]]
    # cumulative: 1.25, then 1.25 * 0.5; the residual writes are divided by it
    folds = [{r["filter"]: r["value"] for r in s["sources"][0]["parameters"]["scale"] if "filter" in r}
             for s in config["slices"]]
    assert folds == [{"o_proj": 0.8, "down_proj": 0.8}, {"o_proj": 1.6, "down_proj": 1.6},
                     {"o_proj": 1.6, "down_proj": 1.6}]
    with pytest.raises(UserError, match=r"embeddings from the first slice's model \(add\).*head from the last"):
        to_mergekit(path(Slice("add", 0, 4), Slice("sort", 3, 4), outside="add"))
    merge = Recipe.uniform("base", EXPERTS, 4, MethodConfig("task_arithmetic", {e: ExpertParams(weight=0.5)
                                                                                for e in EXPERTS}))
    with pytest.raises(UserError, match="runs through the parameter-space merge"):
        to_mergekit(path(Slice("merge", 0, 4), outside="merge", merge=merge))


# --- models ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def merger(pico_zoo):
    return Merger(ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()}))


@pytest.fixture(scope="module")
def sources(merger):
    return PathSources(merger)


def pico_path(pico_zoo, *slices: Slice, outside: str, merge: Recipe | None = None) -> LayerPath:
    return LayerPath(str(pico_zoo.base), EXPERTS, 4, tuple(slices), outside, merge,
                     expert_refs={k: str(v) for k, v in pico_zoo.experts.items()})


@torch.no_grad()
def test_a_whole_path_is_its_source_and_shares_its_tensors(pico_zoo, sources):
    whole = pico_path(pico_zoo, Slice("reverse", 0, 4), outside="reverse")
    model, source = path_model(whole, sources), sources.model(whole, "reverse")
    assert torch.equal(model(IDS).logits, source(IDS).logits)
    ours = model.model.layers[2].mlp.down_proj.weight
    assert ours.data_ptr() == source.model.layers[2].mlp.down_proj.weight.data_ptr()  # no copy


@torch.no_grad()
def test_a_block_visited_twice_gets_a_cache_slot_per_visit(pico_zoo, sources):
    twice = pico_path(pico_zoo, Slice("add", 0, 4), Slice("add", 1, 4, 0.7), outside="add")
    model = path_model(twice, sources)
    full = model(IDS).logits
    first = model(IDS[:, :5], use_cache=True)
    rest = model(IDS[:, 5:], cache=first.cache, use_cache=True)
    torch.testing.assert_close(rest.logits, full[:, 5:], atol=1e-5, rtol=0)


def exact_norms(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its RMSNorms' epsilon at 0, where folding a scale is exact: the pico
    model's hidden states are so small that the default epsilon alone moves its logits by 1e-3."""
    for module in model.modules():
        if hasattr(module, "variance_epsilon"):
            module.variance_epsilon = 0.0
    return model


@torch.no_grad()
def test_the_folded_export_computes_the_path(pico_zoo, sources, merger, tmp_path):
    """Scales folded into the residual writes: the exported folder, loaded by plain transformers,
    gives the unfolded path model's logits (to the norms' epsilon), with more blocks than any
    source and a block visited twice stored twice."""
    from transformers import AutoModelForCausalLM

    p = pico_path(pico_zoo, Slice("add", 0, 4, 1.4), Slice("reverse", 1, 4, 0.6), Slice("base", 3, 4, 1.9),
                  outside="reverse")
    expected = exact_norms(path_model(p, sources))(IDS).logits
    unscaled = pico_path(pico_zoo, *[Slice(s.source, s.start, s.end) for s in p.slices], outside="reverse")
    assert not torch.allclose(expected, exact_norms(folded(unscaled, sources))(IDS).logits, atol=1e-2)
    out = export(p, merger, tmp_path / "pick")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model")
    assert reloaded.config.num_hidden_layers == 8
    torch.testing.assert_close(exact_norms(reloaded)(IDS).logits, expected, atol=1e-5, rtol=1e-5)
    assert plan_from_dict(yaml.safe_load((out / "recipe.yaml").read_text())) == p
    assert "No mergekit config: mergekit takes the embeddings" in (out / "model" / "README.md").read_text()


@torch.no_grad()
def test_mergekit_stacks_the_exported_passthrough_to_the_same_model(pico_zoo, merger, sources, tmp_path):
    pytest.importorskip("mergekit")
    from test_export import run_mergekit
    from transformers import AutoModelForCausalLM

    p = pico_path(pico_zoo, Slice("sort", 0, 3, 1.3), Slice("upper", 1, 3, 0.7), Slice("sort", 2, 4), outside="sort")
    out = export(p, merger, tmp_path / "pick")
    run_mergekit(out / "mergekit.yaml", tmp_path / "mergekit")
    (tmp_path / "mergekit" / "generation_config.json").unlink(missing_ok=True)
    theirs = exact_norms(AutoModelForCausalLM.from_pretrained(tmp_path / "mergekit"))
    torch.testing.assert_close(theirs(IDS).logits, exact_norms(path_model(p, sources))(IDS).logits,
                               atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_a_path_through_a_ps_merge_runs_the_merge(pico_zoo, merger, sources):
    weights = {e: ExpertParams(weight=w) for e, w in zip(EXPERTS, (0.4, 0.9, 0.1, 0.6))}
    merge = Recipe.uniform(str(pico_zoo.base), EXPERTS, 4, MethodConfig("task_arithmetic", weights),
                           expert_refs={k: str(v) for k, v in pico_zoo.experts.items()})
    whole = pico_path(pico_zoo, Slice("merge", 0, 4), outside="merge", merge=merge)
    expected = merger.materialize(merge)(IDS).logits
    torch.testing.assert_close(path_model(whole, sources)(IDS).logits, expected, atol=0, rtol=0)


# --- the genome ------------------------------------------------------------------------------------

def space(**overrides) -> PathSpace:
    config = parse(SpaceConfig, {"kind": "dataflow", "initial": [], **overrides})
    return PathSpace(config, "base", EXPERTS, 30)


def test_every_parent_is_a_point_of_the_space_and_its_genes_are_real():
    s = space()
    assert not s.mixed and len(s.names) == 3 + 2 * 2 + 3 + 1  # sources, cuts + overlaps, scales, outside
    for name, parent in s.parent_recipes().items():
        assert s.decode(s.encode(parent)) == parent, name
    lows, highs = s.bounds()
    assert lows[s.names.index("s1.overlap")] == -6 and highs[s.names.index("s0.source")] == 5


def test_a_genome_cuts_repeats_and_scales_as_it_says():
    s = space(slices=2)
    genome = {"s0.source": 1.2, "s0.log2_scale": 0.0, "s1.source": 4.7, "s1.cut": 0.5, "s1.overlap": 3.2,
              "s1.log2_scale": -0.5, "out.source": 3.0}
    p = s.decode(genome)
    assert [(x.source, x.start, x.end, x.scale) for x in p.slices] == [("add", 0, 15, 1.0), ("upper", 12, 30, 0.71)]
    assert p.outside == "sort" and p.length == 33
    skipping = s.decode({**genome, "s1.overlap": -4.0})
    assert skipping.slices[1].start == 19 and skipping.length == 26


def test_random_genomes_decode_to_valid_paths():
    import random

    s, rng = space(slices=4, overlap=30), random.Random(0)
    paths = [s.decode(s.random(rng)) for _ in range(300)]
    assert all(1 <= p.length <= 30 * 4 for p in paths)
    assert len({p.hash for p in paths}) == 300


def test_bad_dataflow_settings_are_one_line_errors(tmp_path):
    cases = [({"kind": "flow"}, "space.kind='flow' is not one of params, dataflow"),
             ({"slices": 0}, "space.slices=0 must be an integer >= 1"),
             ({"scale": [1.5, 2.0]}, r"space.scale=\[1.5, 2.0\] must be \[low, high\] with 0 < low <= 1 <= high"),
             ({"kind": "params", "merge": "x.yaml"}, "space.merge=x.yaml adds a merge to a layer path"),
             ({"merge": str(tmp_path / "none")}, "is neither a recipe file nor an export folder"),
             ({"initial": [{"weight": 0.3}]}, "holds merge recipes; a dataflow search starts from its sources")]
    for overrides, message in cases:
        with pytest.raises(UserError, match=message) as info:
            space(**{"initial": [], **overrides})
        assert "\n" not in str(info.value)
    other = Recipe.uniform("base", ("add",), 30, MethodConfig("task_arithmetic", {"add": ExpertParams(weight=1)}))
    (tmp_path / "recipe.yaml").write_text(other.to_yaml())
    with pytest.raises(UserError, match=r"merges experts \['add'\] over 30 blocks; this search has experts"):
        space(merge=str(tmp_path))


# --- from the CLI ---------------------------------------------------------------------------------

def test_a_dataflow_search_runs_inspects_exports_and_resumes(pico_zoo, pico_cache, tmp_path):
    from test_search import cli, comparable
    from transformers import AutoModelForCausalLM

    from evomerge.pick_export import export_pick
    from evomerge.report.run_data import summary
    from evomerge.report.text import render
    from evomerge.run import RunDir

    runs = tmp_path / "runs"
    # the random estimator: no probe population to fit (the estimators are tested on their own)
    args = ["search", "zoo=pico", f"runs_dir={runs}", "name=dfs", "space=dataflow", "fitness=random",
            "fitness.items_per_task=8", "algorithm.pop_size=4", "algorithm.generations=2", "runtime.workers=1"]
    done = cli(*args, cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "dfs"
    archive = [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines()]
    assert [e["generation"] for e in archive[:5]] == [-1] * 5  # base and the four experts, whole
    assert all(e["recipe"]["kind"] == "path" and e["error"] is None for e in archive)
    # inspect and export in this process (the CLI's own paths are tested on parameter-space runs)
    shown = render(summary(RunDir.open(run)))
    assert "path of " in shown and " · outside: " in shown
    entry, out = export_pick(RunDir.open(run), "best:mean", tmp_path / "pick")
    pick = plan_from_dict(yaml.safe_load((out / "recipe.yaml").read_text()))
    assert isinstance(pick, LayerPath) and pick.hash == entry.recipe_hash
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == pick.length
    before = comparable(run)
    resumed = cli("resume", str(run), cache=pico_cache)
    assert resumed.returncode == 0 and comparable(run) == before  # replayed: nothing evaluated again


@pytest.mark.zoo
@torch.no_grad()
def test_lm_eval_scores_an_exported_path_as_the_search_scores_it(zoo, zoo_merger, tmp_path):
    """The export of a path longer than the model (the reverse expert, then the upper-case
    expert's last 8 blocks entered at scale 0.8), loaded by lm-eval's own HF wrapper from the
    folder, scores what evomerge's scorer measures on the in-memory path model."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager, get_task_dict

    from evomerge.fitness.native import generate_exact_match

    limit, refs = 16, {k: str(v) for k, v in zoo.experts.items()}
    p = LayerPath(str(zoo.base), tuple(refs), 30, (Slice("reverse", 0, 30), Slice("upper", 22, 30, 0.8)), "reverse",
                  expert_refs=refs)
    model = path_model(p, PathSources(zoo_merger))
    rows = zoo.items("reverse", "test")[:limit]
    native = generate_exact_match(model, zoo_merger.tokenizer, [r["prompt"] for r in rows], [r["answer"] for r in rows])
    out = export(p, zoo_merger, tmp_path / "pick")
    lm = HFLM(pretrained=str(out / "model"), batch_size=16, device="cpu")
    tasks = get_task_dict(["zoo_reverse"], TaskManager(include_path=str(zoo.task_dir)))
    results = evaluate(lm=lm, task_dict=tasks, limit=limit, verbosity="ERROR")["results"]
    assert results["zoo_reverse"]["exact_match,strip"] == pytest.approx(sum(r.correct for r in native) / limit)
    assert lm.model.config.num_hidden_layers == 38
