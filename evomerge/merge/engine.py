"""The Merger: a pool held resident on one device, writing any recipe's weights into a model in place.

A search scores thousands of candidates, and each one is a recipe applied to the same base and
task vectors. So everything that does not depend on the recipe is done once: each tensor's task
vectors are stacked as one ``[K, n]`` matrix (optionally in a lower precision than the model, to
fit large pools), the base is kept beside the working model, and magnitude quantiles are
computed the first time a sparsifying method needs a tensor. A candidate then costs one pass over
the tensors: the common linear methods are one matrix-vector product written straight into the
parameter, the others call the pure functions of :mod:`evomerge.merge.methods` tensor by tensor.
Nothing model-sized is allocated per candidate, and nothing of one candidate survives into the
next: every merged tensor is recomputed from the base and the task vectors.

Task vectors may also be stored quantized (``delta_dtype`` ``int8`` or ``int4``, see
:mod:`evomerge.merge.quantized`) or, for LoRA-adapter experts, as factors
(:mod:`evomerge.merge.factored`). Methods never see either: the engine dequantizes or multiplies
out one tensor's stack where it needs dense deltas (a column block at a time for the linear
methods over codes; never for factors, which the linear methods apply as one rank-r product), so
the extra memory is one tensor's dense stack, never the pool's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from evomerge.config import QUANTIZED_DELTAS
from evomerge.errors import UserError
from evomerge.merge import kernels, methods, registry
from evomerge.merge.factored import FactoredStack, LowRank
from evomerge.merge.memory import (Adapter, DeltaFormat, MemoryPlan, check_fits, delta_format,  # noqa: F401 - re-exported
                                   itemsize, lora_factor_dtype)
from evomerge.merge.quantized import GROUP, QuantizedStack, quantized_bytes
from evomerge.merge.registry import MergeParams
from evomerge.merge.stats import DeltaStats
from evomerge.architecture import transposed_weights
from evomerge.model_files import unique_parameters
from evomerge.pool import ModelPool
from evomerge.recipe import MethodConfig, Recipe

# Methods that are base plus a fixed combination of task vectors: one BLAS pass (kernels.combine).
_LINEAR_METHODS = frozenset({"linear", "task_arithmetic"})

def pool_plan(pool: ModelPool, dtype: torch.dtype, delta_dtype: DeltaFormat) -> MemoryPlan:
    """The plan for ``pool`` as the Merger will hold it: full experts' dense stacks, each
    adapter's factors (:class:`~evomerge.merge.memory.Adapter`), and the few tensors an adapter
    changes densely (DoRA, ``modules_to_save``) as dense rows; nothing for what it leaves alone."""
    full, adapters, extra = 0, [], 0
    for expert, tau in pool.task_vectors.items():
        if expert not in pool.adapters:
            full += 1
            continue
        factors = {name: d for name, d in tau.items() if isinstance(d, LowRank)}
        adapters.append(Adapter({name: f.shape for name, f in factors.items()},
                                {name: f.rank for name, f in factors.items()}))
        for name, entry in tau.items():
            if not isinstance(entry, LowRank):
                numel = pool.base[name].numel()
                extra += (quantized_bytes(numel, QUANTIZED_DELTAS[delta_dtype]) if isinstance(delta_dtype, str)
                          else numel * itemsize(delta_dtype))
    plan = MemoryPlan.for_shapes({k: v.shape for k, v in pool.base.items()}, full, dtype, delta_dtype,
                                 adapters=adapters)
    return dataclasses.replace(plan, deltas=plan.deltas + extra)


# --- recipe translation --------------------------------------------------------------------------


def merge_params(config: MethodConfig, experts: Sequence[str]) -> tuple[MergeParams, list[int]]:
    """The method's parameters for ``config``, resolved and checked against its schema, and the
    indices (into ``experts``, the pool's order) of the experts it merges; an expert the config
    leaves out takes no part."""
    included = [i for i, name in enumerate(experts) if name in config.experts]
    spec = registry.method(config.method)
    per_expert = {p.name: [config.experts[experts[i]][p.name] for i in included] for p in spec.expert_params}
    params = MergeParams(**config.params, **per_expert)
    return registry.resolve(config.method, params, [experts[i] for i in included]), included


def layer_fraction(name: str, layer: int | None, num_layers: int) -> float:
    """Depth of a tensor for layer-aware methods: 0 for the embeddings, ``layer / (N - 1)`` in the
    blocks, and 1 for the final norm and head, which sit above the last block."""
    if layer is None:
        return 0.0 if "embed" in name else 1.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def tensor_seed(recipe_seed: int, name: str) -> int:
    """Seed of one tensor's random draws: stable across processes (unlike ``hash``), different
    per tensor so masks are independent, and a function of the recipe so one recipe is one model."""
    digest = hashlib.sha256(f"{recipe_seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class _ExpertSubset:
    """Stats of all K experts seen through the experts a config merges."""

    stats: DeltaStats
    indices: tuple[int, ...]

    def magnitude_threshold(self, expert_index: int, keep_fraction: float) -> float:
        return self.stats.magnitude_threshold(self.indices[expert_index], keep_fraction)

    def row_ranks(self) -> Tensor:
        return self._select(self.stats.row_ranks())

    def l1_norms(self) -> Tensor:
        return self._select(self.stats.l1_norms())

    def ranked_l1_norms(self) -> Tensor:
        return self._select(self.stats.ranked_l1_norms())

    def singular_factors(self) -> tuple[Tensor, Tensor, Tensor]:
        u, s, vh = self.stats.singular_factors()
        return self._select(u), self._select(s), self._select(vh)

    def tsv_components(self, rank: int) -> Tensor:
        return self.stats.tsv_components(rank, self.indices)

    def _select(self, per_expert: Tensor) -> Tensor:
        return per_expert.index_select(0, torch.tensor(self.indices, device=per_expert.device))


@dataclass(frozen=True)
class _Plan:
    """A validated config, translated once per candidate rather than once per tensor."""

    method: str
    params: MergeParams
    included: tuple[int, ...]


# --- the merger ----------------------------------------------------------------------------------


class Merger:
    """Base, stacked task vectors and one working model, resident on one device.

    Built from a :class:`ModelPool`, whose tensors it takes over: the pool's base becomes the
    merger's base and its task vectors become views of the merger's stacks, so the pool stays
    usable without being held twice, and its model becomes the working model. ``dtype`` is the
    working model's (and base's) dtype, ``delta_dtype`` the stacks' (default: ``dtype``): a float
    dtype, or ``int8`` / ``int4`` for group-wise quantized stacks (:mod:`evomerge.merge.quantized`),
    whose rows the pool's entries then are (one-row stacks of views; ``pool.delta`` dequantizes).
    ``quantile_resolution`` sets the magnitude quantile table per tensor: tensors of at most
    ``resolution + 1`` elements get exact thresholds, larger ones interpolate, keeping within
    ``numel / resolution`` elements of the exact count. The tables (a few KiB per tensor) and
    DELLA's in-row ranks (2 bytes per delta element, only for tensors DELLA merges: a quarter of
    an fp32 stack on top of the memory plan) are built on first use and kept for the merger's life,
    as are TSV-M's per-expert components (one more delta stack, in the stacks' dtype, for the
    block matrices; a search's plan counts them: ``memory.tsv_component_bytes``) and STAR's SVD
    factors (1.4 to 2 fp32 stacks), which no plan counts.
    Over quantized stacks these are built from the dense deltas, in the working precision: a
    TSV-M component stack then costs about 4 int8 stacks.
    """

    def __init__(self, pool: ModelPool, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, delta_dtype: torch.dtype | str | None = None,
                 quantile_resolution: int = 1024) -> None:
        self.device = _concrete(torch.device(device))
        self.dtype = dtype
        self.delta_dtype = delta_format(delta_dtype, dtype)
        # quantized deltas are made dense in the merge's working precision, where the kernels
        # would upcast a float stack anyway
        self._dense_dtype = kernels.work_dtype(dtype)
        self.experts = pool.expert_names
        self.quantile_resolution = quantile_resolution
        self.plan = pool_plan(pool, dtype, self.delta_dtype)
        check_fits(self.plan, self.device, _bytes_on(pool, self.device))
        self.pool = pool
        self.tokenizer = pool.tokenizer
        self.model = pool.model.to(device=self.device, dtype=dtype)
        self._base: dict[str, Tensor] = {}
        self._stacks: dict[str, Tensor | QuantizedStack | FactoredStack] = {}
        for name in list(pool.base):
            self._take(pool, name)
        self.layout = pool.layout
        self._where = {name: self.layout.where(name) for name in self._base}
        self.num_layers = self.layout.num_layers
        self._transposed = transposed_weights(self.model) & self._base.keys()
        self._stats: dict[str, DeltaStats] = {}
        self._compile_all = any(kernels.compiles(_dense_numel(stack)) for stack in self._stacks.values())

    @property
    def quantized(self) -> bool:
        """Whether the task vectors are stored quantized (int8 / int4)."""
        return isinstance(self.delta_dtype, str)

    def _take(self, pool: ModelPool, name: str) -> None:
        """Move one tensor's base and task vectors onto the device, stacked; the pool's entries
        become views of the result (rows of codes over quantized stacks), so the old copies are
        freed tensor by tensor. Rows the pool already quantized to this format are stacked as
        they are: the same codes as quantizing the dense stack."""
        base = pool.base[name].to(device=self.device, dtype=self.dtype)
        entries = [pool.task_vectors[expert].get(name) if expert in pool.adapters else pool.task_vectors[expert][name]
                   for expert in self.experts]
        dense_rows = [i for i, entry in enumerate(entries) if isinstance(entry, (Tensor, QuantizedStack))]
        dense = None
        if dense_rows:
            rows = [entries[i] for i in dense_rows]
            bits = QUANTIZED_DELTAS[self.delta_dtype] if self.quantized else None
            if bits is not None and all(isinstance(r, QuantizedStack) and r.bits == bits for r in rows):
                dense = QuantizedStack.stacked([r.to(self.device) for r in rows])
            else:
                dense_dtype = self._dense_dtype if self.quantized else self.delta_dtype
                dense = torch.empty((len(rows), base.numel()), dtype=dense_dtype, device=self.device)
                for row, entry in enumerate(rows):
                    dense[row].copy_((entry.dense(dense_dtype)[0] if isinstance(entry, QuantizedStack)
                                      else entry).reshape(-1))
                if self.quantized:
                    dense = QuantizedStack.of(dense, bits)
            for row, i in enumerate(dense_rows):
                pool.task_vectors[self.experts[i]][name] = (dense.row(row) if self.quantized
                                                            else dense[row].view(base.shape))
        pool.base[name] = base
        self._base[name] = base
        if len(dense_rows) == len(self.experts):
            self._stacks[name] = dense
            return
        factors = {}
        for i, entry in enumerate(entries):
            if isinstance(entry, LowRank):
                factors[i] = entry.to(self.device, lora_factor_dtype(self.delta_dtype, self.dtype))
                pool.task_vectors[self.experts[i]][name] = factors[i]
        self._stacks[name] = FactoredStack(tuple(base.shape), len(self.experts), tuple(dense_rows), dense,
                                           factors, self.device)

    def memory_plan(self) -> MemoryPlan:
        return self.plan

    # --- what gradient refinement reads (evomerge.merge.weight_grad) ------------------------------

    def tensor_names(self) -> list[str]:
        """The names of the tensors this merger writes, one per unique parameter."""
        return list(self._base)

    def base_tensor(self, name: str) -> Tensor:
        """The base model's ``name``, on the device in the working dtype (read, never written)."""
        return self._base[name]

    def where(self, name: str) -> tuple[int | None, str]:
        """(block, component) of tensor ``name``: what a recipe's ``config_for`` is asked."""
        return self._where[name]

    def transposed(self, name: str) -> bool:
        """Whether ``name`` is stored (in, out) (Conv1D), so row-wise methods see its transpose."""
        return name in self._transposed

    def dense_deltas(self, name: str) -> Tensor:
        """``[K, n]``: every expert's task vector of ``name``, flat, in a float dtype (a view of a
        dense stack; quantized or factored stacks are made dense for the call)."""
        stack = self._stacks[name]
        if isinstance(stack, (QuantizedStack, FactoredStack)):
            return stack.dense(self._dense_dtype).view(len(self.experts), -1)
        return stack.view(len(self.experts), -1)

    def statistics(self, name: str) -> DeltaStats:
        """The cached statistics of ``name`` (TSV-M's components among them), built on first use."""
        return self._stats_of(name)

    def method_plans(self, recipe: Recipe) -> dict[MethodConfig, tuple[str, MergeParams, tuple[int, ...]]]:
        """Each config of ``recipe`` as (method, resolved parameters, indices of its experts),
        validated as ``materialize`` validates it."""
        return {config: (plan.method, plan.params, plan.included) for config, plan in self._plans(recipe).items()}

    def drop_statistics(self) -> None:
        """Free the per-tensor statistics built so far (rebuilt on next use). For merges made
        once, like a data-flow search's source models: TSV-M's components alone are one more
        delta stack, which two workers of a path search cannot afford to keep for nothing."""
        self._stats.clear()

    def cached_bytes(self) -> int:
        """Bytes of the per-tensor statistics built so far (tables, ranks, SVDs, TSV-M components)."""
        return sum(stats.cached_bytes() for stats in self._stats.values())

    # --- validation ------------------------------------------------------------------------------

    def validate(self, recipe: Recipe) -> None:
        """Raise a one-line UserError for a recipe this pool cannot merge; touches no weights."""
        self._plans(recipe)

    def _plans(self, recipe: Recipe) -> dict[MethodConfig, _Plan]:
        unknown = [name for name in recipe.experts if name not in self.experts]
        if unknown:
            raise UserError(f"recipe expert {unknown[0]!r} is not in the pool; pool experts: "
                            f"{', '.join(self.experts)}")
        if recipe.num_layers != self.num_layers:
            raise UserError(f"recipe has {recipe.num_layers} layers but the pool's model has "
                            f"{self.num_layers}; the recipe was made for another model")
        if any(group.component != "all" for group in recipe.groups):
            self.layout.marks()  # refused, in one line, for a family whose attn/mlp names are unknown
        configs = [recipe.outside] + [group.config for group in recipe.groups]
        plans = {}
        for config in configs:
            params, included = merge_params(config, self.experts)
            plans[config] = _Plan(config.method, params, tuple(included))
        return plans

    # --- materialization -------------------------------------------------------------------------

    def materialize(self, recipe: Recipe, into: torch.nn.Module | None = None) -> torch.nn.Module:
        """Write ``recipe``'s merged weights into ``into`` (default: the working model) in place
        and return it. The recipe is validated first, so a bad one leaves the weights as they were.
        Randomized methods draw from a generator seeded by the recipe and the tensor's name."""
        model = self.model if into is None else into
        plans = self._plans(recipe)
        targets = self._targets(model)
        with torch.no_grad(), kernels.compiling_every_tensor(self._compile_all):
            for name, target in targets.items():
                layer, component = self._where[name]
                plan = plans[recipe.config_for(layer, component)]
                self._merge_into(name, plan, recipe, target)
        return model

    def _targets(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """The model's unique parameters as flat views, checked to be writable by this merger."""
        params = unique_parameters(model)
        if params.keys() != self._base.keys():
            odd = sorted(params.keys() ^ self._base.keys())[0]
            raise ValueError(f"model parameter {odd!r} does not match the pool's tensors")
        for name, param in params.items():
            if param.dtype != self.dtype or param.device != self.device or not param.is_contiguous():
                raise ValueError(f"parameter {name} is {param.dtype} on {param.device}; the merger "
                                 f"writes contiguous {self.dtype} tensors on {self.device}")
        return {name: param.view(-1) for name, param in params.items()}

    def _merge_into(self, name: str, plan: _Plan, recipe: Recipe, target: Tensor) -> None:
        if plan.method in _LINEAR_METHODS:
            scale, coefficients = self._linear_coefficients(plan)
            self._write_combination(name, scale, coefficients, target)
            return
        base = self._base[name]
        stack = self._stacks[name]
        index = torch.tensor(plan.included, device=self.device)
        every = len(plan.included) == len(self.experts)
        if isinstance(stack, (QuantizedStack, FactoredStack)):  # dense for this tensor's merge only
            deltas = (stack if every else stack.select(index)).dense(self._dense_dtype).view(-1, *base.shape)
        else:
            deltas = (stack if every else stack.index_select(0, index)).view(-1, *base.shape)
        flip = name in self._transposed  # stored (in, out): per-row methods must see (out, in) rows
        if flip:
            base, deltas = base.T.contiguous(), deltas.transpose(1, 2).contiguous()
        layer, _ = self._where[name]
        params = plan.params.in_context(layer_fraction=layer_fraction(name, layer, self.num_layers),
                                        in_block=layer is not None)
        generator = None
        spec = registry.METHODS[plan.method]
        if spec.randomized:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(tensor_seed(recipe.seed, name))
        stats = None
        lent = contextlib.nullcontext()
        if spec.reads_stats:  # cached: a table lookup replaces a sort, a stored SVD a new one
            stats = self._stats_of(name)
            if every and (flip or isinstance(stack, (QuantizedStack, FactoredStack))):
                lent = stats.lending(deltas)  # first-use statistics read the stack made above
            stats = stats if every else _ExpertSubset(stats, plan.included)
        with lent:
            merged = methods.merge_tensor(plan.method, base, deltas, params, generator, stats,
                                          out=None if flip else target.view(base.shape))
        if flip:
            target.view(base.T.shape).copy_(merged.T)

    def _linear_coefficients(self, plan: _Plan) -> tuple[float, list[float]]:
        """``(scale, c)`` with merged = scale * base + sum_i c_i * delta_i, over all pool experts
        (0 for those the config leaves out); mergekit's semantics, as in ``methods``."""
        params = plan.params
        weights = params.weight
        total = sum(weights)
        coefficients = [0.0] * len(self.experts)
        normalize = params.normalize
        if plan.method == "linear":
            scale, factor = (1.0, 1 / total) if normalize else (total, 1.0)
        else:
            divisor = total if normalize and abs(total) >= 1e-8 else 1.0
            scale, factor = 1.0, params.lambda_ / divisor
        for i, weight in zip(plan.included, weights):
            coefficients[i] = weight * factor
        return scale, coefficients

    def _write_combination(self, name: str, scale: float, coefficients: list[float],
                           target: Tensor) -> None:
        """target = scale * base + stack^T c. A quantized stack's whole groups are dequantized in
        the combining pass (:func:`kernels.combine_codes`), a column block at a time so an eager
        fallback's temporaries stay bounded; a last short group goes through :func:`kernels.combine`. Factors are
        added as one rank-r product after the dense experts."""
        base, stack = self._base[name].view(-1), self._stacks[name]
        if isinstance(stack, FactoredStack):
            dense = [coefficients[i] for i in stack.dense_rows]
            if stack.dense_part is None:
                torch.mul(base, scale, out=target)
            else:
                self._combine_dense(base, stack.dense_part, scale, dense, target)
            stack.add_low_rank(coefficients, target)
            return
        self._combine_dense(base, stack, scale, coefficients, target)

    def _combine_dense(self, base: Tensor, stack: Tensor | QuantizedStack, scale: float,
                       coefficients: list[float], target: Tensor) -> None:
        if not isinstance(stack, QuantizedStack):
            kernels.combine(base, stack, scale, coefficients, target)
            return
        for start, end in stack.blocks():
            whole = start + (end - start) // GROUP * GROUP
            if whole > start:
                codes, scales = stack.groups(start, whole)
                kernels.combine_codes(base[start:whole], codes, scales, stack.bits, scale, coefficients,
                                      target[start:whole])
            if end > whole:
                kernels.combine(base[whole:end], stack.dense(self._dense_dtype, whole, end), scale, coefficients,
                                target[whole:end])

    def _stats_of(self, name: str) -> DeltaStats:
        """Made the first time a sparsifying method merges ``name``; it fills itself on use. A
        quantized stack's statistics make it dense when they are built, and keep no dense copy."""
        if name not in self._stats:
            shape, stack = self._base[name].shape, self._stacks[name]
            if isinstance(stack, (QuantizedStack, FactoredStack)):
                source = lambda: stack.dense(self._dense_dtype).view(-1, *shape)  # noqa: E731
            else:
                source = stack.view(-1, *shape)
            if name in self._transposed:  # the statistics of the (out, in) rows the merge sees
                stored = source
                source = lambda: (stored() if callable(stored) else stored).transpose(1, 2).contiguous()  # noqa: E731
            self._stats[name] = DeltaStats(source, resolution=self.quantile_resolution)
        return self._stats[name]


# --- helpers -------------------------------------------------------------------------------------


def _bytes_on(pool: ModelPool, device: torch.device) -> int:
    """Bytes of the pool's tensors already on ``device``: the merger reuses or frees them."""
    deltas = [d for tv in pool.task_vectors.values() for d in tv.values()]
    factors = [t for d in deltas if isinstance(d, LowRank) for t in (d.left, d.right)]
    codes = [t for d in deltas if isinstance(d, QuantizedStack) for t in (d.codes, d.scales)]
    tensors = [*pool.base.values(), *(d for d in deltas if isinstance(d, Tensor)), *factors, *codes,
               *unique_parameters(pool.model).values()]
    return sum(t.nbytes for t in tensors if t.device == device)


def _dense_numel(stack: Tensor | QuantizedStack | FactoredStack) -> int:
    return stack.numel() if isinstance(stack, Tensor) else stack.dense_numel()


def _concrete(device: torch.device) -> torch.device:
    """``cuda`` as the ``cuda:N`` that tensors report, so device comparisons mean what they say."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
