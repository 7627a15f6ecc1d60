"""Shared fixtures: the pico zoo (built per test run into a temp cache, seconds) and the real
SmolLM2 zoo (built once into the user's cache and reused; the first build takes 20-30 minutes)."""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# pytest-xdist runs the suite in two processes (pyproject's addopts): each computes with one
# thread, so two of them share the two cores instead of four threads fighting over them, and
# what they start (CLI subprocesses, Ray workers) inherits that.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def pico_cache(tmp_path_factory):
    """One cache for the test run: under pytest-xdist the workers share it (the session's temp
    folder above their own), so the pico zoo is built once (build_zoo's lock) and not per worker."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "evomerge-cache"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("evomerge-cache")


@pytest.fixture(scope="session")
def pico_zoo(pico_cache):
    from evomerge.config import zoo_config
    from evomerge.zoo.build import build_zoo

    return build_zoo(zoo_config(["zoo=pico"]), cache=pico_cache, log=lambda _: None)


@pytest.fixture(scope="session")
def zoo():
    from evomerge.config import zoo_config
    from evomerge.zoo.build import build_zoo

    return build_zoo(zoo_config(), log=print)


@pytest.fixture(scope="session")
def zoo_merger(zoo):
    from evomerge.merge.engine import Merger
    from evomerge.pool import ModelPool

    return Merger(ModelPool(str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}))


@pytest.fixture
def evomerge_main(monkeypatch, capsys):
    """``evomerge ARGS...`` in this process (the CLI's own ``main``, what ``python -m
    evomerge.cli`` runs): a subprocess per call costs ~3 s of imports and proves nothing more
    where a test reads the exit code and output. Returns returncode, stdout and stderr."""
    from evomerge.cli import main

    def call(*args: str, cache=None) -> SimpleNamespace:
        if cache is not None:
            monkeypatch.setenv("EVOMERGE_CACHE", str(cache))
        capsys.readouterr()
        try:
            code = main([str(a) for a in args])
        except SystemExit as exit_:  # argparse's --help and usage errors
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 2)
        out, err = capsys.readouterr()
        return SimpleNamespace(returncode=code, stdout=out, stderr=err)
    return call
