"""Recipes: validation, the YAML and mergekit round trips, the content hash, gradient parsing."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml

from evomerge.errors import UserError
from evomerge.architecture import LLAMA_STYLE
from evomerge.mergekit_config import from_mergekit, to_mergekit, to_mergekit_yaml
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe

EXPERTS = ("add", "reverse")


def ties(w_add: float = 0.5, w_rev: float = 0.3, **kw) -> MethodConfig:
    return MethodConfig("ties", {"add": ExpertParams(weight=w_add, density=0.7),
                                 "reverse": ExpertParams(weight=w_rev, density=0.5)}, **kw)


def uniform() -> Recipe:
    return Recipe.uniform("/zoo/base", EXPERTS, 4, ties(normalize=True),
                          expert_refs={"add": "/zoo/add", "reverse": "/zoo/reverse"})


def layerwise() -> Recipe:
    """Two block groups, attention and MLP split in the second, a different config outside."""
    groups = (LayerGroup(0, 2, "all", ties(0.2, 0.8)), LayerGroup(2, 4, "all", ties(0.6, 0.4)),
              LayerGroup(2, 4, "attn", ties(0.9, 0.1, lambda_=1.5)),
              LayerGroup(2, 4, "mlp", ties(0.1, 0.9)))
    return Recipe("/zoo/base", EXPERTS, 4, groups, ties(1.0, 1.0), "bfloat16",
                  {"add": "/zoo/add", "reverse": "/zoo/reverse"})


def raises_one_line(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(UserError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return str(info.value)


# --- evomerge YAML -------------------------------------------------------------------------------

@pytest.mark.parametrize("make", [uniform, layerwise])
def test_yaml_round_trip(make):
    recipe = make()
    text = recipe.to_yaml()
    back = Recipe.from_yaml(text)
    assert back == recipe and back.to_yaml() == text and back.hash == recipe.hash


def test_layerwise_yaml_keeps_the_attn_mlp_split():
    back = Recipe.from_yaml(layerwise().to_yaml())
    assert [(g.start, g.end, g.component) for g in back.groups] == [
        (0, 2, "all"), (2, 4, "all"), (2, 4, "attn"), (2, 4, "mlp")]
    assert back.config_for(3, "attn").lambda_ == 1.5


@pytest.mark.reliability("bad input", "unknown keys in a recipe YAML")
def test_unknown_yaml_keys_are_named_with_the_valid_ones():
    data = uniform().to_dict()
    data["groups"][0]["config"]["experts"]["add"]["wieght"] = 0.5
    message = raises_one_line("wieght", Recipe.from_dict, data)
    assert "groups[0].config.experts.add" in message and "density, epsilon, gamma, weight" in message
    data = uniform().to_dict() | {"seed": 3}
    assert "expert_refs" in raises_one_line("'seed'", Recipe.from_dict, data)


@pytest.mark.reliability("bad input", "malformed recipe YAML (the line is named)")
def test_malformed_yaml_names_the_line():
    text = uniform().to_yaml().replace("dtype: float32", "dtype: float32: x")
    line = text.splitlines().index("dtype: float32: x") + 1
    raises_one_line(f"malformed recipe YAML at line {line}, column 15: mapping values are not allowed",
                    Recipe.from_yaml, text)


def test_bad_values_in_yaml_are_named():
    text = uniform().to_yaml().replace("weight: 0.5", "weight: lots", 1)
    raises_one_line("outside.experts.add.weight must be a finite number, got 'lots'",
                    Recipe.from_yaml, text)
    # PyYAML reads 1e-3 as a string; it is still a number
    text = uniform().to_yaml().replace("weight: 0.5", "weight: 1e-3")
    assert Recipe.from_yaml(text).outside.experts["add"].weight == 0.001


# --- hash and seed -------------------------------------------------------------------------------

def test_hash_is_stable_across_dict_order_and_reserialization():
    recipe = uniform()
    reordered = MethodConfig("ties", {"reverse": ExpertParams(weight=0.3, density=0.5), "add": ExpertParams(weight=0.5, density=0.7)},
                             normalize=True)
    same = Recipe("/zoo/base", EXPERTS, 4, [LayerGroup(0, 4, "all", reordered)], reordered,
                  expert_refs={"reverse": "/zoo/reverse", "add": "/zoo/add"})
    assert same.hash == recipe.hash and same == recipe
    assert Recipe.from_yaml(recipe.to_yaml()).hash == recipe.hash
    noisy = recipe.to_yaml().replace("weight: 0.5", "weight: 0.50000").replace("lambda: 1.0", "lambda: 1")
    assert Recipe.from_yaml(noisy).hash == recipe.hash
    shuffled = yaml.safe_dump(recipe.to_dict(), sort_keys=True)
    assert Recipe.from_yaml(shuffled).hash == recipe.hash
    assert len(recipe.hash) == 16 and int(recipe.hash, 16) >= 0


@pytest.mark.parametrize("change", [
    lambda r: replace(r, outside=ties(0.5, 0.31, normalize=True)),
    lambda r: replace(r, outside=r.outside.replace(experts={
        "add": ExpertParams(weight=0.5, density=0.71), "reverse": ExpertParams(weight=0.3, density=0.5)})),
    lambda r: replace(r, outside=r.outside.replace(lambda_=1.1)),
    lambda r: replace(r, outside=r.outside.replace(normalize=False)),
    lambda r: replace(r, outside=r.outside.replace(rescale=True)),
    lambda r: replace(r, outside=r.outside.replace(method="dare_ties")),
    lambda r: replace(r, dtype="bfloat16"),
    lambda r: replace(r, experts=("reverse", "add")),
    lambda r: replace(r, groups=(LayerGroup(0, 1, "all", r.outside),
                                 LayerGroup(1, 4, "all", ties(0.6)))),
    lambda r: replace(r, groups=r.groups + (LayerGroup(0, 4, "mlp", r.outside),)),
    lambda r: Recipe.uniform(r.base, r.experts, 5, r.outside),
])
def test_hash_changes_with_any_value(change):
    recipe = uniform()
    changed = change(recipe)
    assert changed != recipe and changed.hash != recipe.hash and changed.seed != recipe.seed


@pytest.mark.parametrize("change", [
    {"experts": {"add": ExpertParams(weight=0.5, density=0.7, gamma=0.02), "reverse": ExpertParams(weight=0.3, density=0.5)}},
    {"experts": {"add": ExpertParams(weight=0.5, density=0.7, epsilon=0.1), "reverse": ExpertParams(weight=0.3, density=0.5)}},
    {"t": 0.4},
    {"normalize": True},  # ties' own default, said explicitly
])
def test_hash_ignores_what_the_method_does_not_read(change):
    """TIES takes no gamma, epsilon or t, and normalizes by default: setting them changes no
    weight, so it is the same candidate (one archive entry, one seed), and the recipe does not
    carry them."""
    recipe = uniform()
    changed = replace(recipe, outside=recipe.outside.replace(**change))
    assert changed == recipe and changed.hash == recipe.hash
    assert set(changed.outside.to_dict()) == {"method", "lambda", "normalize", "rescale", "experts"}
    assert set(changed.outside.to_dict()["experts"]["add"]) == {"weight", "density"}


def test_adjacent_groups_with_one_config_are_one_group():
    """Where a run of equal configs is cut changes no weight: a layer-wise genome that gives
    every group the same values is the uniform recipe (one archive entry, one seed)."""
    recipe = uniform()
    cut = replace(recipe, groups=(LayerGroup(0, 1, "all", recipe.outside), LayerGroup(1, 3, "all", recipe.outside),
                                  LayerGroup(3, 4, "all", recipe.outside)))
    assert cut == recipe and cut.hash == recipe.hash and cut.groups == (LayerGroup(0, 4, "all", recipe.outside),)
    mixed = replace(recipe, groups=(LayerGroup(0, 2, "all", recipe.outside), LayerGroup(2, 4, "all", ties(0.6)),
                                    LayerGroup(0, 1, "attn", ties(0.7)), LayerGroup(1, 2, "attn", ties(0.7))))
    assert [(g.start, g.end, g.component) for g in mixed.groups] == [(0, 2, "all"), (0, 2, "attn"), (2, 4, "all")]


def test_hash_ignores_where_models_live_and_arithmetic_noise():
    recipe = uniform()
    assert replace(recipe, base="/elsewhere/base", expert_refs={}).hash == recipe.hash
    noisy = replace(recipe, outside=ties(0.1 + 0.2, normalize=True))
    assert noisy.hash == replace(recipe, outside=ties(0.3, normalize=True)).hash


def test_seed_is_derived_from_the_hash():
    recipe = uniform()
    assert recipe.seed == int(recipe.hash[:8], 16) and 0 <= recipe.seed < 2**32
    assert Recipe.from_yaml(recipe.to_yaml()).seed == recipe.seed
    assert layerwise().seed != recipe.seed


# --- structure -----------------------------------------------------------------------------------

def test_config_for_prefers_the_component_group():
    recipe = layerwise()
    assert recipe.config_for(0, "attn") == recipe.config_for(0, "all") == ties(0.2, 0.8)
    assert recipe.config_for(3, "attn") == ties(0.9, 0.1, lambda_=1.5)
    assert recipe.config_for(3, "mlp") == ties(0.1, 0.9)
    assert recipe.config_for(3, "norm") == recipe.config_for(3, "all") == ties(0.6, 0.4)
    assert recipe.config_for(None, "all") == ties(1.0, 1.0)
    assert recipe.config_for(2, LLAMA_STYLE.component_of("model.layers.2.self_attn.q_proj.weight")).lambda_ == 1.5
    assert LLAMA_STYLE.component_of("model.layers.2.mlp.up_proj.weight") == "mlp"
    assert LLAMA_STYLE.component_of("model.layers.2.input_layernorm.weight") == "all"
    raises_one_line("layer 4 is outside", recipe.config_for, 4, "all")
    raises_one_line("'ffn'", recipe.config_for, 1, "ffn")


def _groups(*spans):
    return tuple(LayerGroup(s, e, c, ties()) for s, e, c in spans)


@pytest.mark.parametrize("groups, match", [
    (_groups((0, 2, "all"), (3, 4, "all")), "no 'all' group covers layer 2;"),
    (_groups((0, 1, "all")), "no 'all' group covers layers 1-3;"),
    (_groups((0, 3, "all"), (2, 4, "all")), r"layer 2 is covered twice: by all layers \[0, 3\)"),
    (_groups((0, 4, "all"), (0, 2, "attn"), (1, 3, "attn")), r"layer 1 .* attn layers \[1, 3\)"),
    (_groups((0, 5, "all")), r"all layers \[0, 5\) runs past the model's last layer 3"),
])
def test_coverage_errors_name_the_layers(groups, match):
    raises_one_line(match, Recipe, "base", EXPERTS, 4, groups, ties())


def test_group_errors_name_the_value():
    raises_one_line("'everything' is not one of all, attn, mlp", LayerGroup, 0, 4, "everything", ties())
    raises_one_line(r"\[3, 3\) is empty", LayerGroup, 3, 3, "all", ties())
    raises_one_line("start must be an integer, got 0.5", LayerGroup, 0.5, 3, "all", ties())


def test_unknown_experts_are_named():
    stranger = MethodConfig("ties", {"sort": ExpertParams()})
    raises_one_line(r"expert 'sort' in the all layers \[2, 4\) config",
                    Recipe, "base", EXPERTS, 4,
                    _groups((0, 2, "all")) + (LayerGroup(2, 4, "all", stranger),), ties())
    raises_one_line("expert 'sort' in the outside config", Recipe.uniform, "base", EXPERTS, 4, stranger)
    raises_one_line("expert_refs names 'sort'", Recipe.uniform, "base", EXPERTS, 4, ties(),
                    expert_refs={"sort": "/zoo/sort"})


def test_summary():
    assert uniform().summary() == \
        "ties λ=1.00 · add w=0.50 d=0.70 · reverse w=0.30 d=0.50 · 1 layer group"
    assert layerwise().summary().startswith("ties λ≈1.12 · add w≈0.45")
    assert layerwise().summary().endswith("· 4 layer groups")


# --- mergekit export -----------------------------------------------------------------------------

def test_uniform_ties_to_mergekit():
    assert to_mergekit(uniform()) == {
        "merge_method": "ties",
        "base_model": "/zoo/base",
        "dtype": "float32",
        "models": [
            {"model": "/zoo/base"},
            {"model": "/zoo/add", "parameters": {"weight": 0.5, "density": 0.7}},
            {"model": "/zoo/reverse", "parameters": {"weight": 0.3, "density": 0.5}},
        ],
    }
    assert yaml.safe_load(to_mergekit_yaml(uniform())) == to_mergekit(uniform())


def test_layerwise_to_mergekit_uses_slices_and_filters():
    config = to_mergekit(layerwise())
    assert "models" not in config and "parameters" not in config
    first, second = config["slices"]
    assert [s["layer_range"] for s in first["sources"]] == [[0, 2]] * 3
    assert first["sources"][0] == {"model": "/zoo/base", "layer_range": [0, 2]}
    # first slice: blocks differ from the outside tensors (embeddings take this slice's values)
    assert first["sources"][1]["parameters"]["weight"] == [{"filter": "layers.", "value": 0.2},
                                                          {"value": 1.0}]
    assert first["parameters"] == {"lambda": 1.0}  # written everywhere once it varies anywhere
    assert second["sources"][1]["parameters"]["weight"] == [
        {"filter": "self_attn", "value": 0.9}, {"filter": "mlp", "value": 0.1},
        {"filter": "layers.", "value": 0.6}, {"value": 1.0}]
    assert second["parameters"] == {"lambda": [{"filter": "self_attn", "value": 1.5}, {"value": 1.0}]}


def test_to_mergekit_writes_required_keys_and_those_off_the_default():
    della = MethodConfig("della", {"add": ExpertParams(weight=0.5, density=0.7)})
    config = to_mergekit(Recipe.uniform("base", ["add"], 2, della))
    assert config["models"][1]["parameters"] == {"weight": 0.5, "density": 0.7}
    wide = MethodConfig("della", {"add": ExpertParams(weight=0.5, density=0.7, epsilon=0.1)}, normalize=False)
    config = to_mergekit(Recipe.uniform("base", ["add"], 2, wide))
    assert config["models"][1]["parameters"] == {"weight": 0.5, "density": 0.7, "epsilon": 0.1}
    assert config["parameters"] == {"normalize": False}
    slerp = MethodConfig("slerp", {"add": ExpertParams()})
    assert to_mergekit(Recipe.uniform("base", ["add"], 2, slerp))["parameters"] == {"t": 0.5}
    linear = MethodConfig("linear", {"add": ExpertParams(weight=0.4), "reverse": ExpertParams(weight=0.6)})
    config = to_mergekit(Recipe.uniform("base", EXPERTS, 2, linear))
    assert "base_model" not in config and [m["model"] for m in config["models"]] == list(EXPERTS)
    back = from_mergekit(config, num_layers=2, base="base")
    assert back == Recipe.uniform("base", EXPERTS, 2, linear)


def test_mixed_methods_cannot_go_to_mergekit():
    dare = MethodConfig("dare_ties", {"add": ExpertParams(), "reverse": ExpertParams()})
    recipe = replace(layerwise(), groups=layerwise().groups[:3] + (LayerGroup(2, 4, "mlp", dare),))
    message = raises_one_line("one merge_method", lambda: to_mergekit(recipe))
    assert r"dare_ties for mlp layers [2, 4)" in message and "ties for outside" in message


@pytest.mark.parametrize("recipe, match", [
    (Recipe.uniform("base", EXPERTS, 2, MethodConfig("magmax", {"add": ExpertParams()})),
     "'magmax' has no mergekit equivalent"),
    (Recipe("base", EXPERTS, 2, _groups((0, 2, "all")), MethodConfig("ties", {"add": ExpertParams()})),
     r"all layers \[0, 2\) merges \['add', 'reverse'\] and outside merges \['add'\]"),
])
def test_inexpressible_recipes_say_what(recipe, match):
    raises_one_line(match, lambda: to_mergekit(recipe))


# --- mergekit import -----------------------------------------------------------------------------

@pytest.mark.parametrize("make", [uniform, layerwise])
def test_mergekit_round_trip(make):
    recipe = make()
    assert from_mergekit(to_mergekit(recipe), num_layers=4) == recipe
    assert from_mergekit(to_mergekit_yaml(recipe), num_layers=4) == recipe


def test_per_layer_recipe_round_trips_through_mergekit():
    flags = {"normalize": False, "rescale": False}
    groups = tuple(LayerGroup(i, i + 1, "all", ties(0.1 * i, 1 - 0.1 * i, **flags)) for i in range(6))
    groups += tuple(LayerGroup(i, i + 1, "attn", ties(normalize=False, rescale=True)) for i in range(3))
    recipe = Recipe("b", EXPERTS, 6, groups, ties(**flags))
    config = to_mergekit(recipe)
    assert [s["sources"][0]["layer_range"] for s in config["slices"]] == [[i, i + 1] for i in range(6)]
    assert from_mergekit(config) == recipe


def test_simple_models_form_with_default_names():
    text = """
merge_method: dare_ties
base_model: HuggingFaceTB/SmolLM2-135M
models:
  - model: HuggingFaceTB/SmolLM2-135M
  - model: me/add-expert
    parameters: {weight: 0.6, density: 0.5}
  - model: /data/reverse/
    parameters: {weight: 0.4, density: 0.7}
parameters: {int8_mask: true, lambda: 0.9}
dtype: bfloat16
tokenizer_source: base
"""
    recipe = from_mergekit(text, num_layers=3)
    config = MethodConfig("dare_ties", {"add-expert": ExpertParams(weight=0.6, density=0.5),
                                        "reverse": ExpertParams(weight=0.4, density=0.7)}, lambda_=0.9)
    assert recipe == Recipe.uniform("HuggingFaceTB/SmolLM2-135M", ["add-expert", "reverse"], 3, config,
                                    dtype="bfloat16",
                                    expert_refs={"add-expert": "me/add-expert",
                                                 "reverse": "/data/reverse/"})
    renamed = from_mergekit(text, {"me/add-expert": "add"}, num_layers=3)
    raises_one_line("pass num_layers", from_mergekit, text)
    assert renamed.experts == ("add", "reverse") and renamed.expert_refs["add"] == "me/add-expert"


def test_gradients_interpolate_per_layer_like_mergekit():
    # 4 layers: t = i/3; weight [0, 1, 0.2] has 3 points, so position = t*2 = 0, 2/3, 4/3, 2
    config = {"merge_method": "task_arithmetic", "base_model": "b",
              "models": [{"model": "x/add", "parameters": {"weight": [0, 1, 0.2], "density": 0.5}}],
              "parameters": {"normalize": [True, False]}}
    recipe = from_mergekit(config, num_layers=4)
    expected = [0.0, 2 / 3 * 1.0, 2 / 3 * 1.0 + 1 / 3 * 0.2, 0.2]
    assert [(g.start, g.end) for g in recipe.groups] == [(i, i + 1) for i in range(4)]
    assert [recipe.config_for(i, "all").experts["add"].weight for i in range(4)] == \
        pytest.approx(expected)
    assert all("density" not in recipe.config_for(i, "attn").experts["add"] for i in range(4))  # TA takes none
    # booleans pick, not interpolate: int(t * 1) is 0 until t reaches 1
    assert [recipe.config_for(i, "all").normalize for i in range(4)] == [True, True, True, False]
    # the tensors outside the blocks are planned at t = 0
    assert recipe.outside.experts["add"].weight == 0.0 and recipe.outside.normalize is True


def sources(a: int, b: int, weight: list[float]) -> list[dict]:
    return [{"model": "b", "layer_range": [a, b]},
            {"model": "add", "layer_range": [a, b], "parameters": {"weight": weight}}]


def test_gradients_restart_in_each_slice_and_single_layer_slices_take_the_end():
    config = {"merge_method": "ties", "base_model": "b", "parameters": {"density": 0.5},
              "slices": [{"sources": sources(0, 3, [0.0, 1.0])},   # t = 0, 1/2, 1
                         {"sources": sources(3, 4, [0.0, 0.6])}]}  # one layer: t = 1
    recipe = from_mergekit(config)
    assert recipe.num_layers == 4
    assert [recipe.config_for(i, "mlp").experts["add"].weight for i in range(4)] == \
        pytest.approx([0.0, 0.5, 1.0, 0.6])
    assert recipe.config_for(2, "all").experts["add"].density == 0.5
    # embeddings take slice 0 at t=0 (0.0), the head the last slice at t=0 (0.2): not one config
    raises_one_line("model.embed_tokens.weight and model.norm.weight different", from_mergekit,
                    config | {"slices": config["slices"][:1] + [
                        {"sources": sources(3, 4, [0.2, 0.6])}]})


def test_slerp_filter_gradients_become_attn_and_mlp_groups():
    text = """
slices:
  - sources:
      - {model: org/base, layer_range: [0, 3]}
      - {model: org/chat, layer_range: [0, 3]}
merge_method: slerp
base_model: org/base
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - filter: mlp
      value: [1, 0.5, 0]
    - value: 0.3
"""
    recipe = from_mergekit(text)
    assert [recipe.config_for(i, "attn").t for i in range(3)] == [0.0, 0.5, 1.0]
    assert [recipe.config_for(i, "mlp").t for i in range(3)] == [1.0, 0.5, 0.0]
    assert [recipe.config_for(i, "norm").t for i in range(3)] == [0.3] * 3
    assert recipe.outside.t == 0.3
    # every layer's attn and mlp values differ from the rest of its block's, which is one group
    assert {(g.start, g.end, g.component) for g in recipe.groups} == {
        (i, i + 1, c) for i in range(3) for c in ("attn", "mlp")} | {(0, 3, "all")}
    assert from_mergekit(to_mergekit(recipe)) == recipe


@pytest.mark.parametrize("config, match", [
    ({"merge_method": "ties", "models": [{"model": "a"}]}, "no base_model"),
    ({"merge_method": "ties", "base_model": "b", "modules": {}}, "unknown key 'modules'"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "a", "parameters": {"wight": 1}}]},
     r"unknown key 'wight' in models\[0\].parameters"),
    ({"merge_method": "ties", "base_model": "b", "slices": [{"sources": [
        {"model": "b", "layer_range": [0, 2]}, {"model": "a", "layer_range": [2, 4]}]}]},
     r"layer_range \[2, 4\] would feed output layers \[0, 2\)"),
    ({"merge_method": "ties", "base_model": "b", "slices": [
        {"sources": [{"model": "b", "layer_range": [0, 1]}, {"model": "a", "layer_range": [0, 1]}]},
        {"sources": [{"model": "b", "layer_range": [1, 2]}, {"model": "c", "layer_range": [1, 2]}]}]},
     r"merges \['c'\] at layers \[1, 2\)"),
    ({"merge_method": "ties", "base_model": "b", "models": [{"model": "x/a"}, {"model": "y/a"}]},
     "would both be named 'a'"),
    ({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "a", "parameters": {"weight": [{"filter": "q_proj", "value": 2}, {"value": 1}]}}]},
     "self_attn.q_proj.weight and model.layers.0.self_attn.k_proj.weight different"),
    ({"merge_method": "linear", "base_model": "b", "models": [{"model": "a"}]}, "counts base_model 'b'"),
])
def test_inexpressible_mergekit_configs_say_why(config, match):
    raises_one_line(match, from_mergekit, config, None, 2)


def test_malformed_mergekit_yaml_names_the_line():
    raises_one_line("malformed mergekit config YAML at line 2", from_mergekit,
                    "merge_method: ties\nmodels: a: b\n", None, 2)


def test_mergekit_itself_accepts_exports_and_agrees_on_gradients():
    """Check against mergekit's own schema and gradient evaluation (imports torch: seconds)."""
    mergekit_config = pytest.importorskip("mergekit.config")
    for recipe in (uniform(), layerwise()):
        mergekit_config.MergeConfiguration.model_validate(yaml.safe_load(to_mergekit_yaml(recipe)))
    gradient = [0.1, 0.9, 0.3, 0.7]
    recipe = from_mergekit({"merge_method": "ties", "base_model": "b", "models": [
        {"model": "a", "parameters": {"weight": gradient}}]}, num_layers=5)
    theirs = [mergekit_config.evaluate_setting("w", gradient, i / 4, validate=float) for i in range(5)]
    assert [recipe.config_for(i, "all").experts["a"].weight for i in range(5)] == theirs


def test_mergekit_resolves_an_export_to_the_recipe_for_every_tensor():
    """Resolve each tensor's parameters with mergekit's own resolver, the way its planner does
    (layers from their slice, embeddings from the first slice and norm/head from the last, t=0)."""
    mergekit_config = pytest.importorskip("mergekit.config")
    from mergekit.common import ModelReference
    from mergekit.merge_methods import registry
    from mergekit.parameter_resolver import resolve_parameters

    recipe = replace(layerwise(), outside=ties(1.0, 1.0, lambda_=0.5))
    config = mergekit_config.MergeConfiguration.model_validate(to_mergekit(recipe))
    spec = registry.get(config.merge_method).spec
    base = ModelReference.parse(recipe.base)
    names = {ref: name for name, ref in recipe.expert_refs.items()}

    def check(piece, tensor: str, expected: MethodConfig) -> None:
        reader = mergekit_config.ConfigReader(config=config, t=0, slice_out=piece)
        shared, per_input = resolve_parameters(
            spec, tensor_name=tensor, inputs={s.model: tensor for s in piece.sources},
            sources=reader.parameter_sources, base_model=base, t=0)
        assert shared["lambda"] == expected.lambda_, tensor
        assert {names[str(m)]: (p["weight"], p["density"]) for m, p in per_input.items() if m != base} \
            == {n: (p.weight, p.density) for n, p in expected.experts.items()}, tensor

    for piece in config.slices:
        start, end = piece.sources[0].layer_range
        for layer in range(start, end):
            for suffix, component in [("self_attn.o_proj.weight", "attn"), ("mlp.up_proj.weight", "mlp"),
                                      ("input_layernorm.weight", "norm")]:
                check(piece, f"model.layers.{layer}.{suffix}", recipe.config_for(layer, component))
    check(config.slices[0], "model.embed_tokens.weight", recipe.outside)
    for tensor in ("model.norm.weight", "lm_head.weight"):
        check(config.slices[-1], tensor, recipe.outside)


@pytest.mark.reliability("safety", "a recipe YAML carrying a Python object tag: refused by safe loading, nothing constructed")
def test_yaml_with_python_tags_is_refused():
    text = "!!python/object/apply:os.system ['echo owned']\n"
    with pytest.raises(UserError, match="malformed recipe YAML"):
        Recipe.from_yaml(text)


def test_registry_matches_mergekit_parameters_and_defaults():
    """Every method that exports to mergekit declares mergekit's parameters with mergekit's
    defaults, so a recipe made in Python or by a search merges like the same recipe read from
    mergekit YAML. (DELLA's epsilon once defaulted to 0.0 in recipes and 0.15 in the merge.)"""
    mergekit = pytest.importorskip("mergekit.merge_methods.registry")
    from evomerge.merge.registry import METHODS

    scopes = {"shared": "global", "non_base": "expert", "input": "expert"}
    for name, spec in METHODS.items():
        if spec.mergekit is None:
            continue
        theirs = {p.name: p for p in mergekit.get(spec.mergekit).spec.parameters if p.name != "int8_mask"}
        # mergekit's task_arithmetic also lists density and rescale, which do nothing without sparsification
        assert {p.name for p in spec.params} <= set(theirs), name
        for param in spec.params:
            other = theirs[param.name]
            assert param.scope == scopes[other.scope.value], (name, param.name)
            required = not isinstance(other.default, (bool, int, float))
            assert param.mergekit_required == required, (name, param.name)
            if not required:
                assert param.default == other.default, (name, param.name)
    assert METHODS["della"].param("epsilon").default == 0.15


def test_della_recipe_from_python_and_from_mergekit_yaml_agree():
    """The bug the registry fixed: the same DELLA recipe, built in Python or read back from the
    mergekit YAML it exports, is one recipe (same hash, so the same seed and the same merge)."""
    della = MethodConfig("della", {"add": ExpertParams(weight=0.5, density=0.7)})
    recipe = Recipe.uniform("base", ["add"], 2, della, expert_refs={"add": "x/add"})
    back = from_mergekit(to_mergekit_yaml(recipe), num_layers=2)
    assert back.hash == recipe.hash and back.outside.experts["add"].epsilon == 0.15


def test_recipes_survive_pickling_as_ray_ships_them():
    """Workers receive recipes pickled (Ray uses cloudpickle): the copy is equal, hashes alike,
    and its parameters read as the original's."""
    import pickle

    from ray import cloudpickle  # the copy Ray ships its tasks with

    recipe = layerwise()
    for module in (pickle, cloudpickle):
        copy = module.loads(module.dumps(recipe))
        assert copy == recipe and copy.hash == recipe.hash
        assert copy.outside.experts["add"].density == recipe.outside.experts["add"].density
        assert copy.outside.lambda_ == recipe.outside.lambda_
