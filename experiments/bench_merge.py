"""How fast the Merger materializes a candidate, against what memory bandwidth allows and mergekit.

On the real zoo's base with 3 experts when the zoo is built, else on a random Llama of
SmolLM2-135M's shape made here (30 layers, hidden 576). For each method it times one in-place
materialization (median of ``--repeats``) and prints it beside

* a floor: the bytes any merge must move (read the base and K task vectors, write the model)
  divided by the copy bandwidth measured in the same run,
* the memory the method's per-tensor statistics add (kept for the merger's life, outside the
  memory plan): quantile tables, DELLA's ranks, STAR's SVDs, TSV-M's components,
* for the subspace methods that decompose per candidate (Iso-C, Iso-CTS), a compute floor: the
  SVDs a candidate cannot avoid (one of every block matrix for Iso-C; for Iso-CTS that one, one
  per expert and the two orthonormalizations, counted as SVDs of the same size), timed in the
  same run; TSV-M and STAR read their SVDs from the merger's cache, so only bandwidth bounds
  them (their first materialization pays the SVDs once), and
* with ``--mergekit``, ``mergekit-yaml`` on the same recipe (slow: it loads and writes models).

It also prints how far bf16 task vectors move a task-arithmetic merge from fp32 ones, and, for
task arithmetic, TIES and DARE-TIES (those of them benchmarked), the same timings over int8 and
int4 quantized task vectors (``runtime.delta_dtype``): time per materialization against the floor
of moving the quantized bytes, the delta bytes, and how far the merge moves from the fp32 one
(max abs difference, and the L2 norm of the difference over the whole model relative to the L2
norm of the change the fp32 merge makes to the base: TIES' threshold and sign election flip
single elements, so its max abs says little).

For the quantized mergers it also times the linear combination over every tensor both ways in
the same run: unfused (dequantize a block into float32, then combine: the engine's path before
``kernels.combine_codes``) and fused (the engine's now), with the ratio and the largest
difference between the two merged models.

With ``--big``, rows on a random model of Llama-3.2-1B's shape (1.24e9 parameters, bfloat16
working model) with 2 experts, one fresh process per delta format (fp32, int8, int4): task
arithmetic's time against its floor, the memory plan and the process's peak RSS; a format whose
plan does not fit the free RAM says so instead. The experts' deltas are drawn tensor by tensor as
the merger stacks them, so the dense fp32 pool is never held whole.

With ``--lora``, rows for LoRA-adapter experts: the same four skills as the LoRA zoo's adapters
(``zoo=smollm2-lora``, held as factors) and as the full zoo's fine-tunes, per method the time
per materialization and the resident deltas, then one worker holding 16 adapters (the LoRA zoo's
four and twelve random ones of the same shapes): its memory plan, its measured RSS growth and
a task-arithmetic merge of all 16.

    python experiments/bench_merge.py --quick
    python experiments/bench_merge.py --repeats 5 --mergekit
    nice python experiments/bench_merge.py --big
"""

from __future__ import annotations

import argparse
import copy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from evomerge.merge.engine import Merger
from evomerge.merge.export import export
from evomerge.model_files import unique_parameters
from evomerge.pool import ModelPool
from evomerge.merge.registry import METHODS
from evomerge.recipe import ExpertParams, MethodConfig, Recipe

ALL_METHODS = ("task_arithmetic", "linear", "ties", "dare_ties", "dare_linear", "breadcrumbs",
               "della", "slerp", "model_stock", "magmax", "consensus", "lines",
               "tsv_m", "iso_c", "iso_cts", "star", "cabs")
QUICK_METHODS = ("task_arithmetic", "ties", "dare_ties")
QUANTIZED_METHODS = ("task_arithmetic", "ties", "dare_ties")


def models(workdir: Path) -> tuple[str, dict[str, str], str]:
    """Base and three experts: the real zoo's when built, else random ones made in ``workdir``."""
    from evomerge.config import zoo_config
    from evomerge.zoo.build import Zoo

    zoo = Zoo.at(zoo_config())
    if zoo.is_built():
        experts = dict(list(zoo.experts.items())[:3])
        return str(zoo.base), {k: str(v) for k, v in experts.items()}, "real zoo"
    return (*random_llama(workdir), "random SmolLM2-135M-shaped Llama")


def random_llama(workdir: Path) -> tuple[str, dict[str, str]]:
    """A SmolLM2-135M-shaped random base and three experts 1e-3 away, as fine-tunes are."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.zoo.pico import char_tokenizer

    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    tokenizer = char_tokenizer()  # mergeability only compares vocabularies across the models
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(workdir / "base")
    tokenizer.save_pretrained(workdir / "base")
    experts = {}
    for i in range(3):
        with torch.no_grad():
            tuned = {k: v + 1e-3 * torch.randn_like(v) for k, v in model.named_parameters()}
        model.save_pretrained(workdir / f"expert{i}", state_dict=tuned)
        tokenizer.save_pretrained(workdir / f"expert{i}")
        experts[f"expert{i}"] = str(workdir / f"expert{i}")
    return str(workdir / "base"), experts


def recipe_for(method: str, base: str, experts: dict[str, str], num_layers: int) -> Recipe:
    names = list(experts)
    if method == "slerp":
        chosen = {names[0]: ExpertParams()}
    else:
        chosen = {n: ExpertParams(weight=w, density=0.5, gamma=0.05, epsilon=0.1) for n, w in zip(names, (0.5, 0.3, 0.8))}
    config = MethodConfig(method, chosen, lambda_=1.0 if method == "linear" else 0.9)
    return Recipe.uniform(base, names, num_layers, config, expert_refs=experts)


def copy_bandwidth(device: torch.device, megabytes: int = 512) -> float:
    """Bytes per second a large tensor copy moves (read plus write), best of three."""
    source = torch.ones(megabytes * 2**20 // 4, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        target.copy_(source)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.nbytes / best


def floor_seconds(merger: Merger, method_experts: int, bandwidth: float) -> float:
    """Minimum traffic of a merge: read the base and the K deltas it uses, write the model."""
    plan = merger.memory_plan()
    delta_bytes = plan.deltas * method_experts // plan.experts
    return (plan.base + delta_bytes + plan.working) / bandwidth


def svd_seconds(merger: Merger) -> float:
    """One SVD of every 2-D tensor inside the blocks (of its first delta: the same size as any
    sum of them), the work an SVD-per-candidate method cannot skip."""
    start = time.perf_counter()
    for name, base in merger.pool.base.items():
        if base.ndim == 2 and merger.layout.layer_of(name) is not None:
            torch.linalg.svd(merger.pool.delta(merger.experts[0], name).float(), full_matrices=False)
    _sync(merger.device)
    return time.perf_counter() - start


def svds_per_candidate(method: str, experts: int) -> int:
    return {"iso_c": 1, "iso_cts": experts + 3}.get(method, 0)


def time_materialize(merger: Merger, recipe: Recipe, repeats: int) -> tuple[float, float]:
    """Seconds of the first materialization (which builds the quantile tables a sparsifying
    method needs and compiles its kernels, once per worker) and the median of the next ones."""
    start = time.perf_counter()
    merger.materialize(recipe)
    _sync(merger.device)
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        merger.materialize(recipe)
        _sync(merger.device)
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def time_mergekit(recipe: Recipe, merger: Merger, workdir: Path) -> float:
    """Wall time of ``mergekit-yaml`` on the exported config (loading and writing included)."""
    out = export(recipe, merger, workdir / "export")
    start = time.perf_counter()
    subprocess.run(["mergekit-yaml", str(out / "mergekit.yaml"), str(workdir / "mergekit"),
                    "--no-copy-tokenizer", "--quiet", "--allow-crimes"], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def bf16_error(merger: Merger, pool: ModelPool, recipe: Recipe) -> tuple[float, float]:
    """Max abs difference of a task-arithmetic merge with bf16 instead of fp32 task vectors, and
    that difference relative to the largest change the merge makes to the base."""
    exact = {k: v.clone() for k, v in unique_parameters(merger.materialize(recipe)).items()}
    change = max(float((exact[k] - merger.pool.base[k]).abs().max()) for k in exact)
    half = Merger(sharing(pool), device=merger.device, delta_dtype=torch.bfloat16)  # shares the model
    merged = unique_parameters(half.materialize(recipe))
    error = max(float((merged[k] - exact[k]).abs().max()) for k in exact)
    return error, error / change


def sharing(pool: ModelPool) -> ModelPool:
    """The pool seen through new dicts: a quantizing Merger drops the task vectors it takes from
    its pool, and these are views of another merger's stacks that the next merger needs."""
    shared = copy.copy(pool)
    shared.base = dict(pool.base)
    shared.task_vectors = {expert: dict(tensors) for expert, tensors in pool.task_vectors.items()}
    return shared


def quantized_rows(merger: Merger, pool: ModelPool, base: str, experts: dict[str, str],
                   methods: tuple[str, ...], repeats: int, bandwidth: float) -> None:
    """The timings of ``methods`` over int8 and int4 task vectors, beside fp32's (timed again, in
    this stretch of the run), and each merge's distance to the fp32 one."""
    from evomerge.config import QUANTIZED_DELTAS

    mergers = {"fp32": merger}
    for fmt in QUANTIZED_DELTAS:  # from the fp32 stacks' views; each shares the working model
        mergers[fmt] = Merger(sharing(pool), device=merger.device, delta_dtype=fmt)
    print(f"\n{'deltas':<8} {'method':<16} {'first s':>8} {'merger s':>9} {'floor s':>8} {'x floor':>8} "
          f"{'delta MiB':>10} {'max abs':>9} {'rel L2':>9}")
    for method in methods:
        recipe = recipe_for(method, base, experts, merger.num_layers)
        exact = {k: v.clone() for k, v in unique_parameters(merger.materialize(recipe)).items()}
        change = sum(float((exact[k] - merger.pool.base[k]).double().pow(2).sum()) for k in exact)
        for fmt, used in mergers.items():
            first, seconds = time_materialize(used, recipe, repeats)
            merged = unique_parameters(used.model)
            error = max(float((merged[k] - exact[k]).abs().max()) for k in exact)
            relative = (sum(float((merged[k] - exact[k]).double().pow(2).sum()) for k in exact) / change) ** 0.5
            floor = floor_seconds(used, len(experts), bandwidth)
            print(f"{fmt:<8} {method:<16} {first:>8.2f} {seconds:>9.3f} {floor:>8.3f} {seconds / floor:>8.1f} "
                  f"{used.memory_plan().deltas / 2**20:>10.1f} {error:>9.2e} {relative:>9.2e}", flush=True)
    for fmt, used in mergers.items():
        if used.quantized:
            unfused, fused, difference = fused_vs_unfused(used, repeats)
            print(f"{fmt}: linear combination over every tensor, unfused {unfused:.3f} s, fused {fused:.3f} s: "
                  f"{unfused / fused:.1f}x faster, largest weight difference {difference:.1e}", flush=True)


def fused_vs_unfused(merger: Merger, repeats: int) -> tuple[float, float, float]:
    """Median seconds of the linear combination over every tensor of a quantized merger,
    unfused (each block dequantized into float32, then combined: the path before the fused
    kernel, redone here) and fused (the engine's), and the largest difference of their weights."""
    from evomerge.merge import kernels

    coefficients = [0.45, 0.27, 0.72][:len(merger.experts)]
    params = {name: param.view(-1) for name, param in unique_parameters(merger.model).items()}

    def unfused() -> None:
        for name, stack in merger._stacks.items():
            base, target = merger._base[name].view(-1), params[name]
            for start, end in stack.blocks():
                kernels.combine(base[start:end], stack.dense(merger._dense_dtype, start, end), 1.0, coefficients,
                                target[start:end])

    def fused() -> None:
        for name in merger._stacks:
            merger._write_combination(name, 1.0, coefficients, params[name])

    seconds, weights = [], []
    with torch.no_grad(), kernels.compiling_every_tensor(merger._compile_all):
        for run in (unfused, fused):
            run()  # compiles once
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                run()
                _sync(merger.device)
                times.append(time.perf_counter() - start)
            seconds.append(statistics.median(times))
            weights.append({k: v.clone() for k, v in params.items()})
    difference = max(float((weights[0][k].float() - weights[1][k].float()).abs().max()) for k in params)
    return seconds[0], seconds[1], difference


def big_row(fmt: str, repeats: int) -> None:
    """One ``--big`` row, in this process: build the random 1B pool, merge, print."""
    import resource

    from transformers import LlamaConfig, LlamaForCausalLM

    from evomerge.errors import UserError

    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    pool = ModelPool.__new__(ModelPool)  # in memory: 3 files of 5 GB would only be read back
    pool.base_ref, pool.expert_refs, pool.model, pool.tokenizer = "random-1b", {}, model, None
    pool.base = {k: v.clone() for k, v in unique_parameters(model).items()}
    pool.task_vectors = {f"expert{i}": _DrawnDeltas(pool.base, i) for i in range(2)}
    pool.adapters = set()
    delta = {"fp32": torch.float32}.get(fmt, fmt)
    try:
        merger = Merger(pool, dtype=torch.bfloat16, delta_dtype=delta)
    except UserError as refused:
        print(f"{fmt:<6} does not fit: {refused}", flush=True)
        return
    bandwidth = copy_bandwidth(merger.device)
    recipe = recipe_for("task_arithmetic", "random-1b", {e: f"random-1b/{e}" for e in merger.experts}, merger.num_layers)
    first, seconds = time_materialize(merger, recipe, repeats)
    floor = floor_seconds(merger, 2, bandwidth)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    row = (f"{fmt:<6} {first:>8.2f} {seconds:>9.3f} {floor:>8.3f} {seconds / floor:>8.1f} "
           f"{merger.memory_plan().deltas / 2**30:>10.2f} {merger.memory_plan().total / 2**30:>9.2f} {peak:>9.2f}")
    if merger.quantized:
        unfused, fused, difference = fused_vs_unfused(merger, repeats)
        row += f"   combine unfused {unfused:.3f} s, fused {fused:.3f} s: {unfused / fused:.1f}x, max diff {difference:.1e}"
    print(row, flush=True)


class _DrawnDeltas(dict):
    """An expert's task vectors drawn on first read (1e-3 x normal, seeded per tensor), never
    kept by this dict: the merger stacks (or quantizes) each as it takes it."""

    def __init__(self, base: dict, expert: int) -> None:
        super().__init__()
        self._base, self._expert = base, expert

    def __missing__(self, name: str) -> torch.Tensor:
        import zlib

        generator = torch.Generator().manual_seed(zlib.crc32(name.encode()) * 8 + self._expert)
        return 1e-3 * torch.randn(self._base[name].shape, generator=generator)

    def __delitem__(self, name: str) -> None:
        self.pop(name, None)


def big_rows(repeats: int) -> None:
    print("random Llama-3.2-1B-shaped model (1.24e9 parameters, bfloat16 working model), 2 experts, "
          "task arithmetic; one process per row")
    print(f"{'deltas':<6} {'first s':>8} {'merger s':>9} {'floor s':>8} {'x floor':>8} {'delta GiB':>10} "
          f"{'plan GiB':>9} {'peak RSS':>9}")
    for fmt in ("fp32", "int8", "int4"):
        subprocess.run([sys.executable, __file__, "--big-row", fmt, "--repeats", str(repeats)], check=False)


LORA_METHODS = ("task_arithmetic", "ties", "dare_ties", "tsv_m")


def every_expert_recipe(method: str, base: str, experts: dict[str, str], num_layers: int) -> Recipe:
    """``method`` over every expert at weight 0.3 (density 0.5): pools of 4 and 16 compare."""
    config = MethodConfig(method, {n: ExpertParams(weight=0.3, density=0.5) for n in experts})
    return Recipe.uniform(base, list(experts), num_layers, config, expert_refs=experts)


def lora_rows(repeats: int) -> None:
    """Adapters (factors) against full fine-tunes of the same skills, then 16 adapters in one worker."""
    import gc

    import psutil

    from evomerge.config import zoo_config
    from evomerge.merge.factored import LowRank
    from evomerge.zoo.build import Zoo

    zoos = {"full": Zoo.at(zoo_config()), "LoRA": Zoo.at(zoo_config(["zoo=smollm2-lora"]))}
    for label, zoo in zoos.items():
        if not zoo.is_built():
            print(f"the {label} zoo is not built at {zoo.root}; run `evomerge zoo build zoo={zoo.config.name}`")
            return
    print(f"{'experts':<8} {'method':<16} {'first s':>8} {'merger s':>9} {'deltas MiB':>11}")
    for label, zoo in zoos.items():
        experts = {k: str(v) for k, v in zoo.experts.items()}
        merger = Merger(ModelPool(str(zoo.base), experts))
        for method in LORA_METHODS:
            first, seconds = time_materialize(merger, every_expert_recipe(method, str(zoo.base), experts,
                                                                          merger.num_layers), repeats)
            print(f"{label:<8} {method:<16} {first:>8.2f} {seconds:>9.3f} {merger.plan.deltas / 2**20:>11.1f}",
                  flush=True)
        del merger
        gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    zoo = zoos["LoRA"]
    pool = ModelPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()})
    template = pool.task_vectors[pool.expert_names[0]]
    generator = torch.Generator().manual_seed(0)
    for i in range(12):  # random adapters of the zoo's shapes and factor scale
        pool.task_vectors[f"random{i}"] = {
            name: LowRank(torch.randn(f.left.shape, generator=generator) * f.left.std(),
                          torch.randn(f.right.shape, generator=generator) * f.right.std(), f.scale)
            for name, f in template.items()}
        pool.adapters.add(f"random{i}")
    merger = Merger(pool)
    grown = process.memory_info().rss - before
    experts = {name: name for name in merger.experts}
    first, seconds = time_materialize(merger, every_expert_recipe("task_arithmetic", str(zoo.base), experts,
                                                                  merger.num_layers), repeats)
    print(f"16 LoRA experts in one worker: plan {merger.plan.summary()}; RSS grew {grown / 2**30:.2f} GiB "
          f"loading pool and merger; task arithmetic of all 16: {seconds:.3f} s (first {first:.2f} s)")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 methods, 1 repeat: a smoke run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--mergekit", action="store_true", help="also time mergekit-yaml (slow)")
    parser.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(ALL_METHODS))
    parser.add_argument("--random-model", action="store_true",
                        help="a random SmolLM2-shaped Llama even when the zoo is built (machines without it)")
    parser.add_argument("--big", action="store_true",
                        help="only the rows of a random 1B model with 2 experts (fp32, int8, int4 deltas)")
    parser.add_argument("--big-row", choices=("fp32", "int8", "int4"), help=argparse.SUPPRESS)
    parser.add_argument("--lora", action="store_true",
                        help="only the rows of LoRA-adapter experts (the LoRA zoo) beside full fine-tunes")
    args = parser.parse_args(argv)
    if args.lora:
        return lora_rows(args.repeats)
    if args.big_row:
        return big_row(args.big_row, args.repeats)
    if args.big:
        return big_rows(args.repeats)
    if args.threads:
        torch.set_num_threads(args.threads)
    methods = QUICK_METHODS if args.quick else ALL_METHODS
    if args.methods:
        methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            parser.error(f"unknown method {unknown[0]!r}; valid: {', '.join(ALL_METHODS)}")
    repeats = 1 if args.quick else args.repeats

    with tempfile.TemporaryDirectory(prefix="bench_merge.") as tmp:
        workdir = Path(tmp)
        base, experts, source = ((*random_llama(workdir), "random SmolLM2-135M-shaped Llama")
                                 if args.random_model else models(workdir))
        pool = ModelPool(base, experts)
        merger = Merger(pool, device=args.device)
        bandwidth = copy_bandwidth(merger.device)
        print(f"{source}: {merger.num_layers} layers, {len(experts)} experts on {merger.device}, "
              f"{torch.get_num_threads()} threads")
        print(f"memory plan: {merger.memory_plan().summary()}")
        print(f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")
        svd = svd_seconds(merger) if any(svds_per_candidate(m, len(experts)) for m in methods) else 0.0
        header = (f"{'method':<16} {'first s':>8} {'merger s':>9} {'floor s':>8} {'x floor':>8} "
                  f"{'SVD floor s':>11} {'x SVD floor':>11} {'cache MiB':>10}")
        print(header + (f" {'mergekit s':>11} {'mk/merger':>10}" if args.mergekit else ""))
        for method in methods:
            recipe = recipe_for(method, base, experts, merger.num_layers)
            cached = merger.cached_bytes()
            first, seconds = time_materialize(merger, recipe, repeats)
            cached = merger.cached_bytes() - cached  # what this method's statistics added
            used = 1 if method == "slerp" else len(experts)
            floor = floor_seconds(merger, used, bandwidth)
            row = f"{method:<16} {first:>8.2f} {seconds:>9.3f} {floor:>8.3f} {seconds / floor:>8.1f}"
            svds = svds_per_candidate(method, used)
            row += (f" {svds * svd:>11.3f} {seconds / (svds * svd):>11.1f}" if svds else f" {'-':>11} {'-':>11}")
            row += f" {cached / 2**20:>10.1f}"
            if args.mergekit and METHODS[method].mergekit is not None:
                theirs = time_mergekit(recipe, merger, workdir / method)
                row += f" {theirs:>11.2f} {theirs / seconds:>10.1f}"
            print(row, flush=True)
        error, relative = bf16_error(merger, pool, recipe_for("task_arithmetic", base, experts,
                                                               merger.num_layers))
        print(f"bf16 deltas vs fp32 (task_arithmetic): max abs {error:.2e}, "
              f"relative to the largest change {relative:.2e}")
        quantized = tuple(m for m in QUANTIZED_METHODS if m in methods)
        if quantized:
            quantized_rows(merger, pool, base, experts, quantized, repeats, bandwidth)


if __name__ == "__main__":
    sys.exit(main())
