"""What a user is about to merge: how far each expert moved from the base, where, and how alike
the experts' moves are.

Per expert, the task vector's L2 norm per transformer block (tensors outside the blocks grouped
as "outside") and relative to the base's norm, the small-perturbation regime merging relies on;
and the pairwise cosine similarity of the flattened task vectors, the "model kinship" the merging
literature uses to pick partners (similar vectors merge with little interference).
Everything comes from one Gram matrix per layer, accumulated tensor by tensor in float64 in
column chunks, so no whole-model vector is ever concatenated or upcast.

Cosine misses what the subspace methods (TSV-M, Iso-CTS) act on: two task vectors can be nearly
orthogonal element-wise while moving a matrix along the same few singular directions, where they
do interfere. So the report also gives, per pair, how much the experts' top singular subspaces
overlap in the block matrices: 1 where they coincide, about ``k / m`` for random subspaces.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from evomerge.errors import UserError
from evomerge.architecture import transposed_weights
from evomerge.pool import ModelPool
from evomerge.run import RunDir

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
    overlap: list[list[float]]  # experts x experts: top singular subspace overlap (:func:`subspace_overlap`)
    overlap_chance: float  # what random subspaces of the same sizes would overlap

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def kinship(pool: ModelPool) -> Kinship:
    """Norms and cosine similarities of ``pool``'s task vectors."""
    experts = pool.expert_names
    grams: dict[str, torch.Tensor] = {}
    for name in pool.base:
        layer = pool.layout.layer_of(name)
        key = OUTSIDE if layer is None else str(layer)
        stack = [pool.delta(e, name).reshape(-1) for e in experts]
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
        cosine=cosine.tolist(),
        **dict(zip(("overlap", "overlap_chance"), subspace_overlap(pool))))


def subspace_overlap(pool: ModelPool) -> tuple[list[list[float]], float]:
    """Per pair of experts, ``||U_i^T U_j||_F^2 / k`` averaged over the 2-D tensors inside the
    blocks, where ``U_i`` holds expert i's top ``k = max(1, min(m, n) // K)`` left singular
    vectors of its task matrix (the share of directions TSV-M keeps per expert): the fraction of
    one expert's dominant directions lying in the other's. Returned with the chance level,
    the mean ``k / m`` of random subspaces. Zero matrices (an expert that left a tensor alone)
    count as no overlap. Costs one SVD per expert and matrix."""
    experts = pool.expert_names
    count = len(experts)
    total = torch.zeros(count, count, dtype=torch.float64)
    chance, matrices = 0.0, 0
    transposed = transposed_weights(pool.model)  # Conv1D (in, out): left singular vectors are outputs' after .mT
    for name, base in pool.base.items():
        if base.ndim != 2 or pool.layout.layer_of(name) is None or min(base.shape) < 2:
            continue
        k = max(1, min(base.shape) // count)
        stack = torch.stack([pool.delta(e, name).float() for e in experts])
        if name in transposed:
            base, stack = base.T, stack.mT
        u, s, _ = torch.linalg.svd(stack, full_matrices=False)
        tops = u[:, :, :k].double() * (s[:, :1, None] > 0)  # an all-zero update has no directions
        total += torch.einsum("ima,jmb->ijab", tops, tops).square().sum((2, 3)) / k
        chance += k / base.shape[0]
        matrices += 1
    if matrices == 0:
        return [[0.0] * count for _ in range(count)], 0.0
    return (total / matrices).tolist(), chance / matrices


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
    lines += ["", f"subspace overlap: top singular directions shared in the block matrices "
                  f"(1 = the same, {k.overlap_chance:.3f} = random)", row("", k.experts)]
    lines += [row(e, [f"{v:.3f}" for v in values]) for e, values in zip(k.experts, k.overlap)]
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
    from evomerge.zoo.build import model_refs

    config = read_config(compose(overrides))
    base, experts = model_refs(config)
    return ModelPool(base, experts, allow_pickle=config.models.allow_pickle,
                     trust_remote_code=config.models.trust_remote_code)


def write_run_kinship(run: RunDir) -> Path:
    """Compute the kinship of the models a run merges (named by its archive's recipes, where the
    search wrote their paths) and store it as ``RUN/kinship.json``, the form ``evomerge pool
    --json`` prints, for the run report. Loads the base and experts: the report itself never
    does, so this is the one step that pays for it."""
    entry = next(iter(run.archive()), None)
    if entry is None:
        raise UserError(f"{run.archive_path} holds no candidate yet, so nothing names the models to compare; "
                        f"wait for the first evaluations or run `evomerge pool BASE EXPERT...`")
    recipe = entry.recipe
    try:
        base, refs = recipe["base"], {e: recipe.get("expert_refs", {}).get(e, e) for e in recipe["experts"]}
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"archive id {entry.id} in {run.archive_path} names no base and experts; "
                        f"run `evomerge pool BASE EXPERT... --json > {run.kinship_path}` instead") from None
    run.write_json(run.kinship_path, kinship(ModelPool(base, refs)).to_dict())
    return run.kinship_path
