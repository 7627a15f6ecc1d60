"""Merge methods against independent references: plain loops over elements, following each paper's
(or, where they differ, mergekit's) definition, on small random tensors; plus mergekit itself."""

from __future__ import annotations

import math

import numpy as np
import pytest
import subspace_reference
import torch
from scipy import stats

from evomerge.errors import UserError
from evomerge.merge import kernels
from evomerge.merge.draws import Grid, draw_keys, draw_uniforms, integer_draws
from evomerge.merge.methods import merge_tensor
from evomerge.merge.params import MergeParamError
from evomerge.merge.registry import METHODS, TASK_ARITHMETIC_VARIANTS, MergeParams, validate
from evomerge.merge.stats import MagnitudeQuantiles, row_ranks

torch.set_num_threads(1)

SHAPE = (64, 48)
WEIGHTS = [0.9, 0.6, -0.3]
DENSITIES = [0.5, 0.3, 0.8]
GAMMAS = [0.05, 0.1, 0.3]
EPSILONS = [0.1, 0.2, 0.15]
ATOL = 2e-5


def tensors(k: int, seed: int = 0, shape: tuple[int, ...] = SHAPE) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen), 0.1 * torch.randn((k, *shape), generator=gen)


def lists(base: torch.Tensor, deltas: torch.Tensor) -> tuple[list[float], list[list[float]]]:
    return base.reshape(-1).tolist(), [d.reshape(-1).tolist() for d in deltas]


def as_tensor(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype).reshape(like.shape)


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


# --- reference building blocks, one expert (a flat list) at a time ----------------------------


def ref_top_k(delta: list[float], density: float) -> list[float]:
    """Keep the int(density * n) largest magnitudes (at least one), by sorting."""
    n = len(delta)
    if density >= 1:
        return list(delta)
    k = 0 if density <= 0 else max(1, int(density * n))
    keep = set(sorted(range(n), key=lambda j: -abs(delta[j]))[:k])
    return [x if j in keep else 0.0 for j, x in enumerate(delta)]


def ref_band(delta: list[float], density: float, gamma: float) -> list[float]:
    """Breadcrumbs as mergekit defines it: sort ascending, skip the bottom, keep `target` elements."""
    n = len(delta)
    if density >= 1:
        return list(delta)
    target, top = int(density * n), int(gamma * n)
    bottom = max(0, n - target - top)
    ascending = sorted(range(n), key=lambda j: abs(delta[j]))
    keep = set(ascending[bottom:bottom + target])
    return [x if j in keep else 0.0 for j, x in enumerate(delta)]


def ref_l1(original: list[float], kept: list[float]) -> list[float]:
    before, after = sum(abs(x) for x in original), sum(abs(x) for x in kept)
    if before < 1e-7 or after < 1e-7:
        return kept
    return [x * before / after for x in kept]


def ref_expected_l1(original: list[float], kept: list[float], keep_probability: list[float]) -> list[float]:
    """DARE's and DELLA's rescale: to the L1 norm the random keep leaves in expectation."""
    before = sum(abs(x) for x in original)
    after = sum(abs(x) * p for x, p in zip(original, keep_probability))
    if before < 1e-7 or after < 1e-7:
        return kept
    return [x * before / after for x in kept]


def ref_della_probability(delta: list[float], density: float, epsilon: float, width: int) -> list[float]:
    """DELLA's keep probability: within each row, rising with magnitude rank."""
    if density >= 1:
        return [1.0] * len(delta)
    probability = []
    for start in range(0, len(delta), width):
        row = delta[start:start + width]
        order = sorted(range(width), key=lambda j: abs(row[j]))
        rank = {j: r for r, j in enumerate(order)}
        probability += [density - epsilon + 2 * epsilon * rank[j] / (width - 1) for j in range(width)]
    return probability


def ref_gta(base: list[float], deltas: list[list[float]], weights: list[float], *, ties: bool,
            normalize: bool, lam: float) -> list[float]:
    """Generalized task arithmetic, element by element."""
    out = []
    for j, b in enumerate(base):
        vals = [w * d[j] for w, d in zip(weights, deltas)]
        if ties:
            elected = 1 if sum(vals) >= 0 else -1
            chosen = [i for i, v in enumerate(vals) if sign(v) == elected]
            mixed = sum(vals[i] for i in chosen)
            divisor = sum(weights[i] for i in chosen) or 1.0
        else:
            mixed = sum(vals)
            divisor = sum(weights) if abs(sum(weights)) >= 1e-8 else 1.0
        out.append(b + lam * (mixed / divisor if normalize else mixed))
    return out


# --- references per method -------------------------------------------------------------------


def reference(method: str, base: torch.Tensor, deltas: torch.Tensor, p: MergeParams,
              seed: int | None = None) -> torch.Tensor:
    b, ds = lists(base, deltas)
    k = len(ds)
    w = list(p.weight) if p.weight is not None else [1.0] * k
    spec = METHODS[method]
    default = {param.name: param.default for param in spec.params}
    p = MergeParams(layer_fraction=p.layer_fraction, **{**{param.name: param.default for param in spec.global_params},
                                                        **p.values})
    normalize = default.get("normalize") if p.normalize is None else p.normalize
    rescale = default.get("rescale") if p.rescale is None else p.rescale
    if method == "linear":
        experts = [[x + y for x, y in zip(b, d)] for d in ds]
        total = sum(w)
        out = [sum(wi * e[j] for wi, e in zip(w, experts)) / (total if normalize else 1) for j in range(len(b))]
    elif method == "task_arithmetic":
        out = ref_gta(b, ds, w, ties=False, normalize=normalize, lam=p.lambda_)
    elif method in ("ties", "breadcrumbs", "breadcrumbs_ties"):
        if method == "ties":
            kept = [ref_top_k(d, den) for d, den in zip(ds, p.density)]
        else:
            kept = [ref_band(d, den, g) for d, den, g in zip(ds, p.density, p.gamma)]
        if rescale:
            kept = [ref_l1(d, kd) for d, kd in zip(ds, kept)]
        out = ref_gta(b, kept, w, ties=method != "breadcrumbs", normalize=normalize, lam=p.lambda_)
    elif method in ("dare_linear", "dare_ties", "della", "della_linear"):
        # The documented draw protocol: a 32-bit key from the generator, then one counter-based
        # uniform per element of deltas (checked for uniformity and independence below).
        key = int(torch.randint(0, 1 << 32, (), generator=torch.Generator().manual_seed(seed)))
        draws = draw_uniforms(key, k, deltas[0].numel()).tolist()
        if method.startswith("dare"):
            # a draw is a multiple of 2^-16, so it falls below density with this probability
            probability = [[min(1.0, math.ceil(den * 2**16) / 2**16)] * len(b) for den in p.density]
        else:
            probability = [ref_della_probability(d, den, e, base.shape[-1])
                           for d, den, e in zip(ds, p.density, p.epsilon)]
        kept = [[x if u < q else 0.0 for x, u, q in zip(d, us, qs)] for d, us, qs in zip(ds, draws, probability)]
        if rescale:
            kept = [ref_expected_l1(d, kd, qs) for d, kd, qs in zip(ds, kept, probability)]
        out = ref_gta(b, kept, w, ties=method in ("dare_ties", "della"), normalize=normalize, lam=p.lambda_)
    elif method == "slerp":
        v0, v1 = b, [x + y for x, y in zip(b, ds[0])]
        n0, n1 = math.sqrt(sum(x * x for x in v0)), math.sqrt(sum(x * x for x in v1))
        cos = sum(x * y for x, y in zip(v0, v1)) / (n0 * n1)
        if abs(cos) > 0.9995:
            c0, c1 = 1 - p.t, p.t
        else:
            theta = math.acos(cos)
            c0, c1 = math.sin((1 - p.t) * theta) / math.sin(theta), math.sin(p.t * theta) / math.sin(theta)
        out = [c0 * x + c1 * y for x, y in zip(v0, v1)]
    elif method == "model_stock":
        width = base.shape[-1] if p.filter_wise else len(b)
        out = []
        for start in range(0, len(b), width):
            rows = [d[start:start + width] for d in ds]
            cosines = []
            for i in range(k):
                for j in range(i + 1, k):
                    dot = sum(x * y for x, y in zip(rows[i], rows[j]))
                    norms = math.sqrt(sum(x * x for x in rows[i])) * math.sqrt(sum(y * y for y in rows[j]))
                    cosines.append(dot / norms)
            c = sum(cosines) / len(cosines)
            t = k * c / (1 + (k - 1) * c)
            for j in range(width):
                average = sum(b[start + j] + r[j] for r in rows) / k
                out.append(t * average + (1 - t) * b[start + j])
    elif method == "magmax":
        out = []
        for j, x in enumerate(b):
            vals = [wi * d[j] for wi, d in zip(w, ds)]
            out.append(x + p.lambda_ * max(vals, key=abs))
    elif method == "consensus":
        divisor = sum(w) if normalize else 1.0
        out = []
        for j, x in enumerate(b):
            tau = [wi * d[j] for wi, d in zip(w, ds)]
            votes = sum(abs(tau[i]) >= p.lambda_tall * abs(sum(tau[m] for m in range(k) if m != i)) for i in range(k))
            out.append(x + p.lambda_ * (sum(tau) / divisor if votes >= p.k else 0.0))
    elif method == "lines":
        alpha = 1 / k if p.alpha is None else p.alpha
        scale = (alpha + p.beta * p.layer_fraction) / (sum(w) if normalize else 1.0)
        out = [x + scale * sum(wi * d[j] for wi, d in zip(w, ds)) for j, x in enumerate(b)]
    elif method == "cabs":
        update = subspace_reference.cabs(ds, w, list(p.density), p.lambda_, int(p.block))
        out = [x + u for x, u in zip(b, update)]
    elif method in SUBSPACE:
        stack = deltas.double().numpy()
        if method == "tsv_m":
            update = subspace_reference.tsv_m(stack, w, p.lambda_, p.rank_fraction)
        elif method == "iso_c":
            update = subspace_reference.iso_c(stack, w, p.lambda_)
        elif method == "iso_cts":
            update = subspace_reference.iso_cts(stack, w, p.lambda_, p.common_fraction)
        else:
            update = subspace_reference.star(stack, w, p.lambda_, p.eta)
        return (base.double() + torch.from_numpy(np.asarray(update))).to(base.dtype)
    else:
        raise AssertionError(method)
    return as_tensor(out, base)


SUBSPACE = ("tsv_m", "iso_c", "iso_cts", "star")


def params_for(method: str, k: int, **overrides: object) -> MergeParams:
    values: dict[str, object] = dict(weight=WEIGHTS[:k], density=DENSITIES[:k], gamma=GAMMAS[:k],
                                     epsilon=EPSILONS[:k], lambda_=0.8, layer_fraction=0.4, alpha=0.3, t=0.35)
    values.update(overrides)
    return MergeParams(**values)


DETERMINISTIC = [(m, k) for m, spec in METHODS.items() if not spec.randomized for k in (1, 2, 3)
                 if spec.min_experts <= k <= (spec.max_experts or 3)]
RANDOMIZED = [(m, k) for m, spec in METHODS.items() if spec.randomized for k in (1, 2, 3)]


@pytest.mark.parametrize("method,k", DETERMINISTIC)
def test_matches_reference(method: str, k: int) -> None:
    base, deltas = tensors(k, seed=k)
    p = params_for(method, k)
    torch.testing.assert_close(merge_tensor(method, base, deltas, p), reference(method, base, deltas, p),
                               atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("method,k", RANDOMIZED)
def test_randomized_matches_reference(method: str, k: int) -> None:
    base, deltas = tensors(k, seed=10 + k)
    p = params_for(method, k)
    merged = merge_tensor(method, base, deltas, p, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(merged, reference(method, base, deltas, p, seed=7), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("method", ["ties", "breadcrumbs", "breadcrumbs_ties", "consensus", "task_arithmetic",
                                    "lines", "linear"])
@pytest.mark.parametrize("switches", [(True, True), (False, False), (False, True)])
def test_switches_match_reference(method: str, switches: tuple[bool, bool]) -> None:
    base, deltas = tensors(3, seed=4)
    p = params_for(method, 3, normalize=switches[0], rescale=switches[1], lambda_tall=0.5)
    torch.testing.assert_close(merge_tensor(method, base, deltas, p), reference(method, base, deltas, p),
                               atol=ATOL, rtol=1e-5)


def test_model_stock_filter_wise_and_slerp_fallback_match_reference() -> None:
    base, deltas = tensors(3, seed=5)
    p = MergeParams(filter_wise=True)
    torch.testing.assert_close(merge_tensor("model_stock", base, deltas, p),
                               reference("model_stock", base, deltas, p), atol=ATOL, rtol=1e-5)
    p = MergeParams(t=0.3)
    for delta in (0.001 * base + 1e-4 * deltas[0], -2 * base):  # nearly parallel, antiparallel
        torch.testing.assert_close(merge_tensor("slerp", base, delta[None], p),
                                   reference("slerp", base, delta[None], p), atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(merge_tensor("slerp", base, -2 * base[None], p), 0.4 * base)


# --- identities ----------------------------------------------------------------------------------


def test_task_arithmetic_with_zero_weights_is_base() -> None:
    base, deltas = tensors(3)
    assert torch.equal(merge_tensor("task_arithmetic", base, deltas, MergeParams(weight=[0.0, 0.0, 0.0])), base)


def test_linear_of_one_expert_is_the_expert() -> None:
    base, deltas = tensors(1)
    torch.testing.assert_close(merge_tensor("linear", base, deltas, MergeParams(weight=[1.0])), base + deltas[0])


def test_ties_at_full_density_with_agreeing_signs_is_normalized_task_arithmetic() -> None:
    base, deltas = tensors(3)
    deltas = deltas.abs() * torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).sign()
    p = MergeParams(weight=[0.5, 0.2, 0.3], density=[1.0, 1.0, 1.0], lambda_=0.7)
    ta = merge_tensor("task_arithmetic", base, deltas, MergeParams(weight=p.weight, lambda_=0.7, normalize=True))
    torch.testing.assert_close(merge_tensor("ties", base, deltas, p), ta)
    assert not torch.allclose(ta, merge_tensor("task_arithmetic", base, deltas, MergeParams(weight=p.weight)))


@pytest.mark.parametrize("random_method,counterpart", [("dare_linear", "task_arithmetic"), ("dare_ties", "ties"),
                                                       ("della", "ties"), ("della_linear", "task_arithmetic")])
def test_full_density_random_methods_equal_their_deterministic_counterpart(random_method: str,
                                                                           counterpart: str) -> None:
    base, deltas = tensors(3)
    spec = METHODS[random_method]
    p = MergeParams(weight=WEIGHTS, density=[1.0] * 3, normalize=spec.param("normalize").default,
                    rescale=spec.param("rescale").default)
    merged = merge_tensor(random_method, base, deltas, p, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(merged, merge_tensor(counterpart, base, deltas, p))


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.randomized])
def test_randomized_methods_are_deterministic_per_seed(method: str) -> None:
    base, deltas = tensors(2)
    p = params_for(method, 2)

    def run(seed: int) -> torch.Tensor:
        return merge_tensor(method, base, deltas, p, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_dare_keeps_density_fraction_and_restores_l1_norm() -> None:
    base, deltas = tensors(1)
    p = MergeParams(density=[0.3])
    merged = merge_tensor("dare_linear", base, deltas, p, generator=torch.Generator().manual_seed(0))
    change = merged - base
    kept = change != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.03
    # divided by the keep probability (to 2^-16), the norm is restored in expectation; here, on
    # 3072 elements, within the mask's noise (a relative std of 1.3% at density 0.3)
    torch.testing.assert_close(change[kept], deltas[0][kept] / (math.ceil(0.3 * 2**16) / 2**16))
    assert abs(change.abs().sum() / deltas[0].abs().sum() - 1) < 0.05


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_rescale_restores_the_l1_norm_in_expectation(method: str) -> None:
    """Averaged over seeds the kept norm converges to the original one; one draw does not."""
    base, deltas = tensors(1)
    p = MergeParams(density=[0.4], epsilon=[0.3])
    ratios = torch.tensor([float((merge_tensor(method, base, deltas, p, generator=torch.Generator().manual_seed(s))
                                  - base).abs().sum() / deltas[0].abs().sum()) for s in range(40)])
    assert abs(float(ratios.mean()) - 1) < 0.005
    assert float(ratios.std()) > 0.002


def test_della_keeps_large_magnitudes_more_often() -> None:
    base, deltas = tensors(1)
    p = MergeParams(density=[0.5], epsilon=[0.4])
    kept = merge_tensor("della_linear", base, deltas, p, generator=torch.Generator().manual_seed(0)) != base
    above_median = deltas[0].abs() > deltas[0].abs().median(dim=1, keepdim=True).values
    assert kept[above_median].float().mean() > kept[~above_median].float().mean() + 0.2


def test_draws_are_uniform_and_independent_across_keys_neighbours_and_experts() -> None:
    draws = draw_uniforms(12345, 3, 50_000)
    assert stats.kstest(draws.reshape(-1).numpy(), "uniform").pvalue > 1e-3
    other = draw_uniforms(12346, 3, 50_000)  # the next key: an unrelated stream
    assert abs(torch.corrcoef(torch.stack([draws.reshape(-1), other.reshape(-1)]))[0, 1]) < 0.02
    neighbours = torch.corrcoef(torch.stack([draws[0, :-1], draws[0, 1:]]))[0, 1]
    assert abs(neighbours) < 0.02
    # experts 0 and 1 share one hash (its two halves), expert 2 has its own
    assert abs(torch.corrcoef(draws)[0, 1]) < 0.02 and abs(torch.corrcoef(draws)[0, 2]) < 0.02
    both = (draws[0] < 0.5) & (draws[1] < 0.5)
    assert abs(both.float().mean().item() - 0.25) < 0.01
    assert torch.equal(draws, draw_uniforms(12345, 3, 50_000))


def reference_draw(seed: int, expert: int, numel: int, column: int) -> float:
    """The documented draw in plain unsigned 32-bit arithmetic: hash (seed, pair * numel + column)
    with a Weyl step and two multiply-xorshift rounds; the even expert of a pair takes the high
    16 bits, the odd one the low 16."""
    mask = 0xFFFFFFFF
    h = ((expert // 2 * numel + column) * 0x9E3779B1 + seed) & mask
    for _ in range(2):
        h = (((h >> 16) ^ h) * 0x45D9F3B) & mask
    h = (h >> 16) ^ h
    return ((h >> 16) if expert % 2 == 0 else (h & 0xFFFF)) / 65536


def test_draws_follow_the_documented_hash_in_int32_lanes() -> None:
    """The kernels hash in wrapping int32 arithmetic; the draws must be the unsigned hash's, also
    where positions pass 2^31 (wrapped) and keys sit above 2^31."""
    for seed in (0, 12345, (1 << 32) - 7):
        draws = draw_uniforms(seed, 5, 1000)
        for expert, column in [(0, 0), (1, 0), (2, 999), (3, 17), (4, 500)]:
            assert draws[expert, column].item() == reference_draw(seed, expert, 1000, column)
    width = 1 << 20  # rows 2047 and 2048 straddle position 2^31; pair offsets pass 2^32
    numel = 2049 * width
    keys = draw_keys(99, 3, numel, "cpu")
    spread = Grid.of(width, "cpu").spread(2047, 2)
    far = integer_draws(keys, 3, spread)
    for expert in range(3):
        for row, column in [(0, 0), (0, width - 1), (1, 0), (1, 12345)]:
            position = (2047 + row) * width + column
            assert far[expert][row, column].item() == reference_draw(99, expert, numel, position) * 65536


@pytest.mark.parametrize("method", ["dare_ties", "della"])
def test_random_masks_do_not_depend_on_how_a_tensor_is_sliced(method: str, monkeypatch) -> None:
    base, deltas = tensors(3, shape=(40, 32))
    p = params_for(method, 3)
    whole = merge_tensor(method, base, deltas, p, generator=torch.Generator().manual_seed(5))
    monkeypatch.setattr(kernels, "_SLAB_ELEMENTS", 3 * 64)  # 2 rows per slab instead of all 40
    sliced = merge_tensor(method, base, deltas, p, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(sliced, whole, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "breadcrumbs", "della", "magmax", "consensus"])
def test_compiled_kernels_merge_like_eager_ones(method: str, monkeypatch) -> None:
    """Large tensors run the slab kernels through torch.compile (the CPU path a search takes)."""
    base, deltas = tensors(3, seed=2, shape=(256, 384))  # above the compile threshold
    assert deltas.numel() >= kernels._COMPILE_MIN_ELEMENTS
    p = params_for(method, 3)
    generator = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    compiled = merge_tensor(method, base, deltas, p, generator=generator())
    assert kernels.COMPILATION.failure is None and kernels.COMPILATION.compiled, "the kernels ran eagerly"
    monkeypatch.setattr(kernels, "_COMPILE_MIN_ELEMENTS", 1 << 62)
    torch.testing.assert_close(compiled, merge_tensor(method, base, deltas, p, generator=generator()),
                               atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["della", "magmax"])
def test_small_tensors_merge_compiled_like_eager_ones_within_a_large_model(method: str) -> None:
    """A model's 1-D norm weights run the compiled kernels when its large tensors do."""
    base, deltas = tensors(3, seed=4, shape=(576,))
    p = params_for(method, 3)
    generator = lambda: torch.Generator().manual_seed(9)  # noqa: E731
    eager = merge_tensor(method, base, deltas, p, generator=generator())
    assert not kernels.compiles(deltas.numel())
    with kernels.compiling_every_tensor():
        assert kernels.compiles(deltas.numel())
        compiled = merge_tensor(method, base, deltas, p, generator=generator())
    assert not kernels.compiles(deltas.numel())
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-5)


def test_every_task_arithmetic_variant_keeps_its_compiled_graph() -> None:
    """Each variant, with and without normalize and rescale, on a matrix or a 1-D tensor (one
    row, which dynamo specializes), is a graph of the one merge kernel; past dynamo's limit on
    graphs per function it would merge eagerly, 25-60x slower."""
    base, deltas = tensors(3, seed=2, shape=(256, 384))
    merge_tensor("ties", base, deltas, params_for("ties", 3))
    graphs = len(TASK_ARITHMETIC_VARIANTS) * 2 * 2 * 2
    assert torch._dynamo.config.recompile_limit >= kernels._KERNEL_VARIANTS >= graphs


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints(t: float) -> None:
    base, deltas = tensors(1)
    expected = base if t == 0 else base + deltas[0]
    torch.testing.assert_close(merge_tensor("slerp", base, deltas, MergeParams(t=t)), expected)


def test_consensus_with_k_zero_is_task_arithmetic_and_above_k_is_base() -> None:
    base, deltas = tensors(3)
    ta = merge_tensor("task_arithmetic", base, deltas, MergeParams(weight=WEIGHTS, lambda_=0.5))
    everything = MergeParams(weight=WEIGHTS, lambda_=0.5, k=0)
    torch.testing.assert_close(merge_tensor("consensus", base, deltas, everything), ta)
    assert torch.equal(merge_tensor("consensus", base, deltas, MergeParams(k=4)), base)


def test_lines_scales_with_depth() -> None:
    base, deltas = tensors(2)
    total = deltas.sum(0)
    p = MergeParams(alpha=0.2, beta=0.6)
    for fraction, scale in ((0.0, 0.2), (0.5, 0.5), (1.0, 0.8)):
        merged = merge_tensor("lines", base, deltas, MergeParams(alpha=p.alpha, beta=p.beta, layer_fraction=fraction))
        torch.testing.assert_close(merged, base + scale * total)


def test_half_precision_accumulates_in_float32_and_keeps_dtype() -> None:
    base, deltas = tensors(3)
    p = params_for("ties", 3)
    merged = merge_tensor("ties", base.bfloat16(), deltas.bfloat16(), p)
    assert merged.dtype == torch.bfloat16
    expected = merge_tensor("ties", base.bfloat16().float(), deltas.bfloat16().float(), p).bfloat16()
    assert torch.equal(merged, expected)


def test_elements_tied_at_the_threshold_are_all_kept() -> None:
    base = torch.zeros(8)
    deltas = torch.tensor([[4.0, -3.0, 2.0, 2.0, -2.0, 1.0, 0.5, 0.1]])
    merged = merge_tensor("ties", base, deltas, MergeParams(density=[3 / 8]))
    assert merged.tolist() == [4.0, -3.0, 2.0, 2.0, -2.0, 0.0, 0.0, 0.0]


# --- MagnitudeQuantiles ------------------------------------------------------------------------


def test_quantiles_are_exact_at_grid_points() -> None:
    _, deltas = tensors(3, shape=(40, 33))
    table = MagnitudeQuantiles.from_deltas(deltas, resolution=64)
    n = 40 * 33
    assert len(table.counts) == 65 and table.counts[0] == 1 and table.counts[-1] == n
    flat = deltas.abs().reshape(3, -1)
    for i in range(3):
        for count in table.counts:
            exact = torch.kthvalue(flat[i], n - count + 1).values.item()
            assert table.magnitude_threshold(i, count / n) == exact


def test_quantiles_interpolate_between_grid_points_and_are_exact_for_small_tensors() -> None:
    _, deltas = tensors(2, shape=(40, 33))
    table = MagnitudeQuantiles.from_deltas(deltas, resolution=16)
    n = 40 * 33
    c0, c1 = table.counts[3], table.counts[4]
    middle = table.magnitude_threshold(1, (c0 + c1) // 2 / n)
    assert table.magnitude_threshold(1, c1 / n) < middle < table.magnitude_threshold(1, c0 / n)
    assert table.magnitude_threshold(0, 0.0) == math.inf
    small = MagnitudeQuantiles.from_deltas(deltas[:, :2, :5], resolution=16)
    flat = deltas[:, :2, :5].abs().reshape(2, -1)
    for count in range(1, 11):
        assert small.magnitude_threshold(1, count / 10) == torch.kthvalue(flat[1], 11 - count).values.item()


def test_sampled_quantiles_keep_close_to_the_asked_fraction() -> None:
    deltas = torch.randn((2, 300_000), generator=torch.Generator().manual_seed(3)) ** 3  # heavy tails
    table = MagnitudeQuantiles.from_deltas(deltas, resolution=1024, sample=1 << 14)
    exact = MagnitudeQuantiles.from_deltas(deltas, resolution=1024, sample=1 << 20)  # no sampling
    for fraction in (0.01, 0.1, 0.5, 0.9):
        for i in range(2):
            kept = (deltas[i].abs() >= table.magnitude_threshold(i, fraction)).float().mean().item()
            assert abs(kept - fraction) < 4 * math.sqrt(fraction * (1 - fraction) / (1 << 14)) + 1e-3
            kept = (deltas[i].abs() >= exact.magnitude_threshold(i, fraction)).float().mean().item()
            assert abs(kept - fraction) < 1e-3


@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties"])
def test_quantile_thresholds_reproduce_exact_merges(method: str) -> None:
    base, deltas = tensors(3)
    table = MagnitudeQuantiles.from_deltas(deltas, resolution=SHAPE[0] * SHAPE[1])
    p = params_for(method, 3)
    assert torch.equal(merge_tensor(method, base, deltas, p, stats=table), merge_tensor(method, base, deltas, p))
    coarse = MagnitudeQuantiles.from_deltas(deltas, resolution=32)
    approx = merge_tensor(method, base, deltas, p, stats=coarse)
    exact = merge_tensor(method, base, deltas, p)
    assert (approx != exact).float().mean() < 0.05


# --- validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("method,params,experts,message", [
    ("ties", MergeParams(density=[1.5, 0.2]), ["add", "mul"], "density 1.5 for expert 'add' is outside [0, 1]"),
    ("foo", MergeParams(), None, "unknown merge method 'foo'; valid: linear, task_arithmetic, ties"),
    ("slerp", MergeParams(), ["a", "b"], "slerp merges the base with exactly 1 expert, got 2"),
    ("model_stock", MergeParams(), 1, "model_stock merges the base with at least 2 experts, got 1"),
    ("della", MergeParams(density=0.1), 2, "epsilon 0.15 for expert 0 is too wide for density 0.1"),
    ("breadcrumbs", MergeParams(gamma=[0.1, 0.2, 0.3]), 2, "gamma has 3 values for 2 experts"),
    ("dare_ties", MergeParams(weight=[1.0, math.nan]), None, "weight nan for expert 1 is not a finite number"),
    ("slerp", MergeParams(t=1.2), 1, "t 1.2 for slerp is outside [0, 1]"),
    ("consensus", MergeParams(k=1.5), 3, "k 1.5 for consensus is not an integer"),
    ("linear", MergeParams(weight=[1.0, -1.0]), None, "linear weights sum to 0"),
    ("ties", MergeParams(normalize="yes"), 2, "normalize 'yes' for ties must be true or false"),
])
def test_validate_messages(method: str, params: MergeParams, experts: object, message: str) -> None:
    with pytest.raises(MergeParamError, match="^" + message.replace("[", r"\[").replace("(", r"\(")) as info:
        validate(method, params, experts)
    assert isinstance(info.value, ValueError) and isinstance(info.value, UserError)
    assert "\n" not in str(info.value)


def test_valid_recipes_pass_and_merge_tensor_validates() -> None:
    for method, spec in METHODS.items():
        validate(method, params_for(method, spec.min_experts), spec.min_experts)
    base, deltas = tensors(2)
    with pytest.raises(MergeParamError, match="slerp merges the base with exactly 1 expert"):
        merge_tensor("slerp", base, deltas, MergeParams())
    with pytest.raises(ValueError, match="pass a torch.Generator"):
        merge_tensor("dare_ties", base, deltas, MergeParams())
    with pytest.raises(MergeParamError, match="needs layer_fraction"):
        merge_tensor("lines", base, deltas, MergeParams())
    with pytest.raises(ValueError, match="deltas have shape"):
        merge_tensor("linear", base, deltas[:, :3], MergeParams())


def test_registry_describes_every_parameter() -> None:
    for spec in METHODS.values():
        for param in spec.params:
            assert param.help and param.scope in ("expert", "global"), (spec.name, param.name)
            if param.kind == "bool":
                assert isinstance(param.default, bool), (spec.name, param.name)
            elif param.default is not None:
                assert param.range.complaint(param.default) is None, (spec.name, param.name)
        assert spec.description


# --- against mergekit itself ------------------------------------------------------------------


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "model_stock"])
@pytest.mark.parametrize("normalize,rescale", [(True, False), (False, True)])
def test_matches_mergekit(method: str, normalize: bool, rescale: bool) -> None:
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorGroup

    base, deltas = tensors(3, seed=9)
    group = TensorGroup.from_tensors([base, *(base + d for d in deltas)], base_index=0)
    ids = [entry.id for entry in group.non_base]
    mergekit_method = registry.get(method)
    given = {"int8_mask": False, "normalize": normalize, "rescale": rescale, "lambda": 0.7, "filter_wise": rescale,
             "weight": dict(zip(ids, WEIGHTS)), "density": dict(zip(ids, DENSITIES)), "gamma": dict(zip(ids, GAMMAS))}
    names = {parameter.name for parameter in mergekit_method.spec.parameters}
    expected = mergekit_method.merge_group(group, **{k: v for k, v in given.items() if k in names})
    p = MergeParams(weight=WEIGHTS, density=DENSITIES, gamma=GAMMAS, lambda_=0.7, normalize=normalize,
                    rescale=rescale, filter_wise=rescale)
    torch.testing.assert_close(merge_tensor(method, base, deltas, p), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("normalize", [True, False])
def test_linear_and_slerp_match_mergekit(normalize: bool) -> None:
    registry = pytest.importorskip("mergekit.merge_methods.registry")
    from mergekit.merge_methods.base import TensorBatch

    base, deltas = tensors(3, seed=8)
    batch = TensorBatch(tuple((base + d)[None] for d in deltas))
    expected = registry.get("linear").merge_batch(batch, weight=torch.tensor([WEIGHTS]), normalize=normalize)[0]
    merged = merge_tensor("linear", base, deltas, MergeParams(weight=WEIGHTS, normalize=normalize))
    torch.testing.assert_close(merged, expected, atol=1e-6, rtol=1e-6)
    pair = TensorBatch((base[None], (base + deltas[0])[None]), base_index=0)
    expected = registry.get("slerp").merge_batch(pair, t=torch.tensor([0.35]))[0]
    torch.testing.assert_close(merge_tensor("slerp", base, deltas[:1], MergeParams(t=0.35)), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_adds_the_weighted_stack_to_the_scaled_base(dtype: torch.dtype, monkeypatch) -> None:
    """The one pass task arithmetic and linear merges take, chunk by chunk (here chunks that do
    not divide the tensor), with bf16 task vectors upcast on the fly and a bf16 model computed in
    float32."""
    base, deltas = tensors(3, seed=4, shape=(256, 384))
    base = base.to(dtype)
    stack = deltas.reshape(3, -1).to(torch.bfloat16)
    monkeypatch.setattr(kernels, "_COMBINE_COLUMNS", 1000)
    out = torch.empty(base.numel(), dtype=dtype)
    kernels.combine(base.reshape(-1), stack, 0.7, [0.5, -0.25, 1.5], out)
    expected = 0.7 * base.reshape(-1).float() + stack.float().t() @ torch.tensor([0.5, -0.25, 1.5])
    torch.testing.assert_close(out, expected.to(dtype), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("width, dtype", [(48, torch.float16), (2100, torch.int32)])
def test_row_ranks_are_exact_in_their_storage_dtype(width: int, dtype: torch.dtype) -> None:
    """DELLA's ranks are stored as float16 while rows are narrow enough for it to hold every rank
    exactly, as int32 beyond; ties go by position (a stable sort), as in mergekit."""
    deltas = torch.randn(2, 3, width, generator=torch.Generator().manual_seed(1))
    deltas[0, 0, :4] = 0.5  # a tie
    ranks = row_ranks(deltas)
    assert ranks.dtype == dtype and ranks.shape == (2, 3 * width)
    expected = deltas.abs().argsort(dim=-1, stable=True).argsort(dim=-1).reshape(2, -1)
    assert torch.equal(ranks.long(), expected)
