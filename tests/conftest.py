"""Shared fixtures: the pico zoo (built per test run into a temp cache, seconds) and the real
SmolLM2 zoo (built once into the user's cache and reused; the first build takes 20-30 minutes)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def pico_cache(tmp_path_factory):
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
