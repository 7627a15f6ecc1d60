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
  evomerge search                    evolve TSV-M merges of the zoo's experts (CMA-ES on the skills' mean)
  evomerge search space.methods=[task_arithmetic]   a method mergekit can redo from the exported YAML
  evomerge search algorithm=ga fitness=irt space=layerwise space.granularity=2 runtime.workers=2
  evomerge plan runtime.device=cuda --device-memory 80GB   what each worker will hold, before anything loads
  evomerge resume runs/RUN           continue a stopped run
  evomerge inspect runs/RUN          Pareto front, progress, plots
  evomerge report runs/RUN           runs/RUN/report.html: the run as one page to open in a browser
  evomerge export runs/RUN --pick best:mean
  evomerge zoo build                 build the SmolLM2 zoo (cached; 20-30 min on 2 cores the first time)
  evomerge zoo build zoo=pico        the tiny random zoo used by plumbing tests (seconds)
  evomerge zoo info                  print the zoo card: every model's score on every skill
  evomerge zoo info --json           the card as JSON, for scripts
  evomerge pool zoo=pico             task-vector norms and kinship of the models to merge
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
    from evomerge.zoo.build import Zoo, write_validation_tasks
    from evomerge.zoo.card import card_markdown

    zoo = Zoo.at(zoo_config(args.overrides))
    card = zoo.card()
    write_validation_tasks(zoo, log=lambda line: None)
    if args.json:
        print(json.dumps({**card, "root": str(zoo.root), "base_path": str(zoo.base),
                          "experts": {k: str(v) for k, v in zoo.experts.items()},
                          "task_dir": str(zoo.task_dir)}, indent=2))
    else:
        print(card_markdown(card))
        print(f"models under {zoo.root / 'models'}; lm-eval tasks: include_path={zoo.task_dir}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from evomerge.report.plots import write_plots
    from evomerge.report.run_data import summary
    from evomerge.report.text import render
    from evomerge.run import RunDir

    run = RunDir.open(args.run_dir)
    data = summary(run)
    plots = [str(p) for p in write_plots(run)]
    if args.json:
        print(json.dumps({**data, "plots": plots}, indent=2))
    else:
        print(render(data))
        print("plots: " + ", ".join(plots))
    return 0


def _report(args: argparse.Namespace) -> int:
    from evomerge.report.html import write_report
    from evomerge.run import RunDir

    run = RunDir.open(args.run_dir)
    if args.kinship:
        from evomerge.kinship import write_run_kinship  # loads models (torch): only when asked

        _log("kinship: loading the run's base and experts to compare their task vectors")
        print(f"wrote {write_run_kinship(run)}")
    path = write_report(run, args.out)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MB); open it in a browser: file://{path.resolve()}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from evomerge.pick_export import export_pick
    from evomerge.run import RunDir

    entry, out = export_pick(RunDir.open(args.run_dir), args.pick, args.out, device=args.device, force=args.force)
    print(f"exported archive id {entry.id} (recipe {entry.recipe_hash}) to {out}")
    return 0


def _search(args: argparse.Namespace) -> int:
    from evomerge.config import compose
    from evomerge.search.driver import check, start
    from evomerge.search.settings import build_zoo_for

    config = compose(args.overrides)
    build_zoo_for(config, log=_log)
    check(config)  # bad input is one line, before the plan prints
    config = _planned(config)
    run = start(config, log=_log)
    print(f"done: {run.root}\n  evomerge inspect {run.root}\n  evomerge export {run.root} --pick knee")
    return 0


def _planned(config: dict) -> dict:
    """``config`` after its memory plan, printed first: with the delta format the plan chose,
    or refused in one line when nothing fits."""
    from evomerge.plan import plan_search, planned_config

    search = plan_search(config)
    for line in search.lines():
        _log(line)
    return planned_config(config, search)


def _plan(args: argparse.Namespace) -> int:
    from evomerge.config import compose
    from evomerge.merge.memory import parse_size
    from evomerge.plan import plan_search, planned_config

    memory = parse_size(args.device_memory) if args.device_memory is not None else None
    sequence = {} if args.sequence_length is None else {"sequence": args.sequence_length}
    if args.sequence_length is not None and args.sequence_length < 1:
        raise UserError(f"--sequence-length={args.sequence_length} must be a number of tokens >= 1")
    search = plan_search(compose(args.overrides), device_memory=memory, **sequence)
    print("\n".join(search.lines()))
    planned_config({}, search)  # nothing fits: the one-line refusal
    return 0


def _resume(args: argparse.Namespace) -> int:
    from evomerge.run import RunDir
    from evomerge.search.driver import resume, resumed_config
    from evomerge.search.settings import build_zoo_for

    run = RunDir.open(args.run_dir)
    with run.driving():  # refused now, not after a zoo build, when another process drives it
        pass
    build_zoo_for(resumed_config(run), log=_log)
    run = resume(args.run_dir, log=_log)
    print(f"done: {run.root}\n  evomerge inspect {run.root}")
    return 0


def _pool(args: argparse.Namespace) -> int:
    from evomerge.kinship import kinship, pool_for, render

    result = kinship(pool_for(args.models))
    print(json.dumps(result.to_dict(), indent=2) if args.json else render(result))
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="evomerge",
        description="Evolutionary search for LLM merge recipes.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    root.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    search = commands.add_parser(
        "search", help="evolve merge recipes (default: CMA-ES on the mean of the SmolLM2 zoo's four skills)",
        description="Compose conf/ with hydra overrides, create runs/<name>/ (config.yaml, "
                    "archive.jsonl, pareto.json) and search. Groups: models, space, "
                    "algorithm, fitness, runtime, zoo; top-level keys: name, runs_dir, seed, tasks, "
                    "include_path.",
        epilog="examples:\n  evomerge search name=first\n"
               "  evomerge search algorithm=ga fitness=irt space=layerwise space.granularity=2 runtime.workers=2\n"
               "  evomerge search space=methods algorithm.generations=20\n"
               "  evomerge search models.base=HuggingFaceTB/SmolLM2-135M-Instruct "
               "models.experts=[./expert-a,./expert-b] tasks=[arc_easy,hellaswag]",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    search.add_argument("overrides", nargs="*", help="hydra overrides, e.g. algorithm=ga seed=1")
    search.set_defaults(run=_search)

    plan = commands.add_parser(
        "plan", help="print a search's memory plan per worker against the device, from metadata only",
        description="Read the models' safetensors headers, config.json and LoRA adapter configs (no "
                    "weights) and print per worker: base, deltas, working model and the evaluation's "
                    "activations, against the device's memory. When the delta format does not fit, the "
                    "first of bfloat16, int8 and int4 that does is named (search uses it); when none "
                    "does, one line says what to change (exit code 2). Takes search's overrides.",
        epilog="examples:\n  evomerge plan\n"
               "  evomerge plan models.base=DIR models.experts=[A,B] runtime.delta_dtype=int8 tasks=[arc_easy]\n"
               "  evomerge plan models.base=DIR models.experts=[A,B] runtime.device=cuda --device-memory 80GB",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("overrides", nargs="*", help="hydra overrides, as for search")
    plan.add_argument("--device-memory", default=None,
                      help="the device's memory, e.g. 80GB, 24GiB (default: free RAM for cpu, the CUDA "
                           "device's total memory)")
    plan.add_argument("--sequence-length", type=int, default=None,
                      help="tokens per evaluation row the activations are planned for (default: 256)")
    plan.set_defaults(run=_plan)

    resume = commands.add_parser(
        "resume", help="continue a stopped run from its folder",
        description="Replay the run's archive through a fresh algorithm set up from the run's seed "
                    "(no candidate is evaluated twice, nothing is unpickled) and finish the search. "
                    "Refuses a config.yaml edited in a way that changes the search; runtime.* and "
                    "algorithm.generations may change.",
        epilog="example:\n  evomerge resume runs/first",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    resume.add_argument("run_dir", metavar="RUN", help="the run folder, e.g. runs/first")
    resume.set_defaults(run=_resume)

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

    inspect = commands.add_parser(
        "inspect", help="show a run's Pareto front and progress, and plot them",
        description="Print the Pareto front (validation and held-out test scores, recipe summary, "
                    "archive id; * marks the knee) and the run's progress, and write "
                    "plots/pareto.png and plots/hypervolume.png. Works while the run is going.",
        epilog="example:\n  evomerge inspect runs/my-run --json",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect.add_argument("run_dir", metavar="RUN", help="the run folder, e.g. runs/my-run")
    inspect.add_argument("--json", action="store_true", help="print the front and progress as JSON")
    inspect.set_defaults(run=_inspect)

    report = commands.add_parser(
        "report", help="write RUN/report.html: the run as one self-contained page (front, progress, recipes)",
        description="Write one HTML file that opens offline in a browser: the Pareto front (hover a "
                    "candidate for its scores and recipe, click it for its export command), progress per "
                    "generation, each pick's recipe per layer, estimates against full-split scores and the "
                    "experts' kinship. The search rewrites RUN/report.html after every generation; this "
                    "command writes it for any run folder, finished or not.",
        epilog="examples:\n  evomerge report runs/my-run\n"
               "  evomerge report runs/my-run --out /tmp/my-run.html\n"
               "  evomerge report runs/my-run --kinship     also compute the experts' kinship (loads the models once)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    report.add_argument("run_dir", metavar="RUN", help="the run folder, e.g. runs/my-run")
    report.add_argument("--out", help="where to write the page (default: RUN/report.html)")
    report.add_argument("--kinship", action="store_true",
                        help="first compute the experts' kinship from their weights into RUN/kinship.json "
                             "(loads the base and experts once; the page shows it from then on)")
    report.set_defaults(run=_report)

    export = commands.add_parser(
        "export", help="export one recipe of a run as a model folder, recipe.yaml and mergekit.yaml",
        description="Merge the picked recipe from its base and experts and write recipe.yaml, "
                    "mergekit.yaml and model/ (safetensors, config, tokenizer, model card).",
        epilog="examples:\n  evomerge export runs/my-run --pick knee\n"
               "  evomerge export runs/my-run --pick best:zoo_add --out my-merge\n"
               "  evomerge export runs/my-run --pick 42",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    export.add_argument("run_dir", metavar="RUN", help="the run folder, e.g. runs/my-run")
    export.add_argument("--pick", default="knee",
                        help="knee (default: the front's balanced compromise), best:<objective>, "
                             "best:mean (the best mean over task objectives, among the candidates the "
                             "search verified on every validation item where it verified any), or an archive id")
    export.add_argument("--out", help="output folder (default: RUN/exports/<pick>)")
    export.add_argument("--device", default="cpu", help="where to merge, e.g. cpu or cuda")
    export.add_argument("--force", action="store_true",
                        help="replace an existing export folder (whole, at the end; refused without)")
    export.set_defaults(run=_export)

    pool = commands.add_parser(
        "pool", help="task-vector norms per layer and the kinship matrix of the models to merge",
        description="Per expert, the task-vector L2 norm per layer and relative to the base; "
                    "the pairwise cosine similarity of the experts' task vectors (model kinship); "
                    "and per pair how much their top singular subspaces overlap in the block "
                    "matrices (where the subspace methods see interference).",
        epilog="examples:\n  evomerge pool path/to/base path/to/expert-a path/to/expert-b\n"
               "  evomerge pool zoo=pico --json      the zoo's base and experts\n"
               "  evomerge pool models.base=BASE models.experts=[A,B]   as a search config names them",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    pool.add_argument("models", nargs="*",
                      help="BASE EXPERT [EXPERT...] (folders, .gguf files or hub ids), or hydra "
                           "overrides naming models.base/models.experts or a built zoo "
                           "(default: the SmolLM2 zoo)")
    pool.add_argument("--json", action="store_true", help="print the norms and matrix as JSON")
    pool.set_defaults(run=_pool)
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
