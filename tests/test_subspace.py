"""The subspace methods (TSV-M, Iso-C, Iso-CTS, STAR) and CABS beyond the element references in
test_methods: what each keeps, where it falls back, its cache, and its export."""

from __future__ import annotations

import numpy as np
import pytest
import subspace_reference
import torch

from evomerge.errors import UserError
from evomerge.merge.methods import merge_tensor
from evomerge.merge.params import MergeParamError
from evomerge.merge.registry import MergeParams, validate
from evomerge.merge.stats import DeltaStats
from evomerge.mergekit_config import to_mergekit_yaml
from evomerge.recipe import ExpertParams, MethodConfig, Recipe

torch.set_num_threads(1)

SUBSPACE = ("tsv_m", "iso_c", "iso_cts", "star")


def tensors(k: int, shape: tuple[int, ...], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), 0.1 * torch.randn((k, *shape), generator=gen)


def low_rank(k: int, shape: tuple[int, int], rank: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.stack([0.1 * torch.randn(shape[0], rank, generator=gen) @ torch.randn(rank, shape[1], generator=gen)
                        for _ in range(k)])


@pytest.mark.parametrize("method", SUBSPACE)
@pytest.mark.parametrize("shape,in_block", [((40,), None), ((40,), True), ((24, 16), False)])
def test_outside_block_matrices_the_weighted_mean_is_taken(method: str, shape, in_block) -> None:
    base, deltas = tensors(3, shape)
    p = MergeParams(weight=[0.5, 1.0, -0.2], lambda_=1.5, in_block=in_block)
    want = base.double() + torch.from_numpy(subspace_reference.mean_fallback(deltas.double().numpy(), p.weight, 1.5))
    torch.testing.assert_close(merge_tensor(method, base, deltas, p), want.float(), atol=1e-6, rtol=0)


def test_a_block_matrix_is_decomposed_unless_outside_the_blocks() -> None:
    base, deltas = tensors(2, (24, 16))
    inside = merge_tensor("iso_c", base, deltas, MergeParams(in_block=True))
    outside = merge_tensor("iso_c", base, deltas, MergeParams(in_block=False))
    assert not torch.allclose(inside, outside, atol=1e-3)
    torch.testing.assert_close(inside, merge_tensor("iso_c", base, deltas, MergeParams()))


def test_tsv_m_of_one_expert_at_full_rank_is_its_task_vector() -> None:
    base, deltas = tensors(1, (24, 16))
    merged = merge_tensor("tsv_m", base, deltas, MergeParams(weight=0.7, rank_fraction=1.0))
    torch.testing.assert_close(merged, base + 0.7 * deltas[0], atol=1e-5, rtol=0)


def test_tsv_m_keeps_experts_on_orthogonal_subspaces_intact() -> None:
    # Experts updating disjoint row and column blocks do not interfere: TSV-M is then their sum.
    base = torch.zeros(12, 12)
    deltas = torch.zeros(2, 12, 12)
    deltas[0, :6, :6] = low_rank(1, (6, 6), 3, seed=1)[0]
    deltas[1, 6:, 6:] = low_rank(1, (6, 6), 3, seed=2)[0]
    merged = merge_tensor("tsv_m", base, deltas, MergeParams(rank_fraction=0.25))
    torch.testing.assert_close(merged, deltas.sum(0), atol=1e-5, rtol=0)


def test_iso_c_flattens_the_spectrum_to_its_mean() -> None:
    base, deltas = tensors(3, (20, 12))
    merged = merge_tensor("iso_c", base, deltas, MergeParams(lambda_=1.0))
    before = torch.linalg.svdvals(deltas.sum(0))
    after = torch.linalg.svdvals(merged - base)
    torch.testing.assert_close(after, torch.full_like(after, float(before.mean())), atol=1e-5, rtol=0)


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.01])
def test_iso_cts_uses_the_whole_rank_and_a_flat_spectrum(fraction: float) -> None:
    base, deltas = tensors(3, (20, 13))
    merged = merge_tensor("iso_cts", base, deltas, MergeParams(common_fraction=fraction))
    values = torch.linalg.svdvals(merged - base)
    assert float(values.min()) > 0.99 * float(values.max())  # isotropic, full rank (13)
    if fraction == 1.0:  # no room for the experts' own directions: Iso-C
        torch.testing.assert_close(merged, merge_tensor("iso_c", base, deltas, MergeParams()), atol=1e-5, rtol=0)


def test_star_keeps_the_fewest_components_holding_eta_and_restores_the_nuclear_norm() -> None:
    base, deltas = tensors(1, (20, 12))
    s = torch.linalg.svdvals(deltas[0])
    eta = float(s[:3].sum() / s.sum()) - 1e-4  # three components hold just over eta
    update = merge_tensor("star", base, deltas, MergeParams(eta=eta)) - base
    kept = torch.linalg.svdvals(update)
    assert int((kept > 1e-5).sum()) == 3
    torch.testing.assert_close(kept.sum(), s.sum(), atol=1e-5, rtol=0)
    whole = merge_tensor("star", base, deltas, MergeParams(eta=1.0))
    torch.testing.assert_close(whole, base + deltas[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape,block", [((10, 7), 4), ((64,), 32), ((3, 5), 16)])
def test_cabs_experts_never_share_an_element_and_respect_n_of_m(shape, block: int) -> None:
    base, deltas = tensors(3, shape, seed=3)
    densities, weights = [0.5, 0.25, 0.5], [1.0, 0.8, 0.6]
    p = MergeParams(weight=weights, density=densities, block=block, lambda_=1.0)
    update = (merge_tensor("cabs", base, deltas, p) - base).reshape(-1)
    want = subspace_reference.cabs([d.reshape(-1).tolist() for d in deltas], weights, densities, 1.0, block)
    torch.testing.assert_close(update, torch.tensor(want), atol=1e-6, rtol=0)
    owners = torch.zeros(update.numel(), dtype=torch.long)
    for i, (d, w) in enumerate(zip(deltas, weights)):
        owned = torch.isclose(update, w * d.reshape(-1), atol=1e-7) & (update != 0)
        assert not (owners.bool() & owned).any()
        owners[owned] = i + 1
        padded = torch.nn.functional.pad(owned, (0, (-owned.numel()) % block))
        assert int(padded.view(-1, block).sum(1).max()) <= round(densities[i] * block)


def test_cached_spectra_merge_like_fresh_ones() -> None:
    base, deltas = tensors(3, (24, 16), seed=5)
    stats = DeltaStats(deltas)
    for method in ("tsv_m", "star"):
        p = MergeParams(weight=[0.3, 0.9, 0.6], eta=0.5)
        torch.testing.assert_close(merge_tensor(method, base, deltas, p, stats=stats),
                                   merge_tensor(method, base, deltas, p), atol=1e-6, rtol=0)
    factors = stats.singular_factors()
    assert stats.singular_factors() is factors  # built once
    assert stats.tsv_components(5) is stats.tsv_components(5)
    assert stats.cached_bytes() == sum(f.nbytes for f in factors) + stats.tsv_components(5).nbytes


@pytest.mark.parametrize("method,params,message", [
    ("tsv_m", MergeParams(rank_fraction=0.0), "rank_fraction 0 for tsv_m is outside (0, 1]"),
    ("iso_cts", MergeParams(common_fraction=1.5), "common_fraction 1.5 for iso_cts is outside (0, 1]"),
    ("star", MergeParams(eta=-0.1), "eta -0.1 for star is outside (0, 1]"),
    ("cabs", MergeParams(block=2.5), "block 2.5 for cabs is not an integer"),
    ("cabs", MergeParams(density=[0.5, 1.2]), "density 1.2 for expert 1 is outside [0, 1]"),
])
def test_bad_parameters_are_refused_naming_the_valid_range(method, params, message) -> None:
    with pytest.raises(MergeParamError, match="^" + message.replace("(", r"\(").replace("[", r"\[")):
        validate(method, params, 2)


@pytest.mark.parametrize("method", [*SUBSPACE, "cabs"])
def test_recipes_round_trip_and_refuse_a_mergekit_config_in_one_line(method: str) -> None:
    config = MethodConfig(method, {"a": ExpertParams(weight=0.7, density=0.4), "b": ExpertParams(weight=0.2)},
                          rank_fraction=0.3, common_fraction=0.6, eta=0.5, block=8.0, lambda_=1.2)
    recipe = Recipe.uniform("base", ["a", "b"], 4, config)
    assert Recipe.from_yaml(recipe.to_yaml()).hash == recipe.hash
    with pytest.raises(UserError, match=f"{method}' has no mergekit equivalent") as info:
        to_mergekit_yaml(recipe)
    assert "\n" not in str(info.value)


def test_reference_polar_factor_is_orthonormal() -> None:
    # The references' own building block, checked so a wrong reference cannot pass silently.
    a = np.random.default_rng(0).normal(size=(7, 4))
    q = subspace_reference._orthogonal(a)
    np.testing.assert_allclose(q.T @ q, np.eye(4), atol=1e-12)
    np.testing.assert_allclose(subspace_reference._orthogonal(a.T) @ subspace_reference._orthogonal(a.T).T,
                               np.eye(4), atol=1e-12)
