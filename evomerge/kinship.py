"""What a user is about to merge: how far each expert moved from the base, where, and how alike
the experts' moves are.

Per expert, the task vector's L2 norm per transformer block (tensors outside the blocks grouped
as "outside") and relative to the base's norm, the small-perturbation regime merging relies on;
and the pairwise cosine similarity of the flattened task vectors, the "model kinship" the merging
literature uses to pick partners (similar vectors merge with little interference).
Everything comes from one Gram matrix per layer, accumulated tensor by tensor in float64 in
column chunks, so no whole-model vector is ever concatenated or upcast.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from evomerge.errors import UserError
from evomerge.pool import ModelPool, layer_index

OUTSIDE = "outside"
_CHUNK = 1 << 20  # columns upcast to float64 at a time: bounds the temporary at K x 8 MiB


@dataclass
class Kinship:
    experts: list[str]
    layers: list[str]  # "0", "1", ... then "outside"
    norms: dict[str, dict[str, float]]  # expert -> layer -> ||tau restricted to the layer||
    total: dict[str, float]  # expert -> ||tau||
    relative: dict[str, float]  # expert -> ||tau|| / ||theta_base||
    cosine: list[list[float]]  # experts x experts

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kinship(pool: ModelPool) -> Kinship:
    """Norms and cosine similarities of ``pool``'s task vectors."""
    experts = pool.expert_names
    grams: dict[str, torch.Tensor] = {}
    for name in pool.base:
        layer = layer_index(name)
        key = OUTSIDE if layer is None else str(layer)
        stack = [pool.task_vectors[e][name].reshape(-1) for e in experts]
        gram = grams.setdefault(key, torch.zeros(len(experts), len(experts), dtype=torch.float64))
        for start in range(0, stack[0].numel(), _CHUNK):
            chunk = torch.stack([t[start:start + _CHUNK] for t in stack]).double()
            gram += chunk @ chunk.T
    layers = sorted((k for k in grams if k != OUTSIDE), key=int) + ([OUTSIDE] if OUTSIDE in grams else [])
    total = sum(grams.values())
    norm = total.diagonal().sqrt()
    cosine = total / torch.outer(norm, norm).clamp_min(torch.finfo(torch.float64).tiny)
    return Kinship(
        experts=experts, layers=layers,
        norms={e: {k: float(grams[k][i, i].sqrt()) for k in layers} for i, e in enumerate(experts)},
        total={e: float(norm[i]) for i, e in enumerate(experts)},
        relative=pool.relative_norms(),
        cosine=cosine.tolist())


def render(k: Kinship) -> str:
    """Two tables: task-vector norm per layer and expert, then the kinship (cosine) matrix."""
    width = max(9, *(len(e) + 1 for e in k.experts))
    row = lambda label, cells: label.ljust(width) + "".join(c.rjust(width) for c in cells)
    lines = ["task-vector L2 norm per layer", row("layer", k.experts)]
    lines += [row(layer, [f"{k.norms[e][layer]:.4f}" for e in k.experts]) for layer in k.layers]
    lines.append(row("total", [f"{k.total[e]:.4f}" for e in k.experts]))
    lines.append(row("‖τ‖/‖θ‖", [f"{k.relative[e]:.5f}" for e in k.experts]))
    lines += ["", "kinship: cosine similarity of task vectors", row("", k.experts)]
    lines += [row(e, [f"{v:+.3f}" for v in values]) for e, values in zip(k.experts, k.cosine)]
    return "\n".join(lines)


def pool_for(arguments: Sequence[str]) -> ModelPool:
    """The pool ``evomerge pool`` describes: ``BASE EXPERT...`` model references, or hydra
    overrides (``key=value``) composing the search config, whose ``models`` group names the base
    and experts, or, left unset, selects the zoo (which must be built)."""
    overrides = [a for a in arguments if "=" in a and not Path(a).exists()]
    refs = [a for a in arguments if a not in overrides]
    if refs and overrides:
        raise UserError(f"pass model references ({' '.join(refs)}) or config overrides "
                        f"({' '.join(overrides)}), not both")
    if refs:
        if len(refs) < 2:
            raise UserError(f"got only {refs[0]}; pass a base and at least one expert: "
                            f"evomerge pool BASE EXPERT [EXPERT...]")
        return ModelPool(refs[0], refs[1:])
    from evomerge.config import compose, read_config
    from evomerge.zoo.build import Zoo

    config = read_config(compose(overrides))
    models = config.models
    if models.base:
        if not models.experts:
            raise UserError(f"models.base={models.base} is set but models.experts is empty; "
                            f"list the fine-tuned models, e.g. models.experts=[PATH,PATH]")
        return ModelPool(models.base, models.experts, allow_pickle=models.allow_pickle,
                         trust_remote_code=models.trust_remote_code)
    zoo = Zoo.at(config.zoo)
    if not zoo.is_built():
        build = " ".join(["evomerge zoo build", *overrides])
        raise UserError(f"the {zoo.config.kind} zoo is not built at {zoo.root}; run '{build}' "
                        f"or pass BASE EXPERT...")
    return ModelPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()})
