"""Header-only model folders of hub shapes: config.json plus safetensors files whose header names
every tensor and whose data is absent. The memory plan reads nothing else, so these plan exactly
as the real checkpoints would, in kilobytes and without a download. Shared by tests/test_plan.py
and experiments/plan_hub.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Mapping, Sequence

# Llama-family configs, as their hub config.json spell them (the keys the plan reads).
LLAMA_1B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
            "num_hidden_layers": 16, "intermediate_size": 8192, "vocab_size": 128256,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
            "tie_word_embeddings": True}  # Llama-3.2-1B
LLAMA_7B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "num_hidden_layers": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "num_attention_heads": 32, "num_key_value_heads": 32,
            "tie_word_embeddings": False}  # Llama-2-7B (Mistral-7B: 7.24e9, kv 8, 14336)
LLAMA_70B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8192,
             "num_hidden_layers": 80, "intermediate_size": 28672, "vocab_size": 32000,
             "num_attention_heads": 64, "num_key_value_heads": 8,
             "tie_word_embeddings": False}  # Llama-2-70B
# Gemma 3 270M's sizes (its q/k norms and post-norms, ~20k parameters, are not written): what
# matters to the plan is its 262k vocabulary, whose logits outweigh the model.
GEMMA3_270M = {"architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text", "hidden_size": 640,
               "num_hidden_layers": 18, "intermediate_size": 2048, "vocab_size": 262144,
               "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
               "tie_word_embeddings": True}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def linear_shapes(config: Mapping) -> dict[str, tuple[int, int]]:
    """Each decoder block's linear weights (``(out, in)``) of a Llama config, by full name."""
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim", hidden // config["num_attention_heads"])
    q, kv = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    per_block = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden),
                 "self_attn.v_proj": (kv, hidden), "self_attn.o_proj": (hidden, q),
                 "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    return {f"model.layers.{i}.{name}": shape for i in range(config["num_hidden_layers"])
            for name, shape in per_block.items()}


def llama_shapes(config: Mapping) -> dict[str, tuple[int, ...]]:
    """Every tensor a Llama checkpoint of ``config`` stores (no lm_head when tied)."""
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(config["num_hidden_layers"]):
        shapes[f"model.layers.{i}.input_layernorm.weight"] = (hidden,)
        shapes[f"model.layers.{i}.post_attention_layernorm.weight"] = (hidden,)
    shapes.update({f"{name}.weight": shape for name, shape in linear_shapes(config).items()})
    shapes["model.norm.weight"] = (hidden,)
    if not config.get("tie_word_embeddings"):
        shapes["lm_head.weight"] = (vocab, hidden)
    return shapes


def write_header(path: Path, shapes: Mapping[str, Sequence[int]], dtype: str = "BF16") -> None:
    """A safetensors header for ``shapes`` with no data after it."""
    width = {"BF16": 2, "F16": 2, "F32": 4}[dtype]
    header, offset = {}, 0
    for name, shape in shapes.items():
        size = width
        for n in shape:
            size *= n
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob)


def write_model(folder: Path, config: Mapping) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(dict(config)))
    write_header(folder / "model.safetensors", llama_shapes(config))
    return folder


def write_lora(folder: Path, config: Mapping, rank: int = 16, targets: Sequence[str] = LORA_TARGETS) -> Path:
    """A peft LoRA adapter folder of ``config``'s model: rank ``rank`` on ``targets``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(targets)}))
    shapes = {}
    for name, (out, inp) in linear_shapes(config).items():
        if name.rsplit(".", 1)[-1] in targets:
            shapes[f"base_model.model.{name}.lora_A.weight"] = (rank, inp)
            shapes[f"base_model.model.{name}.lora_B.weight"] = (out, rank)
    write_header(folder / "adapter_model.safetensors", shapes)
    return folder
