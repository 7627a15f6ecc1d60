"""Can a layer path compose two skills at all? Hand-made paths through two experts on the zoo.

The cross-skill probe ``zoo_shout`` (reverse the letters and upper-case them) needs the reverse
and the upper-case experts' skills at once; every parameter-space merge scores 0 on it. Before
reading what the data-flow search found, this asks the space directly: for each ordered pair of
those experts and each depth k, two families of paths are scored on every validation item of
shout and of both skills:

* ``switch``: A's blocks 0..k-1, then B's blocks k..29 (the usual depth, the upper part swapped);
* ``stack``: all of A's blocks, then B's blocks k..29 again (longer; B's top on A's output).

    python experiments/zoo_pareto/stacks.py            # writes stacks.md beside it
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
SKILLS = ("shout", "reverse", "upper")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="10,16,22,26", help="comma-separated k")
    parser.add_argument("--out", type=Path, default=HERE / "stacks.md")
    args = parser.parse_args()
    from evomerge.config import zoo_config
    from evomerge.fitness.native import generate_exact_match
    from evomerge.layer_path import LayerPath, Slice
    from evomerge.merge.engine import Merger
    from evomerge.merge.path_model import PathSources, path_model
    from evomerge.pool import ModelPool
    from evomerge.zoo.build import Zoo

    torch.set_num_threads(1)
    started = time.perf_counter()
    zoo = Zoo.at(zoo_config())
    refs = {k: str(v) for k, v in zoo.experts.items()}
    merger = Merger(ModelPool(str(zoo.base), refs))
    sources = PathSources(merger)
    layers = merger.num_layers
    items = {s: zoo.items(s, "validation") for s in SKILLS}

    def score(path: LayerPath) -> dict[str, float]:
        model = path_model(path, sources)
        with torch.no_grad():
            return {s: sum(r.correct for r in generate_exact_match(
                model, merger.tokenizer, [i["prompt"] for i in rows], [i["answer"] for i in rows])) / len(rows)
                for s, rows in items.items()}

    def make(*slices: Slice, outside: str) -> LayerPath:
        return LayerPath(str(zoo.base), tuple(refs), layers, slices, outside, expert_refs=refs)

    rows = [("expert", "reverse", "-", make(Slice("reverse", 0, layers), outside="reverse")),
            ("expert", "upper", "-", make(Slice("upper", 0, layers), outside="upper"))]
    for a, b in (("reverse", "upper"), ("upper", "reverse")):
        for k in [int(d) for d in args.depths.split(",")]:
            rows.append(("switch", f"{a} → {b}", k, make(Slice(a, 0, k), Slice(b, k, layers), outside=a)))
            rows.append(("stack", f"{a} → {b}", k, make(Slice(a, 0, layers), Slice(b, k, layers), outside=a)))
    lines = ["# Hand-made layer paths through the reverse and upper-case experts (full validation split)", "",
             f"Made by `python experiments/zoo_pareto/stacks.py` ({time.strftime('%Y-%m-%d')}). Embeddings and "
             "head from the first expert of the pair; every scale 1.", "",
             "| family | experts | k | blocks | " + " | ".join(f"zoo_{s}" for s in SKILLS) + " |",
             "|---|---|---|---|" + "---|" * len(SKILLS)]
    for family, pair, k, path in rows:
        scores = score(path)
        lines.append(f"| {family} | {pair} | {k} | {path.length} | " + " | ".join(f"{scores[s]:.2f}" for s in SKILLS) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"{len(rows)} paths in {(time.perf_counter() - started) / 60:.1f} min."]
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
