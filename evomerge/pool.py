"""The models a user merges: one base and its fine-tuned experts, checked and held as task vectors.

A model is named by a local folder, a `.gguf` file, or a hub id. Mergeability is checked from
cheap metadata (config, safetensors headers, tokenizer vocabulary) *before* any weights load, so a
wrong expert costs a second, not a model load, and the error names the first mismatch.
Weights load from safetensors only unless the user opts in to pickle, because a pickle checkpoint
can run arbitrary code when loaded.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Mapping, Sequence

import torch

from evomerge.adapters import ADAPTER_CONFIG, adapter_deltas, check_adapter, inspect_adapter, is_adapter_folder
from evomerge.architecture import Layout, layout_of
from evomerge.config import QUANTIZED_DELTAS
from evomerge.errors import UserError, first_line
from evomerge.merge.memory import DeltaFormat, delta_format
from evomerge.merge.factored import LowRank
from evomerge.merge.quantized import QuantizedStack
from evomerge.model_files import folder_header, folder_shapes, stored_dtype, unique_parameters

Delta = torch.Tensor | LowRank | QuantizedStack
"""One expert's task vector for one tensor as a pool holds it: dense (in the pool's delta
format), an adapter's factors, or a one-row quantized stack."""

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")


@dataclass
class ModelInfo:
    """What the mergeability check needs, read without loading weights."""

    ref: str
    folder: Path | None
    gguf_file: str | None
    architecture: str
    shapes: dict[str, tuple[int, ...]]
    vocab: dict[str, int] = field(repr=False)


def local_ref(ref: str) -> tuple[Path, str | None] | None:
    """A local model's folder (and GGUF file name), or None for a hub id: the one reading of a
    model reference, for loading and for the memory plan (which must not download). Anything
    else is a one-line UserError saying what a reference may be."""
    path = Path(ref).expanduser()
    if _is_gguf(ref):
        return path.parent, path.name
    if path.is_dir():
        if not (path / "config.json").exists() and not is_adapter_folder(path):
            raise UserError(f"model folder {ref} has no config.json; expected a Hugging Face model folder "
                            f"(config.json + *.safetensors), a peft adapter folder ({ADAPTER_CONFIG}) "
                            f"or a .gguf file")
        return path, None
    if path.suffix == ".gguf" or ref.startswith((".", "/", "~")) or not _HUB_ID.match(ref):
        raise UserError(f"model {ref!r} not found: expected a local model folder, a .gguf file, "
                        f"or a hub id like 'HuggingFaceTB/SmolLM2-135M-Instruct'")
    return None


def resolve(ref: str, *, allow_pickle: bool = False) -> tuple[Path, str | None]:
    """Local folder (and GGUF file name) for ``ref``, downloading a hub id's files if needed."""
    local = local_ref(ref)
    return local if local is not None else (_download(ref, allow_pickle=allow_pickle), None)


def _download(hub_id: str, *, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
    if allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(hub_id, allow_patterns=patterns))
    except Exception as error:  # offline, unknown repo, gated: all mean "cannot use this id"
        raise UserError(f"hub id {hub_id!r} could not be fetched ({first_line(error)}); "
                        f"pass a local model folder or .gguf file instead") from None


def _load_dtype(ref: str, *, allow_pickle: bool) -> torch.dtype:
    """What a pool loads ``ref`` in: the dtype its safetensors store (every stored value is exact
    in it, and a bfloat16 checkpoint takes half of float32's host RAM), float32 otherwise."""
    folder, gguf_file = resolve(ref, allow_pickle=allow_pickle)
    if gguf_file is not None:
        return torch.float32  # GGUF weights arrive dequantized
    return stored_dtype(entry.get("dtype", "") for entry in folder_header(folder).values())


def _pickle_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(folder.glob("pytorch_model*.bin")):
        state = torch.load(file, map_location="meta", weights_only=True, mmap=True)
        shapes.update({k: tuple(v.shape) for k, v in state.items()})
    return shapes


def inspect_model(ref: str, *, allow_pickle: bool = False, trust_remote_code: bool = False,
                  loaded: tuple | None = None) -> ModelInfo:
    """Architecture, tensor shapes and vocabulary of ``ref``, from metadata only where possible;
    ``loaded`` is ``ref``'s (model, tokenizer) when the caller already holds them."""
    from transformers import AutoTokenizer

    folder, gguf_file = resolve(ref, allow_pickle=allow_pickle)
    if gguf_file is not None:
        # A GGUF file's tensor names follow llama.cpp, not transformers; loading is the honest way
        # to learn the transformers names. GGUF models are small enough for that to be cheap.
        model, tokenizer = loaded or load_model(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        return ModelInfo(ref, folder, gguf_file, type(model).__name__, shapes, tokenizer.get_vocab())
    config = json.loads((folder / "config.json").read_text())
    architecture = (config.get("architectures") or [config.get("model_type", "unknown")])[0]
    shapes = folder_shapes(folder)
    if not shapes:
        if not any((folder / name).exists() for name in _PICKLE_WEIGHTS):
            raise UserError(f"model {ref} has no *.safetensors weights; expected model.safetensors "
                            f"or sharded model-*.safetensors files")
        if not allow_pickle:
            raise UserError(f"model {ref} has only pickle weights (pytorch_model.bin), which can run code "
                            f"when loaded; convert it to safetensors or opt in with allow_pickle=true")
        shapes = _pickle_shapes(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    return ModelInfo(ref, folder, None, architecture, shapes, tokenizer.get_vocab())


def check_mergeable(base: ModelInfo, expert: ModelInfo) -> None:
    """Raise a one-line UserError naming the first way ``expert`` differs from ``base``."""
    if expert.architecture != base.architecture:
        raise UserError(f"expert {expert.ref} is a {expert.architecture}, base {base.ref} is a "
                        f"{base.architecture}; experts must share the base's architecture")
    # Tied embeddings may be stored once or twice; compare what both sides store.
    missing = sorted(set(base.shapes) - set(expert.shapes) - {"lm_head.weight"})
    extra = sorted(set(expert.shapes) - set(base.shapes) - {"lm_head.weight"})
    if missing or extra:
        name = (missing or extra)[0]
        side = "lacks" if missing else "has an extra tensor"
        raise UserError(f"expert {expert.ref} {side} {name!r} (base {base.ref}); "
                        f"experts must have exactly the base's tensor names")
    for name, shape in base.shapes.items():
        if name in expert.shapes and expert.shapes[name] != shape:
            raise UserError(f"expert {expert.ref} tensor {name!r} has shape {list(expert.shapes[name])}, "
                            f"base has {list(shape)}; experts must be fine-tunes of the same base")
    if expert.vocab != base.vocab:
        differing = sorted(set(expert.vocab.items()) ^ set(base.vocab.items()))
        token = differing[0][0] if differing else "?"
        raise UserError(f"expert {expert.ref} tokenizer vocabulary differs from base {base.ref} "
                        f"(size {len(expert.vocab)} vs {len(base.vocab)}, first differing token {token!r}); "
                        f"experts must use the base's tokenizer")


def check_expert(base: ModelInfo, ref: str, *, allow_pickle: bool = False,
                 trust_remote_code: bool = False) -> None:
    """Check one expert (a full model or a LoRA adapter) against the base from metadata only;
    a one-line UserError names the first mismatch."""
    folder, gguf_file = resolve(ref, allow_pickle=allow_pickle)
    if gguf_file is None and is_adapter_folder(folder):
        check_adapter(base.ref, base.shapes, inspect_adapter(ref, folder, allow_pickle=allow_pickle))
    else:
        check_mergeable(base, inspect_model(ref, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code))


def load_model(ref: str, *, dtype: torch.dtype = torch.float32, allow_pickle: bool = False,
               trust_remote_code: bool = False, device: str = "cpu"):
    """Model and tokenizer for ``ref`` in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, gguf_file = resolve(ref, allow_pickle=allow_pickle)
    kwargs: dict = {"dtype": dtype, "trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    else:
        kwargs["use_safetensors"] = None if allow_pickle else True
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder, **({"gguf_file": gguf_file} if gguf_file else {}),
                                              trust_remote_code=trust_remote_code)
    if getattr(model, "hf_quantizer", None) is not None:  # GGUF weights arrive dequantized
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model.eval(), tokenizer


def _is_gguf(ref: str) -> bool:
    path = Path(ref).expanduser()
    return path.suffix == ".gguf" and path.is_file()


def named_experts(experts: Mapping[str, str] | Sequence[str] | None) -> dict[str, str]:
    """Experts by name: a mapping as given, a list named by each reference's last path part (a
    folder or hub id's name), the names a recipe and the archive use; colliding names and an empty
    list are one-line errors."""
    if isinstance(experts, Mapping):
        named = {str(k): str(v) for k, v in experts.items()}
    else:
        named = {}
        for ref in experts or ():
            name = Path(str(ref).rstrip("/")).name or str(ref)
            if name in named:
                raise UserError(f"experts {named[name]!r} and {ref!r} would both be named {name!r}; "
                                f"give models.experts as a mapping name: path")
            named[name] = str(ref)
    if not named:
        raise UserError(f"models.experts={experts!r} must list at least one expert model (path or hub id)")
    return named


class ModelPool:
    """The base's weights and each expert's task vector τ = θ_expert − θ_base, on one device.

    Models load in ``dtype``, by default the dtype their files store (a bfloat16 checkpoint in
    bfloat16: exact, and half of float32's memory); the Merger casts the base to its own dtype.
    Experts load one at a time and only their difference is kept (computed in float32 at least),
    each tensor's stored in ``delta_dtype`` (default float32; ``int8``/``int4`` quantized) as soon
    as it is computed, so loading peaks at two models (the base, the expert being read) plus the
    task vectors as the Merger will hold them. A LoRA adapter's task vector stays factored: its
    entries are :class:`~evomerge.merge.factored.LowRank` for the projections it adapts, absent
    for the tensors it leaves alone (:meth:`delta` reads any entry densely).
    """

    def __init__(self, base: str, experts: Mapping[str, str] | Sequence[str], *,
                 dtype: torch.dtype | None = None, delta_dtype: torch.dtype | str | None = None,
                 allow_pickle: bool = False, trust_remote_code: bool = False, device: str = "cpu") -> None:
        named = named_experts(experts)
        opts = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
        # Inspecting a GGUF file means dequantizing it; a GGUF base is loaded once, for both.
        def load_dtype(ref: str) -> torch.dtype:
            return dtype or _load_dtype(ref, allow_pickle=allow_pickle)

        loaded = load_model(base, dtype=load_dtype(base), device=device, **opts) if _is_gguf(base) else None
        base_info = inspect_model(base, loaded=loaded, **opts)
        for ref in named.values():
            check_expert(base_info, ref, **opts)
        self.base_ref = base
        self.expert_refs = named
        self.model, self.tokenizer = loaded or load_model(base, dtype=load_dtype(base), device=device, **opts)
        self.delta_dtype = delta_format(delta_dtype, dtype or torch.float32)
        # The model's own tensors while experts load (read only); copied once they are in, so the
        # peak is two models (base, the expert loading) plus the task vectors as stored.
        self.base = unique_parameters(self.model)
        self.task_vectors: dict[str, dict[str, Delta]] = {}
        self.adapters: set[str] = set()  # experts whose task vectors hold only what they change
        for name, ref in named.items():
            folder, gguf_file = resolve(ref, allow_pickle=allow_pickle)
            if gguf_file is None and is_adapter_folder(folder):
                adapter = inspect_adapter(ref, folder, allow_pickle=allow_pickle)
                # peft merges into a float32 copy, so what it changes densely loses nothing to rounding
                fresh = lambda: load_model(base, dtype=dtype or torch.float32, device=device, **opts)[0]  # noqa: E731
                self.task_vectors[name] = {k: d if isinstance(d, LowRank) else stored_delta(d, self.delta_dtype)
                                           for k, d in adapter_deltas(adapter, fresh, self.base).items()}
                self.adapters.add(name)
                continue
            expert, _ = load_model(ref, dtype=load_dtype(ref), device=device, **opts)
            weights = unique_parameters(expert)
            # in float32 at least: the difference of two bfloat16 weights need not be one
            self.task_vectors[name] = {k: stored_delta(_wide(weights[k]) - _wide(self.base[k]), self.delta_dtype)
                                       for k in self.base}
            del expert, weights
        self.base = {k: v.clone() for k, v in self.base.items()}

    @cached_property
    def layout(self) -> Layout:
        """Where the base keeps its decoder blocks, found from the loaded model."""
        return layout_of(self.model)

    @property
    def expert_names(self) -> list[str]:
        return list(self.task_vectors)

    def delta(self, expert: str, name: str) -> torch.Tensor:
        """``expert``'s task vector for tensor ``name``, dense (zeros where an adapter leaves it)."""
        entry = self.task_vectors[expert].get(name)
        base = self.base[name]
        if entry is None:
            return torch.zeros_like(base, dtype=torch.promote_types(base.dtype, torch.float32))
        if isinstance(entry, QuantizedStack):
            return entry.dense(torch.float32)[0].view(base.shape)
        return entry.dense() if isinstance(entry, LowRank) else entry

    def relative_norms(self) -> dict[str, float]:
        """‖τ‖/‖θ_base‖ per expert: how far each fine-tune moved, the regime merging depends on."""
        base_norm = _norm(self.base.values())
        return {name: _norm(self.delta(name, k) for k in tau) / base_norm for name, tau in self.task_vectors.items()}


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def stored_delta(delta: torch.Tensor, fmt: DeltaFormat) -> torch.Tensor | QuantizedStack:
    """A dense task vector as a pool holds it in ``fmt``: cast to a float format, or quantized as
    a one-row stack, as soon as it is computed, so a pool never holds its experts in float32
    first (the Merger stacks the rows without converting them again)."""
    if isinstance(fmt, str):
        return QuantizedStack.of(delta.reshape(1, -1), QUANTIZED_DELTAS[fmt])
    return delta.to(fmt)


def _norm(tensors) -> float:
    return float(sum(t.double().pow(2).sum() for t in tensors)) ** 0.5
