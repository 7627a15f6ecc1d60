"""`evomerge plan` on hub-shaped pools, without downloading a byte of weights.

Writes header-only fixtures (config.json and safetensors headers of Llama-2-7B's and
Llama-2-70B's shapes; rank-16 LoRA adapters on q/k/v/o/gate/up/down; see tests/hub_fixtures.py)
to a temporary folder and prints the plan of three pools on GPUs of 24, 80 and 141 GB, one
worker per GPU, bfloat16 working model and (as requested) bfloat16 deltas:

* Llama-2-7B with 4 full fine-tunes as experts,
* Llama-2-7B with 16 LoRA adapters as experts,
* Llama-2-70B with 2 full fine-tunes as experts.

    python experiments/plan_hub.py
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from hub_fixtures import LLAMA_7B, LLAMA_70B, write_lora, write_model  # noqa: E402

from evomerge.cli import main as cli  # noqa: E402

DEVICES = ("24GB", "80GB", "141GB")


def pools(root: Path) -> dict[str, tuple[Path, list[Path]]]:
    return {
        "Llama-2-7B x 4 full experts": (write_model(root / "7b", LLAMA_7B),
                                        [write_model(root / f"7b-full-{i}", LLAMA_7B) for i in range(4)]),
        "Llama-2-7B x 16 LoRA experts (rank 16, q/k/v/o/gate/up/down)":
            (root / "7b", [write_lora(root / f"7b-lora-{i}", LLAMA_7B) for i in range(16)]),
        "Llama-2-70B x 2 full experts": (write_model(root / "70b", LLAMA_70B),
                                         [write_model(root / f"70b-full-{i}", LLAMA_70B) for i in range(2)]),
    }


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="plan_hub.") as tmp:
        for title, (base, experts) in pools(Path(tmp)).items():
            for memory in DEVICES:
                print(f"\n### {title} on a {memory} GPU", flush=True)
                args = ["plan", f"models.base={base}", f"models.experts=[{','.join(map(str, experts))}]",
                        "runtime.device=cuda", "runtime.dtype=bfloat16", "--device-memory", memory]
                with contextlib.redirect_stderr(sys.stdout):
                    cli(args)
                sys.stdout.flush()


if __name__ == "__main__":
    main()
