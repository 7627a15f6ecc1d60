"""The memory plan (read from headers, before anything loads) against the RSS a worker's pool measures.

On the real zoo (base + 4 experts), one fresh process per delta format builds what a search
worker builds (a ``ModelPool`` storing its task vectors in the format as they load, then a
``Merger``) and reports its resident set size after imports, after the pool loaded, after the
merger took it over, and the process's peak (the kernel's ``ru_maxrss``), beside the plan's
resident bytes (base + deltas + working model, no activations: nothing is evaluated here) and
its loading peak.

    python experiments/plan_rss.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys

FORMATS = ("float32", "bfloat16", "int8", "int4")


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def measure(fmt: str) -> dict:
    import torch

    from evomerge.config import compose
    from evomerge.merge.engine import Merger
    from evomerge.plan import plan_search
    from evomerge.pool import ModelPool
    from evomerge.zoo.build import Zoo
    from evomerge.config import zoo_config

    torch.set_num_threads(1)
    planned = plan_search(compose([f"runtime.delta_dtype={fmt}"]), device_memory=2**40)
    zoo = Zoo.at(zoo_config())
    start = _rss()
    pool = ModelPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}, delta_dtype=fmt)
    loaded = _rss()
    merger = Merger(pool, delta_dtype=fmt)
    held = _rss()
    return {"format": fmt, "plan": planned.plan.resident, "loading_plan": planned.loading, "merger_plan": merger.memory_plan().total,
            "start": start, "pool": loaded - start, "merger": held - start,
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start}


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--one":
        print(json.dumps(measure(sys.argv[2])))
        return
    print("| deltas | plan (headers) | Merger's plan | RSS pool loaded | RSS merger built | merger / plan "
          "| loading plan | peak RSS | peak / loading plan |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fmt in FORMATS:
        out = subprocess.run([sys.executable, __file__, "--one", fmt], check=True, capture_output=True, text=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        gib = lambda n: f"{n / 2**30:.2f} GiB"  # noqa: E731
        print(f"| {fmt} | {gib(row['plan'])} | {gib(row['merger_plan'])} | {gib(row['pool'])} | "
              f"{gib(row['merger'])} | {row['merger'] / row['plan']:.2f} | {gib(row['loading_plan'])} | "
              f"{gib(row['peak'])} | {row['peak'] / row['loading_plan']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
