"""The ``evomerge`` command. Parses arguments and calls the package; holds no logic of its own.

Errors a user can cause (UserError) end in one line on stderr and exit code 2; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback

from evomerge.errors import UserError

EXAMPLES = """examples:
  evomerge zoo build                 build the SmolLM2 zoo (cached; 20-30 min on 2 cores the first time)
  evomerge zoo build zoo=pico        the tiny random zoo used by plumbing tests (seconds)
  evomerge zoo info                  print the zoo card: every model's score on every skill
  evomerge zoo info --json           the card as JSON, for scripts
"""


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _zoo_build(args: argparse.Namespace) -> int:
    from evomerge.config import zoo_config
    from evomerge.zoo.build import build_zoo
    from evomerge.zoo.card import card_markdown

    zoo = build_zoo(zoo_config(args.overrides), log=_log)
    print(card_markdown(zoo.card()))
    print(f"zoo ready at {zoo.root}")
    return 0


def _zoo_info(args: argparse.Namespace) -> int:
    from evomerge.config import zoo_config
    from evomerge.zoo.build import Zoo
    from evomerge.zoo.card import card_markdown

    zoo = Zoo.at(zoo_config(args.overrides))
    card = zoo.card()
    if args.json:
        print(json.dumps({**card, "root": str(zoo.root), "base_path": str(zoo.base),
                          "experts": {k: str(v) for k, v in zoo.experts.items()},
                          "task_dir": str(zoo.task_dir)}, indent=2))
    else:
        print(card_markdown(card))
        print(f"models under {zoo.root / 'models'}; lm-eval tasks: include_path={zoo.task_dir}")
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary search for LLM merge recipes.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    zoo = commands.add_parser("zoo", help="build or describe the model zoo (SmolLM2 base + skill experts)",
                              epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    zoo_commands = zoo.add_subparsers(dest="zoo_command", required=True, metavar="ACTION")
    build = zoo_commands.add_parser(
        "build", help="build the zoo (cached under $EVOMERGE_CACHE or ~/.cache/evomerge)",
        description="Fetch the base, write the skill data and lm-eval tasks, fine-tune one expert per "
                    "skill and score everything into the zoo card. Resumes an interrupted build.",
        epilog="example:\n  evomerge zoo build zoo.finetune.steps=200 zoo.seed=1",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    build.add_argument("overrides", nargs="*", help="hydra overrides, e.g. zoo=pico zoo.seed=1")
    build.set_defaults(run=_zoo_build)
    info = zoo_commands.add_parser(
        "info", help="print the zoo card", description="Print the card of a built zoo.",
        epilog="example:\n  evomerge zoo info zoo=pico --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    info.add_argument("overrides", nargs="*", help="hydra overrides selecting the zoo, e.g. zoo=pico")
    info.add_argument("--json", action="store_true", help="print the card and the zoo's paths as JSON")
    info.set_defaults(run=_zoo_info)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor loading bars drown evomerge's own progress
    try:
        return args.run(args)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"evomerge: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
