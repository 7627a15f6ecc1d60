"""Quantized task vectors: the round trip is within half a step of each group, values on the grid
survive exactly, and a Merger over int8 / int4 deltas merges what an fp32 Merger over the
dequantized deltas merges, within the quantization error of the fp32 merge, in about a quarter /
an eighth of the delta bytes (plus scales)."""

from __future__ import annotations

import pytest
import torch

from evomerge.config import DELTA_DTYPES, QUANTIZED_DELTAS, compose, read_config
from evomerge.errors import UserError
from evomerge.merge import quantized
from evomerge.merge.engine import Merger, delta_format
from evomerge.merge.quantized import GROUP, QuantizedStack, levels, quantized_bytes
from evomerge.merge.registry import METHODS
from evomerge.model_files import unique_parameters
from evomerge.pool import ModelPool
from evomerge.recipe import ExpertParams, MethodConfig, Recipe

torch.set_num_threads(1)

BITS = sorted(QUANTIZED_DELTAS.values())
USED = ("add", "reverse", "sort")  # "upper" takes no part: coefficient 0, rows not dequantized
WEIGHT = (0.5, 0.3, 0.8)
LAMBDA = 0.9


def steps(stack: QuantizedStack) -> torch.Tensor:
    """``[K, numel]``: each element's quantization step (its group's scale)."""
    return stack.scales.repeat_interleave(GROUP, dim=1)[:, :stack.numel]


def odd_stack(numel: int) -> torch.Tensor:
    """Three experts' deltas of ``numel`` elements (not a multiple of 128): fine-tune-sized values,
    one outlier, one all-zero group and one all-zero expert."""
    generator = torch.Generator().manual_seed(numel)
    dense = 1e-3 * torch.randn(3, numel, generator=generator)
    dense[0, numel // 2] = 0.05
    dense[1, :GROUP] = 0.0
    dense[2] = 0.0
    return dense


# --- the format ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("numel", [1, 77, 3 * GROUP + 1, 1000])
def test_round_trip_is_within_half_a_step_per_group(bits, numel):
    dense = odd_stack(numel)
    stack = QuantizedStack.of(dense, bits)
    back = stack.dense()
    assert back.shape == dense.shape and back.dtype == torch.float32 and back.is_contiguous()
    error = (back.double() - dense.double()).abs()
    assert (error <= steps(stack).double() / 2 * (1 + 1e-6)).all()
    # each group's step is its absolute maximum over the code range, so that maximum is exact
    groups = torch.nn.functional.pad(dense, (0, stack.scales.shape[1] * GROUP - numel)).view(3, -1, GROUP)
    torch.testing.assert_close(stack.scales, groups.abs().amax(-1) / levels(bits), rtol=1e-6, atol=0)
    # all-zero groups: step 0, exact zeros
    assert (stack.scales[2] == 0).all() and (back[2] == 0).all()
    assert (back[1, :min(GROUP, numel)] == 0).all()
    assert stack.nbytes == 3 * quantized_bytes(numel, bits)


@pytest.mark.parametrize("bits", BITS)
def test_values_on_the_grid_are_exact(bits):
    top = levels(bits)
    generator = torch.Generator().manual_seed(1)
    codes = torch.randint(-top, top + 1, (2, 5 * GROUP + 3), generator=generator)
    codes[:, ::GROUP] = top  # every group reaches the top code: its step is the grid's
    step = 2.0**-12
    dense = codes.float() * step
    assert torch.equal(QuantizedStack.of(dense, bits).dense(), dense)


@pytest.mark.parametrize("bits", BITS)
def test_blocks_select_and_column_ranges_agree_with_the_whole(bits, monkeypatch):
    dense = odd_stack(1000)
    whole = QuantizedStack.of(dense, bits)
    monkeypatch.setattr(quantized, "BLOCK_COLUMNS", 2 * GROUP)  # five blocks, the last one short
    blocked = QuantizedStack.of(dense, bits)
    assert torch.equal(blocked.codes, whole.codes) and torch.equal(blocked.scales, whole.scales)
    full = whole.dense()
    assert torch.equal(blocked.dense(), full)
    assert [b for b in blocked.blocks()] == [(0, 256), (256, 512), (512, 768), (768, 1000)]
    assert torch.equal(whole.dense(torch.float32, GROUP, 900), full[:, GROUP:900])
    assert torch.equal(whole.select([2, 0]).dense(), full[[2, 0]])
    with pytest.raises(ValueError, match="multiple of 128"):
        whole.dense(torch.float32, 5, 10)
    if bits == 4:  # two codes a byte
        assert whole.codes.dtype == torch.uint8 and whole.codes.shape[1] * 2 == whole.scales.shape[1] * GROUP


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.reliability("bad input", "runtime.delta_dtype other than a float dtype, int8 or int4: refused before anything loads")
def test_a_bad_delta_dtype_is_one_line_naming_what_is_valid():
    with pytest.raises(UserError) as caught:
        read_config(compose(["runtime.delta_dtype=int3"]))
    message = str(caught.value)
    assert "runtime.delta_dtype='int3'" in message and ", ".join(DELTA_DTYPES) in message and "\n" not in message
    assert read_config(compose(["runtime.delta_dtype=int4"])).runtime.delta_dtype == "int4"
    with pytest.raises(UserError, match="runtime.dtype='int8' is not one of float32, bfloat16, float16$"):
        read_config(compose(["runtime.dtype=int8"]))
    for bad in ("int3", torch.int8):
        with pytest.raises(UserError, match="int8, int4"):
            delta_format(bad, torch.float32)
    assert delta_format("bfloat16", torch.float32) is torch.bfloat16 and delta_format(None, torch.float16) is torch.float16


# --- the Merger ----------------------------------------------------------------------------------


def pool_of(pico_zoo) -> ModelPool:
    return ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()})


def recipe(pico_zoo, method: str, **params) -> Recipe:
    names = USED[:1] if method == "slerp" else USED
    experts = {n: ExpertParams(weight=w, density=0.5, gamma=0.05, epsilon=0.1) for n, w in zip(names, WEIGHT)}
    config = MethodConfig(method, experts, lambda_=LAMBDA, **params)
    return Recipe.uniform(str(pico_zoo.base), list(pico_zoo.experts), 4, config)


def merged(merger: Merger, r: Recipe) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unique_parameters(merger.materialize(r)).items()}


@pytest.fixture(scope="module")
def fp32(pico_zoo):
    return Merger(pool_of(pico_zoo))


@pytest.fixture(scope="module", params=sorted(QUANTIZED_DELTAS))
def pair(request, pico_zoo):
    """A Merger over quantized deltas, and an fp32 one over those deltas dequantized: what the
    quantized one must merge, whatever the method."""
    bits = QUANTIZED_DELTAS[request.param]
    dequantized = pool_of(pico_zoo)
    for name in dequantized.base:
        stack = torch.stack([tv[name].reshape(-1) for tv in dequantized.task_vectors.values()])
        back = QuantizedStack.of(stack, bits).dense()
        for i, tv in enumerate(dequantized.task_vectors.values()):
            tv[name] = back[i].view(tv[name].shape)
    return Merger(pool_of(pico_zoo), delta_dtype=request.param), Merger(dequantized)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_quantized_deltas_merge_as_their_dequantized_values_do(pico_zoo, pair, method):
    """Every method sees dense tensors: the engine's dequantization (whole stacks, chosen experts,
    column blocks for the linear methods, statistics built from the dense stack lent to them)
    gives what dense deltas of the same values give."""
    quantized_merger, dense_merger = pair
    r = recipe(pico_zoo, method)
    got, want = merged(quantized_merger, r), merged(dense_merger, r)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-6, rtol=0, msg=name)


def test_quantized_statistics_keep_no_dense_stack(pico_zoo, pair):
    quantized_merger, _ = pair
    merged(quantized_merger, recipe(pico_zoo, "ties", normalize=False))
    assert quantized_merger._stats and all(callable(s.source) for s in quantized_merger._stats.values())


@pytest.mark.parametrize("method", ["task_arithmetic", "linear"])
def test_linear_merges_stay_within_half_a_step_per_expert(pico_zoo, fp32, pair, method):
    """merged = scale * base + sum_i c_i delta_i, so |merged_q - merged_fp32| <= sum_i |c_i| step_i / 2."""
    quantized_merger, _ = pair
    r = recipe(pico_zoo, method)
    exact, got = merged(fp32, r), merged(quantized_merger, r)
    factor = LAMBDA if method == "task_arithmetic" else 1 / sum(WEIGHT)  # linear normalizes
    coefficients = torch.tensor([factor * w for w in WEIGHT] + [0.0])  # pool order: add, reverse, sort, upper
    assert list(quantized_merger.experts) == [*USED, "upper"]
    worst = 0.0
    for name, value in got.items():
        bound = (coefficients[:, None] * steps(quantized_merger._stacks[name]) / 2).sum(0).view(value.shape)
        assert ((value - exact[name]).abs() <= bound + 1e-6).all(), name
        worst = max(worst, float((value - exact[name]).abs().max()))
    assert worst > 0  # the deltas did lose precision


def relative_error(got: dict, exact: dict, base: dict) -> float:
    """||merged_q - merged_fp32|| / ||merged_fp32 - base|| over the whole model."""
    error = sum(float((got[k] - exact[k]).double().pow(2).sum()) for k in exact)
    change = sum(float((exact[k] - base[k]).double().pow(2).sum()) for k in exact)
    return (error / change) ** 0.5


# TIES and DARE-TIES are not continuous in the deltas: an element at TIES' magnitude threshold,
# or whose sign decides an election, flips with any rounding, so the merges move by more than the
# linear bound. Measured on the pico zoo: int8 TIES 6.5%, DARE-TIES 2.5% of the fp32 merge's change
# to the base (task arithmetic 0.4%); int4 30% / 12% (7%). Reading each group with its
# neighbour's scale gives int8 33% / 21%, scales 10% too large 12% / 10%.
RELATIVE_BOUND = {("int8", "ties"): 0.10, ("int8", "dare_ties"): 0.05,
                  ("int4", "ties"): 0.40, ("int4", "dare_ties"): 0.20}


@pytest.mark.parametrize("method", ["ties", "dare_ties"])
def test_ties_and_dare_ties_stay_close_to_fp32(pico_zoo, fp32, pair, method, monkeypatch):
    quantized_merger, _ = pair
    fmt = quantized_merger.delta_dtype
    r = recipe(pico_zoo, method, normalize=False)
    base = {k: v.clone() for k, v in fp32.pool.base.items()}
    exact = merged(fp32, r)
    bound = RELATIVE_BOUND[fmt, method]
    assert 0 < relative_error(merged(quantized_merger, r), exact, base) < bound
    if fmt != "int8":
        return
    # the bound is tight enough to catch a dequantization that reads each group with its
    # neighbour's scale
    true_dense = QuantizedStack.dense

    def neighbours_scale(self, dtype=torch.float32, start=0, end=None):
        shifted = QuantizedStack(self.codes, self.scales.roll(1, dims=1), self.numel, self.bits)
        return true_dense(shifted, dtype, start, end)

    monkeypatch.setattr(QuantizedStack, "dense", neighbours_scale)
    quantized_merger.drop_statistics()
    try:
        assert relative_error(merged(quantized_merger, r), exact, base) > bound
    finally:
        monkeypatch.undo()
        quantized_merger.drop_statistics()


def test_memory_plan_counts_codes_and_scales(pico_zoo, fp32, pair):
    quantized_merger, _ = pair
    fmt = quantized_merger.delta_dtype
    bits = QUANTIZED_DELTAS[fmt]
    plan, dense_plan = quantized_merger.memory_plan(), fp32.memory_plan()
    assert plan.deltas == sum(s.nbytes for s in quantized_merger._stacks.values())
    assert plan.deltas == 4 * sum(quantized_bytes(b.numel(), bits) for b in fp32.pool.base.values())
    ratio = plan.deltas / dense_plan.deltas
    codes_and_scales = bits / 32 + 4 / (4 * GROUP)  # per fp32 byte: codes, one fp32 scale per group
    assert codes_and_scales <= ratio < codes_and_scales * 1.1  # groups padded at each tensor's end
    assert (plan.base, plan.working) == (dense_plan.base, dense_plan.working)
    assert f"4 experts, {fmt} in groups of 128 + fp32 scales" in plan.summary()
    # the pool's entries are rows of the merger's codes (views): read densely, they are the stack's rows
    pool = quantized_merger.pool
    assert pool.expert_names == list(pico_zoo.experts)
    for name, stack in quantized_merger._stacks.items():
        rows = stack.dense()
        for i, expert in enumerate(pool.expert_names):
            entry = pool.task_vectors[expert][name]
            assert entry.codes.data_ptr() == stack.row(i).codes.data_ptr()
            torch.testing.assert_close(pool.delta(expert, name), rows[i].view(pool.base[name].shape), rtol=0, atol=0)
    assert set(pool.relative_norms()) == set(pico_zoo.experts)


@pytest.mark.parametrize("fmt", ["int4", "bfloat16"])
def test_a_pool_stores_deltas_as_they_load_and_merges_as_one_converted_after(pico_zoo, fmt):
    """A pool told the merger's delta format stores each task vector in it as it loads (never
    the pool in float32 first); the merger stacks those rows as they are and merges exactly as
    over a float32 pool it converts itself."""
    early = ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()}, delta_dtype=fmt)
    held = next(iter(early.task_vectors.values()))
    want = QuantizedStack if fmt == "int4" else torch.Tensor
    assert all(isinstance(d, want) for d in held.values())
    if fmt == "bfloat16":
        assert all(d.dtype == torch.bfloat16 for d in held.values())
    late = Merger(pool_of(pico_zoo), delta_dtype=fmt)
    stored = Merger(early, delta_dtype=fmt)
    for name, stack in late._stacks.items():
        if fmt == "int4":
            assert torch.equal(stored._stacks[name].codes, stack.codes)
            assert torch.equal(stored._stacks[name].scales, stack.scales)
        else:
            assert torch.equal(stored._stacks[name], stack)
    for method in ("task_arithmetic", "ties"):
        ours, theirs = merged(stored, recipe(pico_zoo, method)), merged(late, recipe(pico_zoo, method))
        for name in ours:
            assert torch.equal(ours[name], theirs[name]), (method, name)


def test_fused_dequantize_combine_is_the_unfused_merge():
    """Eager here (compiling costs 30 s on 2 cores); experiments/bench_merge.py compares the
    compiled kernel's merge with the unfused one on the whole zoo model."""
    from evomerge.merge import kernels

    numel = 5 * GROUP
    dense = odd_stack(numel)
    base = torch.randn(numel, generator=torch.Generator().manual_seed(1))
    coefficients, scale = [0.45, -0.27, 0.72], 0.9
    for bits in BITS:
        stack = QuantizedStack.of(dense, bits)
        unfused = kernels.combine(base, stack.dense(), scale, coefficients, torch.empty(numel))
        codes, scales = stack.groups(0, numel)
        fused = torch.empty(numel)
        kernels.combine_codes(base, codes, scales, bits, scale, coefficients, fused)
        torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-7)
