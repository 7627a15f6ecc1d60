"""Functional dual anchors on the pico zoo: the alignment they are built for, recomputed from the
experts' own files (an independent reference: the expert's MLP loaded as a module of its own,
its task vector read from its checkpoint, not from the merger); the anchors' loss against finite
differences through the refinement's weight gradients; and a refinement on them that lowers it."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from evomerge.config import RefineConfig
from evomerge.errors import UserError
from evomerge.fitness.dual_anchors import AnchorSettings, build_anchors, mlp_paths
from evomerge.fitness.tasks import TaskSuite
from evomerge.pick_export import provenance
from evomerge.recipe import ExpertParams, MethodConfig, Recipe
from evomerge.search.refine import Refiner, Slots
from evomerge.zoo.tasks import task_name

from test_refine import slot_gradient


@pytest.fixture(scope="module")
def pico(pico_zoo):
    from evomerge.merge.engine import Merger
    from evomerge.pool import ModelPool

    merger = Merger(ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()}))
    suite = TaskSuite([task_name(s) for s in pico_zoo.config.skills], merger.tokenizer,
                      include_path=str(pico_zoo.task_dir))
    return merger, suite, pico_zoo


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize("init", ["gaussian", "weights"])
def test_anchors_induce_gradients_along_each_experts_task_vector(pico, init):
    merger, _, zoo = pico
    settings = AnchorSettings(count=16, steps=20, lr=0.01, init=init, scale=0.01, seed=0)
    anchors = build_anchors(merger, settings)
    assert [b.path for b in anchors.blocks] == [f"model.layers.{i}.mlp" for i in range(merger.num_layers)]
    assert mlp_paths(merger) == {i: f"model.layers.{i}.mlp" for i in range(merger.num_layers)}
    base_files = _tensors(zoo.base)
    for block in anchors.blocks:
        assert block.inputs.shape[:2] == (len(merger.experts), 16)
        for j, k in enumerate(block.experts):
            before, after = block.alignment[j]
            assert after < before - 0.2, (block.path, k)  # the construction did its job
            # Recompute 1 - cos(induced gradient, task vector) from the expert's checkpoint.
            expert_files = _tensors(zoo.experts[merger.experts[k]])
            base_mlp = copy.deepcopy(merger.model.get_submodule(block.path))
            expert_mlp = copy.deepcopy(base_mlp)
            with torch.no_grad():
                for name, p in base_mlp.named_parameters():
                    p.copy_(base_files[f"{block.path}.{name}"])
                for name, p in expert_mlp.named_parameters():
                    p.copy_(expert_files[f"{block.path}.{name}"])
            x = block.inputs[j]
            similarity = F.cosine_similarity(base_mlp(x), expert_mlp(x), dim=-1).mean()
            names = [n for n, _ in base_mlp.named_parameters()]
            grads = torch.autograd.grad(similarity, list(base_mlp.parameters()))
            terms = [1 - F.cosine_similarity(g.reshape(-1), (expert_files[f"{block.path}.{n}"]
                                                              - base_files[f"{block.path}.{n}"]).reshape(-1), dim=0)
                     for n, g in zip(names, grads)]
            assert float(torch.stack(terms).mean()) == pytest.approx(after, abs=1e-4)
            torch.testing.assert_close(block.targets[j], expert_mlp(x).detach(), rtol=1e-5, atol=1e-6)
    again = build_anchors(merger, settings)
    assert all(torch.equal(a.inputs, b.inputs) for a, b in zip(anchors.blocks, again.blocks))  # a seed is one set


def test_the_anchor_loss_gradient_equals_finite_differences(pico):
    merger, _, _ = pico
    anchors = build_anchors(merger, AnchorSettings(count=8, steps=5, lr=0.01, init="gaussian", scale=0.01, seed=1))
    config = MethodConfig("tsv_m", {e: ExpertParams(weight=0.5) for e in merger.experts}, lambda_=0.8)
    slots = Slots(Recipe.uniform("base", merger.experts, merger.num_layers, config), False)
    torch.manual_seed(0)
    weights = slots.weights().double() + 0.2 * torch.rand(len(slots.names), len(merger.experts), dtype=torch.float64)
    analytic = slot_gradient(merger, slots, weights, anchors.loss)
    step = 1e-2
    for slot, expert in [(1, 0), (2, 3), (len(slots.names) - 1, 1)]:
        values = []
        for sign in (1, -1):
            moved = weights.clone()
            moved[slot, expert] += sign * step
            with torch.no_grad():
                values.append(float(anchors.loss(merger.materialize(slots.recipe_for(moved)))))
        numeric = (values[0] - values[1]) / (2 * step)
        assert abs(analytic[slot, expert]) > 1e-5
        assert analytic[slot, expert] == pytest.approx(numeric, rel=2e-2, abs=1e-5), (slot, expert)
    assert float(analytic[0].abs().sum()) == 0  # outside the blocks no MLP reads the anchors


def test_an_fda_refinement_lowers_the_anchor_loss_records_its_anchors_and_reads_no_task_data(pico):
    merger, suite, _ = pico
    config = RefineConfig(steps=6, lr=0.1, signal="fda", anchors=8, anchor_steps=5)
    refiner = Refiner(merger, suite, config)
    start = Recipe.uniform("base", merger.experts, merger.num_layers,
                           MethodConfig("task_arithmetic", {e: ExpertParams(weight=0.3) for e in merger.experts}))
    refiner.tasks = {}  # no task is read: an fda refinement would fail on the first item it asked for
    done = refiner.refine(start, seed=2)
    anchors, built_now = refiner.anchors(2)
    assert built_now == 0.0 and done.anchor_seconds > 0  # built once, by the first refinement
    with torch.no_grad():
        before = float(anchors.loss(merger.materialize(start)))
        after = float(anchors.loss(merger.materialize(done.recipe)))
    assert done.losses[0] == pytest.approx(before, rel=1e-5) and done.losses[-1] == pytest.approx(after, rel=1e-5)
    assert after < before - 2e-3  # as far as 6 steps go on pico (0.171 -> 0.167)
    record = done.record(parent=7)
    assert record["refine"]["anchors"]["count"] == 8 and record["refine"]["anchors"]["seed"] == 2
    assert done.cost_seconds == pytest.approx(done.seconds + done.anchor_seconds)
    json.dumps(record)
    card = provenance(SimpleNamespace(origin=record))  # the export's model card: enough to redo it
    assert "fda signal, seed 2) on functional dual anchors (8 per expert and block, built by 5 steps" in card
    assert refiner.refine(start, seed=2).recipe.hash == done.recipe.hash


def test_anchor_settings_are_checked_in_one_line():
    with pytest.raises(UserError, match="unknown refine.anchor_init 'rows'; valid: gaussian, weights"):
        RefineConfig(anchor_init="rows")
    with pytest.raises(UserError, match=r"refine.anchors=0 must be an integer >= 1"):
        RefineConfig(anchors=0)
    with pytest.raises(UserError, match=r"refine.anchor_lr=-1 must be a positive number"):
        RefineConfig(anchor_lr=-1)
