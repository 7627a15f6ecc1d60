"""The memory plan from metadata alone: header-only fixtures of hub shapes plan to the byte counts
an independent count gives; a plan that does not fit picks the first smaller delta format that
does, or refuses in one line naming what to change."""

from __future__ import annotations

import pytest
import torch

from evomerge.cli import main
from evomerge.config import compose
from evomerge.errors import UserError
from evomerge.merge.memory import Adapter, Architecture, lora_factor_bytes, parse_size
from evomerge.plan import EvaluationPath, TaskShape, evaluation_paths, plan_search, planned_config
from evomerge.model_files import safetensors_shapes
from hub_fixtures import GEMMA3_270M, LLAMA_7B, LLAMA_70B, linear_shapes, write_header, write_lora, write_model

TINY = {"architectures": ["LlamaForCausalLM"], "hidden_size": 8, "num_hidden_layers": 2, "intermediate_size": 12,
        "vocab_size": 10, "num_attention_heads": 2, "num_key_value_heads": 1, "tie_word_embeddings": True}
LLAMA_7B_PARAMS = 6_738_415_616  # Llama-2-7B's parameter count, as its model card gives 6.74e9


def overrides(base, experts, *more, refine="none"):
    """The plan of a search over ``base`` and ``experts``; without the default refinement
    (refine.at=auto plans gradients where they fit) unless ``refine`` says otherwise."""
    return [f"models.base={base}", f"models.experts=[{','.join(map(str, experts))}]", f"refine={refine}", *more]


def test_a_tiny_plan_counts_each_parameter_once_and_lora_factors(tmp_path):
    base = write_model(tmp_path / "base", TINY)
    full = write_model(tmp_path / "full", TINY)
    lora = write_lora(tmp_path / "lora", TINY, rank=2, targets=("q_proj", "down_proj"))
    plan = plan_search(compose(overrides(base, [full, lora])), device_memory=2**30).plan
    # by hand: embedding (tied: the head is the same tensor) 10*8, per block 2 norms of 8, q 8x8,
    # k and v 4x8, o 8x8, gate and up 12x8, down 8x12; the final norm 8
    params = 80 + 2 * (16 + 64 + 32 + 32 + 64 + 96 + 96 + 96) + 8
    assert plan.base == plan.working == params * 4
    # LoRA: per block q (A 2x8, B 8x2) and down (A 2x12, B 8x2), in float32 (the working dtype)
    assert plan.deltas == params * 4 + 2 * (2 * 8 + 8 * 2 + 2 * 12 + 8 * 2) * 4
    assert plan.experts == 2 and plan.adapters == 1
    # activations by hand: fitness.batch_size 32 x 256 tokens = 8192, float32; per block the
    # stream, its normed copy and attention output (3 x 8), q (2 heads x 4), k and v (1 x 4 each),
    # gate, up and product (3 x 12); scores 32 x 2 heads x 256^2 in float32; the KV cache of 2
    # layers; logits over 10 tokens in float32 plus their float32 copy
    block = 8192 * (3 * 8 + 8 + 2 * 4 + 3 * 12) * 4
    assert plan.activations == block + 32 * 2 * 256 * 256 * 4 + 2 * 2 * 8192 * 4 * 4 + 8192 * 10 * 8


def test_lora_factor_bytes_by_rank_and_module():
    modules = {"q": (4096, 4096), "down": (4096, 11008)}
    assert lora_factor_bytes(modules, 16, torch.bfloat16) == 16 * (8192 + 15104) * 2
    assert lora_factor_bytes(modules, {"q": 8, "down": 4}, torch.float32) == (8 * 8192 + 4 * 15104) * 4
    # quantized delta formats keep LoRA factors in the working dtype
    adapter = Adapter(modules, 16)
    assert adapter.factor_bytes("int8", torch.float32) == adapter.factor_bytes(torch.float32, torch.float32)


def test_headers_are_read_without_data(tmp_path):
    write_header(tmp_path / "h.safetensors", {"a": (3, 4), "b": (5,)})
    assert safetensors_shapes(tmp_path / "h.safetensors") == {"a": (3, 4), "b": (5,)}
    (tmp_path / "bad.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(UserError, match="not a safetensors file"):
        safetensors_shapes(tmp_path / "bad.safetensors")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {"7b": write_model(root / "7b", LLAMA_7B), "70b": write_model(root / "70b", LLAMA_70B),
            "experts7": [write_model(root / f"e7-{i}", LLAMA_7B) for i in range(4)],
            "experts70": [write_model(root / f"e70-{i}", LLAMA_70B) for i in range(2)],
            "lora7": [write_lora(root / f"l7-{i}", LLAMA_7B) for i in range(16)]}


def test_7b_with_4_experts_plans_fp32_deltas_and_picks_the_first_format_that_fits(hub):
    # task arithmetic caches nothing per tensor (TSV-M's components: the next test)
    config = compose(overrides(hub["7b"], hub["experts7"], "runtime.device=cuda", "space.methods=[task_arithmetic]"))
    roomy = plan_search(config, device_memory=parse_size("1TB"))
    assert roomy.plan.deltas == 4 * LLAMA_7B_PARAMS * 4 and roomy.plan.base == LLAMA_7B_PARAMS * 4
    assert not roomy.changed and roomy.fit.workers == 1
    # 141 GB: fp32 deltas (4 x 27 GB + 2 x 27 GB) do not fit, bfloat16 ones do
    h200 = plan_search(config, device_memory=parse_size("141GB"))
    assert h200.changed and h200.plan.delta_dtype == torch.bfloat16
    assert h200.plan.deltas == 4 * LLAMA_7B_PARAMS * 2
    # loading: the base and the expert being read as their headers store them (bfloat16), the task
    # vectors as the chosen format stores them
    assert h200.loading == 2 * LLAMA_7B_PARAMS * 2 + 4 * LLAMA_7B_PARAMS * 2
    assert roomy.loading == 2 * LLAMA_7B_PARAMS * 2 + roomy.plan.deltas
    assert planned_config(config, h200)["runtime"]["delta_dtype"] == "bfloat16"
    assert any("using runtime.delta_dtype=bfloat16" in line for line in h200.lines())


def test_tsv_m_plans_one_component_stack_of_the_block_matrices(hub):
    """TSV-M, the default method, keeps each expert's components of every 2-D block tensor for
    the merger's life: one more stack of the block matrices, in the float delta format, or in the
    working dtype where deltas are quantized (they are made from dense deltas)."""
    blocks = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # q, k, v, o and gate, up, down per block
    assert blocks == LLAMA_7B_PARAMS - 2 * 32000 * 4096 - (2 * 32 + 1) * 4096  # less embedding, head, norms
    for delta, width in (("float32", 4), ("bfloat16", 2), ("int8", 4)):
        config = compose(overrides(hub["7b"], hub["experts7"], "runtime.device=cuda", f"runtime.delta_dtype={delta}"))
        search = plan_search(config, device_memory=parse_size("1TB"))
        assert search.plan.statistics == 4 * blocks * width, delta
        assert search.plan.total == search.plan.resident + search.plan.activations + search.plan.statistics
    assert any("method statistics 96.50 GiB (TSV-M's per-expert components" in line for line in search.lines())
    lora = plan_search(compose(overrides(hub["7b"], hub["lora7"][:2], "runtime.device=cuda")), device_memory=parse_size("1TB"))
    assert lora.plan.statistics == 2 * blocks * 4  # components of LoRA experts' dense task vectors too


def test_7b_with_16_lora_experts_holds_their_factors(hub):
    config = compose(overrides(hub["7b"], hub["lora7"], "runtime.device=cuda", "runtime.dtype=bfloat16"))
    search = plan_search(config, device_memory=parse_size("24GB"))
    plan = search.plan
    # loading: the bfloat16 base, the float32 copy peft merges each adapter into, the factors
    assert search.loading == LLAMA_7B_PARAMS * (2 + 4) + plan.deltas
    factors = sum(lora_factor_bytes({k: v for k, v in linear_shapes(LLAMA_7B).items()}, 16, torch.bfloat16)
                  for _ in range(16))
    assert plan.deltas == factors == 16 * 32 * 16 * (4 * 8192 + 3 * 15104) * 2
    assert plan.adapters == 16 and plan.base == LLAMA_7B_PARAMS * 2


def test_70b_that_fits_nowhere_is_refused_in_one_line(hub):
    config = compose(overrides(hub["70b"], hub["experts70"], "runtime.device=cpu", "runtime.workers=2"))
    search = plan_search(config, device_memory=parse_size("24GB"))
    assert search.fit.chosen is None
    message = search.refusal()
    # TSV-M's components are dense in the working dtype under int8/int4 deltas: bfloat16 is smallest
    assert "\n" not in message and "runtime.workers=2" in message and "with bfloat16 at fitness.batch_size=1" in message
    assert "streaming deltas from host memory to the GPU is not built" in message
    with pytest.raises(UserError, match="does not fit"):
        planned_config(config, search)


def test_plan_command_prints_then_refuses_with_exit_code_2(hub, capsys):
    code = main(["plan", *overrides(hub["70b"], hub["experts70"], "runtime.device=cuda"), "--device-memory", "80GB"])
    out, err = capsys.readouterr()
    assert code == 2 and "evaluation activations" in out and "does not fit" in out
    assert err.count("\n") == 1 and err.startswith("evomerge: error: the search does not fit cuda")
    assert main(["plan", *overrides(hub["7b"], hub["experts7"]), "--device-memory", "lots"]) == 2
    assert "device memory 'lots' is not a size" in capsys.readouterr().err


def test_bad_model_references_are_one_line_as_when_loading(hub, tmp_path):
    """The plan reads references as loading does (pool.local_ref) but never downloads: a missing
    path, a folder without a config and a GGUF file each get one line naming the reference."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    cases = {str(tmp_path / "missing"): "not found: expected a local model folder",
             str(tmp_path / "empty"): "has no config.json",
             str(tmp_path / "model.gguf"): "is a .gguf file, which loads dequantized"}
    for ref, message in cases.items():
        with pytest.raises(UserError, match=message) as caught:
            plan_search(compose(overrides(ref, hub["experts7"][:1])), device_memory=parse_size("1TB"))
        assert ref in str(caught.value) and "\n" not in str(caught.value)


def test_refinement_plans_a_gradient_per_parameter_and_is_refused_where_it_does_not_fit(hub):
    config = compose(overrides(hub["7b"], hub["experts7"], "runtime.device=cuda", "runtime.delta_dtype=int8"))
    refining = compose(overrides(hub["7b"], hub["experts7"], "runtime.device=cuda", "runtime.delta_dtype=int8",
                                 "refine.at=final"))
    plain = plan_search(config, device_memory=parse_size("80GB"))
    refined = plan_search(refining, device_memory=parse_size("80GB"))
    assert plain.plan.gradients == 0
    assert refined.plan.gradients == LLAMA_7B_PARAMS * 4  # float32 working model: one fp32 gradient each
    assert refined.fit.requested.total == plain.fit.requested.total + refined.plan.gradients
    assert any("gradients 25.10 GiB (refine.at" in line for line in refined.lines())
    between = (plain.fit.requested.total + refined.fit.requested.total) // 2
    assert plan_search(config, device_memory=between).fit.chosen is not None
    tight = plan_search(refining, device_memory=between)
    if tight.fit.chosen is None:
        assert "\n" not in tight.refusal() and "does not fit" in tight.refusal()
    else:  # a smaller delta format makes room for the gradients
        assert tight.plan.delta_dtype == "int4"

    # refine.at=auto, the default, gives way instead: the search runs without it where its
    # gradients would not fit beside the requested deltas, with them where they do
    auto = compose(overrides(hub["7b"], hub["experts7"], "runtime.device=cuda", "runtime.delta_dtype=int8",
                             refine="auto"))
    dropped = plan_search(auto, device_memory=between)
    assert dropped.refine_dropped and dropped.plan.gradients == 0 and dropped.fit.chosen is dropped.fit.requested
    assert planned_config(auto, dropped)["refine"]["at"] == "off"
    assert any("refine.at=auto" in line for line in dropped.lines())
    roomy = plan_search(auto, device_memory=parse_size("1TB"))
    assert not roomy.refine_dropped and roomy.plan.gradients == refined.plan.gradients
    assert planned_config(auto, roomy)["refine"].get("at") != "off"

def test_each_scoring_path_counts_the_logits_it_keeps():
    """By hand on a tiny config: decoding keeps one position per row and every layer's KV cache,
    teacher forcing the reference's positions (max_gen_toks + 1), a native log-likelihood
    request every position, lm-eval's also its cache and a log-softmax, perplexity every
    position of a quarter batch and a log-softmax; none but decoding keeps a cache."""
    arch = Architecture.of_config(TINY)
    paths = evaluation_paths((TaskShape("generate_until", 12, True), TaskShape("multiple_choice", 0, True),
                              TaskShape("multiple_choice", 0, False)), 32, 256, teacher_forcing=True, perplexity=True)
    assert [(p.what, p.rows, p.sequence, p.logit_positions, p.kv_cache) for p in paths] == [
        ("decoding", 32, 256, 1, True), ("teacher forcing", 32, 256, 13, False), ("log-likelihood", 32, 256, None, False),
        ("lm-eval's log-likelihood", 32, 256, None, True), ("perplexity", 8, 256, None, False)]
    tokens = 32 * 256
    block = tokens * (3 * 8 + 8 + 2 * 4 + 3 * 12) * 4 + 32 * 2 * 256 * 256 * 4  # as the tiny plan's test counts
    cache = 2 * 2 * tokens * 4 * 4
    logits = [32 * 1 * 10 * 4 + cache, 32 * 13 * 10 * 4, tokens * 10 * 4, tokens * 10 * 8 + cache]
    assert [p.bytes(arch, torch.float32) for p in paths[:4]] == [block + n for n in logits]
    quarter = 8 * 256 * (3 * 8 + 8 + 2 * 4 + 3 * 12) * 4 + 8 * 2 * 256 * 256 * 4
    assert paths[4].bytes(arch, torch.float32) == quarter + 8 * 256 * 10 * 8
    # bfloat16 logits are scored in a float32 copy
    half_block = tokens * (3 * 8 + 8 + 2 * 4 + 3 * 12) * 2 + 32 * 2 * 256 * 256 * 4  # the scores stay float32
    assert paths[2].bytes(arch, torch.bfloat16) == half_block + tokens * 10 * (2 + 4)
    decoded = evaluation_paths((TaskShape("generate_until", 12, True),), 32, 256, teacher_forcing=False, perplexity=False)
    assert decoded == [EvaluationPath("decoding", 32, 256, 1, kv_cache=True)]
    lm_eval_path = evaluation_paths((TaskShape("generate_until", 12, False),), 32, 256, teacher_forcing=True,
                                    perplexity=False)
    assert [p.logit_positions for p in lm_eval_path] == [1]  # lm-eval's generate: transformers keeps one
    assert [p.logit_positions for p in evaluation_paths(None, 32, 256, teacher_forcing=True, perplexity=False)] == [None]


@pytest.fixture(scope="module")
def gemma(tmp_path_factory):
    root = tmp_path_factory.mktemp("gemma")
    return [write_model(root / name, GEMMA3_270M) for name in ("base", "e1", "e2")]


def test_a_262k_vocabulary_plans_the_logits_its_tasks_keep_and_lowers_the_batch_before_the_deltas(gemma, pico_zoo):
    """Gemma 3 270M with two experts, 2 CPU workers in 24 GiB: generation tasks fit at the
    configured batch with float32 deltas (teacher forcing keeps 13 positions per row, not 256);
    a multiple-choice task keeps every position, so the plan halves the batch until it fits,
    and keeps float32 deltas."""
    skill = pico_zoo.config.skills[0]
    common = [*overrides(gemma[0], gemma[1:]), "runtime.device=cpu", "runtime.workers=2",
              f"include_path={pico_zoo.task_dir}"]
    memory = parse_size("24GiB")
    generating = plan_search(compose([*common, f"tasks=[zoo_{skill}]"]), device_memory=memory)
    assert generating.fit.chosen is generating.fit.requested and generating.fit.batch == 32
    assert (generating.evaluation.what, generating.evaluation.logit_positions) == ("teacher forcing", 13)
    arch = Architecture.of_config(GEMMA3_270M)
    assert generating.plan.activations == arch.activation_bytes(32, 256, torch.float32, logit_positions=13,
                                                                kv_cache=False)
    assert generating.plan.activations < 2 * 2**30 < arch.activation_bytes(32, 256, torch.float32)
    assert any("teacher forcing: batch 32 x 256 tokens, logits at 13 positions per row" in line
               for line in generating.lines())

    config = compose([*common, f"tasks=[zoo_{skill}_mc]"])
    choosing = plan_search(config, device_memory=memory)
    batch = choosing.fit.batch
    assert choosing.evaluation.what == "log-likelihood" and choosing.evaluation.logit_positions is None
    assert 1 <= batch < 32 and choosing.plan.delta_dtype == torch.float32 and choosing.batch_changed
    assert choosing.fit.needs(choosing.plan) <= memory  # the largest that fits: twice it does not
    assert plan_search(compose([*common, f"tasks=[zoo_{skill}_mc]", f"fitness.batch_size={2 * batch}"]),
                       device_memory=memory).fit.batch == batch
    assert planned_config(config, choosing)["fitness"]["batch_size"] == batch
    assert any(f"fitness.batch_size=32 does not fit: using fitness.batch_size={batch}" in line for line in choosing.lines())
