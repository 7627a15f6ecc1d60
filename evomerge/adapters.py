"""LoRA adapters as experts: recognized, checked against the base, and read as factors.

Most experts users hold are peft adapters, not full fine-tunes; merging one into a dense model
first turns a few MB of factors into a task vector the size of the model. An adapter folder is
read with peft's own config and loading (``PeftConfig``, ``PeftModel``), so every variant peft
knows (rank and alpha patterns, rsLoRA, Conv1D's transposed layout) means here what it means
there. Plain LoRA projections stay factors (:class:`~evomerge.merge.factored.LowRank`);
everything else an adapter changes (DoRA, LoRA biases, embedding LoRA, ``modules_to_save``) is
taken densely from peft's own merge, so nothing peft applies is lost.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from evomerge.errors import UserError, first_line
from evomerge.merge.factored import Delta, LowRank
from evomerge.model_files import safetensors_shapes, unique_parameters

ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "default"  # the name PeftModel.from_pretrained gives the one adapter it loads


def is_adapter_folder(folder: Path) -> bool:
    """A peft adapter folder: ``adapter_config.json`` and no full model's ``config.json``."""
    return (folder / ADAPTER_CONFIG).is_file() and not (folder / "config.json").is_file()


@dataclass(frozen=True)
class AdapterInfo:
    """What checking an adapter against its base needs, read without loading any weights."""

    ref: str
    folder: Path
    peft_type: str
    base_model: str | None
    shapes: dict[str, tuple[int, ...]]  # the adapter file's tensors, as peft saved them
    fan_in_fan_out: bool


def inspect_adapter(ref: str, folder: Path, *, allow_pickle: bool = False) -> AdapterInfo:
    from peft import PeftConfig

    try:
        config = PeftConfig.from_pretrained(str(folder))
    except Exception as error:  # a broken or foreign adapter_config.json
        raise UserError(f"adapter {ref}: {ADAPTER_CONFIG} could not be read by peft "
                        f"({first_line(error)})") from None
    weights = folder / "adapter_model.safetensors"
    if weights.is_file():
        shapes = safetensors_shapes(weights)
    elif (folder / "adapter_model.bin").is_file():
        if not allow_pickle:
            raise UserError(f"adapter {ref} has only pickle weights (adapter_model.bin), which can run code "
                            f"when loaded; convert it to safetensors or opt in with allow_pickle=true")
        shapes = {k: tuple(v.shape) for k, v in torch.load(folder / "adapter_model.bin", map_location="meta",
                                                            weights_only=True, mmap=True).items()}
    else:
        raise UserError(f"adapter {ref} has no adapter_model.safetensors; expected a folder written by "
                        f"peft's save_pretrained")
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    return AdapterInfo(ref, folder, peft_type, config.base_model_name_or_path, shapes,
                       bool(getattr(config, "fan_in_fan_out", False)))


def check_adapter(base_ref: str, base_shapes: dict[str, tuple[int, ...]], adapter: AdapterInfo) -> None:
    """Raise a one-line UserError naming the first way ``adapter`` does not fit the base: its
    kind, the base it names, a target module the base lacks, or a factor of the wrong shape."""
    if adapter.peft_type != "LORA":
        raise UserError(f"expert {adapter.ref} is a {adapter.peft_type} adapter; adapters must be LoRA "
                        f"(peft_type LORA) or be merged into a full model first")
    if adapter.base_model and not _same_model(adapter.base_model, base_ref):
        raise UserError(f"adapter {adapter.ref} was trained on {adapter.base_model!r} (its {ADAPTER_CONFIG}), "
                        f"not on base {base_ref}; pass that model as models.base")
    for module, factor in lora_factors(adapter.ref, adapter.shapes).items():
        weight = f"{module}.weight"
        if weight not in base_shapes:
            raise UserError(f"adapter {adapter.ref} targets {module!r}, which base {base_ref} lacks; "
                            f"the adapter was made for another model")
        stored = base_shapes[weight]
        rows, cols = stored[:2] if len(stored) >= 2 else (None, None)
        out_size, in_size = (cols, rows) if adapter.fan_in_fan_out else (rows, cols)
        if (factor.out_features, factor.in_features) != (out_size, in_size):
            raise UserError(f"adapter {adapter.ref} factors of {module!r} (lora_A {list(factor.a)}, lora_B "
                            f"{list(factor.b)}) do not fit {weight!r} {list(stored)} of base {base_ref}")


@dataclass(frozen=True)
class LoraFactor:
    """One targeted module's factor shapes as peft saves them, whatever the weight's layout:
    ``lora_A`` is ``rank x in``, ``lora_B`` is ``out x rank``."""

    a: tuple[int, int]
    b: tuple[int, int]

    @property
    def rank(self) -> int:
        return self.a[0]

    @property
    def in_features(self) -> int:
        return self.a[1]

    @property
    def out_features(self) -> int:
        return self.b[0]


def lora_factors(ref: str, shapes: Mapping[str, tuple[int, ...]]) -> dict[str, LoraFactor]:
    """Each targeted module (named as in the base, peft's ``base_model.model.`` prefix removed)
    with its factor shapes, from an adapter file's tensor shapes: the one reading of them, for
    the check against the base and for the memory plan."""
    factors: dict[str, LoraFactor] = {}
    for key, a in shapes.items():
        if ".lora_A." not in key:
            continue
        b = shapes.get(key.replace(".lora_A.", ".lora_B."))
        if b is None or len(a) != 2 or len(b) != 2 or a[0] != b[1]:
            raise UserError(f"LoRA adapter {ref} factor {key!r} {list(a)} has no 2-D lora_B partner of its "
                            f"rank (found {list(b) if b is not None else 'none'})")
        module = key.split(".lora_A.")[0].removeprefix("base_model.model.")
        factors[module] = LoraFactor((int(a[0]), int(a[1])), (int(b[0]), int(b[1])))
    if not factors:
        raise UserError(f"LoRA adapter {ref} has no lora_A/lora_B tensors in its adapter weights")
    return factors


def adapter_deltas(adapter: AdapterInfo, fresh_base: Callable[[], torch.nn.Module],
                   base: dict[str, torch.Tensor]) -> dict[str, Delta]:
    """The adapter's task vector per base tensor it changes: plain LoRA projections as factors,
    the rest dense from peft's merge. ``fresh_base`` makes a new copy of the base model for peft
    to wrap (and merge into); ``base`` holds the base's unique parameters to subtract."""
    from peft import PeftModel
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:
        wrapped = PeftModel.from_pretrained(fresh_base(), str(adapter.folder), adapter_name=_ADAPTER)
    except Exception as error:  # peft names the mismatch; our check should have caught it first
        raise UserError(f"adapter {adapter.ref} could not be applied to the base ({first_line(error)})") from None
    deltas: dict[str, Delta] = {}
    with torch.no_grad():
        for name, module in wrapped.base_model.model.named_modules():
            if (type(module) is LoraLinear and _ADAPTER in module.lora_A and _ADAPTER not in module.lora_variant
                    and not module.lora_bias.get(_ADAPTER, False)):
                a = module.lora_A[_ADAPTER].weight.detach()
                b = module.lora_B[_ADAPTER].weight.detach()
                left, right = (a.t(), b.t()) if module.fan_in_fan_out else (b, a)
                deltas[f"{name}.weight"] = LowRank(left.contiguous().clone(), right.contiguous().clone(),
                                                   float(module.scaling[_ADAPTER]))
        merged = unique_parameters(wrapped.merge_and_unload())
        for name, weight in merged.items():
            if name in deltas:
                continue
            delta = weight.float() - base[name].float()  # the base may be held in bfloat16
            if bool(delta.any()):
                deltas[name] = delta
    return deltas


def _same_model(named: str, base_ref: str) -> bool:
    """Whether an adapter's recorded base names ``base_ref``: the same string, the same folder,
    or the same model name (a hub id's last part, a local copy's folder name)."""
    if named == base_ref:
        return True
    left, right = Path(named).expanduser(), Path(base_ref).expanduser()
    if left.exists() and right.exists():
        return left.resolve() == right.resolve()
    return named.rstrip("/").rsplit("/", 1)[-1] == base_ref.rstrip("/").rsplit("/", 1)[-1]
