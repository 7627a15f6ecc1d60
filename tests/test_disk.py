"""A disk that refuses a write (full, read-only): one line saying what failed and what to do,
and nothing already written lost or torn. The refusal is injected where the kernel would report
it (``os.fsync``, as delayed allocation reports a full disk; a write call), in this process; the
search's own case, through a driver hook, is in test_search.py."""

from __future__ import annotations

import errno
import json
import os

import pytest

from evomerge.errors import DiskError, UserError
from evomerge.recipe import ExpertParams, MethodConfig, Recipe
from evomerge.run import ArchiveEntry, RunDir, atomic_write


def disk_full(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def entry(i: int) -> ArchiveEntry:
    recipe = Recipe.uniform("base", ("a",), 2, MethodConfig("task_arithmetic", {"a": ExpertParams(weight=0.1 * i)}))
    return ArchiveEntry(id=i, generation=0, genome=[0.1 * i], recipe_hash=recipe.hash, recipe=recipe.to_dict(),
                        objectives={"a": 0.5}, scores={"a": 0.5})


def one_line(error: UserError) -> str:
    text = str(error)
    assert "\n" not in text
    return text


@pytest.mark.reliability("fault", "a full disk while appending an archive line: a one-line error naming the file and `evomerge resume`; every earlier line kept, no torn line")
def test_a_full_disk_mid_append_keeps_every_earlier_line_and_no_torn_one(tmp_path, monkeypatch):
    run = RunDir.create(tmp_path / "run", {"seed": 0})
    for i in range(3):
        run.append(entry(i))
    before = run.archive_path.read_bytes()
    monkeypatch.setattr(os, "fsync", disk_full)  # the line reached the file; the disk refuses to keep it
    with pytest.raises(DiskError) as caught:
        run.append(entry(3))
    message = one_line(caught.value)
    assert str(run.archive_path) in message and "No space left on device" in message
    assert f"evomerge resume {run.root}" in message
    assert run.archive_path.read_bytes() == before  # cut back: no torn line
    monkeypatch.undo()
    run.append(entry(3))  # space freed: appends go on after the kept lines
    assert [e.id for e in run.archive()] == [0, 1, 2, 3] and run.dropped_archive_lines() == 0


@pytest.mark.reliability("fault", "a full disk while rewriting pareto.json or the run's config: a one-line error; the previous file intact, no temporary file left")
def test_a_refused_atomic_write_leaves_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "pareto.json"
    atomic_write(path, json.dumps({"members": [1]}))
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(DiskError) as caught:
        atomic_write(path, json.dumps({"members": [1, 2]}))
    assert "pareto.json is intact" in one_line(caught.value)
    assert json.loads(path.read_text()) == {"members": [1]} and sorted(p.name for p in tmp_path.iterdir()) == [
        "pareto.json"]


@pytest.mark.reliability("fault", "a full disk while exporting over an earlier export with --force: a one-line error; the earlier export intact, no staging folder left")
def test_a_refused_export_keeps_the_earlier_export(pico_zoo, tmp_path, monkeypatch):
    from evomerge.merge import export as exporting
    from evomerge.merge.engine import Merger
    from evomerge.pool import ModelPool

    refs = {k: str(v) for k, v in pico_zoo.experts.items()}
    recipe = Recipe.uniform(str(pico_zoo.base), tuple(refs), 4,
                            MethodConfig("task_arithmetic", {e: ExpertParams(weight=0.3) for e in refs}),
                            expert_refs=refs)
    merger = Merger(ModelPool(str(pico_zoo.base), refs))
    out = tmp_path / "exports" / "knee"
    exporting.export(recipe, merger, out)
    kept = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def card_on_a_full_disk(*_args, **_kwargs):
        disk_full()

    monkeypatch.setattr(exporting, "model_card", card_on_a_full_disk)  # the last file of the new export
    with pytest.raises(DiskError) as caught:
        exporting.export(recipe, merger, out, force=True)
    message = one_line(caught.value)
    assert str(out) in message and "the previous export there is intact" in message
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == kept
    assert sorted(p.name for p in out.parent.iterdir()) == ["knee"]  # no staging folder left
