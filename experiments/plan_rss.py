"""The memory plan (read from headers, before anything loads) against the RSS a worker's pool measures.

On the real zoo (base + 4 experts), one fresh process per delta format builds what a search
worker builds (a ``ModelPool`` storing its task vectors in the format as they load, then a
``Merger``) and reports its resident set size after imports, after the pool loaded, after the
merger took it over, and the process's peak (the kernel's ``ru_maxrss``), beside the plan's
resident bytes (base + deltas + working model, no activations: nothing is evaluated here) and
its loading peak. The zoo's checkpoints are float32; with ``--bfloat16`` the same models are
first saved as bfloat16 checkpoints (as most hub models are) in a temporary folder, which the
pool then loads as stored.

    python experiments/plan_rss.py [--bfloat16]
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

FORMATS = ("float32", "bfloat16", "int8", "int4")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(fmt: str, folder: str | None) -> dict:
    import torch

    from evomerge.config import compose, zoo_config
    from evomerge.merge.engine import Merger
    from evomerge.plan import plan_search
    from evomerge.pool import ModelPool
    from evomerge.zoo.build import Zoo

    torch.set_num_threads(1)
    zoo = Zoo.at(zoo_config())
    if folder is None:
        base, experts, models = str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}, []
    else:
        base, experts = f"{folder}/base", {k: f"{folder}/{k}" for k in zoo.experts}
        models = [f"models.base={base}", f"models.experts=[{','.join(experts.values())}]"]
    planned = plan_search(compose([*models, f"runtime.delta_dtype={fmt}"]), device_memory=2**40)
    start = _rss()
    pool = ModelPool(base, experts, delta_dtype=fmt)
    loaded = _rss()
    merger = Merger(pool, delta_dtype=fmt)
    held = _rss()
    return {"format": fmt, "plan": planned.plan.resident, "loading_plan": planned.loading,
            "merger_plan": merger.memory_plan().total, "start": start, "pool": loaded - start,
            "merger": held - start, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start}


def bfloat16_copy(root: Path) -> str:
    """The zoo's base and experts saved as bfloat16 checkpoints (tokenizer files copied)."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    from evomerge.config import zoo_config
    from evomerge.zoo.build import Zoo

    zoo = Zoo.at(zoo_config())
    for name, source in {"base": zoo.base, **zoo.experts}.items():
        AutoModelForCausalLM.from_pretrained(source).to(torch.bfloat16).save_pretrained(root / name)
        for file in Path(source).iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name != "config.json":
                shutil.copy(file, root / name / file.name)
    return str(root)


def main() -> None:
    if len(sys.argv) >= 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = bfloat16_copy(Path(tmp)) if "--bfloat16" in sys.argv else None
        print(f"checkpoints: {'bfloat16 copies of the zoo' if folder else 'the zoo as stored (float32)'}")
        print("| deltas | plan (headers) | Merger's plan | RSS pool loaded | RSS merger built | merger / plan "
              "| loading plan | peak RSS | peak / loading plan |")
        print("|---|---|---|---|---|---|---|---|---|")
        for fmt in FORMATS:
            out = subprocess.run([sys.executable, __file__, "--one", fmt, *([folder] if folder else [])],
                                 check=True, capture_output=True, text=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
            print(f"| {fmt} | {gib(row['plan'])} | {gib(row['merger_plan'])} | {gib(row['pool'])} | "
                  f"{gib(row['merger'])} | {row['merger'] / row['plan']:.2f} | {gib(row['loading_plan'])} | "
                  f"{gib(row['peak'])} | {row['peak'] / row['loading_plan']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
