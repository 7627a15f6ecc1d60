"""The search end to end on the pico zoo, with real Ray workers: the run folder, the archive's
guarantees (each candidate once, duplicates served from it), resume after a killed driver, a
killed worker, a failing candidate, and joining a Ray cluster by address."""

from __future__ import annotations

import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_cluster import free_port, local_cluster
from search_faults import (DRIVER_EXIT, DiskFullAtArchiveLine, DriverDiesAfterGeneration, DriverDiesInArchiveLine,
                           WorkerFaults)

from evomerge.errors import UserError
from evomerge.search.hooks import SearchHooks

POP, GENS = 4, 3
PARENTS = 1 + 4 + 3  # base, the pico zoo's four experts, uniform merges at 0.3, 0.5 and 1
VERIFY = 3  # fitness.verify's default: the best estimates re-scored on every validation item at the end
TESTS = Path(__file__).resolve().parent


# NSGA-II over layer groups of task arithmetic without racing: a population-based algorithm whose
# replay on resume must rebuild its survivors, and exports a mergekit config; the default search
# (CMA-ES over depth profiles) with racing is tested too (RACING).
CLASSIC = ("algorithm=nsga2", "space.knots=0", "fitness.multi_fidelity=0", "space.methods=[task_arithmetic]")


def search_args(runs: Path, name: str, *extra: str, classic: bool = True) -> list[str]:
    return ["search", "zoo=pico", f"runs_dir={runs}", f"name={name}", "fitness=anchors", "refine=none",
            "fitness.items_per_task=8", "fitness.probe_merges=1", "space.granularity=2",
            f"algorithm.pop_size={POP}", f"algorithm.generations={GENS}", "runtime.workers=1",
            *(CLASSIC if classic else ()), *extra]


def cli(*args: str, cache: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "EVOMERGE_CACHE": str(cache), **(env or {})}
    return subprocess.run([sys.executable, "-m", "evomerge.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=timeout)


def start_cli(*args: str, cache: Path, env: dict | None = None) -> subprocess.Popen:
    """``cli`` started, not waited for: for runs that can overlap."""
    full_env = {**os.environ, "EVOMERGE_CACHE": str(cache), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env)


def finish(running: subprocess.Popen, timeout: int = 600) -> subprocess.CompletedProcess:
    """Wait for a ``start_cli`` run; killed (and the test failed) past ``timeout``."""
    try:
        out, err = running.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        running.kill()
        out, err = running.communicate()
        pytest.fail(f"{' '.join(running.args[3:5])} ran past {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(running.args, running.returncode, out, err)


def with_hooks(hooks: SearchHooks, *args: str, cache: Path, folder: Path) -> subprocess.CompletedProcess:
    """``args`` (search OVERRIDE... or resume RUN_DIR) run by tests/search_faults.py's driver with
    ``hooks``, in a process of its own; its Ray workers find the hooks' module on PYTHONPATH."""
    hooks_file = folder / "hooks.pkl"
    hooks_file.write_bytes(pickle.dumps(hooks))
    path = os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "EVOMERGE_CACHE": str(cache), "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-m", "search_faults", str(hooks_file), *args], capture_output=True,
                          text=True, env=env, timeout=600)


def comparable(run: Path) -> list[dict]:
    """Archive lines without what legitimately differs between runs (timings, worker names)."""
    rows = [json.loads(line) for line in (run / "archive.jsonl").read_text().splitlines() if line.strip()]
    drop = ("merge_seconds", "eval_seconds", "worker")
    return sorted(({k: v for k, v in r.items() if k not in drop} for r in rows), key=lambda r: r["id"])


@pytest.fixture(scope="module")
def reference_run(pico_zoo, pico_cache, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    done = cli(*search_args(runs, "ref"), cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "ref", done


def test_a_search_fills_its_run_folder(reference_run):
    run, done = reference_run
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "archive.jsonl", "history.jsonl", "probes.json",
                                                "pareto.json", "run.json", "report.html"}
    assert not [p for p in run.rglob("*") if p.suffix in (".pkl", ".pickle")]  # data only
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["algorithm"]["pop_size"] == POP and config["fitness"]["estimator"] == "anchors"
    rows = comparable(run)
    assert [r["id"] for r in rows] == list(range(PARENTS + POP * GENS + VERIFY))
    assert [r["generation"] for r in rows] == ([-1] * PARENTS + [g for g in range(GENS) for _ in range(POP)]
                                               + [GENS] * VERIFY)
    # The end verifies the best estimates by mean: each recipe once, on all 16 validation items.
    estimates, verified = rows[:-VERIFY], rows[-VERIFY:]
    assert all(r["fidelity"] == "estimate" for r in estimates) and all(r["fidelity"] == "full" for r in verified)
    mean = lambda r: sum(r["objectives"].values()) / len(r["objectives"])  # noqa: E731
    first = {}
    for r in estimates:
        first.setdefault(r["recipe_hash"], r)
    ranked = sorted(first.values(), key=lambda r: (-mean(r), r["id"]))
    assert [r["recipe_hash"] for r in verified] == [r["recipe_hash"] for r in ranked[:VERIFY]]
    assert all(abs(v * 16 - round(v * 16)) < 1e-9 for r in verified for v in r["scores"].values())
    evaluated = [r for r in estimates if r["cached_from"] is None]
    assert len({r["recipe_hash"] for r in evaluated}) == len(evaluated)  # never estimated twice
    assert all(set(r["objectives"]) == {"zoo_add", "zoo_reverse", "zoo_sort", "zoo_upper"} for r in rows)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["generation"] for h in history] == list(range(GENS))
    assert [h["evaluations"] for h in history] == [PARENTS + POP * (g + 1) for g in range(GENS)]
    assert all(h["hypervolume"] >= 0 for h in history)
    pareto = json.loads((run / "pareto.json").read_text())
    assert pareto["members"] and any(m["test_scores"] is not None for m in pareto["members"])
    assert "generation 2:" in done.stderr and "candidates/min" in done.stderr


def test_parents_open_the_archive_and_no_front_member_is_worse_than_one(reference_run):
    """Base, every expert alone and the uniform merges are candidates of the run (generation
    -1, the archive's first ids): no parent dominates a member of the front, and the pick best
    on each objective scores at least what every parent scores there, on the search's data."""
    from evomerge import front as fronts
    from evomerge.recipe import Recipe
    from evomerge.report.run_data import objectives, pick
    from evomerge.run import RunDir

    run = RunDir.open(reference_run[0])
    archive = run.archive()
    parents = [e for e in archive if e.generation == -1]
    assert [e.id for e in parents] == list(range(PARENTS)) and all(e.genome == [] for e in parents)
    weights = [{n: p.weight for n, p in Recipe.from_dict(e.recipe).outside.experts.items()} for e in parents]
    experts = ["add", "reverse", "sort", "upper"]
    assert weights == [dict.fromkeys(experts, 0.0)] + [{n: float(n == e) for n in experts} for e in experts] \
        + [dict.fromkeys(experts, w) for w in (0.3, 0.5, 1.0)]
    objs = objectives(run)
    members = fronts.front(archive, objs)
    for parent in parents:
        mine = [o.minimized(parent.objectives[o.name]) for o in objs]
        for member in members:
            theirs = [o.minimized(member.objectives[o.name]) for o in objs]
            assert not (all(a <= b for a, b in zip(mine, theirs)) and mine != theirs), (parent.id, member.id)
    for o in objs:
        best = pick(run, f"best:{o.name}").objectives[o.name]
        assert all(o.minimized(best) <= o.minimized(p.objectives[o.name]) for p in parents)


def test_probe_population_is_measured_once_on_the_full_split(reference_run):
    run, _ = reference_run
    probes = json.loads((run / "probes.json").read_text())
    names = [p["name"] for p in probes["probes"]]
    assert names == ["base", "expert:add", "expert:reverse", "expert:sort", "expert:upper", "random:0"]
    items = probes["probes"][0]["evaluation"]["items"]["zoo_add"]["ids"]
    assert len(items) == 16  # the pico zoo's whole validation split, not the 8-item subset


@pytest.mark.reliability("fault", "the driver dying halfway through an archive line, then `evomerge resume`: the archive equals the uninterrupted run's")
@pytest.mark.reliability("fault", "the driver dying between two generations, then `evomerge resume`: the archive equals the uninterrupted run's")
def test_resume_after_crashes_in_an_archive_line_and_between_generations(reference_run, pico_cache, tmp_path):
    """One run, two crashes: mid archive line in generation 1, then (in the resumed run) right
    after generation 2; each resume replays what the archive holds and goes on from there."""
    done = with_hooks(DriverDiesInArchiveLine(entry_id=PARENTS + POP + 1), *search_args(tmp_path, "crash"),
                      cache=pico_cache, folder=tmp_path)
    assert done.returncode == DRIVER_EXIT == 9, done.stderr[-3000:]
    done = with_hooks(DriverDiesAfterGeneration(generation=2), "resume", str(tmp_path / "crash"), cache=pico_cache,
                      folder=tmp_path)
    assert done.returncode == 9, done.stderr[-3000:]
    assert "dropped 1 unreadable line" in done.stderr
    assert f"archive: {PARENTS + POP + 1} evaluations replayed" in done.stderr
    kept = len((tmp_path / "crash" / "archive.jsonl").read_text().splitlines())
    assert kept == PARENTS + POP * GENS  # generation 2 was complete when it died
    done = cli("resume", str(tmp_path / "crash"), cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"archive: {kept} evaluations replayed" in done.stderr
    assert comparable(tmp_path / "crash") == comparable(reference_run[0])


@pytest.mark.reliability("fault", "the disk filling up while the search appends to its archive: a one-line error naming the file and `evomerge resume`, which then ends equal to the uninterrupted run")
def test_a_full_disk_stops_the_search_in_one_line_and_resume_finishes_it(reference_run, pico_cache, tmp_path):
    cut = PARENTS + POP + 2
    done = with_hooks(DiskFullAtArchiveLine(entry_id=cut), *search_args(tmp_path, "full"), cache=pico_cache,
                      folder=tmp_path)
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert "archive.jsonl: No space left on device" in last and "evomerge resume" in last
    archive = tmp_path / "full" / "archive.jsonl"
    assert [json.loads(line)["id"] for line in archive.read_text().splitlines()] == list(range(cut))
    done = cli("resume", str(tmp_path / "full"), cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert comparable(tmp_path / "full") == comparable(reference_run[0])


@pytest.mark.reliability("fault", "the driver killed (SIGKILL) mid-generation, then `evomerge resume`: the archive equals the uninterrupted run's")
def test_resume_after_a_killed_driver_ends_with_the_same_archive(reference_run, pico_cache, tmp_path):
    reference, _ = reference_run
    args = search_args(tmp_path, "cut")
    process = subprocess.Popen([sys.executable, "-m", "evomerge.cli", *args], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env={**os.environ, "EVOMERGE_CACHE": str(pico_cache)},
                               start_new_session=True)
    archive = tmp_path / "cut" / "archive.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill it mid-search: inside generation 1
        if archive.exists() and len(archive.read_text().splitlines()) >= PARENTS + POP + 2:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    kept = len(archive.read_text().splitlines())
    assert PARENTS + POP + 2 <= kept < PARENTS + POP * GENS
    done = cli("resume", str(tmp_path / "cut"), cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{kept} evaluations replayed" in done.stderr
    assert comparable(tmp_path / "cut") == comparable(reference)


@pytest.mark.reliability("bad input", "resuming a run whose config.yaml was edited to search differently")
def test_resume_refuses_an_edited_search_config(reference_run, pico_cache, tmp_path, evomerge_main):
    import shutil

    run = tmp_path / "edited"
    shutil.copytree(reference_run[0], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["space"]["granularity"] = 3
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    done = evomerge_main("resume", run, cache=pico_cache)  # refused before Ray starts: in process
    assert done.returncode == 2 and "space.granularity" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_run_made_before_teacher_forcing_resumes_decoding(reference_run, pico_cache, tmp_path, monkeypatch):
    """A run folder whose config predates ``fitness.teacher_forcing`` decoded its estimator
    items: resuming it must not switch to the new default halfway through."""
    import shutil

    from evomerge.search import driver as loop
    from evomerge.search.settings import search_fingerprint

    run = tmp_path / "old"
    shutil.copytree(reference_run[0], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["fitness"].pop("teacher_forcing") is True  # today's runs record it
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (run / "run.json").write_text(json.dumps({"fingerprint": search_fingerprint(config), "config": config}))
    seen = []
    monkeypatch.setattr(loop.Search, "run", lambda self, folder: seen.append(self.settings.fitness))
    monkeypatch.setenv("EVOMERGE_CACHE", str(pico_cache))
    loop.resume(run, log=lambda *a, **k: None)
    assert seen and seen[0].teacher_forcing is False


def test_the_evaluation_batch_may_change_on_resume(reference_run, pico_cache, tmp_path, monkeypatch):
    """``fitness.batch_size`` sets how many rows a forward pass scores, not what is scored, so
    the memory plan may lower it and a resume may change it, also in a run made when the
    fingerprint still held it; a change of what is scored stays refused."""
    import shutil

    from evomerge.search import driver as loop
    from evomerge.search.settings import search_fingerprint

    run = tmp_path / "old"
    shutil.copytree(reference_run[0], run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    before = ("name", "runs_dir", "runtime", "algorithm.generations")  # the resumable keys until now
    (run / "run.json").write_text(json.dumps({"fingerprint": search_fingerprint(config, before), "config": config}))
    config["fitness"]["batch_size"] = 7
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    seen = []
    monkeypatch.setattr(loop.Search, "run", lambda self, folder: seen.append(self.settings.fitness))
    monkeypatch.setenv("EVOMERGE_CACHE", str(pico_cache))
    loop.resume(run, log=lambda *a, **k: None)
    assert seen and seen[0].batch_size == 7
    config["fitness"]["items_per_task"] += 1
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(UserError, match=r"\(fitness.items_per_task\); only name, runs_dir, runtime.\*, "
                                        r"algorithm.generations, fitness.batch_size may change"):
        loop.resume(run, log=lambda *a, **k: None)


@pytest.mark.reliability("bad input", "resuming a folder that is not a run")
def test_resume_of_a_folder_that_is_not_a_run_fails_clearly(tmp_path, pico_cache, evomerge_main):
    done = evomerge_main("resume", tmp_path, cache=pico_cache)
    assert done.returncode == 2 and "not an evomerge run folder" in done.stderr


@pytest.mark.reliability("fault", "a worker killed by Ray's memory monitor (OutOfMemoryError, not an actor death): replaced, its candidate retried")
def test_a_worker_killed_for_memory_is_replaced_and_its_candidate_retried(monkeypatch):
    """Ray's memory monitor reports a killed worker as ``OutOfMemoryError`` from ``ray.get``,
    which is no ``RayActorError``: a Gemma search lost its run to one while scoring its picks.
    The pool replaces the worker and retries the candidate as for any lost worker (Ray faked:
    the memory monitor cannot be made to pick a worker on a shared test machine)."""
    from types import SimpleNamespace

    import ray
    from ray.exceptions import OutOfMemoryError

    from evomerge.search.workers import WorkerPool

    class Actor:
        def __init__(self, name):
            self.evaluate = SimpleNamespace(remote=lambda request: (name, request))

    pool = WorkerPool.__new__(WorkerPool)  # no Ray: its loop over fake actors
    started, said, results = [], [], {}

    def start():
        started.append(f"w{len(started)}")
        return Actor(started[-1]), started[-1]

    def get(ref):
        worker, request = ref
        if worker == "w0":
            raise OutOfMemoryError("Memory on the node was 22.83GB used / 23.54GB limit")
        return f"{request} by {worker}"

    pool.spec, pool.log, pool._start = SimpleNamespace(runtime=SimpleNamespace(max_retries=2)), said.append, start
    pool.actors = [start(), start()]
    monkeypatch.setattr(ray, "wait", lambda refs, num_returns: (refs[:1], refs[1:]))
    monkeypatch.setattr(ray, "get", get)
    pool.run({"a": "A", "b": "B"}, lambda key, result: results.__setitem__(key, result))
    assert results == {"a": "A by w2", "b": "B by w1"}
    assert said == ["worker w0 died (OutOfMemoryError); started w2 and retrying its candidate"]


@pytest.mark.reliability("fault", "a worker actor killed mid-generation: its candidate is retried on a fresh worker; the archive equals a fault-free run's")
def test_a_killed_worker_loses_nothing(reference_run, pico_cache, tmp_path):
    done = with_hooks(WorkerFaults(kill_on=5, kill_worker="w0"), *search_args(tmp_path, "faulty"), cache=pico_cache,
                      folder=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "worker w0 died" in done.stderr
    assert comparable(tmp_path / "faulty") == comparable(reference_run[0])


@pytest.mark.reliability("fault", "a candidate whose merged weights are NaN: recorded with its reason and the worst fitness; the run goes on")
@pytest.mark.reliability("fault", "a candidate whose evaluation raises: recorded with its reason and the worst fitness; the run goes on")
def test_failing_candidates_cost_the_candidates_not_the_run(pico_zoo, pico_cache, tmp_path):
    generations = tmp_path / "generations.txt"
    # by candidate: 1 and 3 NaN, 2 raises, 4 fine; the picks are not test-scored (the experiments' way)
    hooks = WorkerFaults(nan_on=(1, 3), raise_on=(2,), generations_file=str(generations), test_scoring=False)
    done = with_hooks(hooks, *search_args(tmp_path, "nan", "algorithm.generations=1", "space.parents=false",
                                         "fitness.verify=0"),
                      cache=pico_cache,
                      folder=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = comparable(tmp_path / "nan")
    assert len(rows) == POP
    errors = sorted(r["error"] or "" for r in rows)
    assert errors[0] == "" and "injected evaluation failure" in errors[1]
    assert all("not finite" in e for e in errors[2:])
    for row in rows:
        if row["error"]:
            assert all(v == 0.0 for v in row["objectives"].values())
    good = [r["id"] for r in rows if not r["error"]]
    assert generations.read_text().splitlines() == [f"0 {good[0]}"]  # after_generation saw the front
    pareto = json.loads((tmp_path / "nan" / "pareto.json").read_text())
    assert [m["id"] for m in pareto["members"]] == good and pareto["members"][0]["test_scores"] is None
    assert "test split: scoring" not in done.stderr  # (datasets may log "Generating test split")


def test_a_search_joins_a_ray_cluster_by_address(pico_zoo, pico_cache, tmp_path):
    # A throwaway localhost cluster: no token, so the driver needs none either.
    env = {**os.environ, "EVOMERGE_CACHE": str(pico_cache), "RAY_AUTH_MODE": "disabled"}
    with local_cluster(env) as address:
        done = cli(*search_args(tmp_path, "cluster", f"runtime.address={address}", "algorithm.generations=1"),
                   cache=pico_cache, env={"RAY_AUTH_MODE": "disabled"})
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(comparable(tmp_path / "cluster")) == PARENTS + POP + VERIFY


@pytest.mark.reliability("safety", "joining a Ray cluster started with token authentication: the right token file joins it, a wrong one or none is a one-line error")
def test_a_search_joins_a_token_protected_cluster_only_with_its_token(pico_zoo, pico_cache, tmp_path):
    secret, wrong = tmp_path / "token", tmp_path / "wrong-token"
    secret.write_text("evomerge-test-token-7f3a9c\n")
    wrong.write_text("not-the-token\n")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secret.read_text().strip()}
    clean = {"RAY_AUTH_MODE": "", "RAY_AUTH_TOKEN": "", "RAY_AUTH_TOKEN_PATH": ""}  # nothing leaks in from CI
    with local_cluster(env) as address:
        # The two refusals wait on Ray's handshake, the joining search computes: all three at once.
        started = time.time()
        refused = {token: start_cli(*search_args(tmp_path, f"refused-{bool(token)}", f"runtime.address={address}",
                                                 *([f"runtime.auth_token_file={token}"] if token else [])),
                                    cache=pico_cache, env=clean)
                   for token in (wrong, None)}
        joined = start_cli(*search_args(tmp_path, "joined", f"runtime.address={address}",
                                        f"runtime.auth_token_file={secret}", "algorithm.generations=1"),
                           cache=pico_cache, env=clean)
        for token, running in refused.items():
            done = finish(running, timeout=300)
            assert done.returncode == 2, (token, done.stderr[-3000:])
            last = done.stderr.strip().splitlines()[-1]
            assert "cannot join the Ray cluster at runtime.address=127.0.0.1" in last and "auth_token_file" in last
            assert time.time() - started < 120
        done = finish(joined)
        assert done.returncode == 0, done.stderr[-3000:]
        assert len(comparable(tmp_path / "joined")) == PARENTS + POP + VERIFY
        assert "evomerge-test-token" not in (tmp_path / "joined" / "config.yaml").read_text()


@pytest.mark.reliability("bad input", "a Ray cluster address nobody listens on")
def test_an_unreachable_ray_cluster_is_a_one_line_error(pico_zoo, pico_cache, tmp_path):
    port = free_port()  # nobody listens on it
    done = cli(*search_args(tmp_path, "nocluster", f"runtime.address=127.0.0.1:{port}"), cache=pico_cache,
               env={"RAY_AUTH_MODE": "disabled"}, timeout=300)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and f"runtime.address=127.0.0.1:{port}" in last and "Traceback" not in done.stderr


def _bad(override: str, named: str, what: str):
    return pytest.param(override, named, marks=pytest.mark.reliability("bad input", what), id=override)


@pytest.mark.parametrize("override, named", [
    _bad("algorithm=pso", "pso", "`evomerge search` with an unknown algorithm"),
    _bad("algorithm.pop_size=1", "pop_size=1", "`evomerge search` with a population smaller than 2"),
    _bad("space.density=[0.5,1.5]", "density", "`evomerge search` with density bounds outside [0, 1]"),
    _bad("space.methods=[ties,nope]", "nope", "`evomerge search` with an unknown merge method"),
    _bad("fitness.estimator=oracle", "oracle", "`evomerge search` with an unknown estimator"),
    _bad("tasks=[zoo_add,zoo_telepathy]", "zoo_telepathy", "`evomerge search` with an unknown lm-eval task"),
    _bad("models.base=/no/such/model", "/no/such/model", "`evomerge search` with a missing model path"),
    _bad("+colour=red", "colour", "`evomerge search` with an unknown config key"),
    _bad("runtime.auth_token_file=/no/token", "/no/token", "`evomerge search` with a Ray token file that does not exist"),
])
def test_bad_search_input_fails_fast_in_one_line(override, named, pico_zoo, pico_cache, tmp_path, capsys,
                                                 monkeypatch):
    """In process (the CLI's own ``main``; a subprocess per case cost 3 s of imports each): the
    one-line error path is the same code either way."""
    from evomerge.cli import main

    monkeypatch.setenv("EVOMERGE_CACHE", str(pico_cache))
    started = time.time()
    capsys.readouterr()
    code = main(search_args(tmp_path, "bad", override))
    err = capsys.readouterr().err
    assert code == 2, err[-2000:]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], err
    assert not (tmp_path / "bad").exists()  # nothing written, nothing started
    assert time.time() - started < 60


class _Planted:
    """A pickle that, loaded, runs a shell command: what a shared run folder could carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.reliability("safety", "a run folder from someone else with a malicious pickle planted in it: resume never loads it, and ends equal to the uninterrupted run")
@pytest.mark.reliability("fault", "a torn last archive line: resume drops it, says so, and ends equal to the uninterrupted run")
def test_resume_runs_no_planted_pickle_and_survives_a_torn_archive_line(reference_run, pico_cache, tmp_path):
    import shutil

    run = tmp_path / "shared"
    shutil.copytree(reference_run[0], run)
    archive = run / "archive.jsonl"
    text = archive.read_text()
    archive.write_text(text[: len(text) - 40])  # the last line torn mid-write
    marker = tmp_path / "code-ran"
    (run / "checkpoints").mkdir(exist_ok=True)  # where evomerge once kept pickled algorithm state
    for name in ("checkpoints/generation-0099.pkl", "algorithm.pkl", "probes.pkl"):
        (run / name).write_bytes(pickle.dumps(_Planted(marker)))
    done = cli("resume", str(run), cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dropped 1 unreadable line" in done.stderr
    assert not marker.exists()
    assert comparable(run) == comparable(reference_run[0])


def test_no_module_unpickles_a_file():
    """The guarantee above, for every code path: evomerge has no pickle load at all (model
    weights load from safetensors; a user's own pickled weights go through torch.load with
    weights_only, and only when they opt in)."""
    package = TESTS.parent / "evomerge"
    loads = re.compile(r"\b(cloud)?pickle\.loads?\(|\bdill\.loads?\(")
    assert [p.name for p in package.rglob("*.py") if loads.search(p.read_text())] == []


@pytest.mark.reliability("fault", "a worker over its memory cap: a one-line error naming runtime.memory_limit_gb and what to lower")
def test_a_worker_over_its_memory_cap_names_the_setting(pico_zoo, pico_cache, tmp_path):
    done = cli(*search_args(tmp_path, "tight", "runtime.memory_limit_gb=0.0001"), cache=pico_cache)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]  # earlier lines: the run's own progress log
    assert last.startswith("evomerge: error:") and "runtime.memory_limit_gb=0.0001" in last
    assert "runtime.workers" in last and "Traceback" not in done.stderr


@pytest.mark.reliability("bad input", "resuming a run whose config.yaml is malformed YAML")
def test_resume_of_a_malformed_config_names_the_file(reference_run, pico_cache, tmp_path, evomerge_main):
    import shutil

    run = tmp_path / "malformed"
    shutil.copytree(reference_run[0], run)
    (run / "config.yaml").write_text("models: {base: [unclosed\n")
    done = evomerge_main("resume", run, cache=pico_cache)
    assert done.returncode == 2 and "config.yaml is not valid YAML" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


# The default search, smaller, over task arithmetic: on pico, TSV-M's near-equal candidates can
# outlast the final rung's generation of promotions (as on the zoo), and this tests racing itself.
RACING = ("space.knots=2", "fitness.multi_fidelity=0.25", "space.methods=[task_arithmetic]")


@pytest.fixture(scope="module")
def raced_run(pico_zoo, pico_cache, tmp_path_factory):
    runs = tmp_path_factory.mktemp("raced")
    done = cli(*search_args(runs, "raced", *RACING, classic=False), cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    return runs / "raced"


def test_racing_promotes_each_generations_best_and_verifies_the_pick(raced_run, pico_cache):
    """After each generation its best candidate by estimated mean (a quarter of 4) is re-scored
    on all 16 validation items (fidelity full, the next id, same generation), and the run ends
    with ``best:mean`` a verified candidate."""
    from evomerge.report.run_data import pick
    from evomerge.run import RunDir

    rows = comparable(raced_run)
    assert [r["id"] for r in rows] == list(range(len(rows)))
    full = [r for r in rows if r["fidelity"] == "full"]
    estimated = {r["recipe_hash"]: r for r in rows if r["fidelity"] == "estimate" and r["generation"] >= 0}
    assert {r["generation"] for r in full} >= set(range(GENS))  # every generation promotes one
    for r in full:
        assert r["recipe_hash"] in estimated or r["generation"] == GENS  # it verifies a candidate
        assert all(abs(v * 16 - round(v * 16)) < 1e-9 for v in r["scores"].values())  # 16 items, not 8
    assert len({r["recipe_hash"] for r in full}) == len([r for r in full if r["cached_from"] is None])
    chosen = pick(RunDir.open(raced_run), "best:mean")
    assert chosen.fidelity == "full"
    shown = cli("inspect", str(raced_run), cache=pico_cache)
    assert shown.returncode == 0 and "scored on" in shown.stdout
    rows = [line.split() for line in shown.stdout.splitlines()]
    assert any(r and r[0].rstrip("*+") == str(chosen.id) and "all" in r for r in rows)


@pytest.mark.reliability("fault", "the driver dying while it appends a racing promotion, then `evomerge resume`: the archive equals the uninterrupted run's")
def test_a_raced_run_resumes_to_the_same_archive(raced_run, pico_cache, tmp_path):
    first_promotion = next(r["id"] for r in comparable(raced_run) if r["fidelity"] == "full" and r["generation"] == 1)
    done = with_hooks(DriverDiesInArchiveLine(entry_id=first_promotion), *search_args(tmp_path, "cut", *RACING, classic=False),
                      cache=pico_cache, folder=tmp_path)
    assert done.returncode == DRIVER_EXIT, done.stderr[-3000:]
    done = cli("resume", str(tmp_path / "cut"), cache=pico_cache)
    assert done.returncode == 0, done.stderr[-3000:]
    assert comparable(tmp_path / "cut") == comparable(raced_run)
