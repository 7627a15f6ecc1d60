"""Gradient refinement on the pico zoo: the weight gradients against finite differences of the
loss itself (an independent reference: nothing but merges and forward passes), a refinement that
lowers the loss it follows, one-line refusals, and a search that refines its pick at the end,
archives it with its parent, and resumes to the same archive."""

from __future__ import annotations

import json

import pytest
import torch

from evomerge.config import RefineConfig
from evomerge.errors import UserError
from evomerge.fitness.losses import answer_entropy, reference_loss
from evomerge.fitness.tasks import TaskSuite
from evomerge.merge.weight_grad import weight_gradients
from evomerge.recipe import ExpertParams, MethodConfig, Recipe
from evomerge.search.refine import Refiner, Slots, slot_of
from evomerge.zoo.tasks import task_name


@pytest.fixture(scope="module")
def pico(pico_zoo):
    from evomerge.merge.engine import Merger
    from evomerge.pool import ModelPool

    merger = Merger(ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()}))
    tasks = [task_name(s) for s in pico_zoo.config.skills]
    suite = TaskSuite(tasks, merger.tokenizer, include_path=str(pico_zoo.task_dir))
    return merger, suite


def _recipe(merger, method: str, weight: float = 0.5, **params) -> Recipe:
    config = MethodConfig(method, {e: ExpertParams(weight=weight) for e in merger.experts}, **params)
    return Recipe.uniform("base", merger.experts, merger.num_layers, config)


def slot_gradient(merger, slots: Slots, weights: torch.Tensor, loss_of) -> torch.Tensor:
    recipe = slots.recipe_for(weights)
    model = merger.materialize(recipe)
    params = dict(model.named_parameters())  # the parameters themselves, tied ones once
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    loss_of(model).backward()
    per_tensor = weight_gradients(merger, recipe, {n: torch.zeros_like(p) if p.grad is None else p.grad
                                                     for n, p in params.items()})
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    out = torch.zeros_like(weights)
    for name, values in per_tensor.items():
        out[slots.names.index(slot_of(*merger.where(name), slots.split))] += values
    return out


@pytest.mark.parametrize("method,split", [("tsv_m", False), ("task_arithmetic", True)])
def test_weight_gradients_equal_finite_differences_of_the_loss(pico, method, split):
    merger, suite = pico
    torch.manual_seed(0)
    slots = Slots(_recipe(merger, method, lambda_=0.8), split)
    weights = slots.weights().double() + 0.2 * torch.rand(len(slots.names), len(merger.experts),
                                                           dtype=torch.float64)
    task = suite.tasks("validation")[suite_names(suite)[0]]
    pairs = task.reference_pairs(range(6), merger.tokenizer)

    def loss_of(model):
        return reference_loss(model, merger.tokenizer, pairs)

    analytic = slot_gradient(merger, slots, weights, loss_of)
    step = 1e-2
    checked = [(0, 0), (1, 1), (len(slots.names) - 1, len(merger.experts) - 1), (2, 2)]
    for slot, expert in checked:
        values = []
        for sign in (1, -1):
            moved = weights.clone()
            moved[slot, expert] += sign * step
            with torch.no_grad():
                values.append(float(loss_of(merger.materialize(slots.recipe_for(moved)))))
        numeric = (values[0] - values[1]) / (2 * step)
        assert analytic[slot, expert] == pytest.approx(numeric, rel=2e-2, abs=2e-4), (slot, expert)
    assert analytic.abs().sum() > 0


def suite_names(suite) -> list[str]:
    return list(suite.tasks("validation"))


@pytest.mark.parametrize("signal", ["supervised", "entropy"])
def test_refinement_lowers_the_loss_it_follows_and_stays_a_recipe(pico, signal):
    merger, suite = pico
    refiner = Refiner(merger, suite, RefineConfig(steps=8, lr=0.1, signal=signal, items_per_task=8))
    start = _recipe(merger, "tsv_m", 0.3)
    tasks = suite.tasks("validation")

    def loss(recipe: Recipe) -> float:  # on every validation item, not a batch
        model = merger.materialize(recipe)
        with torch.no_grad():
            if signal == "supervised":
                values = [reference_loss(model, merger.tokenizer, t.reference_pairs(range(len(t)), merger.tokenizer))
                          for t in tasks.values()]
            else:
                values = [answer_entropy(model, merger.tokenizer, t.prompts(range(len(t))),
                                         max_new_tokens=t.max_gen_toks) for t in tasks.values()]
        return float(sum(values) / len(values))

    done = refiner.refine(start, seed=3)
    assert len(done.losses) == 9 and done.seconds > 0
    assert loss(done.recipe) < loss(start) - 1e-3
    again = Recipe.from_dict(json.loads(json.dumps(done.recipe.to_dict())))
    assert again.hash == done.recipe.hash
    assert refiner.refine(start, seed=3).recipe.hash == done.recipe.hash  # a seed is one refinement
    # Only weights moved: lambda and the per-layer groups' other values are the start's.
    configs = [g.config for g in done.recipe.groups] + [done.recipe.outside]
    assert {c.params["lambda"] for c in configs} == {1.0}
    assert len(done.recipe.groups) == merger.num_layers


def test_a_method_whose_weights_enter_non_linearly_is_refused_in_one_line(pico):
    merger, suite = pico
    refiner = Refiner(merger, suite, RefineConfig(steps=1))
    with pytest.raises(UserError, match="linear in its weights, got 'ties'") as error:
        refiner.refine(_recipe(merger, "ties"))
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="normalize false"):
        refiner.refine(_recipe(merger, "task_arithmetic", normalize=True))


def test_a_search_refines_its_pick_archives_it_with_its_parent_and_resumes_to_the_same_archive(
        pico_zoo, pico_cache, tmp_path, evomerge_main):
    from test_search import cli, comparable, search_args

    args = search_args(tmp_path, "refined", "refine.at=final", "refine.steps=3", "refine.lr=0.1",
                       "space.methods=[tsv_m]", "algorithm.generations=1", classic=False)
    done = cli(*args, cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "refined" / "archive.jsonl").read_text().splitlines()]
    made = [r for r in rows if "origin" in r]
    assert len(made) == 1 and made[0]["id"] == len(rows) - 1  # after the verification, last
    refined, parent = made[0], rows[made[0]["origin"]["parent"]]
    assert parent["fidelity"] == refined["fidelity"] == "full"
    assert refined["recipe_hash"] != parent["recipe_hash"]
    record = refined["origin"]["refine"]
    assert record["steps"] == 3 and len(record["losses"]) == 4 and record["estimator_equivalents"] > 0
    assert f"refined best:mean (id {parent['id']}" in done.stderr
    means = {r["id"]: sum(r["scores"].values()) / len(r["scores"]) for r in rows if r["fidelity"] == "full"}
    pareto = json.loads((tmp_path / "refined" / "pareto.json").read_text())
    assert pareto["verified"][0]["id"] == max(means, key=lambda i: (means[i], -i))
    exported = evomerge_main("export", tmp_path / "refined", "--pick", refined["id"], "--out", tmp_path / "export",
                             cache=pico_cache)  # in process: it loads models, starts no Ray
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert Recipe.from_yaml((tmp_path / "export" / "recipe.yaml").read_text()).hash == refined["recipe_hash"]
    card = (tmp_path / "export" / "model" / "README.md").read_text()
    assert f"Refined** from archive entry {parent['id']} by 3 Adam steps (learning rate 0.1, supervised" in card
    before = comparable(tmp_path / "refined")
    again = cli("resume", str(tmp_path / "refined"), cache=pico_cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "refined best:mean" not in again.stderr  # replayed, not redone
    assert comparable(tmp_path / "refined") == before


def test_refinement_of_a_space_it_cannot_differentiate_is_refused_before_any_work(pico_zoo, pico_cache, tmp_path):
    from test_search import cli, search_args

    done = cli(*search_args(tmp_path, "bad", "refine.at=final", "space.methods=[ties]", classic=False),
               cache=pico_cache)
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1].startswith("evomerge: error: refine.at needs methods linear in their weights")
    assert not (tmp_path / "bad").exists()
