"""Decoder families other than Llama: tiny random pools (a base and two experts nudged from it) of
GPT-2 (Conv1D, fused QKV, tied head), GPT-NeoX (fused QKV, untied head), OPT (bare fc1/fc2 MLP,
positions offset), Qwen2 (biased QKV), Phi (fused-free, parallel block) and Gemma 3 (q/k norms,
sandwich post-norms as the residual writers, sliding-window layers, tied head), merged layer-wise
with different attention and MLP configs, exported, reloaded with plain transformers, and redone
by real mergekit where mergekit knows the architecture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.architecture import layout_of, transposed_weights
from evomerge.errors import UserError
from evomerge.merge.engine import Merger
from evomerge.merge.export import export
from evomerge.mergekit_config import to_mergekit
from evomerge.pool import ModelPool
from evomerge.recipe import ExpertParams, LayerGroup, MethodConfig, Recipe
from evomerge.zoo.pico import char_tokenizer

EXPERTS = ("a", "b")
LAYERS = 2


def _config(family: str, vocab: int):
    import transformers as tf

    common = {"vocab_size": vocab}
    return {
        "gpt2": lambda: tf.GPT2Config(n_embd=32, n_layer=LAYERS, n_head=2, n_positions=64, **common),
        "gpt_neox": lambda: tf.GPTNeoXConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                             intermediate_size=64, max_position_embeddings=64,
                                             layer_norm_eps=1e-12, **common),  # tiny activations: eps would dominate
        "opt": lambda: tf.OPTConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2, ffn_dim=64,
                                    word_embed_proj_dim=32, max_position_embeddings=64, **common),
        "qwen2": lambda: tf.Qwen2Config(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                        num_key_value_heads=1, intermediate_size=64, max_position_embeddings=64,
                                        tie_word_embeddings=True, **common),
        "phi": lambda: tf.PhiConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                    intermediate_size=64, max_position_embeddings=64, **common),
        "gemma3_text": lambda: tf.Gemma3TextConfig(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=2,
                                                   num_key_value_heads=1, head_dim=16, intermediate_size=64,
                                                   max_position_embeddings=64, sliding_window=4,
                                                   layer_types=["sliding_attention", "full_attention"], **common),
    }[family]()


# family: (architecture, attn tensors per block, mlp tensors per block, other block tensors, mergekit knows it)
FAMILIES = {
    "gpt2": ("GPT2LMHeadModel", 4, 4, 4, True),
    "gpt_neox": ("GPTNeoXForCausalLM", 4, 4, 4, False),
    "opt": ("OPTForCausalLM", 8, 4, 4, False),
    "qwen2": ("Qwen2ForCausalLM", 7, 3, 2, True),
    "phi": ("PhiForCausalLM", 8, 4, 2, True),
    "gemma3_text": ("Gemma3ForCausalLM", 6, 3, 4, True),
}


@pytest.fixture(scope="module")
def pools(tmp_path_factory) -> dict[str, Path]:
    """Per family a folder with base/, a/, b/: experts are the base plus 1e-2 Gaussian noise."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("families")
    tokenizer = char_tokenizer()
    for index, family in enumerate(FAMILIES):
        torch.manual_seed(index)
        model = AutoModelForCausalLM.from_config(_config(family, len(tokenizer)))
        for name in ("base", *EXPERTS):
            if name != "base":
                with torch.no_grad():
                    for param in model.parameters():
                        param.add_(torch.randn_like(param) * 1e-2)
            model.save_pretrained(root / family / name)
            tokenizer.save_pretrained(root / family / name)
            if name != "base":  # the next expert starts from the base again
                model = AutoModelForCausalLM.from_pretrained(root / family / "base")
    return root


def _merger(pools: Path, family: str) -> Merger:
    folder = pools / family
    return Merger(ModelPool(str(folder / "base"), {e: str(folder / e) for e in EXPERTS}))


def layerwise(merger: Merger, family: str) -> Recipe:
    """Task arithmetic with other weights for attention, MLP, the rest of each block and outside."""
    def ta(a: float, b: float) -> MethodConfig:
        return MethodConfig("task_arithmetic", {"a": ExpertParams(weight=a), "b": ExpertParams(weight=b)})

    groups = (LayerGroup(0, LAYERS, "all", ta(0.5, 0.5)), LayerGroup(0, LAYERS, "attn", ta(1.0, 0.0)),
              LayerGroup(0, 1, "mlp", ta(0.0, 1.0)), LayerGroup(1, LAYERS, "mlp", ta(0.25, 0.75)))
    folder = merger.pool.base_ref.rsplit("/", 1)[0]
    return Recipe(merger.pool.base_ref, EXPERTS, LAYERS, groups, ta(0.3, 0.3),
                  expert_refs={e: f"{folder}/{e}" for e in EXPERTS})


def expected_weights(family: str, layer: int | None) -> dict[str, tuple[float, float]]:
    if layer is None:
        return {"all": (0.3, 0.3)}
    return {"all": (0.5, 0.5), "attn": (1.0, 0.0), "mlp": (0.0, 1.0) if layer == 0 else (0.25, 0.75)}


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_merges_exports_and_reloads(pools, family, tmp_path):
    from transformers import AutoModelForCausalLM

    architecture, attn, mlp, rest, known = FAMILIES[family]
    merger = _merger(pools, family)
    layout = merger.layout
    assert (layout.architecture, layout.num_layers, merger.num_layers) == (architecture, LAYERS, LAYERS)
    kinds = [merger._where[name] for name in merger._base]
    for layer in range(LAYERS):
        assert [c for l, c in kinds if l == layer].count("attn") == attn
        assert [c for l, c in kinds if l == layer].count("mlp") == mlp
        assert [c for l, c in kinds if l == layer].count("all") == rest
    # the blocks found from the files are those found from the loaded model
    from transformers import AutoConfig

    from evomerge.architecture import layout_of_files
    from evomerge.pool import inspect_model

    base_dir = pools / family / "base"
    assert layout_of_files(AutoConfig.from_pretrained(base_dir), inspect_model(str(base_dir)).shapes) == layout

    recipe = layerwise(merger, family)
    model = merger.materialize(recipe)
    experts = {e: dict(AutoModelForCausalLM.from_pretrained(pools / family / e).named_parameters()) for e in EXPERTS}
    merged = dict(model.named_parameters())
    for name, base in merger.pool.base.items():
        layer, kind = layout.where(name)
        wa, wb = expected_weights(family, layer).get(kind, expected_weights(family, layer)["all"])
        want = base + wa * (experts["a"][name] - base) + wb * (experts["b"][name] - base)
        torch.testing.assert_close(merged[name].detach(), want.detach(), rtol=0, atol=1e-6, msg=name)

    out = export(recipe, merger, tmp_path / "merge")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[5, 17, 40, 3, 22, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)
    assert (out / "mergekit.yaml").exists() == known
    if not known:
        card = (out / "model" / "README.md").read_text()
        assert f"No mergekit config: mergekit has no architecture definition for {architecture}" in card or \
            f"No mergekit config: mergekit's definition of {architecture} requires" in card
        return
    pytest.importorskip("mergekit")
    from test_export import run_mergekit

    theirs = run_mergekit(out / "mergekit.yaml", tmp_path / "mergekit")
    ours = model.state_dict()
    assert set(theirs) <= set(ours) and len(theirs) >= len(merger.pool.base)
    for name, tensor in theirs.items():
        torch.testing.assert_close(tensor, ours[name], rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_family_goes_through_the_searchs_own_pieces(pools, pico_zoo, family, tmp_path):
    """What `evomerge search` does with a pool, in process (the CLI run below does it through Ray
    for GPT-2): the settings read the block count from the model, the genome gives each block's
    attention its own genes, a worker merges and scores decoded genomes, and the scored merge exports and reloads
    to the logits the worker scored."""
    import random

    from transformers import AutoModelForCausalLM

    from evomerge.config import compose
    from evomerge.search.settings import read_settings
    from evomerge.search.workers import EvalRequest, MergeWorker
    from evomerge.search.space import search_space

    folder = pools / family
    settings = read_settings(compose([
        f"models.base={folder / 'base'}", f"models.experts=[{folder / 'a'},{folder / 'b'}]", "tasks=[zoo_add]",
        f"include_path={pico_zoo.task_dir}", "fitness=random", "fitness.items_per_task=3",
        "fitness.objectives=[mean]", "space.granularity=1", "space.knots=0", "space.split_components=true",
        "space.methods=[task_arithmetic,ties]", "runtime.workers=1"]))
    assert settings.num_layers == LAYERS
    space = search_space(settings.space, settings.base, tuple(settings.experts), settings.num_layers,
                         expert_refs=settings.experts)
    worker = MergeWorker(settings.worker_spec(), "w0")
    rng = random.Random(0)
    recipes = [space.decode(space.random(rng)) for _ in range(2)]
    for recipe in recipes:
        # per block one group for its attention tensors, one for the rest (MLP and norms)
        assert sorted((g.start, g.component) for g in recipe.groups) == \
            sorted((layer, c) for layer in range(LAYERS) for c in ("all", "attn"))
        result = worker.evaluate(EvalRequest(recipe))
        assert result.error is None and result.evaluation is not None
        scores = result.evaluation.scores
        assert scores and all(0.0 <= v <= 1.0 for v in scores.values()), scores
    model = worker.merger.materialize(recipes[-1])
    out = export(recipes[-1], worker.merger, tmp_path / "merge")
    reloaded = AutoModelForCausalLM.from_pretrained(out / "model").eval()
    ids = torch.tensor([[5, 17, 40, 3, 22, 9]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_gpt2_conv1d_rows_are_output_rows(pools):
    """DELLA ranks within rows: a Conv1D weight is stored (in, out), so the merge must rank the
    transposed tensor, i.e. give what a Linear's (out, in) weight of the same values gives."""
    from evomerge.merge import methods
    from evomerge.merge.engine import tensor_seed

    merger = _merger(pools, "gpt2")
    name = "transformer.h.0.mlp.c_fc.weight"
    assert name in transposed_weights(merger.model) and merger.model.get_parameter(name).shape == (32, 128)
    config = MethodConfig("della", {e: ExpertParams(weight=1.0, density=0.5, epsilon=0.2) for e in EXPERTS},
                          lambda_=1.0)
    recipe = Recipe.uniform(merger.pool.base_ref, EXPERTS, LAYERS, config)
    merged = merger.materialize(recipe).get_parameter(name).detach().clone()
    base = merger._base[name]
    deltas = merger._stacks[name].view(2, *base.shape)
    generator = torch.Generator().manual_seed(tensor_seed(recipe.seed, name))
    params = merger._plans(recipe)[config].params.in_context(layer_fraction=0.0, in_block=True)
    rowwise = methods.merge_tensor("della", base.T.contiguous(), deltas.transpose(1, 2).contiguous(), params,
                                   generator)
    torch.testing.assert_close(merged, rowwise.T, rtol=0, atol=0)
    generator = torch.Generator().manual_seed(tensor_seed(recipe.seed, name))
    stored = methods.merge_tensor("della", base, deltas, params, generator)
    assert (merged - stored).abs().max() > 1e-4  # the orientation matters: rows of (in, out) differ
    # mergekit would rank the stored rows: no mergekit.yaml, and the model card says why
    out = export(recipe, merger, pools.parent / "della-gpt2", force=True)
    assert not (out / "mergekit.yaml").exists()
    assert "della works row by row and GPT2LMHeadModel stores weights transposed" in (out / "model" / "README.md").read_text()


def test_post_norm_opt_refuses_the_dataflow_fold(pools, tmp_path):
    from transformers import AutoModelForCausalLM

    from evomerge.layer_path import LayerPath, Slice

    model = AutoModelForCausalLM.from_pretrained(pools / "opt" / "base")
    model.config.do_layer_norm_before = False
    layout = layout_of(model)
    assert layout.blocks == "model.decoder.layers" and layout.in_block_mark == "layers."
    with pytest.raises(UserError, match=r"opt with do_layer_norm_before=false normalizes after the residual add.*"
                                        r"space.kind=params") as info:
        to_mergekit(LayerPath("base", EXPERTS, LAYERS, (Slice("a", 0, 2, 0.5),), "a"), layout)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("family", ["gpt_neox", "gemma3_text"])
def test_a_non_llama_path_folds_its_scales(pools, family):
    """GPT-NeoX's parallel pre-norm block and Gemma 3's post-norms computing x * (1 + w): the
    folded path computes what the hooked one does; mergekit's scale (w * s) folds the first and is
    refused for the second."""
    from evomerge.layer_path import LayerPath, Slice
    from evomerge.merge.path_model import PathSources, folded, path_model

    merger = _merger(pools, family)
    path = LayerPath(merger.pool.base_ref, EXPERTS, LAYERS, (Slice("a", 0, 2, 1.5), Slice("b", 1, 2, 0.5), Slice("a", 1, 2)),
                     "a")
    sources = PathSources(merger)
    ids = torch.tensor([[5, 17, 40, 3]])
    with torch.no_grad():
        hooked, flat = path_model(path, sources)(ids).logits, folded(path, sources)(ids).logits
    torch.testing.assert_close(flat, hooked, rtol=0, atol=1e-4)
    unscaled = LayerPath(merger.pool.base_ref, EXPERTS, LAYERS, (Slice("a", 0, 2), Slice("b", 1, 2), Slice("a", 1, 2)),
                         "a")
    with torch.no_grad():  # the fold is what makes them agree: without it the scales change the logits
        assert (path_model(unscaled, sources)(ids).logits - hooked).abs().max() > 1e-3
    if family == "gemma3_text":
        with pytest.raises(UserError, match=r"gemma3_text's residual writes are norms computing x \* \(1 \+ weight\)"):
            to_mergekit(path, merger.layout)
        assert to_mergekit(unscaled, merger.layout)["merge_method"] == "passthrough"  # nothing to fold: exported
        return
    scale = to_mergekit(path, merger.layout)["slices"][1]["sources"][0]["parameters"]["scale"]
    assert [(c.get("filter"), c["value"]) for c in scale] == [
        ("attention.dense", pytest.approx(1 / 0.75)), ("dense_4h_to_h", pytest.approx(1 / 0.75)), (None, 1.0)]


def test_cli_search_inspect_export_on_gpt2(pools, pico_zoo, tmp_path, evomerge_main):
    """One CLI run for two features: a non-Llama family, and a pool mixing a full expert with
    a LoRA adapter (GPT-2's Conv1D: peft's fan_in_fan_out) that mergekit re-merges as base+adapter."""
    from test_export import run_mergekit
    from test_lora import _adapter

    runs = tmp_path / "runs"
    folder = pools / "gpt2"
    adapter = _adapter(str(folder / "base"), tmp_path / "lora", 5, target_modules=["c_attn", "c_proj", "c_fc"],
                       fan_in_fan_out=True)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                              env=env, timeout=300)

    # a subprocess: its Ray workers are processes too
    done = cli("search", f"runs_dir={runs}", "name=gpt2", f"models.base={folder / 'base'}", "refine=none",
               f"models.experts=[{folder / 'a'},{adapter}]", "tasks=[zoo_add]",
               f"include_path={pico_zoo.task_dir}", "algorithm=ga", "fitness=random",
               "fitness.objectives=[mean]", "fitness.items_per_task=4", "fitness.probe_merges=0",
               "space.granularity=1", "space.knots=0", "space.split_components=true", "space.parents=false",
               "fitness.multi_fidelity=0", "fitness.verify=0",
               "space.methods=[task_arithmetic]", "algorithm.pop_size=2", "algorithm.generations=1",
               "runtime.workers=1")
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(evomerge_main("inspect", runs / "gpt2", "--json").stdout)
    assert summary["progress"]["evaluations"] == 2 and summary["front"]
    best = summary["front"][0]
    done = evomerge_main("export", runs / "gpt2", "--pick", best["id"], "--out", tmp_path / "merge")
    assert done.returncode == 0, done.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merge" / "model")
    assert type(model).__name__ == "GPT2LMHeadModel" and model.config.n_layer == LAYERS
    # the exported weights are what the archived recipe merges to here
    recipe = Recipe.from_yaml((tmp_path / "merge" / "recipe.yaml").read_text())
    want = Merger(ModelPool(str(folder / "base"), recipe.expert_refs)).materialize(recipe).state_dict()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(tensor, want[name], rtol=0, atol=0, msg=name)
    config = yaml.safe_load((tmp_path / "merge" / "mergekit.yaml").read_text())
    assert f"{folder / 'base'}+{adapter}" in [m["model"] for m in config["models"]]
    theirs = run_mergekit(tmp_path / "merge" / "mergekit.yaml", tmp_path / "mergekit",
                          lora_merge_cache=str(tmp_path / "lora-cache"))
    assert len(theirs) >= len(want) - 1  # GPT-2's tied head is stored once
    for name, tensor in theirs.items():
        torch.testing.assert_close(tensor.float(), want[name], rtol=0, atol=1e-5, msg=name)
