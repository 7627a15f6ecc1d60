"""LoRA adapters as experts: factors equal to peft's own merge, merges equal to the same experts
merged densely, memory counted as factors, bad adapters refused in one line. A mixed pool
searched, exported and re-merged by mergekit from the CLI: tests/test_architectures.py (GPT-2)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from evomerge.errors import UserError
from evomerge.merge.engine import Merger
from evomerge.merge.factored import LowRank
from evomerge.pool import ModelPool, check_expert, inspect_model, load_model
from evomerge.recipe import ExpertParams, MethodConfig, Recipe

LINEAR_PER_BLOCK = 7  # q, k, v, o, gate, up, down: what "all-linear" adapts in a Llama block


def _adapter(base: str, out: Path, seed: int, **lora) -> Path:
    """A peft LoRA adapter of ``base`` with random B factors (peft starts B at zero), saved with
    its dense twin ``out-full`` (peft's merge_and_unload), the reference it must equal."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model, tokenizer = load_model(base)
    wrapped = get_peft_model(model, LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                                  "lora_dropout": 0.0, **lora}))
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    wrapped.save_pretrained(out)
    full = wrapped.merge_and_unload()
    full.save_pretrained(out.with_name(out.name + "-full"))
    tokenizer.save_pretrained(out.with_name(out.name + "-full"))
    return out


@pytest.fixture(scope="module")
def adapters(pico_zoo, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    base = str(pico_zoo.base)
    return {"plain": _adapter(base, folder / "plain", 1),
            "patterned": _adapter(base, folder / "patterned", 2, use_rslora=True, rank_pattern={"q_proj": 2},
                                  alpha_pattern={"down_proj": 3}),
            "dora": _adapter(base, folder / "dora", 3, use_dora=True)}


@pytest.fixture(scope="module")
def pools(pico_zoo, adapters):
    """The same three experts twice: as adapters plus the pico zoo's full 'add' expert, and all dense."""
    base = str(pico_zoo.base)
    factored = ModelPool(base, {**{k: str(v) for k, v in adapters.items()}, "add": str(pico_zoo.expert("add"))})
    dense = ModelPool(base, {**{k: str(v.with_name(v.name + "-full")) for k, v in adapters.items()},
                             "add": str(pico_zoo.expert("add"))})
    return factored, dense


def test_adapters_are_held_as_factors_equal_to_peft_merge(pools):
    factored, dense = pools
    blocks = 4
    for expert in ("plain", "patterned"):
        entries = factored.task_vectors[expert]
        assert sum(isinstance(d, LowRank) for d in entries.values()) == LINEAR_PER_BLOCK * blocks == len(entries)
        for name in factored.base:
            torch.testing.assert_close(factored.delta(expert, name), dense.delta(expert, name), atol=1e-7, rtol=0)
    ranks = {name.split(".")[-2]: d.rank for name, d in factored.task_vectors["patterned"].items()}
    assert ranks["q_proj"] == 2 and ranks["k_proj"] == 4  # peft's rank_pattern, read by peft
    # DoRA is not base + B·A: taken densely from peft's merge, and still exact
    assert all(isinstance(d, torch.Tensor) for d in factored.task_vectors["dora"].values())
    for name in factored.base:
        torch.testing.assert_close(factored.delta("dora", name), dense.delta("dora", name), atol=1e-7, rtol=0)


def test_conv1d_adapters_are_factors_in_the_weights_layout(pico_zoo, tmp_path):
    """GPT-2 stores projections as Conv1D (in, out); peft marks them fan_in_fan_out."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = load_model(str(pico_zoo.base))[1]
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    model.save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    adapter = _adapter(str(tmp_path / "gpt2"), tmp_path / "lora", 4, target_modules=["c_attn", "c_fc"],
                       fan_in_fan_out=True)
    pool = ModelPool(str(tmp_path / "gpt2"), {"lora": str(adapter), "full": str(tmp_path / "lora-full")})
    factors = pool.task_vectors["lora"]
    assert sorted(factors) == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "mlp.c_fc"))
    for name, factor in factors.items():
        assert factor.shape == tuple(pool.base[name].shape)  # (in, out), as the weight is stored
        torch.testing.assert_close(factor.dense(), pool.delta("full", name), atol=1e-7, rtol=0)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {}), ("linear", {}), ("ties", {"density": 0.5}), ("dare_ties", {"density": 0.6}),
    ("tsv_m", {})])
def test_a_mixed_pool_merges_as_its_dense_twin(pools, method, params):
    """Linear methods apply the factors as one rank-r product; the others make each tensor's
    stack dense. Both must give the dense pool's weights (DARE's draws too: same seed). TSV-M
    too, though an adapter's delta has rank 4 of 64: its null-space directions, arbitrary and
    different in the two pools, are left out of the orthonormalization (they were not: 71% apart)."""
    factored, dense = pools
    weights = dict(zip(factored.expert_names, (0.7, 0.4, 0.5, 0.3)))
    config = MethodConfig(method, {e: ExpertParams(weight=w, **params) for e, w in weights.items()})
    merged = []
    for pool in (factored, dense):
        merger = Merger(pool)
        recipe = Recipe.uniform("base", pool.expert_names, merger.num_layers, config)
        merged.append({k: v.clone() for k, v in merger.materialize(recipe).state_dict().items()})
    for name in merged[0]:
        torch.testing.assert_close(merged[0][name], merged[1][name], atol=2e-6, rtol=0)


def test_the_memory_plan_counts_factors_not_dense_deltas(pico_zoo, adapters):
    base = str(pico_zoo.base)
    pool = ModelPool(base, {"plain": str(adapters["plain"]), "add": str(pico_zoo.expert("add"))})
    factor_numel = sum(d.left.numel() + d.right.numel() for d in pool.task_vectors["plain"].values())
    model_numel = sum(t.numel() for t in pool.base.values())
    for delta_dtype, dense_bytes, factor_bytes in ((None, 4, 4), ("bfloat16", 2, 2), ("int8", None, 4)):
        merger = Merger(ModelPool(base, {"plain": str(adapters["plain"]), "add": str(pico_zoo.expert("add"))}),
                        delta_dtype=delta_dtype)
        if dense_bytes is None:  # int8: codes plus one fp32 scale per group of 128, per tensor
            from evomerge.merge.quantized import quantized_bytes

            dense = sum(quantized_bytes(t.numel(), 8) for t in pool.base.values())
        else:
            dense = model_numel * dense_bytes
        assert merger.plan.deltas == dense + factor_numel * factor_bytes
    assert factor_numel * 4 < model_numel * 4 / 5  # what keeping factors saves on the pico model


def test_bad_adapters_are_one_line_errors(pico_zoo, adapters, tmp_path):
    from peft import IA3Config, get_peft_model

    base = str(pico_zoo.base)
    info = inspect_model(base)
    model, _ = load_model(base)
    get_peft_model(model, IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                    feedforward_modules=["down_proj"])).save_pretrained(tmp_path / "ia3")
    renamed = tmp_path / "renamed"
    shutil.copytree(adapters["plain"], renamed)
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "org/other-model"}))
    cases = {tmp_path / "ia3": "is a IA3 adapter; adapters must be LoRA",
             renamed: "was trained on 'org/other-model'"}
    for folder, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            check_expert(info, str(folder))
        assert "\n" not in str(caught.value)
    # an adapter made for a wider model: its factors do not fit the base's projections
    wide = tmp_path / "wide"
    from transformers import LlamaConfig, LlamaForCausalLM

    big = LlamaForCausalLM(LlamaConfig(**{**model.config.to_dict(), "hidden_size": 96, "num_attention_heads": 3,
                                          "num_key_value_heads": 3, "head_dim": 32}))
    from peft import LoraConfig, get_peft_model as wrap

    wrap(big, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(wide)
    config = json.loads((wide / "adapter_config.json").read_text())
    (wide / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": base}))
    with pytest.raises(UserError, match=r"factors of 'model.layers.0.self_attn.q_proj' \(lora_A \[2, 96\], "
                                        r"lora_B \[96, 2\]\) do not fit 'model.layers.0.self_attn.q_proj.weight'"):
        check_expert(info, str(wide))


def test_factor_shapes_are_read_once_for_the_check_and_the_plan():
    """lora_factors is the one reading of an adapter file's shapes: modules named as in the base,
    rank and (in, out) from A and B whatever the layout, and a factor without its partner refused."""
    from evomerge.adapters import lora_factors
    from evomerge.plan import _adapter

    shapes = {"base_model.model.h.0.attn.c_attn.lora_A.weight": (4, 64),
              "base_model.model.h.0.attn.c_attn.lora_B.weight": (192, 4),
              "base_model.model.h.0.mlp.c_fc.lora_A.weight": (2, 64),
              "base_model.model.h.0.mlp.c_fc.lora_B.weight": (256, 2)}
    factors = lora_factors("a", shapes)
    assert {m: (f.rank, f.in_features, f.out_features) for m, f in factors.items()} == {
        "h.0.attn.c_attn": (4, 64, 192), "h.0.mlp.c_fc": (2, 64, 256)}
    planned = _adapter("a", shapes)
    assert dict(planned.modules) == {"h.0.attn.c_attn": (192, 64), "h.0.mlp.c_fc": (256, 64)}
    assert dict(planned.rank) == {"h.0.attn.c_attn": 4, "h.0.mlp.c_fc": 2}
    for broken, found in (({k: v for k, v in shapes.items() if "c_fc.lora_B" not in k}, "none"),
                          ({**shapes, "base_model.model.h.0.mlp.c_fc.lora_B.weight": (256, 3)}, r"\[256, 3\]")):
        with pytest.raises(UserError, match=rf"factor 'base_model.model.h.0.mlp.c_fc.lora_A.weight' \[2, 64\] has no "
                                            rf"2-D lora_B partner of its rank \(found {found}\)"):
            lora_factors("a", broken)
    with pytest.raises(UserError, match="has no lora_A/lora_B tensors"):
        lora_factors("a", {"h.0.weight": (4, 4)})


def test_a_mixed_pool_quantized_as_it_loads_merges_as_one_quantized_after(pico_zoo, adapters):
    """Factors stay factors, DoRA's dense deltas and the full expert are stored as int8 rows as
    they load; the merger stacks them as they are, to the codes it would have made itself."""
    from evomerge.merge.quantized import QuantizedStack

    base = str(pico_zoo.base)
    refs = {**{k: str(v) for k, v in adapters.items()}, "add": str(pico_zoo.expert("add"))}
    early = ModelPool(base, refs, delta_dtype="int8")
    assert all(isinstance(d, LowRank) for d in early.task_vectors["plain"].values())
    assert all(isinstance(d, QuantizedStack) for d in early.task_vectors["dora"].values())
    stored, late = Merger(early, delta_dtype="int8"), Merger(ModelPool(base, refs), delta_dtype="int8")
    weights = dict(zip(stored.experts, (0.7, 0.4, 0.5, 0.3)))
    for method in ("task_arithmetic", "ties"):
        config = MethodConfig(method, {n: ExpertParams(weight=w, density=0.5) for n, w in weights.items()})
        recipe = Recipe.uniform(base, stored.experts, stored.num_layers, config)
        ours = {k: v.clone() for k, v in stored.materialize(recipe).state_dict().items()}
        theirs = late.materialize(recipe).state_dict()
        for name, tensor in ours.items():
            assert torch.equal(tensor, theirs[name]), (method, name)
