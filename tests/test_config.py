"""The config's schema is the one home of its defaults: every group file of ``conf/`` sets only
what choosing it changes, composing gives the dataclasses' values, reading is pure."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import yaml

from evomerge.config import Config, compose, conf_dir, read_config
from evomerge.errors import UserError

GROUPS = [f.name for f in dataclasses.fields(Config) if dataclasses.is_dataclass(f.default_factory)]
OPTIONS = [(group, path.stem) for group in GROUPS for path in sorted((conf_dir() / group).glob("*.yaml"))]


def drift(where: str, declared: dict[str, Any], composed: dict[str, Any], default: dict[str, Any]) -> list[str]:
    """What is wrong with a group file that declares ``declared``, given the ``composed`` group
    and the dataclass ``default``: a key it sets that composing lost, a default it restates, a
    key it leaves that composing does not take from the dataclass."""
    problems = [f"{where}{key} is not in the schema" for key in sorted(set(declared) - set(default))]
    for key, value in default.items():
        if key not in declared:
            if composed.get(key) != value:
                problems.append(f"{where}{key}: composed {composed.get(key)!r}, dataclass default {value!r}")
        elif isinstance(value, dict):
            problems += drift(f"{where}{key}.", declared[key], composed[key], value)
        elif declared[key] == value:
            problems.append(f"{where}{key}: restates the default {value!r}")
        elif composed.get(key) != declared[key]:
            problems.append(f"{where}{key}: declared {declared[key]!r}, composed {composed.get(key)!r}")
    return problems


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_a_group_file_sets_only_what_its_choice_changes(group, option):
    declared = yaml.safe_load((conf_dir() / group / f"{option}.yaml").read_text()) or {}
    composed = compose([f"{group}={option}"])[group]
    default = dataclasses.asdict(getattr(Config(), group))
    assert drift(f"{group}.", declared, composed, default) == []


def test_every_group_has_options():
    assert set(GROUPS) == {"zoo", "models", "space", "algorithm", "fitness", "runtime", "refine"}
    assert {g for g, _ in OPTIONS} == set(GROUPS)
    assert ("algorithm", "cmaes") in OPTIONS and ("zoo", "pico") in OPTIONS


def test_the_drift_check_catches_a_restated_default_and_a_lost_value():
    default = {"workers": 2, "address": None, "nested": {"lr": 1e-4, "steps": 150}}
    composed = {"workers": 2, "address": "auto", "nested": {"lr": 1e-4, "steps": 40}}
    assert drift("runtime.", {"address": "auto", "nested": {"steps": 40}}, composed, default) == []
    assert drift("runtime.", {"workers": 2, "address": "auto", "nested": {"steps": 40}}, composed, default) == \
        ["runtime.workers: restates the default 2"]
    assert drift("runtime.", {"address": "auto", "nested": {"steps": 40, "lr": 3e-3}}, composed, default) == \
        ["runtime.nested.lr: declared 0.003, composed 0.0001"]
    assert drift("runtime.", {"nested": {"steps": 40}}, composed, default) == \
        ["runtime.address: composed 'auto', dataclass default None"]
    assert drift("runtime.", {"colour": 1, "address": "auto", "nested": {"steps": 40}}, composed, default) == \
        ["runtime.colour is not in the schema"]


def test_a_search_without_overrides_runs_the_dataclass_defaults():
    composed = compose()
    assert composed == dataclasses.asdict(Config())
    assert (composed["algorithm"]["name"], composed["algorithm"]["generations"], composed["fitness"]["items_per_task"],
            composed["runtime"]["workers"], composed["space"]["knots"]) == ("cmaes", 6, 10, 2, 3)
    assert (composed["refine"]["at"], composed["refine"]["steps"]) == ("auto", 12)


@pytest.mark.parametrize("overrides", [[], ["zoo=pico", "space=methods", "algorithm=cmaes", "fitness=irt",
                                             "runtime=cluster", "models.experts=[a,b]", "tasks=[x]"]])
def test_reading_a_composed_config_keeps_every_value(overrides):
    composed = compose(overrides)
    assert dataclasses.asdict(read_config(composed)) == composed


def test_a_run_folders_config_without_newer_keys_reads_with_the_defaults():
    composed = compose(["fitness.items_per_task=7"])
    for group, key in (("algorithm", "sigma"), ("zoo", "validation_size"), ("fitness", "perplexity_tokens")):
        del composed[group][key]
    config = read_config(composed)
    assert config.algorithm.sigma == 0.2 and config.zoo.validation_size is None
    assert config.fitness.perplexity_tokens == 1024 and config.fitness.items_per_task == 7


@pytest.mark.parametrize("overrides, message", [
    (["colour=red"], "unknown config key 'colour'; valid: algorithm, fitness, include_path, models"),
    (["+colour=red"], "unknown config key 'colour'"),
    (["runtime.gpus=1"], "unknown runtime setting 'gpus'; valid: address, auth_token_file, delta_dtype, device"),
    (["+models.token=x"], "unknown models setting 'token'; valid: allow_pickle, base, experts"),
    (["+zoo.finetune.momentum=0.9"], "unknown zoo.finetune setting 'momentum'; valid: batch_size"),
    (["runtime.workers=many"], "runtime.workers='many' must be an integer >= 1"),
    (["fitness.objectives=mean"], "fitness.objectives='mean' must be a list, e.g. fitness.objectives=[mean]"),
    (["seed=abc"], "seed='abc'"),
    (["fitness.native=maybe"], "fitness.native='maybe'"),
    (["zoo=pico", "zoo.validation_size=2.5"], "zoo.validation_size=2.5 must be an integer >= 1, or null for "
                                               "the zoo's eval_size (16)"),
])
def test_a_bad_key_or_type_is_one_line_naming_it(overrides, message):
    with pytest.raises(UserError) as caught:
        read_config(compose(overrides))
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_reading_settings_never_builds_the_zoo(tmp_path, monkeypatch):
    from evomerge.search.settings import read_settings

    monkeypatch.setenv("EVOMERGE_CACHE", str(tmp_path))
    with pytest.raises(UserError, match="is not built; run `evomerge zoo build zoo=pico`"):
        read_settings(compose(["zoo=pico"]))
    assert list(tmp_path.iterdir()) == []


def test_reading_settings_never_writes_the_zoos_task_folder(pico_zoo, pico_cache, monkeypatch):
    from evomerge.search.settings import build_zoo_for, read_settings

    monkeypatch.setenv("EVOMERGE_CACHE", str(pico_cache))
    config = compose(["zoo=pico", "zoo.validation_size=21"])
    folder = Path(pico_zoo.root / "tasks-validation21")
    with pytest.raises(UserError, match="tasks-validation21 .*is not written"):
        read_settings(config)
    assert not folder.exists()
    logs: list[str] = []
    build_zoo_for(config, log=logs.append)  # the explicit step: the zoo is built, so only the folder
    assert logs == [f"data: 21 validation items per task written to {folder}"]
    assert read_settings(config).include_path == str(folder)
