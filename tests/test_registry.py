"""A merge method declares its parameters once, in its registry entry, and everything else
derives from it: recipe YAML and validation, the engine's arguments, mergekit export (or a clear
refusal) and the search space's genes. Shown by registering a method with new parameters in this
test alone."""

from __future__ import annotations

import pytest
import torch

from evomerge.config import SpaceConfig
from evomerge.errors import UserError
from evomerge.merge import registry
from evomerge.mergekit_config import to_mergekit
from evomerge.merge.params import WEIGHT, MergeParamError, Param, ParamRange
from evomerge.merge.registry import MethodSpec
from evomerge.recipe import ExpertParams, MethodConfig, Recipe
from evomerge.search.space import SearchSpace


def boosted(base, deltas, params, generator=None, stats=None, *, out=None):
    """base + boost * sum_k weight_k * keep_k * delta_k, written into ``out``."""
    coefficients = torch.tensor([w * k for w, k in zip(params.weight, params.keep)], dtype=base.dtype)
    merged = base + params.boost * torch.tensordot(coefficients, deltas, dims=1)
    if out is None:
        return merged
    out.copy_(merged)
    return out


@pytest.fixture
def boosted_method():
    spec = registry.register(MethodSpec(
        "boosted", boosted,
        (WEIGHT,
         Param("keep", "expert", 1.0, range=ParamRange(0.0, 1.0), mergekit=False, search=(0.2, 0.9),
               help="share of each expert's weight that counts"),
         Param("boost", "global", 1.0, range=ParamRange(0.0, 10.0), mergekit=False, search=(0.5, 2.0),
               help="scale of the whole sum")),
        "a test's method: a boosted, kept share of task arithmetic"))
    yield spec
    registry.unregister("boosted")


def recipe(keep: float = 0.3, boost: float = 1.5, layers: int = 2) -> Recipe:
    config = MethodConfig("boosted", {"a": ExpertParams(weight=0.5, keep=keep), "b": ExpertParams(weight=0.25)},
                          boost=boost)
    return Recipe.uniform("base", ["a", "b"], layers, config)


def test_a_new_method_round_trips_through_recipe_yaml(boosted_method):
    made = recipe()
    back = Recipe.from_yaml(made.to_yaml())
    assert back == made and back.hash == made.hash
    assert made.outside.to_dict() == {"method": "boosted", "boost": 1.5,
                                      "experts": {"a": {"weight": 0.5, "keep": 0.3}, "b": {"weight": 0.25, "keep": 1.0}}}
    assert recipe(keep=0.31).hash != made.hash and recipe(boost=1.6).hash != made.hash


def test_a_new_method_s_parameters_are_checked_from_its_schema(boosted_method):
    from evomerge.merge.engine import merge_params

    with pytest.raises(MergeParamError, match=r"^boost 20 for boosted is outside \[0, 10\]$"):
        merge_params(recipe(boost=20).outside, ["a", "b"])
    with pytest.raises(MergeParamError, match=r"^keep 1.5 for expert 'a' is outside \[0, 1\]$"):
        merge_params(recipe(keep=1.5).outside, ["a", "b"])
    with pytest.raises(UserError, match=r"^groups\[0\]\.config\.experts\.a\.keep must be a finite number, got 'lots'$"):
        Recipe.from_yaml(recipe().to_yaml().replace("keep: 0.3", "keep: lots"))
    with pytest.raises(UserError, match=r"^unknown key 'boots' in outside; valid keys: .*boost"):
        Recipe.from_yaml(recipe().to_yaml().replace("boost: 1.5", "boots: 1.5", 1))
    params, included = merge_params(recipe().outside, ["a", "b"])
    assert included == [0, 1] and params.keep == [0.3, 1.0] and params.boost == 1.5


def test_a_new_method_merges_through_the_engine_s_derived_arguments(boosted_method):
    from evomerge.merge.engine import merge_params
    from evomerge.merge.methods import merge_tensor

    base = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    deltas = torch.randn(2, 6, 4, generator=torch.Generator().manual_seed(1))
    params, _ = merge_params(recipe().outside, ["a", "b"])
    expected = base + 1.5 * (0.5 * 0.3 * deltas[0] + 0.25 * 1.0 * deltas[1])
    torch.testing.assert_close(merge_tensor("boosted", base, deltas, params), expected)


def test_a_method_mergekit_lacks_is_refused_in_one_line(boosted_method):
    with pytest.raises(UserError, match=r"^merge method 'boosted' has no mergekit equivalent; methods that export: "):
        to_mergekit(recipe())


def test_a_new_method_s_evolvable_parameters_become_genes(boosted_method):
    space = SearchSpace(SpaceConfig(granularity=0, knots=0, methods=["boosted"], initial=[]), "base", ("a", "b"), 2)
    assert space.names == ["out.a.weight", "out.a.keep", "out.b.weight", "out.b.keep", "out.boost",
                           "L0-1.a.weight", "L0-1.a.keep", "L0-1.b.weight", "L0-1.b.keep", "L0-1.boost"]
    low, high = space.bounds()
    assert (low[1], high[1]) == (0.2, 0.9) and (low[4], high[4]) == (0.5, 2.0)  # the declared search ranges
    genome = dict(zip(space.names, [0.5, 0.3, 0.25, 0.9, 1.5] * 2))
    expected = MethodConfig("boosted", {"a": ExpertParams(weight=0.5, keep=0.3),
                                        "b": ExpertParams(weight=0.25, keep=0.9)}, boost=1.5)
    assert space.decode(genome) == Recipe.uniform("base", ["a", "b"], 2, expected)
    assert space.encode(space.decode(genome)) == pytest.approx(genome)


def test_mixed_spaces_pin_the_genes_a_method_does_not_take(boosted_method):
    """In a space of TIES and the new method, a TIES group ignores keep and boost: genomes that
    differ only there decode to one recipe."""
    space = SearchSpace(SpaceConfig(granularity=0, knots=0, methods=["ties", "boosted"], initial=[]), "base", ("a",), 2)
    assert space.names[:5] == ["out.method", "out.a.weight", "out.a.density", "out.a.keep", "out.boost"]
    genome = {name: 0.5 for name in space.names} | {"out.method": "ties", "L0-1.method": "ties"}
    other = genome | {"out.a.keep": 0.8, "L0-1.boost": 1.9}
    assert space.decode(genome).hash == space.decode(other).hash
    assert set(space.decode(genome).outside.experts["a"]) == {"weight", "density"}
