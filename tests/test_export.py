"""Export: the model folder reloads to the same logits, the recipe round-trips, and real mergekit
(0.1.5) run on the exported mergekit.yaml produces the Merger's tensors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from evomerge.errors import UserError
from evomerge.merge.engine import Merger
from evomerge.merge.export import export
from evomerge.model_files import unique_parameters
from evomerge.pool import ModelPool
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe

torch.set_num_threads(1)

NAMES = ("add", "reverse", "sort")
DETERMINISTIC = ("linear", "task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "slerp",
                 "model_stock")


@pytest.fixture(scope="module")
def merger(pico_zoo):
    pool = ModelPool(str(pico_zoo.base), {k: str(v) for k, v in pico_zoo.experts.items()})
    return Merger(pool, quantile_resolution=10**6)  # exact thresholds, as mergekit's top-k


def recipe_for(pico_zoo, cfg: MethodConfig, groups=None) -> Recipe:
    refs = {name: str(path) for name, path in pico_zoo.experts.items()}
    groups = groups or (LayerGroup(0, 4, "all", cfg),)
    return Recipe(str(pico_zoo.base), tuple(pico_zoo.experts), 4, tuple(groups), cfg, "float32", refs)


def method_config(method: str) -> MethodConfig:
    if method == "slerp":
        return MethodConfig("slerp", {"add": ExpertParams()}, t=0.3)
    if method == "model_stock":
        return MethodConfig("model_stock", {n: ExpertParams() for n in NAMES})
    experts = {n: ExpertParams(weight=w, density=d, gamma=g) for n, w, d, g in zip(NAMES, (0.5, 0.3, 0.8), (0.6, 0.5, 0.7),
                                                               (0.05, 0.1, 0.02))}
    return MethodConfig(method, experts, lambda_=1.0 if method == "linear" else 0.9)


def test_exported_folder_reloads_with_the_same_logits(pico_zoo, merger, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe = recipe_for(pico_zoo, method_config("ties"))
    out = export(recipe, merger, tmp_path / "pick", scores={"add": 0.75, "reverse": 0.5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pick"]  # no staging folder left
    assert {"recipe.yaml", "mergekit.yaml", "model"} <= {p.name for p in out.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
    tokens = AutoTokenizer.from_pretrained(out / "model")("12+30=42", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = merger.model(tokens).logits
        torch.testing.assert_close(loaded(tokens).logits, expected, atol=1e-5, rtol=0)
    card = (out / "model" / "README.md").read_text()
    assert recipe.summary() in card and "| add | 0.7500 |" in card and recipe.to_yaml() in card
    assert (out / "model" / "generation_config.json").exists()


def test_recipe_yaml_round_trips_with_optional_globals(pico_zoo, merger, tmp_path):
    lines = MethodConfig("lines", {"add": ExpertParams(weight=0.6), "sort": ExpertParams(weight=0.4)}, alpha=0.3, beta=0.6)
    stock = MethodConfig("model_stock", {"add": ExpertParams(), "sort": ExpertParams()}, filter_wise=True)
    recipe = recipe_for(pico_zoo, lines, (LayerGroup(0, 4, "all", lines), LayerGroup(0, 2, "mlp", stock)))
    out = export(recipe, merger, tmp_path / "pick")
    back = Recipe.from_yaml((out / "recipe.yaml").read_text())
    assert back == recipe and back.hash == recipe.hash
    assert back.config_for(0, "mlp").filter_wise is True and back.outside.alpha == 0.3
    # a method's parameters enter the YAML (and so the hash); LiNeS' alpha only when set (unset: 1/K)
    assert "alpha" not in MethodConfig("ties", {"add": ExpertParams()}).to_dict()
    assert "alpha" not in lines.replace(alpha=None).to_dict()
    assert recipe_for(pico_zoo, lines.replace(alpha=None)).hash != recipe_for(pico_zoo, lines).hash
    # two methods cannot be one mergekit config: no mergekit.yaml, and the card says why
    assert not (out / "mergekit.yaml").exists()
    assert "No mergekit config: mergekit applies one merge_method" in (out / "model" / "README.md").read_text()


@pytest.mark.parametrize("method", ["tsv_m", "cabs"])
def test_methods_without_mergekit_export_a_model_and_say_why_there_is_no_config(pico_zoo, merger, tmp_path, method):
    from transformers import AutoModelForCausalLM

    recipe = recipe_for(pico_zoo, method_config(method))
    out = export(recipe, merger, tmp_path / "pick")
    assert not (out / "mergekit.yaml").exists()
    card = (out / "model" / "README.md").read_text()
    assert f"merge method '{method}' has no mergekit equivalent" in card
    assert Recipe.from_yaml((out / "recipe.yaml").read_text()) == recipe
    loaded = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
    expected = unique_parameters(merger.materialize(recipe))
    for name, tensor in unique_parameters(loaded).items():
        torch.testing.assert_close(tensor, expected[name], atol=0, rtol=0, msg=name)


def test_export_replaces_a_previous_export(pico_zoo, merger, tmp_path):
    first = recipe_for(pico_zoo, method_config("linear"))
    second = recipe_for(pico_zoo, method_config("task_arithmetic"))
    export(first, merger, tmp_path / "pick")
    with pytest.raises(UserError, match=r"already exists; replace it with --force") as info:
        export(second, merger, tmp_path / "pick")
    assert "\n" not in str(info.value)
    assert Recipe.from_yaml((tmp_path / "pick" / "recipe.yaml").read_text()) == first  # untouched
    out = export(second, merger, tmp_path / "pick", force=True)
    assert Recipe.from_yaml((out / "recipe.yaml").read_text()) == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pick"]


def run_mergekit(config_path: Path, out: Path, **options) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions
    from safetensors.torch import load_file

    config = MergeConfiguration.model_validate(yaml.safe_load(config_path.read_text()))
    run_merge(config, str(out), MergeOptions(quiet=True, copy_tokenizer=False, **options))
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def layerwise_ties(pico_zoo) -> Recipe:
    """Other weights in the upper blocks' attention and the lower blocks' MLPs: mergekit slices."""
    base = method_config("ties")
    other = MethodConfig("ties", {n: ExpertParams(weight=w, density=0.4) for n, w in zip(NAMES, (0.9, 0.2, 0.4))},
                         lambda_=0.9)
    groups = (LayerGroup(0, 4, "all", base), LayerGroup(2, 4, "attn", other), LayerGroup(0, 2, "mlp", other))
    return recipe_for(pico_zoo, base, groups)


@pytest.mark.parametrize("method", DETERMINISTIC + ("ties_layerwise",))
def test_mergekit_merges_the_exported_config_to_the_same_tensors(pico_zoo, merger, tmp_path, method):
    pytest.importorskip("mergekit")
    recipe = layerwise_ties(pico_zoo) if method == "ties_layerwise" else recipe_for(pico_zoo, method_config(method))
    out = export(recipe, merger, tmp_path / "pick")
    theirs = run_mergekit(out / "mergekit.yaml", tmp_path / "mergekit")
    ours = unique_parameters(merger.model)
    assert set(theirs) - {"lm_head.weight"} == set(ours)
    for name, value in ours.items():
        torch.testing.assert_close(theirs[name], value, atol=1e-6, rtol=0, msg=name)
