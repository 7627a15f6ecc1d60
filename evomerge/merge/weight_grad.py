"""The gradient of a loss with respect to a recipe's per-expert weights, from one backward pass.

A search scores a candidate as one number per task, while its continuous genes number a dozen
or more. For the methods whose merged tensor is linear in the experts' weights once everything
else is fixed, one backward pass through the merged model gives all of them at once: with
``W_t = base_t + sum_k w_k * a_k * C_{t,k}`` (``C`` an expert's component of tensor ``t``, ``a``
the method's scale), ``dL/dw_k = a_k * <dL/dW_t, C_{t,k}>``, one matrix-vector product per
tensor over components the merger holds already. Which component and scale each method uses is
this module's table; a method missing from it is refused in one line, since its weights enter
non-linearly (TIES' sign election, DARE's rescale) and the product would not be its gradient.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from evomerge.errors import UserError
from evomerge.merge.registry import DIFFERENTIABLE_METHODS, MergeParams
from evomerge.merge.subspace import tsv_m_rank



def check_differentiable(method: str, params: MergeParams) -> None:
    """One line for a method whose weights do not enter linearly."""
    if method not in DIFFERENTIABLE_METHODS:
        raise UserError(f"gradient refinement needs a method linear in its weights, got {method!r}; "
                        f"valid: {', '.join(DIFFERENTIABLE_METHODS)}")
    if method == "task_arithmetic" and params.normalize:
        raise UserError("gradient refinement of task_arithmetic needs normalize false (dividing by the "
                        "weights' sum makes them enter non-linearly)")


def weight_gradients(merger, recipe, grads: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Per tensor name: ``[K]``, dL/d(weight of pool expert k) in the config that merges that
    tensor (0 for experts the config leaves out), from ``grads`` (dL/dW of the merged model's
    parameters, in their stored shapes). ``merger`` is the :class:`~evomerge.merge.engine.Merger`
    the model was materialized by; every term is summed in float64 (the per-tensor products are
    small numbers of very different sizes)."""
    plans = merger.method_plans(recipe)
    out: dict[str, Tensor] = {}
    count = len(merger.experts)
    with torch.no_grad():
        for name, grad in grads.items():
            layer, component = merger.where(name)
            method, params, included = plans[recipe.config_for(layer, component)]
            check_differentiable(method, params)
            g = grad.T if merger.transposed(name) else grad  # the orientation the merge saw
            in_context = params.in_context(layer_fraction=None, in_block=layer is not None)  # as the merge sees it
            components, scale = _components(merger, name, method, in_context, included, g.shape)
            per_expert = components.reshape(len(included), -1).double() @ g.reshape(-1).double()
            full = torch.zeros(count, dtype=torch.float64, device=per_expert.device)
            full[list(included)] = per_expert * scale
            out[name] = full
    return out


def _components(merger, name: str, method: str, params: MergeParams, included: tuple[int, ...],
                shape: torch.Size) -> tuple[Tensor, float]:
    """(components ``[k, *shape]`` of the included experts, the scale each weight multiplies)."""
    deltas = merger.dense_deltas(name).index_select(0, torch.tensor(included, device=merger.device))
    if merger.transposed(name):
        deltas = deltas.view(len(included), shape[1], shape[0]).transpose(1, 2)
    lam = params.lambda_
    if method == "task_arithmetic":
        return deltas, lam
    # tsv_m: its cached components on the blocks' matrices, the weighted mean elsewhere
    rank = tsv_m_rank(shape, len(included), params)
    if rank is None:
        return deltas, lam / len(included)
    # keyed by (rank, experts): the very components the merge reads, whoever built them first
    return merger.statistics(name).tsv_components(rank, tuple(included)), lam
