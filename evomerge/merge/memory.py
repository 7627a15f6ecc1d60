"""Memory arithmetic of a merge worker: the one home of every byte count the plans print.

A pool that does not fit should be refused, or stored smaller, before a single weight loads, so
everything here works from shapes, dtypes and a model's config alone. The :class:`Merger` plans
its own residency with :meth:`MemoryPlan.for_shapes` and refuses it with :func:`check_fits`;
``evomerge plan`` (:mod:`evomerge.plan`) adds the evaluation's activations and the workers
sharing a device, and :func:`fit_plan` picks the first evaluation batch and delta format that fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from evomerge.config import DELTA_DTYPES, DTYPES, QUANTIZED_DELTAS
from evomerge.errors import UserError
from evomerge.merge.quantized import GROUP, quantized_bytes

DeltaFormat = torch.dtype | str
"""How task vectors are stored: a float dtype, or a quantized format's name (``int8``, ``int4``)."""

SMALLER_FORMATS: tuple[DeltaFormat, ...] = (torch.bfloat16, *QUANTIZED_DELTAS)
"""What a plan that does not fit tries, in this order: each loses more precision than the one
before it, so the first that fits is the mildest change (bfloat16 halves fp32 stacks; int8 and
int4 store about 0.26 and 0.13 of them)."""


def delta_format(value: torch.dtype | str | None, dtype: torch.dtype) -> DeltaFormat:
    """``value`` as a delta format: None is the working ``dtype``, a name of
    :data:`~evomerge.config.DTYPES` its torch dtype, a name of
    :data:`~evomerge.config.QUANTIZED_DELTAS` itself; anything else is a one-line UserError."""
    if value is None:
        return dtype
    if isinstance(value, torch.dtype):
        if not value.is_floating_point:
            raise UserError(f"delta_dtype={value} is not a float dtype; valid: {', '.join(DELTA_DTYPES)}")
        return value
    if value in QUANTIZED_DELTAS:
        return value
    if value in DTYPES:
        return getattr(torch, value)
    raise UserError(f"delta_dtype={value!r} is not one of {', '.join(DELTA_DTYPES)}")


def delta_bits(delta: DeltaFormat) -> int:
    """Bits per delta element as stored (scales aside)."""
    return QUANTIZED_DELTAS[delta] if isinstance(delta, str) else 8 * itemsize(delta)


def format_name(delta: DeltaFormat) -> str:
    """A delta format as config spells it: ``bfloat16``, ``int8``."""
    return delta if isinstance(delta, str) else dtype_name(delta)


# --- LoRA experts --------------------------------------------------------------------------------


def lora_factor_dtype(delta: DeltaFormat, dtype: torch.dtype) -> torch.dtype:
    """The dtype a LoRA expert's factors are kept in: the float delta dtype, or the working
    ``dtype`` when deltas are quantized (the quantized formats apply to dense deltas only: a
    rank-16 factor is already ~100x smaller than the dense delta it stands for)."""
    return dtype if isinstance(delta, str) else delta


def lora_factor_bytes(modules: Mapping[str, Sequence[int]], rank: int | Mapping[str, int],
                      dtype: torch.dtype) -> int:
    """Bytes of one LoRA adapter held as its factors: per targeted module of weight shape
    ``(out, in)``, A (``r x in``) and B (``out x r``) in ``dtype``. ``rank`` is one rank for all
    modules or a rank per module (peft's ``rank_pattern``). The plan counts LoRA experts with
    this, and so should the engine that holds them: one home for the arithmetic."""
    elements = 0
    for name, (out_features, in_features) in modules.items():
        r = rank[name] if isinstance(rank, Mapping) else rank
        elements += r * (int(in_features) + int(out_features))
    return elements * itemsize(dtype)


@dataclass(frozen=True)
class Adapter:
    """A LoRA expert's shape: the weight shape ``(out, in)`` of each module it targets and its rank."""

    modules: Mapping[str, tuple[int, int]]
    rank: int | Mapping[str, int]

    def factor_bytes(self, delta: DeltaFormat, dtype: torch.dtype) -> int:
        return lora_factor_bytes(self.modules, self.rank, lora_factor_dtype(delta, dtype))


# --- evaluation activations ----------------------------------------------------------------------


@dataclass(frozen=True)
class Architecture:
    """What a forward pass's activations depend on, from a Hugging Face ``config.json``."""

    hidden: int
    layers: int
    vocab: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of_config(cls, config: Mapping, where: str = "config.json") -> Architecture:
        """Read from a config dict (Llama/Mistral/Qwen names first, GPT-2's as fallbacks); a
        missing size is a one-line UserError naming the keys looked for."""
        def size(*keys: str, default: int | None = None) -> int:
            for key in keys:
                if isinstance(config.get(key), int):
                    return int(config[key])
            if default is None:
                raise UserError(f"{where} has none of {', '.join(keys)}; the memory plan needs it "
                                f"to estimate the evaluation's activations")
            return default
        hidden = size("hidden_size", "n_embd", "d_model")
        heads = size("num_attention_heads", "n_head")
        return cls(hidden=hidden, layers=size("num_hidden_layers", "n_layer", "num_layers"),
                   vocab=size("vocab_size"), intermediate=size("intermediate_size", "n_inner", default=4 * hidden),
                   heads=heads, kv_heads=size("num_key_value_heads", default=heads),
                   head_dim=size("head_dim", default=hidden // heads))

    def activation_bytes(self, batch: int, sequence: int, dtype: torch.dtype, *, logit_positions: int | None = None,
                         float_logit_copies: int = 0, kv_cache: bool = True) -> int:
        """Peak bytes of one no-grad forward pass over ``batch`` rows of ``sequence`` tokens,
        an upper estimate: layers run one at a time, so one block's temporaries are live (the
        residual stream, its normed copy and the attention output; q, k and v; the attention
        scores as the math path materializes them, in float32; the MLP's gate, up and product),
        plus what outlives the blocks: the KV cache a generation keeps for every layer
        (``kv_cache``), and the logits over the whole vocabulary at the ``logit_positions`` of each
        row that the LM head runs on (None: every position, as a log-likelihood request needs; a
        decoding step keeps one), in ``dtype``, with the float32 copy a narrower dtype is scored
        in and ``float_logit_copies`` float32 tensors computed from them (a log-softmax). On a
        262k vocabulary the logits are most of the total, so counting every position where a
        path keeps one refused searches that run."""
        tokens = batch * sequence
        width = itemsize(dtype)
        kv = self.kv_heads * self.head_dim
        block = tokens * (3 * self.hidden + self.heads * self.head_dim + 2 * kv + 3 * self.intermediate) * width
        scores = batch * self.heads * sequence * sequence * 4
        cache = 2 * self.layers * tokens * kv * width if kv_cache else 0
        positions = sequence if logit_positions is None else min(logit_positions, sequence)
        scored = (0 if dtype == torch.float32 else 4) + 4 * float_logit_copies
        logits = batch * positions * self.vocab * (width + scored)
        return block + scores + cache + logits


# --- the plan ------------------------------------------------------------------------------------


def tsv_component_bytes(block_matrices: Sequence[Sequence[int]], experts: int, delta: DeltaFormat,
                        dtype: torch.dtype) -> int:
    """Bytes of TSV-M's per-expert components, which the merger computes once per tensor and keeps:
    one stack of ``experts`` tensors the shape of each of the ``block_matrices`` (the 2-D tensors
    inside the blocks; elsewhere TSV-M averages the task vectors), in the float delta format, or
    the working ``dtype`` where deltas are quantized (the components are made from dense deltas)."""
    width = itemsize(dtype if isinstance(delta, str) else delta)
    return experts * sum(math.prod(map(int, shape)) for shape in block_matrices) * width


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes one worker keeps on its device, known from shapes and dtypes before anything is
    allocated: base, deltas (dense experts' stacks and LoRA experts' factors), the working model,
    and (for a search's plan; the Merger's own leaves it 0) the evaluation's activations."""

    base: int
    deltas: int
    working: int
    experts: int
    dtype: torch.dtype
    delta_dtype: DeltaFormat
    activations: int = 0
    adapters: int = 0  # how many of ``experts`` are LoRA adapters, held as factors
    # dL/dW of every parameter, in the working dtype, while a gradient refinement steps (its
    # backward's activations are those of a few items per task: under the evaluation's batch)
    gradients: int = 0
    # what the search's methods cache per tensor for the merger's life (TSV-M's per-expert
    # components of the block matrices: :func:`tsv_component_bytes`)
    statistics: int = 0

    @classmethod
    def for_shapes(cls, shapes: Mapping[str, Sequence[int]], experts: int, dtype: torch.dtype,
                   delta_dtype: DeltaFormat, *, adapters: Sequence[Adapter] = (),
                   activations: int = 0, gradients: bool = False, statistics: int = 0) -> MemoryPlan:
        """The plan for a model whose unique parameters have ``shapes``, ``experts`` dense experts
        and the LoRA ``adapters``; the working model holds the same tensors as the base, so it
        costs the same. Quantized deltas count their codes (each tensor's groups padded to whole
        groups) and their float32 scales; LoRA factors stay float (:func:`lora_factor_dtype`)."""
        numels = [math.prod(map(int, shape)) for shape in shapes.values()]
        model_bytes = sum(numels) * itemsize(dtype)
        if isinstance(delta_dtype, str):
            per_expert = sum(quantized_bytes(n, QUANTIZED_DELTAS[delta_dtype]) for n in numels)
        else:
            per_expert = sum(numels) * itemsize(delta_dtype)
        factors = sum(adapter.factor_bytes(delta_dtype, dtype) for adapter in adapters)
        return cls(model_bytes, experts * per_expert + factors, model_bytes, experts + len(adapters), dtype,
                   delta_dtype, activations, len(adapters), model_bytes if gradients else 0, statistics)

    @property
    def resident(self) -> int:
        """What the Merger allocates: base, deltas and working model."""
        return self.base + self.deltas + self.working

    @property
    def total(self) -> int:
        return self.resident + self.activations + self.gradients + self.statistics

    def experts_text(self) -> str:
        """``4 experts``, ``16 LoRA experts``, ``2 full + 3 LoRA experts``."""
        full = self.experts - self.adapters
        if not self.adapters:
            return f"{full} experts"
        return f"{self.adapters} LoRA experts" if not full else f"{full} full + {self.adapters} LoRA experts"

    def summary(self) -> str:
        text = (f"base {size_text(self.base)} ({dtype_name(self.dtype)}) + deltas {size_text(self.deltas)} "
                f"({self.experts_text()}, {_long_format_name(self.delta_dtype)}) + working model {size_text(self.working)}")
        if self.activations:
            text += f" + activations {size_text(self.activations)}"
        if self.gradients:
            text += f" + gradients {size_text(self.gradients)}"
        if self.statistics:
            text += f" + method statistics {size_text(self.statistics)}"
        return f"{text} = {size_text(self.total)}"


@dataclass(frozen=True)
class Fit:
    """A plan checked against a device that ``workers`` workers share: the requested delta
    format's plan at the requested evaluation batch, and the plan :func:`fit_plan` chose with
    its ``batch`` (``chosen`` None when nothing fits)."""

    requested: MemoryPlan
    chosen: MemoryPlan | None
    workers: int
    memory: int
    batch: int = 0  # the evaluation batch of ``chosen`` (the requested one when nothing fits)

    def needs(self, plan: MemoryPlan) -> int:
        return self.workers * plan.total


def batch_sizes(requested: int) -> list[int]:
    """What a plan that does not fit tries for the evaluation batch: ``requested``, then halved
    down to 1."""
    sizes = [requested]
    while sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    return sizes


def fit_plan(plan_for: Callable[[DeltaFormat, int], MemoryPlan], requested: DeltaFormat, batch: int,
             workers: int, memory: int) -> Fit:
    """The first plan of which ``workers`` fit in ``memory`` bytes: the requested delta format at
    the evaluation ``batch`` and then at smaller batches (a smaller batch scores the same items,
    only slower), then each of :data:`SMALLER_FORMATS` storing fewer bits likewise (a smaller
    format changes the merges); ``chosen`` None if none does."""
    first = plan_for(requested, batch)
    formats = [requested, *(f for f in SMALLER_FORMATS if delta_bits(f) < delta_bits(requested))]
    for delta in formats:
        for size in batch_sizes(batch):
            plan = first if (delta is requested and size == batch) else plan_for(delta, size)
            if workers * plan.total <= memory:
                return Fit(first, plan, workers, memory, size)
    return Fit(first, None, workers, memory, batch)


def pool_loading_bytes(shapes: Mapping[str, Sequence[int]], stored: torch.dtype, second: torch.dtype,
                       deltas: int) -> int:
    """Peak host bytes of loading a :class:`~evomerge.pool.ModelPool` before a Merger takes it
    over: the base as its files store it (``stored``), a second model of its shapes in ``second``
    (the widest of the experts being read as stored, the float32 copy peft merges an adapter
    into, and the base's own copy made after the experts), plus ``deltas``, the task vectors
    stored as they load in the format the merger holds them (its plan's ``deltas``)."""
    numel = sum(math.prod(map(int, shape)) for shape in shapes.values())
    return numel * (itemsize(stored) + itemsize(second)) + deltas


def available_bytes(device: torch.device) -> int:
    """Memory a new allocation on ``device`` can still get: free RAM for the CPU, free device
    memory for CUDA (what the driver reports, which includes other processes' use)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    raise UserError(f"device {device} is not supported; use cpu or cuda")


def check_fits(plan: MemoryPlan, device: torch.device, reused: int = 0) -> None:
    """Refuse a plan whose new allocations (``plan.total`` less ``reused`` bytes the pool already
    holds on ``device`` and hands over) exceed what ``device`` has free, before allocating any."""
    needed = plan.total - reused
    free = available_bytes(device)
    if needed > free:
        advice = ["use fewer experts", "a smaller working dtype", "or another device"]
        bits = delta_bits(plan.delta_dtype)
        if bits > 4:
            lower = "bfloat16 or int8" if bits > 16 else "int8" if bits > 8 else "int4"
            advice.insert(0, f"lower delta_dtype (e.g. {lower})")
        raise UserError(f"the merger needs {size_text(needed)} more on {device} but only {size_text(free)} "
                        f"is free ({plan.summary()}); {', '.join(advice)}")


# --- units ---------------------------------------------------------------------------------------

_UNITS = {"": 2**30, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(text: str) -> int:
    """``80GB`` (10^9 bytes), ``79.2GiB`` (2^30), a bare number in GiB; a one-line UserError else."""
    cleaned = text.strip().lower().replace(" ", "")
    number = cleaned.rstrip("kmgtib")
    unit = cleaned[len(number):]
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or not value > 0:
        raise UserError(f"device memory {text!r} is not a size; valid: e.g. 80GB, 24GiB, 141GB, 16000MiB")
    return int(value * _UNITS[unit])


def size_text(count: int) -> str:
    """Bytes for people: MiB below a GiB, so a test-sized plan does not read as zero."""
    return f"{count / 2**30:.2f} GiB" if count >= 2**30 else f"{count / 2**20:.2f} MiB"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _long_format_name(delta: DeltaFormat) -> str:
    """A delta format for people: ``bfloat16``, or ``int8 in groups of 128 + fp32 scales``."""
    return f"{delta} in groups of {GROUP} + fp32 scales" if isinstance(delta, str) else dtype_name(delta)
