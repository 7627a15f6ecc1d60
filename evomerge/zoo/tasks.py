"""Writes a skill's splits as JSONL and the lm-eval task files that read them offline.

lm-eval loads them through ``include_path`` with the ``json`` dataset builder, so no hub access
is needed. Each skill gets a generate-until task judged by exact match (``zoo_<skill>``) and a
multiple-choice log-likelihood form (``zoo_<skill>_mc``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import yaml

from evomerge.zoo.skills import Item

SPLITS = ("train", "validation", "test")


def task_name(skill: str, multiple_choice: bool = False) -> str:
    return f"zoo_{skill}_mc" if multiple_choice else f"zoo_{skill}"


def write_jsonl(path: Path, items: Sequence[Item]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as out:
        for item in items:
            out.write(json.dumps(item) + "\n")


def read_jsonl(path: Path) -> list[Item]:
    with open(path) as src:
        return [json.loads(line) for line in src if line.strip()]


def _common(skill: str, data_dir: Path, splits: Sequence[str]) -> dict:
    return {
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {s: str(data_dir / skill / f"{s}.jsonl") for s in splits}},
        "validation_split": "validation",
        "test_split": "test",
        "doc_to_text": "{{prompt}}",
    }


MAX_GEN_TOKS = 12
"""Tokens a zoo answer may take: every answer is a few tokens, and the memory plan counts the
logits teacher forcing keeps by it."""


def lm_eval_tasks(skill: str, data_dir: Path, splits: Sequence[str]) -> dict[str, dict]:
    """The two lm-eval task configs of one skill, keyed by task name."""
    generate = {
        "task": task_name(skill),
        **_common(skill, data_dir, splits),
        "output_type": "generate_until",
        "doc_to_target": "{{answer}}",
        "generation_kwargs": {"until": ["\n", "<|im_end|>", "</s>"], "max_gen_toks": MAX_GEN_TOKS, "do_sample": False},
        "filter_list": [{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                     {"function": "take_first"}]}],
        "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    choice = {
        "task": task_name(skill, multiple_choice=True),
        **_common(skill, data_dir, splits),
        "output_type": "multiple_choice",
        "doc_to_choice": "{{choices}}",
        "doc_to_target": "{{label}}",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    return {generate["task"]: generate, choice["task"]: choice}


def write_task_files(skill: str, splits: dict[str, Sequence[Item]], task_dir: Path) -> list[str]:
    """JSONL splits under ``task_dir/<skill>/`` and one YAML per lm-eval task; returns task names."""
    for split, items in splits.items():
        write_jsonl(task_dir / skill / f"{split}.jsonl", items)
    configs = lm_eval_tasks(skill, task_dir, list(splits))
    for name, config in configs.items():
        (task_dir / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return list(configs)
