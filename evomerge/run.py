"""The run folder: everything a user needs to resume, inspect and export a search.

```
runs/<name>/
  config.yaml        the composed config, as run
  archive.jsonl      one line per evaluated candidate (appended and flushed before the
                     algorithm is told, so a crash never loses a finished evaluation)
  history.jsonl      one line per finished generation: evaluations, best per objective, hypervolume
  probes.json        the probe population's per-item results (fits the estimators; reused on resume)
  pareto.json        the current non-dominated set, with test scores once measured
  report.html        the run as one page (front, progress, picks' recipes), rewritten per generation
  kinship.json       the experts' kinship, where `evomerge report --kinship` computed it
  plots/             pareto.png, hypervolume.png
  exports/<pick>/    recipe.yaml, mergekit.yaml, model/
```

Resume reads only data here (JSON lines, YAML loaded safely): no file of a run folder is ever
unpickled, so a folder received from someone else cannot run their code. The algorithm's state
is not saved at all; a resume rebuilds it by replaying the archive (``evomerge.search.loop``).
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import yaml

from evomerge.errors import DiskError, UserError

CONFIG = "config.yaml"
ARCHIVE = "archive.jsonl"
HISTORY = "history.jsonl"
PROBES = "probes.json"
DRIVER_LOCK = ".driver.lock"
PARETO = "pareto.json"
REPORT = "report.html"
KINSHIP = "kinship.json"


@dataclass
class ArchiveEntry:
    """One evaluated candidate, as a line of archive.jsonl.

    ``objectives`` are in their natural direction (see ``Objective``); ``scores`` are per-task
    validation metrics as the estimator measured them; ``error`` is set (and objectives hold the
    worst values) when the candidate's merge or evaluation failed.
    """

    id: int
    generation: int
    genome: list[float]
    recipe_hash: str
    recipe: dict[str, Any]
    objectives: dict[str, float]
    scores: dict[str, float] = field(default_factory=dict)
    merge_seconds: float = 0.0
    eval_seconds: float = 0.0
    worker: str = ""
    error: str | None = None
    cached_from: int | None = None  # id of the earlier entry whose result this duplicate reuses
    # "estimate": the estimator's items; "full": every validation item (a racing promotion).
    fidelity: str = "estimate"
    # How a candidate that no algorithm asked for was made: {"parent": id, "refine": {...}} for a
    # gradient refinement (evomerge.search.refine); None for every other entry (and then absent
    # from the line, so archives without refinements read and hash as before).
    origin: dict[str, Any] | None = None

    def to_json(self) -> str:
        data = {k: v for k, v in self.__dict__.items() if not (k == "origin" and v is None)}
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ArchiveEntry":
        return cls(**data)


def atomic_write(path: Path, data: bytes | str) -> None:
    """Write via a temporary file and rename: readers see the old file or the new, never half.
    A write the disk refuses leaves the old file as it was, removes the partial temporary file
    and raises a one-line ``DiskError``."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as out:
            out.write(data.encode() if isinstance(data, str) else data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        raise DiskError.of(path, error, f"the previous {path.name} is intact; free space or make "
                                        f"{path.parent} writable and try again") from None


class RunDir:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # --- paths ------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.root / CONFIG

    @property
    def archive_path(self) -> Path:
        return self.root / ARCHIVE

    @property
    def history_path(self) -> Path:
        return self.root / HISTORY

    @property
    def probes_path(self) -> Path:
        return self.root / PROBES

    @property
    def pareto_path(self) -> Path:
        return self.root / PARETO

    @property
    def report_path(self) -> Path:
        return self.root / REPORT

    @property
    def kinship_path(self) -> Path:
        return self.root / KINSHIP

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def export_dir(self, pick: str) -> Path:
        return self.root / "exports" / pick

    # --- life cycle ---------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, config: dict[str, Any]) -> "RunDir":
        run = cls(root)
        if run.config_path.exists():
            raise UserError(f"run folder {run.root} already holds a run; resume it with "
                            f"`evomerge resume {run.root}` or choose another name=")
        run.root.mkdir(parents=True, exist_ok=True)
        atomic_write(run.config_path, yaml.safe_dump(config, sort_keys=False))
        return run

    @classmethod
    def open(cls, root: str | Path) -> "RunDir":
        run = cls(root)
        if not run.config_path.is_file():
            raise UserError(f"{run.root} is not an evomerge run folder (no {CONFIG}); "
                            f"pass the folder `evomerge search` created under runs/")
        return run

    @contextmanager
    def driving(self) -> Iterator[None]:
        """Hold the folder for one search or resume: two drivers would append to one archive. An
        OS lock (``flock``) on a file in the folder, so a driver that is killed releases it with
        its process and never leaves a stale lock behind; the holder's pid is written in the file
        for the message a second driver gets."""
        import fcntl

        handle = open(self.root / DRIVER_LOCK, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UserError(f"{self.root} is being searched by another process (pid {holder}); wait for it "
                            f"to finish or stop it, then resume") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(f"{os.getpid()}\n")
            handle.flush()
            yield
        finally:
            handle.close()  # closing releases the lock

    def config(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(self.config_path.read_text())
        except yaml.YAMLError as error:
            raise UserError(f"{self.config_path} is not valid YAML: {str(error).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"{self.config_path} does not hold a config mapping")
        return data

    # --- archive ------------------------------------------------------------------------------
    def append(self, entry: ArchiveEntry) -> None:
        """Append one line and fsync it: once this returns, the evaluation survives a crash."""
        self._append_line(self.archive_path, entry.to_json())

    def _append_line(self, path: Path, line: str) -> None:
        """A write the disk refuses (full, read-only) is cut back to where it began, so no torn
        line is left after the lines already there, and becomes a one-line ``DiskError``."""
        size = path.stat().st_size if path.exists() else 0
        try:
            with open(path, "a") as out:
                out.write(line + "\n")
                out.flush()
                os.fsync(out.fileno())
        except OSError as error:
            try:
                os.truncate(path, size)
            except OSError:
                pass  # what could not be cut back, repair_archive drops on resume
            raise DiskError.of(path, error, f"every line before it is kept; free space or make {self.root} "
                                            f"writable, then `evomerge resume {self.root}`") from None

    def archive(self) -> list[ArchiveEntry]:
        """Every intact entry; a torn last line (a crash mid-write) is skipped."""
        return [ArchiveEntry.from_dict(d) for d in self._json_lines(self.archive_path)]

    def dropped_archive_lines(self) -> int:
        """How many non-empty lines ``archive()`` skips as unreadable (a torn write)."""
        if not self.archive_path.exists():
            return 0
        lines = [ln for ln in self.archive_path.read_text().splitlines() if ln.strip()]
        return len(lines) - len(list(self._json_lines(self.archive_path)))

    def repair_archive(self) -> int:
        """Drop lines a crash left unreadable (a torn last write) so appends start on a clean
        line; returns how many were dropped. The intact lines are rewritten atomically."""
        if not self.archive_path.exists():
            return 0
        text = self.archive_path.read_text()
        lines = [ln for ln in text.splitlines() if ln.strip()]
        intact = [json.dumps(d, sort_keys=True) for d in self._json_lines(self.archive_path)]
        if len(intact) != len(lines) or (text and not text.endswith("\n")):
            atomic_write(self.archive_path, "".join(line + "\n" for line in intact))
        return len(lines) - len(intact)

    def append_history(self, record: dict[str, Any]) -> None:
        self._append_line(self.history_path, json.dumps(record, sort_keys=True))

    def history(self) -> list[dict[str, Any]]:
        return list(self._json_lines(self.history_path))

    @staticmethod
    def _json_lines(path: Path) -> Iterator[dict[str, Any]]:
        if not path.exists():
            return
        for line in path.read_text().splitlines():
            if not line.strip():
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue

    # --- small JSON documents -------------------------------------------------------------------
    def write_json(self, path: Path, data: Any) -> None:
        atomic_write(path, json.dumps(data, indent=2, sort_keys=True))

    def read_json(self, path: Path) -> Any | None:
        if not path.exists():
            return None
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            return None
