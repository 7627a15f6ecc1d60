"""Faults injected into a real search through its hooks, and the tiny driver that runs one.

The fault tests need a search in a process of its own (a driver that dies must not take pytest
with it), so they pickle one of the hooks below into a file and run

    PYTHONPATH=tests python -m search_faults HOOKS.pkl search OVERRIDE...
    PYTHONPATH=tests python -m search_faults HOOKS.pkl resume RUN_DIR

which calls ``evomerge.search.driver.start`` / ``resume`` with those hooks. The Ray workers inherit
PYTHONPATH, so they import this module by name when they unpickle the hooks.
"""

from __future__ import annotations

import os
import pickle
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from evomerge.run import ArchiveEntry, RunDir
from evomerge.search.hooks import SearchHooks
from evomerge.search.messages import EvalRequest

DRIVER_EXIT = 9  # what a driver killed by a fault exits with


@dataclass
class DriverDiesInArchiveLine(SearchHooks):
    """The driver dies halfway through writing archive line ``entry_id``."""

    entry_id: int

    def before_archive_line(self, run: RunDir, entry: ArchiveEntry) -> None:
        if entry.id == self.entry_id:
            with open(run.archive_path, "a") as out:
                out.write(entry.to_json()[:50])
            os._exit(DRIVER_EXIT)


@dataclass
class DriverDiesAfterGeneration(SearchHooks):
    """The driver dies once ``generation`` is archived, told and its pareto.json written."""

    generation: int

    def after_generation(self, generation: int, front) -> None:
        if generation == self.generation:
            os._exit(DRIVER_EXIT)


@dataclass
class DiskFullAtArchiveLine(SearchHooks):
    """From archive line ``entry_id`` on, the driver's disk is full: its fsync fails as a
    kernel reports a full disk under delayed allocation (the line's bytes written, not kept)."""

    entry_id: int

    def before_archive_line(self, run: RunDir, entry: ArchiveEntry) -> None:
        if entry.id == self.entry_id:
            import errno

            def full(_fd: int) -> None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            os.fsync = full


@dataclass
class Observer(SearchHooks):
    """Writes one line per finished generation to ``generations_file`` (its number and front ids,
    as the driver's ``after_generation`` saw them); with ``test_scoring`` false the search ends
    without scoring its picks on the test split (as the zoo_pareto experiment runs it)."""

    generations_file: str | None = None
    test_scoring: bool = True

    def after_generation(self, generation: int, front: Sequence[ArchiveEntry]) -> None:
        if self.generations_file is not None:
            with open(self.generations_file, "a") as out:
                out.write(f"{generation} {' '.join(str(e.id) for e in front)}\n")

    def before_test_scoring(self, members: Sequence[ArchiveEntry]) -> list[ArchiveEntry]:
        return list(members) if self.test_scoring else []


@dataclass
class WorkerFaults(Observer):
    """Faults by candidate number, counted per worker from 1 over the search's candidates only
    (probes and test scoring run on the full split and are spared): worker ``kill_worker`` dies
    on candidate ``kill_on``; candidates in ``nan_on`` merge to NaN weights; those in
    ``raise_on`` fail in evaluation."""

    kill_on: int | None = None
    kill_worker: str = "w0"
    nan_on: Sequence[int] = ()
    raise_on: Sequence[int] = ()
    calls: int = field(default=0, init=False)
    current: int | None = field(default=None, init=False)

    def candidate_starts(self, worker: str, request: EvalRequest) -> None:
        self.current = None
        if request.split == "validation" and not request.full:
            self.calls += 1
            self.current = self.calls
        if self.current is not None and self.current == self.kill_on and worker == self.kill_worker:
            os._exit(1)  # the worker process is lost mid-candidate

    def materialized(self, worker: str, request: EvalRequest, model: Any) -> None:
        import torch

        if self.current in self.nan_on:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))

    def before_scoring(self, worker: str, request: EvalRequest) -> None:
        if self.current in self.raise_on:
            raise RuntimeError("injected evaluation failure")


def main(argv: Sequence[str]) -> int:
    from evomerge.config import compose
    from evomerge.errors import UserError
    from evomerge.search import driver as loop

    hooks_file, command, *rest = argv
    hooks = pickle.loads(Path(hooks_file).read_bytes())
    try:
        if command == "search":
            loop.start(compose(rest), hooks=hooks)
        elif command == "resume":
            (folder,) = rest
            loop.resume(folder, hooks=hooks)
        else:
            raise SystemExit(f"unknown command {command!r}; search or resume")
    except UserError as error:
        print(f"evomerge: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
