"""The Merger on the pico zoo: every method equals a per-tensor reference, configs land on the
right tensors, results are reproducible and independent of earlier candidates, bad recipes are
refused before any weight moves, and the memory plan is the memory used."""

from __future__ import annotations

import pytest
import torch

from evomerge.errors import UserError
from evomerge.merge.engine import MemoryPlan, Merger, check_fits, tensor_seed
from evomerge.merge.methods import merge_tensor
from evomerge.merge.registry import METHODS, MergeParams
from evomerge.model_files import unique_parameters
from evomerge.pool import ModelPool, load_model
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe

torch.set_num_threads(1)

EXACT = 10**6  # a quantile resolution above every pico tensor's size: exact thresholds
USED = ("add", "reverse", "sort")  # "upper" stays out of every config: it must take no part
WEIGHT, DENSITY, GAMMA, EPSILON = (0.5, 0.3, 0.8), (0.6, 0.5, 0.7), (0.05, 0.1, 0.02), (0.1, 0.2, 0.15)
GLOBALS = {"lambda_": 0.9, "t": 0.3, "alpha": 0.4, "beta": 0.7, "k": 2.0, "lambda_tall": 0.3}


def make_merger(pico_zoo, **kwargs) -> Merger:
    pool = ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()})
    return Merger(pool, **kwargs)


@pytest.fixture(scope="module")
def reference(pico_zoo):
    """Base tensors and task vectors stacked in pool order, loaded without the Merger."""
    base = {k: v.clone() for k, v in unique_parameters(load_model(str(pico_zoo.base))[0]).items()}
    experts = [unique_parameters(load_model(str(path))[0]) for path in pico_zoo.experts.values()]
    deltas = {name: torch.stack([e[name] - b for e in experts]) for name, b in base.items()}
    return base, deltas, list(pico_zoo.experts)


def used_experts(method: str) -> tuple[str, ...]:
    return {"slerp": USED[:1]}.get(method, USED)


def config(method: str, **overrides) -> MethodConfig:
    names = used_experts(method)
    experts = {n: ExpertParams(weight=w, density=d, gamma=g, epsilon=e) for n, w, d, g, e in zip(names, WEIGHT, DENSITY, GAMMA, EPSILON)}
    return MethodConfig(method, experts, **{**GLOBALS, **overrides})


def recipe_of(pico_zoo, cfg: MethodConfig) -> Recipe:
    return Recipe.uniform(str(pico_zoo.base), list(pico_zoo.experts), 4, cfg)


def reference_model(pico_zoo, reference, recipe: Recipe, method: str):
    """Straightforward merge: merge_tensor per tensor on the included experts, exact thresholds,
    a fresh model to write into."""
    base, deltas, names = reference
    index = [names.index(n) for n in used_experts(method)]
    k = len(index)
    model, _ = load_model(str(pico_zoo.base))
    targets = unique_parameters(model)
    for name, b in base.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        fraction = layer / 3 if layer is not None else (0.0 if "embed" in name else 1.0)
        params = MergeParams(weight=WEIGHT[:k], density=DENSITY[:k], gamma=GAMMA[:k], epsilon=EPSILON[:k],
                             lambda_=0.9, t=0.3, alpha=0.4, beta=0.7, k=2, lambda_tall=0.3,
                             layer_fraction=fraction, in_block=layer is not None)
        generator = torch.Generator().manual_seed(tensor_seed(recipe.seed, name))
        targets[name].copy_(merge_tensor(method, b, deltas[name][index], params, generator))
    return model


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in unique_parameters(model).items()}


def assert_same(model, expected, atol=1e-6):
    got, want = unique_parameters(model), unique_parameters(expected)
    assert got.keys() == want.keys()
    for name in got:
        torch.testing.assert_close(got[name], want[name], atol=atol, rtol=0, msg=name)


@pytest.fixture(scope="module")
def merger(pico_zoo):
    return make_merger(pico_zoo, quantile_resolution=EXACT)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_matches_the_per_tensor_reference(pico_zoo, reference, merger, method):
    recipe = recipe_of(pico_zoo, config(method))
    model = merger.materialize(recipe)
    base = reference[0]["model.layers.1.mlp.up_proj.weight"]
    assert not torch.equal(unique_parameters(model)["model.layers.1.mlp.up_proj.weight"], base)
    assert_same(model, reference_model(pico_zoo, reference, recipe, method))
    # the head is tied to the embeddings and written once, through them
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_layer_groups_put_each_config_on_its_tensors(pico_zoo, reference, merger):
    def only_add(weight):
        return MethodConfig("task_arithmetic", {"add": ExpertParams(weight=weight)})

    groups = (LayerGroup(0, 4, "all", only_add(0.1)), LayerGroup(2, 4, "attn", only_add(0.2)),
              LayerGroup(0, 2, "mlp", only_add(0.3)))
    recipe = Recipe(str(pico_zoo.base), tuple(pico_zoo.experts), 4, groups, only_add(0.4))
    merged = unique_parameters(merger.materialize(recipe))
    base, deltas, _ = reference
    for name, value in merged.items():
        layer = int(name.split(".")[2]) if ".layers." in name else None
        if layer is None:
            weight = 0.4
        elif "self_attn" in name and layer >= 2:
            weight = 0.2
        elif ".mlp." in name and layer < 2:
            weight = 0.3
        else:
            weight = 0.1
        torch.testing.assert_close(value, base[name] + weight * deltas[name][0], atol=1e-6, rtol=0,
                                   msg=name)


@pytest.mark.parametrize("method", ["dare_ties", "della", "ties"])
def test_one_recipe_gives_one_model(pico_zoo, merger, method):
    recipe = recipe_of(pico_zoo, config(method))
    first = weights(merger.materialize(recipe))
    merger.materialize(recipe_of(pico_zoo, config("task_arithmetic")))
    second = weights(merger.materialize(recipe))
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_another_recipe_draws_other_dare_masks(pico_zoo, reference, merger):
    def mask(lambda_):
        recipe = recipe_of(pico_zoo, config("dare_linear", lambda_=lambda_))
        name = "model.layers.0.mlp.down_proj.weight"
        merged = unique_parameters(merger.materialize(recipe))[name].clone()
        return recipe.hash, merged != reference[0][name]

    (hash_a, a), (hash_b, b) = mask(0.9), mask(0.8)
    assert hash_a != hash_b
    assert 0.3 < a.float().mean() < 0.95 and 0.3 < b.float().mean() < 0.95
    assert (a != b).float().mean() > 0.05


def test_nothing_leaks_between_candidates(pico_zoo, merger):
    a = recipe_of(pico_zoo, config("ties"))
    b = recipe_of(pico_zoo, config("dare_ties", lambda_=1.2))
    merger.materialize(a)
    after_a = weights(merger.materialize(b))
    fresh, _ = load_model(str(pico_zoo.base))
    alone = weights(merger.materialize(b, into=fresh))
    assert all(torch.equal(after_a[k], alone[k]) for k in alone)


def test_bf16_deltas_stay_within_their_rounding(pico_zoo, reference):
    """bf16 keeps 8 significant bits, so rounding moves each delta by at most 2^-8 of itself and
    the merge by at most 2^-8 * sum_i |c_i| |delta_i| (plus fp32 rounding)."""
    cfg = config("task_arithmetic")
    recipe = recipe_of(pico_zoo, cfg)
    exact = weights(make_merger(pico_zoo).materialize(recipe))
    half = weights(make_merger(pico_zoo, delta_dtype=torch.bfloat16).materialize(recipe))
    _, deltas, _ = reference
    coefficients = torch.tensor([0.9 * w for w in WEIGHT])
    worst = 0.0
    for name, value in half.items():
        bound = 2**-8 * torch.einsum("k,k...->...", coefficients, deltas[name][:3].abs()) + 1e-6
        assert ((value - exact[name]).abs() <= bound).all(), name
        worst = max(worst, float((value - exact[name]).abs().max()))
    assert 0 < worst < 1e-3


@pytest.mark.reliability("bad input", "a recipe naming an expert the pool lacks, or out-of-range parameters: refused before any weight changes")
@pytest.mark.parametrize("recipe_change, message", [
    (lambda r: Recipe(r.base, r.experts + ("nope",), 4, r.groups, r.outside), "'nope' is not in the pool"),
    (lambda r: Recipe.uniform(r.base, r.experts, 3, r.outside), "3 layers but the pool's model has 4"),
    (lambda r: Recipe.uniform(r.base, r.experts, 4, MethodConfig(
        "ties", {"add": ExpertParams(weight=1.0, density=1.5)})), "density 1.5"),
    (lambda r: Recipe.uniform(r.base, r.experts, 4, MethodConfig(
        "slerp", {"add": ExpertParams(), "sort": ExpertParams()})), "exactly 1 expert"),
    (lambda r: Recipe.uniform(r.base, r.experts, 4, MethodConfig("soup", {"add": ExpertParams()})),
     "unknown merge method 'soup'"),
])
def test_bad_recipes_are_refused_before_any_weight_changes(pico_zoo, merger, recipe_change, message):
    good = recipe_of(pico_zoo, config("ties"))
    before = weights(merger.materialize(good))
    with pytest.raises(UserError, match=message) as caught:
        merger.materialize(recipe_change(good))
    assert "\n" not in str(caught.value)
    after = weights(merger.model)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("delta_dtype", [torch.float32, torch.bfloat16])
def test_memory_plan_is_the_memory_held(pico_zoo, delta_dtype):
    merger = make_merger(pico_zoo, delta_dtype=delta_dtype)
    plan = merger.memory_plan()
    pool = merger.pool
    assert plan.base == sum(t.nbytes for t in pool.base.values())
    # the pool's task vectors are views of the merger's stacks, which hold every delta once
    views = [t for tv in pool.task_vectors.values() for t in tv.values()]
    assert all(t.dtype == delta_dtype for t in views)
    assert plan.deltas == sum(t.nbytes for t in views) == 4 * plan.base * views[0].element_size() // 4
    assert plan.working == sum(p.nbytes for p in unique_parameters(merger.model).values())
    assert plan.total == plan.base + plan.deltas + plan.working
    assert "4 experts" in plan.summary() and "\n" not in plan.summary()


def test_an_impossible_plan_is_refused_naming_what_to_lower():
    huge = {"w": (2**20, 2**20)}
    with pytest.raises(UserError, match=r"lower delta_dtype \(e.g. bfloat16 or int8\)") as fp32:
        check_fits(MemoryPlan.for_shapes(huge, 8, torch.float32, torch.float32), torch.device("cpu"))
    assert "8 experts" in str(fp32.value) and "\n" not in str(fp32.value)
    with pytest.raises(UserError, match=r"lower delta_dtype \(e.g. int8\)"):
        check_fits(MemoryPlan.for_shapes(huge, 8, torch.float32, torch.bfloat16), torch.device("cpu"))
    with pytest.raises(UserError, match="use fewer experts") as int4:
        check_fits(MemoryPlan.for_shapes(huge, 8, torch.float32, "int4"), torch.device("cpu"))
    assert "delta_dtype" not in str(int4.value) and "int4 in groups of 128" in str(int4.value)
    check_fits(MemoryPlan.for_shapes({"w": (64, 64)}, 2, torch.float32, torch.float32), torch.device("cpu"))


def test_materialize_writes_into_the_existing_parameters(pico_zoo, merger):
    pointers = {k: v.data_ptr() for k, v in unique_parameters(merger.model).items()}
    for method in ("task_arithmetic", "ties", "dare_linear", "model_stock"):
        model = merger.materialize(recipe_of(pico_zoo, config(method)))
        assert model is merger.model
        assert {k: v.data_ptr() for k, v in unique_parameters(model).items()} == pointers


def test_default_quantiles_keep_within_their_resolution(pico_zoo, merger):
    """Interpolated thresholds keep within numel/resolution elements of mergekit's exact count."""
    recipe = recipe_of(pico_zoo, config("ties"))
    exact = weights(merger.materialize(recipe))
    coarse = make_merger(pico_zoo, quantile_resolution=64)
    approx = weights(coarse.materialize(recipe))
    differing = 0
    for name, value in approx.items():
        changed = int((value != exact[name]).sum())
        assert changed <= 3 * (value.numel() // 64 + 1), name
        differing += changed
    assert differing > 0  # at this resolution the interpolation shows
