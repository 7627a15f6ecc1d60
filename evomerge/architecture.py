"""Where a decoder LM keeps its blocks, and which block tensors are attention, MLP and residual writes.

Layer-wise merging, the data-flow fold and the mergekit export all address tensors by decoder
block. The blocks are found from the model, not from a name pattern: they are the module list
holding ``config.num_hidden_layers`` modules (for files: the one tensor-name prefix followed by
exactly the indices 0..n-1), so any decoder transformers loads has them, whatever it calls them
(``model.layers``, ``transformer.h``, ``gpt_neox.layers``, ``model.decoder.layers``).

What the structure does not say is which block tensors are attention and which MLP (OPT keeps its
MLP as two bare linears, ``fc1``/``fc2``), which modules write to the residual stream, and whether a
block normalizes before its residual add. Those are per family, in :data:`FAMILIES`, the one table
of such names. Its attn/mlp marks are substrings of tensor names, matched first-attn-then-mlp
exactly as mergekit matches ``filter`` values, so a recipe merges the same tensors here and in its
mergekit export. A family missing from the table still merges block by block; what needs its names
(attn/mlp genes, the data-flow fold) is refused in one line naming the family.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from evomerge.errors import UserError

_INDEXED = re.compile(r"^(.+?)\.(\d+)\.")  # a name's first numbered component: prefix, index


@dataclass(frozen=True)
class Family:
    """What a family's names mean, as substrings of tensor names (mergekit ``filter`` values, so
    the export selects the same tensors). ``attn``/``mlp``: the first that a name contains decides,
    attn first; ``writers``: those of the tensors whose outputs are added to the residual stream
    (weights and biases); ``pre_norm``: True, or the config attribute saying whether blocks
    normalize their input (and not their output); ``writer_offset``: what the forward adds to a
    writer's stored weight before it multiplies (Gemma 2 and 3 write through post-norms that
    compute ``x * (1 + weight)``), so scaling a write by ``s`` is ``(w + offset) * s - offset``."""

    attn: tuple[str, ...]
    mlp: tuple[str, ...]
    writers: tuple[str, ...]
    pre_norm: bool | str = True
    writer_offset: float = 0.0

    def scaled_write(self, tensor, scale: float):
        """A residual writer's stored tensor whose output is ``scale`` times the original's."""
        if not self.writer_offset:
            return tensor * scale
        return (tensor + self.writer_offset) * scale - self.writer_offset

    def component_of(self, tensor_name: str) -> str:
        """``attn``, ``mlp`` or ``all`` (the rest of a block: norms), by the first mark contained."""
        for kind in ("attn", "mlp"):
            if any(mark in tensor_name for mark in getattr(self, kind)):
                return kind
        return "all"


_LLAMA = Family(("self_attn",), ("mlp",), ("o_proj", "down_proj"))
# Gemma 2 and 3: "sandwich" blocks whose attention and MLP outputs pass a post-norm before the
# residual add, so the norms are the writers; q_norm/k_norm (Gemma 3) sit under self_attn.
_GEMMA_SANDWICH = Family(("self_attn",), ("mlp",), ("post_attention_layernorm", "post_feedforward_layernorm"),
                         writer_offset=1.0)
# Keyed by config.model_type. A mark ends in a dot where the bare word is in a norm's name too
# (GPT-NeoX's post_attention_layernorm, OPT's self_attn_layer_norm: the rest of the block). Fused layouts need nothing more: GPT-2's c_attn, GPT-NeoX's
# query_key_value and Phi-3's qkv_proj/gate_up_proj sit under their attention or MLP module.
FAMILIES: Mapping[str, Family] = {
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "qwen3": _LLAMA, "gemma": _LLAMA, "phi3": _LLAMA,
    "gemma2": _GEMMA_SANDWICH, "gemma3_text": _GEMMA_SANDWICH,
    "gpt2": Family(("attn",), ("mlp",), ("c_proj",)),
    "gpt_neox": Family((".attention.",), ("mlp",), ("attention.dense", "dense_4h_to_h")),
    "opt": Family(("self_attn.",), ("fc1", "fc2"), ("out_proj", "fc2"), pre_norm="do_layer_norm_before"),
    "phi": Family(("self_attn",), ("mlp",), ("self_attn.dense", "fc2")),
}
LLAMA_STYLE = _LLAMA  # what a recipe's names mean when no model is at hand (the zoo's SmolLM2)


@dataclass(frozen=True)
class Layout:
    """A model's decoder blocks: ``{blocks}.{i}.*`` for i < ``num_layers``, with its family's names
    (``family`` is None for a model_type missing from :data:`FAMILIES`)."""

    model_type: str
    architecture: str
    blocks: str
    num_layers: int
    family: Family | None
    pre_norm: bool
    in_block_mark: str  # the shortest ``<...>layers.`` that every block tensor and no other name contains

    # --- per tensor ------------------------------------------------------------------------------
    def layer_of(self, tensor_name: str) -> int | None:
        """Block a tensor belongs to; None for embeddings, final norm and head."""
        return block_of(tensor_name, self.blocks)

    def where(self, tensor_name: str) -> tuple[int | None, str]:
        """(block, component): what a recipe's ``config_for`` is asked about this tensor."""
        layer = self.layer_of(tensor_name)
        if layer is None or self.family is None:
            return layer, "all"
        return layer, self.family.component_of(tensor_name)

    def renumbered(self, tensor_name: str, layer: int) -> str:
        """``tensor_name`` as block ``layer``'s tensor (a block tensor's name only)."""
        rest = tensor_name[len(self.blocks) + 1:].split(".", 1)[1]
        return f"{self.blocks}.{layer}.{rest}"

    def is_residual_writer(self, tensor_name: str) -> bool:
        return self.layer_of(tensor_name) is not None and any(mark in tensor_name for mark in self.writers())

    # --- what the family allows ------------------------------------------------------------------
    def marks(self) -> dict[str, tuple[str, ...]]:
        """The attn/mlp name marks (mergekit filter values), refused for an unknown family."""
        family = self._known("separate attention and MLP genes (space.split_components)")
        return {"attn": family.attn, "mlp": family.mlp}

    def writers(self) -> tuple[str, ...]:
        """Marks of the residual writers, for folding a path's scales; refused where that is wrong."""
        return self._fold_family().writers

    def scaled_write(self, tensor_name: str, tensor, scale: float):
        """``tensor`` refolded so its block's residual write is ``scale`` times as large (a
        residual writer's; any other tensor is returned as it is)."""
        if not self.is_residual_writer(tensor_name):
            return tensor
        return self._fold_family().scaled_write(tensor, scale)

    def _fold_family(self) -> Family:
        family = self._known("the data-flow search (space.kind=dataflow)")
        if not self.pre_norm:
            raise UserError(f"{self.model_type} with {family.pre_norm}=false normalizes after the residual add, "
                            f"so a layer path's scales cannot fold into its weights; use space.kind=params")
        return family

    def _known(self, what: str) -> Family:
        if self.family is None:
            raise UserError(f"{what} needs the tensor names of model type {self.model_type!r} "
                            f"({self.architecture}), which evomerge does not know; known: {', '.join(FAMILIES)}")
        return self.family


def llama_layout(num_layers: int) -> Layout:
    """The Llama layout (the zoo's SmolLM2, Mistral, Qwen2): what plain-data callers with no
    model at hand (a recipe's default mergekit export) assume."""
    return Layout("llama", "LlamaForCausalLM", "model.layers", num_layers, LLAMA_STYLE, True, "layers.")


def block_of(tensor_name: str, blocks: str) -> int | None:
    """Index of the block ``tensor_name`` is in, blocks being ``{blocks}.{i}``; None outside them."""
    if not tensor_name.startswith(blocks + "."):
        return None
    index = tensor_name[len(blocks) + 1:].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def layout_of(model: Any) -> Layout:
    """The layout of a loaded transformers model: its blocks are the module list holding
    ``config.num_hidden_layers`` modules."""
    import torch

    count = _num_layers(model.config)
    lists = [name for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == count and name]
    if len(lists) != 1:
        raise UserError(f"{type(model).__name__} has {len(lists)} module lists of num_hidden_layers={count} "
                        f"modules ({', '.join(lists) or 'none'}); evomerge needs exactly one list of decoder blocks")
    names = [name for name, _ in model.named_parameters()]
    return _layout(model.config, lists[0], names)


def layout_of_files(config: Any, tensor_names: Iterable[str]) -> Layout:
    """The layout from a model's config and tensor names, before any weight loads: the blocks are
    the one name prefix followed by exactly the indices 0..num_hidden_layers-1."""
    names = list(tensor_names)
    count = _num_layers(config)
    indices: dict[str, set[int]] = {}
    for name in names:
        match = _INDEXED.match(name)
        if match:
            indices.setdefault(match.group(1), set()).add(int(match.group(2)))
    prefixes = [prefix for prefix, seen in indices.items() if seen == set(range(count))]
    if len(prefixes) != 1:
        raise UserError(f"{_architecture(config)} has {len(prefixes)} tensor-name prefixes numbered 0-{count - 1} "
                        f"(num_hidden_layers={count}): {', '.join(prefixes) or 'none'}; evomerge merges decoder "
                        f"LMs block by block and needs exactly one")
    return _layout(config, prefixes[0], names)


def _layout(config: Any, blocks: str, names: list[str]) -> Layout:
    model_type = str(getattr(config, "model_type", "unknown"))
    family = FAMILIES.get(model_type)
    pre_norm = family is not None and (family.pre_norm is True or bool(getattr(config, str(family.pre_norm), True)))
    return Layout(model_type, _architecture(config), blocks, _num_layers(config), family, pre_norm,
                  _in_block_mark(blocks, names))


def _in_block_mark(blocks: str, names: list[str]) -> str:
    """The shortest dotted tail of the blocks' prefix, with its dot, that no tensor outside the
    blocks contains (``layers.`` for Llama): mergekit's filter for "inside a block"."""
    parts = blocks.split(".")
    outside = [name for name in names if not name.startswith(blocks + ".")]
    for start in range(len(parts) - 1, -1, -1):
        mark = ".".join(parts[start:]) + "."
        if not any(mark in name for name in outside):
            return mark
    return blocks + "."


def _num_layers(config: Any) -> int:
    count = getattr(config, "num_hidden_layers", None)
    if not isinstance(count, int) or count < 1:
        raise UserError(f"{_architecture(config)} config has num_hidden_layers={count!r}; evomerge merges "
                        f"decoder LMs with a positive number of blocks")
    return count


def _architecture(config: Any) -> str:
    return (getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")])[0]


def transposed_weights(model: Any) -> frozenset[str]:
    """Names of weights stored (in, out) rather than torch's (out, in): GPT-2's Conv1D. Methods
    that work per output row (DELLA's in-row ranks, model_stock's filter_wise, CABS's n:m blocks)
    must see them transposed."""
    from transformers.pytorch_utils import Conv1D

    return frozenset(f"{name}.weight" if name else "weight" for name, module in model.named_modules()
                     if isinstance(module, Conv1D))
