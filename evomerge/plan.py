"""``evomerge plan``: what a search's workers will hold, from metadata alone, before anything loads.

A pool that does not fit its device used to be found out after minutes of loading (or by the
kernel's OOM killer). Here the models are read as little as possible: each safetensors file's
header (8 bytes of length, then JSON naming every tensor's dtype and shape; the weights behind it
are never read, so header-only files plan like real ones), ``config.json`` for the evaluation's
activations, and for a LoRA expert (a folder holding ``adapter_config.json``) its adapter's
header, whose A and B factors are what a worker keeps of it. The bytes are counted by
:mod:`evomerge.merge.memory`, the one home of that arithmetic; this module only reads and tells.

The evaluation's activations are those of the forward pass that keeps the most logits of the
ones the search's tasks and objectives make (:func:`evaluation_paths`): on a large vocabulary the
logits are most of a worker's memory, and a decoding step keeps one position per row where a
log-likelihood request keeps all. When the plan does not fit, smaller evaluation batches are
tried (the same scores, slower), then the first of bfloat16, int8 and int4 that fits (``search``
then uses what was chosen); when nothing does, one line says what to change. Streaming deltas
from host memory to a GPU would be the next resort and is not built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from evomerge.config import Config, read_config
from evomerge.errors import UserError, first_line
from evomerge.adapters import lora_factors
from evomerge.model_files import folder_header, header_shapes, stored_dtype
from evomerge.pool import local_ref
from evomerge.fitness.text import PERPLEXITY_WINDOW
from evomerge.merge.memory import (SMALLER_FORMATS, Adapter, Architecture, Fit, MemoryPlan, delta_format,
                                   dtype_name, fit_plan, format_name, pool_loading_bytes, size_text,
                                   tsv_component_bytes)

EVAL_SEQUENCE = 256
"""Tokens per row the activations are planned for. The evaluator fixes no length: it pads a batch
of ``fitness.batch_size`` rows (tasks.TaskSuite) to its longest prompt plus answer. 256 is the
perplexity objective's window (text.token_windows) and lm-eval's default answer budget
(``max_gen_toks``, tasks.py); the zoo's prompts are far shorter. Long-context tasks: pass
``--sequence-length``."""



# --- reading metadata ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelMeta:
    """A full model as the plan sees it: its config and the shapes of its unique parameters."""

    ref: str
    config: dict
    shapes: dict[str, tuple[int, ...]]
    stored: torch.dtype = torch.float32  # the dtype its files hold the weights in: what a pool loads it in


def read_model(ref: str) -> ModelMeta:
    """``ref``'s config and parameter shapes (a tied ``lm_head.weight`` is the embedding's tensor,
    held once, as ``unique_parameters`` holds it)."""
    files = _metadata_files(ref)
    if "adapter_config.json" in files:
        raise UserError(f"model {ref} is a LoRA adapter (adapter_config.json); name it as an expert, "
                        f"with the model it adapts as models.base")
    config = files["config.json"]
    shapes = files["shapes"]
    if not shapes:
        raise UserError(f"model {ref} has no *.safetensors weights; the plan reads their headers")
    if config.get("tie_word_embeddings") is True:
        shapes.pop("lm_head.weight", None)
    return ModelMeta(ref, config, shapes, stored_dtype(files["dtypes"]))


def read_expert(ref: str, base: ModelMeta) -> ModelMeta | Adapter:
    """A full expert (checked against the base's shapes) or a LoRA adapter's factor shapes."""
    files = _metadata_files(ref)
    if "adapter_config.json" not in files:
        expert = read_model(ref)
        for name, shape in base.shapes.items():
            if expert.shapes.get(name, shape) != shape:
                raise UserError(f"expert {ref} tensor {name!r} has shape {list(expert.shapes[name])}, base "
                                f"{base.ref} has {list(shape)}; experts must be fine-tunes of the same base")
        return expert
    return _adapter(ref, files["shapes"])


def _adapter(ref: str, shapes: Mapping[str, tuple[int, ...]]) -> Adapter:
    """Each targeted module's ``(out, in)`` and rank, as :func:`~evomerge.adapters.lora_factors` reads them."""
    factors = lora_factors(ref, shapes)
    return Adapter({m: (f.out_features, f.in_features) for m, f in factors.items()},
                   {m: f.rank for m, f in factors.items()})


def _metadata_files(ref: str) -> dict[str, Any]:
    """``config.json`` / ``adapter_config.json`` (parsed) and ``shapes`` (every safetensors
    header merged) of a local folder, or of a hub id through the hub's header endpoint."""
    local = local_ref(ref)
    if local is None:
        return _hub_files(ref)
    path, gguf_file = local
    if gguf_file is not None:
        raise UserError(f"model {ref} is a .gguf file, which loads dequantized; plan with its "
                        f"safetensors original instead")
    out: dict[str, Any] = {name: json.loads((path / name).read_text())
                           for name in ("config.json", "adapter_config.json") if (path / name).is_file()}
    header = folder_header(path)
    out["shapes"] = header_shapes(header)
    out["dtypes"] = [entry.get("dtype", "") for entry in header.values()]
    return out


def _hub_files(repo: str) -> dict[str, Any]:
    """A hub repo's configs and safetensors headers (HTTP range reads; no weights downloaded)."""
    from huggingface_hub import get_safetensors_metadata, hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        out: dict[str, Any] = {}
        for name in ("config.json", "adapter_config.json"):
            try:
                out[name] = json.loads(Path(hf_hub_download(repo, name)).read_text())
            except EntryNotFoundError:
                pass
        metadata = get_safetensors_metadata(repo)
        tensors = [(name, info) for file in metadata.files_metadata.values() for name, info in file.tensors.items()]
        out["shapes"] = {name: tuple(info.shape) for name, info in tensors}
        out["dtypes"] = [str(info.dtype) for _, info in tensors]
        return out
    except Exception as error:  # offline, unknown repo, gated: all mean "cannot plan this id"
        raise UserError(f"hub id {repo!r}: headers could not be fetched ({first_line(error)}); pass a local folder") from None


# --- what the evaluator runs ---------------------------------------------------------------------


@dataclass(frozen=True)
class TaskShape:
    """What the plan needs of a task: how it is scored and how long its answers may be."""

    output_type: str  # lm-eval's: generate_until, loglikelihood, multiple_choice, ...
    max_gen_toks: int  # 0 for tasks that generate nothing
    native: bool  # scored by fitness.native (False: by lm-eval's HF model)


@dataclass(frozen=True)
class EvaluationPath:
    """One kind of forward pass the evaluator makes, by the logits it keeps per row."""

    what: str
    rows: int
    sequence: int
    logit_positions: int | None  # None: every position
    float_logit_copies: int = 0  # float32 tensors of the logits' size computed from them
    kv_cache: bool = False  # whether the pass keeps every layer's keys and values (decoding does)

    def bytes(self, architecture: Architecture, dtype: torch.dtype) -> int:
        return architecture.activation_bytes(self.rows, self.sequence, dtype, logit_positions=self.logit_positions,
                                             float_logit_copies=self.float_logit_copies, kv_cache=self.kv_cache)

    def text(self) -> str:
        kept = ("logits at every position" if self.logit_positions is None else
                f"logits at {min(self.logit_positions, self.sequence)} position"
                f"{'s' if min(self.logit_positions, self.sequence) > 1 else ''} per row")
        return f"{self.what}: batch {self.rows} x {self.sequence} tokens, {kept}"


def evaluation_paths(tasks: tuple[TaskShape, ...] | None, batch: int, sequence: int, *,
                     teacher_forcing: bool, perplexity: bool) -> list[EvaluationPath]:
    """The forward passes scoring ``tasks`` makes at evaluation ``batch``, as fitness.native and
    lm-eval run them: a decoding step's LM head runs on the last position (native ``generate``
    asks for ``logits_to_keep=1``, as transformers' ``generate`` does for lm-eval) and its KV
    cache holds every layer; teacher forcing runs on the reference's positions, at most
    ``max_gen_toks`` + 1, without a cache; a native log-likelihood request on every position
    without a cache, lm-eval's with its cache and a log-softmax of the whole batch; the
    perplexity objective on every position of a quarter batch of windows, with its
    log-softmax. Unknown tasks (None) count as lm-eval's log-likelihood, the most a task keeps."""
    paths = []
    for shape in tasks if tasks is not None else (None,):
        if shape is not None and shape.output_type == "generate_until":
            paths.append(EvaluationPath("decoding", batch, sequence, 1, kv_cache=True))
            if teacher_forcing and shape.native:
                paths.append(EvaluationPath("teacher forcing", batch, sequence, shape.max_gen_toks + 1))
        elif shape is not None and shape.native:
            paths.append(EvaluationPath("log-likelihood", batch, sequence, None))
        else:
            what = "lm-eval's log-likelihood" if shape is not None else "log-likelihood (tasks not known to the plan)"
            paths.append(EvaluationPath(what, batch, sequence, None, 1, kv_cache=True))
    if perplexity:
        paths.append(EvaluationPath("perplexity", max(1, batch // 4), PERPLEXITY_WINDOW, None, 1))
    return paths


def task_shapes(typed: Config) -> tuple[TaskShape, ...] | None:
    """How the search's tasks are scored: the zoo's skill tasks from their definition, named
    tasks as lm-eval loads them; None where the tasks are not known yet (own models and no
    ``tasks``, which the search refuses) or cannot be loaded here (a hub task offline: the
    search says why when it loads them)."""
    if typed.tasks is None:
        if not typed.searches_zoo:
            return None
        from evomerge.zoo.tasks import MAX_GEN_TOKS

        return (TaskShape("generate_until", MAX_GEN_TOKS, typed.fitness.native),)
    from evomerge.fitness.tasks import Task, load_lm_eval_tasks

    include = typed.include_path
    if include is None and typed.searches_zoo:
        from evomerge.zoo.build import Zoo

        include = str(Zoo.at(typed.zoo).task_dir)
    try:
        loaded = load_lm_eval_tasks([str(t) for t in typed.tasks], include, "validation")
        tasks = [Task(name, lm_task, "validation", allow_native=typed.fitness.native) for name, lm_task in loaded.items()]
    except Exception:  # the plan is an estimate: the search itself refuses such tasks in one line
        return None
    return tuple(TaskShape(t.output_type, t.max_gen_toks, t.native) for t in tasks)


# --- the plan of a search ------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchPlan:
    """A search's worker plan against its device: what ``plan`` prints and ``search`` obeys."""

    fit: Fit
    device: str
    memory_source: str
    batch: int  # fitness.batch_size as configured; the plan's is ``fit.batch``
    evaluation: EvaluationPath  # the forward pass keeping the most, at ``fit.batch``: the activations
    base: str
    loading: int = 0  # host bytes while a worker's pool loads (memory.pool_loading_bytes)
    fallbacks: tuple[MemoryPlan, ...] = ()  # every format's plan at batch 1, tried when nothing fit
    refine_dropped: bool = False  # refine.at=auto whose gradients do not fit: the search runs without

    @property
    def plan(self) -> MemoryPlan:
        """The plan the workers will run: the chosen one, or the requested one when none fits."""
        return self.fit.chosen or self.fit.requested

    @property
    def changed(self) -> bool:
        return self.fit.chosen is not None and self.fit.chosen.delta_dtype != self.fit.requested.delta_dtype

    @property
    def batch_changed(self) -> bool:
        return self.fit.chosen is not None and self.fit.batch != self.batch

    def lines(self) -> list[str]:
        """The plan for people: per worker, then the workers sharing the device against its memory."""
        plan, fit = self.plan, self.fit
        workers = f"{fit.workers} worker{'s' if fit.workers > 1 else ''}"
        per_device = "runtime.workers share its memory" if self.device == "cpu" else "one worker per GPU"
        lines = [
            f"memory plan of {self.base} (from config.json and safetensors headers; no weights read)",
            f"  device: {self.device}, {size_text(fit.memory)} ({self.memory_source}); {per_device}",
            f"  per worker: base {size_text(plan.base)} ({dtype_name(plan.dtype)})",
            f"              deltas {size_text(plan.deltas)} ({plan.experts_text()}, {format_name(plan.delta_dtype)})",
            f"              working model {size_text(plan.working)}",
            f"              evaluation activations {size_text(plan.activations)} "
            f"({self.evaluation.text()}, estimated)",
            *([f"              gradients {size_text(plan.gradients)} (refine.at: dL/dW of every parameter)"]
              if plan.gradients else []),
            *([f"              method statistics {size_text(plan.statistics)} (TSV-M's per-expert components "
               f"of the block matrices)"] if plan.statistics else []),
            f"              total {size_text(plan.total)}",
            f"  {workers} x {size_text(plan.total)} = {size_text(fit.needs(plan))} of "
            f"{size_text(fit.memory)}: {'fits' if fit.chosen else 'does not fit'}",
        ]
        lines.append(f"  loading: each worker's pool peaks at {size_text(self.loading)} of host RAM (base and "
                     f"the expert being read as their files store them, task vectors stored as "
                     f"{format_name(plan.delta_dtype)} as they load; not checked)")
        if self.batch_changed:
            lines.append(f"  fitness.batch_size={self.batch} does not fit: using fitness.batch_size={self.fit.batch}, "
                         f"the largest that fits (the same items, scored in smaller batches)")
        if self.changed:
            lines.append(f"  {format_name(fit.requested.delta_dtype)} deltas would need "
                         f"{size_text(fit.needs(fit.requested))}: using runtime.delta_dtype="
                         f"{format_name(plan.delta_dtype)}, the first of bfloat16, int8, int4 that fits")
        if self.refine_dropped:
            lines.append("  refine.at=auto: the refinement's gradients do not fit beside the rest, so this "
                         "search runs without it (refine.at=final asks for it regardless)")
        return lines

    def refusal(self) -> str | None:
        """One line naming what to change when nothing fits; None when something does."""
        if self.fit.chosen is not None:
            return None
        fit, plan = self.fit, self.fit.requested
        smallest = min((fit.requested, *self.fallbacks), key=lambda p: p.total)
        advice = []
        if fit.workers > 1:
            advice.append(f"fewer workers per device (runtime.workers={fit.workers}; 1 needs "
                          f"{size_text(smallest.total)})")
        advice += ["fewer experts", f"or a device of more than {size_text(fit.needs(smallest))}"]
        smaller = (f", still {size_text(fit.needs(smallest))} with {format_name(smallest.delta_dtype)} at "
                   f"fitness.batch_size=1" if smallest.total < plan.total
                   else ", and no smaller delta format or batch makes it smaller")
        return (f"the search does not fit {self.device} ({size_text(fit.memory)}): {fit.workers} x "
                f"{size_text(plan.total)} with {format_name(plan.delta_dtype)} deltas{smaller}; fit it with "
                f"{', '.join(advice)} (streaming deltas from host memory to the GPU is not built: no GPU "
                f"was at hand to build and measure it)")


def plan_search(config: Mapping[str, Any], *, device_memory: int | None = None,
                sequence: int = EVAL_SEQUENCE) -> SearchPlan:
    """The worker plan of the composed ``config`` on its device (``device_memory`` bytes, default:
    free RAM for cpu, the CUDA device's total memory), from metadata only."""
    typed = read_config(config)
    base_ref, expert_refs = _model_refs(typed)
    base = read_model(base_ref)
    experts = [read_expert(ref, base) for ref in expert_refs.values()]
    adapters = [e for e in experts if isinstance(e, Adapter)]
    dense = len(experts) - len(adapters)
    runtime = typed.runtime
    dtype = getattr(torch, runtime.dtype)
    requested = delta_format(runtime.delta_dtype, dtype)
    architecture = Architecture.of_config(base.config, f"{base_ref}/config.json")
    shapes = task_shapes(typed)

    def largest_path(batch: int) -> EvaluationPath:
        paths = evaluation_paths(shapes, batch, sequence, teacher_forcing=typed.fitness.teacher_forcing,
                                 perplexity="perplexity" in typed.fitness.objectives)
        return max(paths, key=lambda p: p.bytes(architecture, dtype))

    from evomerge.search.settings import effective_refine

    refining = effective_refine(typed.refine, typed.space).at == "final"

    matrices = _tsv_block_matrices(typed, base)

    def plan_for(delta, batch: int, gradients: bool | None = None):
        gradients = refining if gradients is None else gradients
        return MemoryPlan.for_shapes(base.shapes, dense, dtype, delta, adapters=adapters,
                                     activations=largest_path(batch).bytes(architecture, dtype), gradients=gradients,
                                     statistics=tsv_component_bytes(matrices, len(experts), delta, dtype))

    device = runtime.resolved_device()
    gpu = device.startswith("cuda")
    memory, source = (device_memory, "--device-memory") if device_memory is not None else _device_memory(device)
    workers = 1 if gpu else runtime.workers  # Ray gives each worker a GPU of its own
    batch = typed.fitness.batch_size
    fit = fit_plan(plan_for, requested, batch, workers, memory)
    dropped = typed.refine.at == "auto" and refining and (fit.chosen is None or fit.chosen is not fit.requested)
    if dropped:  # the default's refinement gives way rather than shrink the batch or deltas, or refuse
        refining = False
        fit = fit_plan(plan_for, requested, batch, workers, memory)
    fallbacks = () if fit.chosen else tuple(plan_for(f, 1) for f in dict.fromkeys((requested, *SMALLER_FORMATS)))
    full = [e for e in experts if isinstance(e, ModelMeta)]
    second = max([base.stored, *(e.stored for e in full), *([torch.float32] if adapters else [])],
                 key=lambda d: d.itemsize)
    loading = pool_loading_bytes(base.shapes, base.stored, second, (fit.chosen or fit.requested).deltas)
    return SearchPlan(fit, "cuda" if gpu else "cpu", source, batch, largest_path(fit.batch), base_ref,
                      loading, fallbacks, refine_dropped=dropped)


def _tsv_block_matrices(typed: Config, base: ModelMeta) -> list[tuple[int, ...]]:
    """The shapes TSV-M keeps per-expert components of, when the search's space merges with it
    (a parameter space; a data-flow search's sources drop theirs once merged): the 2-D tensors
    inside the blocks."""
    if typed.space.kind != "params" or "tsv_m" not in typed.space.methods:
        return []
    from types import SimpleNamespace

    from evomerge.architecture import layout_of_files

    from evomerge.merge.subspace import is_block_matrix

    layout = layout_of_files(SimpleNamespace(**base.config), base.shapes)
    return [shape for name, shape in base.shapes.items() if layout.layer_of(name) is not None and is_block_matrix(shape)]


def planned_config(config: Mapping[str, Any], search: SearchPlan) -> dict[str, Any]:
    """``config`` with the delta format the plan chose (runtime.* may change between a run and
    its resume, so the run's identity is unchanged); a one-line UserError when nothing fits."""
    refusal = search.refusal()
    if refusal:
        raise UserError(refusal)
    config = dict(config)
    if search.refine_dropped:  # refine.at=auto resolved, by the plan, to off
        config["refine"] = {**(config.get("refine") or {}), "at": "off"}
    if search.changed:
        config["runtime"] = {**(config.get("runtime") or {}), "delta_dtype": format_name(search.plan.delta_dtype)}
    if search.batch_changed:  # fitness.batch_size is a runtime matter (search.settings.RESUMABLE)
        config["fitness"] = {**(config.get("fitness") or {}), "batch_size": search.fit.batch}
    return config


def _model_refs(typed: Config) -> tuple[str, dict[str, str]]:
    from evomerge.zoo.build import model_refs

    return model_refs(typed)


def _device_memory(device: str) -> tuple[int, str]:
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError(f"runtime.device={device} but this machine has no CUDA device; state the GPU's "
                            f"memory with --device-memory, e.g. --device-memory 80GB")
        index = torch.device(device).index or 0
        return torch.cuda.get_device_properties(index).total_memory, f"{torch.cuda.get_device_name(index)}"
    import psutil

    return psutil.virtual_memory().available, "free RAM now"
