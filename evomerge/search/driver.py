"""Starting and resuming a search: what ``evomerge search`` / ``resume`` and the experiments call.

``start`` checks a composed config (every check before a file is written), creates its run
folder and records the config's fingerprint in ``run.json``; ``resume`` reads a run folder back,
refuses a config edited in a way that changes the search, and hands it to the same loop, which
replays the archive (``loop.Search``).
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from evomerge.errors import UserError
from evomerge.run import RunDir
from evomerge.search.hooks import SearchHooks
from evomerge.search.loop import Log, Search, stderr_log
from evomerge.search.settings import RESUMABLE, changed_keys, read_settings, same_search, search_fingerprint

RUN_STATE = "run.json"


def check(config: dict[str, Any]) -> None:
    """Every check ``start`` makes before writing a file (models, tasks, space, algorithm), so a
    caller can refuse bad input in one line before it prints anything else (the memory plan)."""
    Search(read_settings(config), lambda _: None)


def start(config: dict[str, Any], log: Log = stderr_log, *, hooks: SearchHooks | None = None) -> RunDir:
    """Check ``config``, create its run folder and search; returns the folder."""
    search = Search(read_settings(config), log, hooks=hooks)  # every check passes before a file is written
    name = config.get("name") or datetime.now().strftime("%Y%m%d-%H%M%S")
    run = RunDir.create(Path(config.get("runs_dir") or "runs") / str(name), config)
    run.write_json(run.root / RUN_STATE, {"fingerprint": search_fingerprint(config), "config": config})
    log(f"run folder: {run.root}")
    with run.driving():
        search.run(run)
    return run


def resume(folder: str | Path, log: Log = stderr_log, *, hooks: SearchHooks | None = None) -> RunDir:
    """Continue the run in ``folder``: replay its archive, then search on."""
    run = RunDir.open(folder)
    with run.driving():
        Search(read_settings(resumed_config(run)), log, hooks=hooks).run(run)
    return run


def resumed_config(run: RunDir) -> dict[str, Any]:
    """``run``'s config as it resumes; refused when edited in a way that changes the search."""
    config = run.config()
    state = run.read_json(run.root / RUN_STATE)
    if state is None:
        raise UserError(f"{run.root} has no readable {RUN_STATE}; it was not written by evomerge search")
    if not same_search(config, state["fingerprint"], state["config"]):
        keys = changed_keys(state["config"], config)
        raise UserError(f"{run.config_path} was edited in a way that changes the search "
                        f"({', '.join(keys) or 'structure'}); only {', '.join(_spelled(RESUMABLE, config))} "
                        f"may change on resume. Start a new run instead")
    if isinstance(config.get("fitness"), dict):
        # Runs made before teacher forcing existed decoded their estimator items (their
        # fingerprint has no such key): a resumed run goes on estimating as it began.
        config["fitness"].setdefault("teacher_forcing", False)
        config["fitness"].setdefault("verify", 0)  # and before the end verified the best estimates
    # Runs made before gradient refinement existed end as they began: without it.
    config.setdefault("refine", {"at": "off"})
    if isinstance(config.get("space"), dict):
        # Runs made before parents were candidates numbered their first generation from 0, and
        # before smooth depth profiles they had genes per layer group.
        config["space"].setdefault("parents", False)
        config["space"].setdefault("knots", 0)
    return config


def _spelled(keys, config: Mapping[str, Any]) -> list[str]:
    """Config keys for people: a section (``runtime``) as ``runtime.*``."""
    return [f"{key}.*" if isinstance(config.get(key), Mapping) else key for key in keys]
