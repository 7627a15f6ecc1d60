"""Functional dual anchors (FDA: Shi, Wen and Liu, "Model Merging with Functional Dual Anchors",
arXiv 2510.21223): a data-free signal for refining a merge.

A task vector says where an expert moved in weight space. Its dual anchors say the same in a
block's input space: synthetic inputs to the block's MLP, built per expert and block, such that
the gradient they induce at the base (of the similarity of the base's and the expert's outputs
on them) points along the expert's task vector, tensor by tensor. A merge is then pulled toward
every expert at once by asking each block's MLP to answer each expert's anchors as that expert
does. Nothing of the tasks is read: no prompts, no references; only base and experts.

As the paper's language-model code does, the anchors are MLP inputs (the residual stream after
the block's norm), one set per block and expert, constructed by Adam on the inputs with a
second-order gradient, initialized either as small Gaussian noise or as rows of the expert's own
input-side weight matrices; the best inputs seen are kept. Where this differs from the paper:
the paper then trains every element of the merged MLPs; here the anchors' loss is a refinement
signal over a recipe's per-block expert weights (:mod:`evomerge.search.refine`), so a refined
merge is still a recipe that exports, hashes and replays. Anchors depend only on the pool and
their settings, never on a candidate: they are built once per refiner.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call


@dataclass(frozen=True)
class AnchorSettings:
    """How the anchors are built: ``count`` inputs per expert and block, ``steps`` Adam steps of
    step size ``lr`` from ``init`` (``gaussian``: N(0, ``scale``^2); ``weights``: rows of the
    expert's input-side MLP matrices), drawn from ``seed``."""

    count: int
    steps: int
    lr: float
    init: str
    scale: float
    seed: int


@dataclass(frozen=True)
class BlockAnchors:
    """One block's anchors: ``inputs[j]`` are expert ``experts[j]``'s (``[n, d]``) and
    ``targets[j]`` that expert's MLP outputs on them; ``alignment`` is the mean over tensors of
    1 - cos(induced gradient, task vector) per expert, at the start and for the inputs kept."""

    path: str
    experts: tuple[int, ...]
    inputs: Tensor
    targets: Tensor
    alignment: tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class DualAnchors:
    """Every block's anchors and the seconds their construction took (a cost a refinement pays)."""

    blocks: tuple[BlockAnchors, ...]
    settings: AnchorSettings
    seconds: float

    def loss(self, model: torch.nn.Module) -> Tensor:
        """Mean over blocks and experts of the mean 1 - cos(merged MLP output, expert's output) on
        that expert's anchors: 0 where every block answers every expert's anchors as it does."""
        terms = []
        for block in self.blocks:
            mlp = model.get_submodule(block.path)
            out = mlp(block.inputs.reshape(-1, block.inputs.shape[-1])).reshape(block.targets.shape)
            terms.append((1 - F.cosine_similarity(out, block.targets, dim=-1)).mean(-1))
        return torch.cat(terms).mean()

    def record(self) -> dict:
        """What an archive entry says of the anchors: enough to build them again."""
        s = self.settings
        return {"count": s.count, "steps": s.steps, "lr": s.lr, "init": s.init, "scale": s.scale,
                "seed": s.seed, "seconds": self.seconds,
                "alignment": [round(statistics.mean(after for _, after in b.alignment), 4) for b in self.blocks]}


def mlp_paths(merger) -> dict[int, str]:
    """Per block, the module name of its MLP: the common prefix of the block's MLP tensor names."""
    names: dict[int, list[list[str]]] = {}
    for name in merger.tensor_names():
        layer, component = merger.where(name)
        if layer is not None and component == "mlp":
            names.setdefault(layer, []).append(name.split("."))
    # a module holds its tensors: the prefix of their owners, never a tensor's own name
    return {layer: ".".join(os.path.commonprefix([p[:-1] for p in parts])) for layer, parts in sorted(names.items())}


def build_anchors(merger, settings: AnchorSettings) -> DualAnchors:
    """Anchors for every block with an MLP and every expert that changed it, from ``merger``'s
    base and task vectors (a :class:`~evomerge.merge.engine.Merger`)."""
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(settings.seed)
    model = merger.model
    hidden = int(model.config.get_text_config().hidden_size)
    blocks = []
    for layer, path in mlp_paths(merger).items():
        mlp = model.get_submodule(path)
        local = [n for n, _ in mlp.named_parameters()]
        base = {n: merger.base_tensor(f"{path}.{n}").detach() for n in local}
        # every expert's task vectors, read once per tensor (a quantized stack is made dense per read)
        stacks = {n: merger.dense_deltas(f"{path}.{n}").view(-1, *base[n].shape).to(base[n].dtype) for n in local}
        experts, inputs, targets, alignment = [], [], [], []
        for k in range(len(merger.experts)):
            tau = {n: stacks[n][k] for n in local}
            moved = [n for n in local if float(tau[n].norm()) > 0]
            if not moved:
                continue  # the expert left this MLP as it was (a LoRA expert elsewhere): nothing to anchor
            expert = {n: base[n] + tau[n] for n in local}
            start = _initial_inputs(merger, path, local, expert, hidden, settings, generator)
            x, before, after = _construct(mlp, base, expert, tau, moved, start, settings)
            with torch.no_grad():
                y = functional_call(mlp, expert, (x,))
            experts.append(k)
            inputs.append(x)
            targets.append(y)
            alignment.append((before, after))
        if experts:
            blocks.append(BlockAnchors(path, tuple(experts), torch.stack(inputs), torch.stack(targets),
                                       tuple(alignment)))
    return DualAnchors(tuple(blocks), settings, time.perf_counter() - started)


def _initial_inputs(merger, path: str, local: list[str], expert: dict[str, Tensor], hidden: int,
                    settings: AnchorSettings, generator: torch.Generator) -> Tensor:
    dtype = next(iter(expert.values())).dtype
    if settings.init == "gaussian":
        return torch.randn(settings.count, hidden, generator=generator).to(dtype) * settings.scale
    rows = []
    for n in local:
        w = expert[n]
        if w.ndim != 2:
            continue
        if merger.transposed(f"{path}.{n}"):
            w = w.T  # stored (in, out): the input-side vectors are its columns
        if w.shape[1] == hidden:
            rows.append(w)
    pool = torch.cat(rows)
    picked = pool[torch.randperm(len(pool), generator=generator)[:settings.count]]
    if len(picked) < settings.count:  # too few rows: midpoints of random pairs, as the paper pads
        pairs = torch.randint(len(pool), (settings.count - len(picked), 2), generator=generator)
        picked = torch.cat([picked, (pool[pairs[:, 0]] + pool[pairs[:, 1]]) / 2])
    return picked.clone()


def _construct(mlp: torch.nn.Module, base: dict[str, Tensor], expert: dict[str, Tensor],
               tau: dict[str, Tensor], moved: list[str], start: Tensor,
               settings: AnchorSettings) -> tuple[Tensor, float, float]:
    """Adam on the inputs toward gradients aligned with ``tau``; (best inputs, loss at the start,
    loss of the inputs kept), each loss the mean over changed tensors of 1 - cos."""
    x = start.clone().requires_grad_(True)
    params = {n: t.clone().requires_grad_(n in moved) for n, t in base.items()}
    wanted = [params[n] for n in moved]
    optimizer = torch.optim.Adam([x], lr=settings.lr)
    best, best_x, first = float("inf"), x.detach().clone(), None
    for step in range(settings.steps + 1):
        similarity = F.cosine_similarity(functional_call(mlp, params, (x,)),
                                         functional_call(mlp, expert, (x,)), dim=-1).mean()
        grads = torch.autograd.grad(similarity, wanted, create_graph=True)
        loss = torch.stack([1 - F.cosine_similarity(g.reshape(-1), tau[n].reshape(-1), dim=0)
                            for g, n in zip(grads, moved)]).mean()
        value = float(loss.detach())
        first = value if first is None else first
        if value < best:
            best, best_x = value, x.detach().clone()
        if step == settings.steps:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return best_x, first, best
