"""Gradient refinement: a recipe's expert weights improved by a few steps of Adam on a loss.

An evaluation tells the search one number per task; one backward pass through the merged model
tells it the slope of a smooth loss along every expert weight of every block at once
(:func:`~evomerge.merge.weight_grad.weight_gradients`). A refinement starts from a recipe, gives
each block (or each block's attention and MLP, ``split_components``) and the tensors outside the
blocks their own weight per expert, and takes ``steps`` Adam steps, each on a fresh random batch
of validation items: the teacher-forced loss of their references (``supervised``) or the entropy
of the model's own answers (``entropy``, no references read); or on the pool's functional dual
anchors (``fda``, no task data read at all: :mod:`evomerge.fitness.dual_anchors`). Every other
parameter of each config (lambda, rank fraction) stays as the recipe had it, so the result is an ordinary recipe:
it exports, hashes and replays like any other. The refined recipe is a candidate of its own;
the loop archives it with its parent and what was done (:class:`Refinement`).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from evomerge.config import RefineConfig
from evomerge.errors import UserError
from evomerge.fitness.dual_anchors import AnchorSettings, DualAnchors, build_anchors
from evomerge.fitness.losses import answer_entropy, reference_loss
from evomerge.fitness.tasks import TaskSuite
from evomerge.merge.weight_grad import check_differentiable, weight_gradients
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe

OUTSIDE = "outside"


@dataclass(frozen=True)
class Refinement:
    """A refined recipe and what it took: the loss before each step and after the last
    (``losses``, one longer than ``steps``), the seconds of the steps together, and for ``fda``
    the anchors' record and the seconds this refinement spent building them (0 when an earlier
    refinement on the same worker had built them)."""

    recipe: Recipe
    steps: int
    lr: float
    signal: str
    seed: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    anchors: dict | None = None
    anchor_seconds: float = 0.0

    @property
    def cost_seconds(self) -> float:
        """What the refinement cost in all: its steps and any anchors it had to build."""
        return self.seconds + self.anchor_seconds

    def record(self, parent: int) -> dict:
        """What an archive entry says of how it was made: enough to redo it."""
        refine = {"steps": self.steps, "lr": self.lr, "signal": self.signal, "seed": self.seed,
                  "losses": self.losses, "seconds": self.seconds}
        if self.anchors is not None:
            refine["anchors"] = self.anchors
            refine["anchor_seconds"] = self.anchor_seconds
        return {"parent": parent, "refine": refine}


def slot_of(layer: int | None, component: str, split: bool) -> str:
    """The weight slot a tensor belongs to: outside the blocks, a block, or a block's attention."""
    if layer is None:
        return OUTSIDE
    return f"{layer}.attn" if split and component == "attn" else f"{layer}.all"


class Slots:
    """A recipe's per-slot configs, with each slot's expert weights as one row of a tensor."""

    def __init__(self, recipe: Recipe, split: bool) -> None:
        self.recipe, self.split = recipe, split
        self.names = [OUTSIDE] + [f"{layer}.{part}" for layer in range(recipe.num_layers)
                                  for part in (("all", "attn") if split else ("all",))]
        self.configs: dict[str, MethodConfig] = {}
        for name in self.names:
            if name == OUTSIDE:
                self.configs[name] = recipe.outside
            else:
                layer, part = name.split(".")
                self.configs[name] = recipe.config_for(int(layer), "attn" if part == "attn" else "mlp")
        self.experts = list(recipe.experts)

    def weights(self) -> torch.Tensor:
        """``[slots, K]`` float64: each slot's weight per expert (0 where its config leaves one out)."""
        rows = [[float(self.configs[s].experts[e].weight) if e in self.configs[s].experts else 0.0
                 for e in self.experts] for s in self.names]
        return torch.tensor(rows, dtype=torch.float64)

    def recipe_for(self, weights: torch.Tensor) -> Recipe:
        """The recipe with these weights: a group per slot, every other value as it was."""
        values = weights.tolist()

        def config(slot: str) -> MethodConfig:
            old = self.configs[slot]
            row = values[self.names.index(slot)]
            experts = {e: ExpertParams(**{**dict(old.experts[e]), "weight": w})
                       for e, w in zip(self.experts, row) if e in old.experts}
            return old.replace(experts=experts)

        groups = []
        for layer in range(self.recipe.num_layers):
            groups.append(LayerGroup(layer, layer + 1, "all", config(f"{layer}.all")))
            if self.split:
                groups.append(LayerGroup(layer, layer + 1, "attn", config(f"{layer}.attn")))
        return Recipe(self.recipe.base, tuple(self.recipe.experts), self.recipe.num_layers, tuple(groups),
                      config(OUTSIDE), expert_refs=dict(self.recipe.expert_refs))


class Refiner:
    """Refines recipes on one resident :class:`~evomerge.merge.engine.Merger` and task suite."""

    def __init__(self, merger, suite: TaskSuite, config: RefineConfig) -> None:
        self.merger, self.suite, self.config = merger, suite, config
        self.tasks = suite.tasks("validation")
        self.tokenizer = suite.tokenizer
        if config.signal == "supervised":
            missing = [n for n, t in self.tasks.items() if not t.reference_pairs(range(min(3, len(t))), self.tokenizer)]
            if missing:
                raise UserError(f"refine.signal=supervised needs reference answers, which task {missing[0]} "
                                f"does not give (a generate_until task with one string target); use refine.signal=entropy "
                                f"or fda")
        self._anchors: dict[int, DualAnchors] = {}

    def anchors(self, seed: int) -> tuple[DualAnchors, float]:
        """The pool's dual anchors drawn from ``seed`` and the seconds spent building them now
        (built once per seed: they depend on the pool and the settings, never on a candidate)."""
        if seed in self._anchors:
            return self._anchors[seed], 0.0
        c = self.config
        built = build_anchors(self.merger, AnchorSettings(count=c.anchors, steps=c.anchor_steps, lr=c.anchor_lr,
                                                          init=c.anchor_init, scale=c.anchor_scale, seed=seed))
        self._anchors[seed] = built
        return built, built.seconds

    def check(self, recipe: Recipe) -> None:
        """One line for a recipe whose method a gradient cannot refine."""
        for method, params, _ in self.merger.method_plans(recipe).values():
            check_differentiable(method, params)

    def refine(self, recipe: Recipe, *, seed: int | None = None,
               on_step: Callable[[int, Recipe, float], None] | None = None) -> Refinement:
        """``recipe`` after ``refine.steps`` steps from ``seed``; ``on_step(step, recipe, seconds)``
        is told each step's starting recipe and the seconds spent so far (learning curves)."""
        config = self.config
        seed = config.seed if seed is None else seed
        self.check(recipe)
        anchors, anchor_seconds = self.anchors(seed) if config.signal == "fda" else (None, 0.0)
        slots = Slots(recipe, config.split_components)
        slot_index = {name: i for i, name in enumerate(slots.names)}
        members = {name: slot_index[slot_of(*self.merger.where(name), slots.split)]
                   for name in dict(self.merger.model.named_parameters())}
        weights = slots.weights().float().requires_grad_(True)
        optimizer = torch.optim.Adam([weights], lr=config.lr)
        rng = random.Random(seed)
        losses: list[float] = []
        spent, mark = 0.0, time.perf_counter()  # the callback's own time is not the refinement's
        for step in range(config.steps + 1):
            current = slots.recipe_for(weights.detach())
            if on_step is not None:
                spent, mark = spent + time.perf_counter() - mark, time.perf_counter()
                on_step(step, current, spent)
                mark = time.perf_counter()
            last = step == config.steps  # the last loss is the refined recipe's, on a fresh batch
            loss, per_tensor = self._loss_and_gradients(current, rng, anchors, backward=not last)
            losses.append(loss)
            if last:
                break
            gradient = torch.zeros_like(weights, dtype=torch.float64)
            for name, per_expert in per_tensor.items():
                gradient[members[name]] += per_expert
            optimizer.zero_grad()
            weights.grad = gradient.float()
            optimizer.step()
        seconds = spent + time.perf_counter() - mark
        return Refinement(slots.recipe_for(weights.detach()), config.steps, config.lr, config.signal, seed,
                          losses, seconds, anchors.record() if anchors is not None else None, anchor_seconds)

    def _batch(self, rng: random.Random) -> dict[str, list[int]]:
        return {name: sorted(rng.sample(range(len(task)), min(self.config.items_per_task, len(task))))
                for name, task in self.tasks.items()}

    def _loss_and_gradients(self, recipe: Recipe, rng: random.Random, anchors: DualAnchors | None, *,
                            backward: bool) -> tuple[float, dict[str, torch.Tensor]]:
        """The signal's loss of ``recipe``'s merge on a random batch (mean over tasks; all the
        anchors for ``fda``) and, with ``backward``, its gradient along each tensor's expert weights."""
        model = self.merger.materialize(recipe)
        params = dict(model.named_parameters())  # the parameters themselves, tied ones once
        wanted = {name: p.requires_grad for name, p in params.items()}
        for p in params.values():
            p.grad = None
            p.requires_grad_(backward)
        total = 0.0
        try:
            with torch.set_grad_enabled(backward):
                if anchors is not None:
                    loss = anchors.loss(model)
                    if backward:
                        loss.backward()
                    total = float(loss.detach())
                else:
                    batch = self._batch(rng)
                    for name, ids in batch.items():
                        task = self.tasks[name]
                        if self.config.signal == "supervised":
                            loss = reference_loss(model, self.tokenizer, task.reference_pairs(ids, self.tokenizer))
                        else:
                            loss = answer_entropy(model, self.tokenizer, task.prompts(ids),
                                                  max_new_tokens=max(1, task.max_gen_toks))
                        if backward:
                            (loss / len(batch)).backward()
                        total += float(loss.detach()) / len(batch)
            gradients = {}
            if backward:
                grads = {name: p.grad if p.grad is not None else torch.zeros_like(p) for name, p in params.items()}
                gradients = weight_gradients(self.merger, recipe, grads)
        finally:
            for name, p in params.items():
                p.grad = None
                p.requires_grad_(wanted[name])
        return total, gradients
