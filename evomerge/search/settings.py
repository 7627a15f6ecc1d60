"""The composed config of a search, read and checked before anything expensive starts.

Every group of ``conf/`` becomes its dataclass here; a bad value fails with one line naming it.
Models are inspected (config, tensor names and shapes, vocabulary, no weights) and tasks resolved
so a typo in an expert path or a task name costs a second, not a worker start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from evomerge.errors import UserError
from evomerge.search.algorithms import AlgorithmConfig
from evomerge.search.workers import RuntimeConfig, WorkerSpec
from evomerge.space import SpaceConfig

TOP_LEVEL = ("name", "runs_dir", "seed", "models", "tasks", "include_path", "space", "algorithm",
             "fitness", "runtime", "zoo")
MODEL_KEYS = ("base", "experts", "allow_pickle", "trust_remote_code")
# Settings that may change between a run and its resume without changing what it searches.
RESUMABLE = ("name", "runs_dir", "runtime", "algorithm.generations")


@dataclass
class Settings:
    config: dict[str, Any]
    base: str
    experts: dict[str, str]
    tasks: list[str]
    include_path: str | None
    space: SpaceConfig
    algorithm: AlgorithmConfig
    fitness: dict[str, Any]
    runtime: RuntimeConfig
    seed: int
    allow_pickle: bool
    trust_remote_code: bool
    num_layers: int

    def worker_spec(self) -> WorkerSpec:
        # EVOMERGE_TEST_FAULT lets the fault tests make workers die or merges go NaN on purpose.
        fault = json.loads(os.environ.get("EVOMERGE_TEST_FAULT") or "{}")
        return WorkerSpec(self.base, dict(self.experts), list(self.tasks), self.include_path,
                          dict(self.fitness), self.runtime, self.allow_pickle, self.trust_remote_code,
                          fault=fault)


def read_settings(config: Mapping[str, Any], *, build_zoo: bool = True, log=print) -> Settings:
    """Check ``config`` top to bottom and resolve models and tasks; builds the zoo when the
    config searches it and it is not cached yet (``build_zoo``)."""
    unknown = sorted(set(config) - set(TOP_LEVEL))
    if unknown:
        raise UserError(f"unknown config key {unknown[0]!r}; valid: {', '.join(TOP_LEVEL)}")
    models = dict(config.get("models") or {})
    bad = sorted(set(models) - set(MODEL_KEYS))
    if bad:
        raise UserError(f"unknown models setting {bad[0]!r}; valid: {', '.join(MODEL_KEYS)}")
    space = SpaceConfig.from_dict(config.get("space") or {})
    algorithm = AlgorithmConfig.from_dict(config.get("algorithm") or {})
    runtime = RuntimeConfig.from_dict(config.get("runtime") or {})
    fitness = dict(config.get("fitness") or {})
    from evomerge.fitness import FitnessConfig

    FitnessConfig.from_dict(fitness)  # fails early on a bad key or value
    seed = config.get("seed", 0)
    if not isinstance(seed, int):
        raise UserError(f"seed={seed!r} must be an integer")

    tasks = config.get("tasks")
    include_path = config.get("include_path")
    if models.get("base") is None:
        if models.get("experts"):
            raise UserError("models.experts is set but models.base is not; give the model the "
                            "experts were fine-tuned from as models.base=PATH_OR_HUB_ID")
        base, experts, zoo_tasks, zoo_path = _zoo_models(config.get("zoo") or {}, build_zoo, log)
        tasks = tasks if tasks is not None else zoo_tasks
        include_path = include_path if include_path is not None else zoo_path
    else:
        base = str(models["base"])
        from evomerge.pool import resolve

        resolve(base, allow_pickle=bool(models.get("allow_pickle")))  # a bad path fails before anything else
        experts = _named_experts(models.get("experts"))
        if not tasks:
            raise UserError("tasks is empty; with your own models name the lm-eval tasks to "
                            "optimize, e.g. tasks=[arc_easy,hellaswag]")
    if isinstance(tasks, str) or not isinstance(tasks, (list, tuple)) or not tasks:
        raise UserError(f"tasks={tasks!r} must be a non-empty list of lm-eval task names")
    layers = _check_models(base, experts, bool(models.get("allow_pickle")), bool(models.get("trust_remote_code")))
    return Settings(dict(config), base, experts, [str(t) for t in tasks], include_path, space, algorithm,
                    fitness, runtime, seed, bool(models.get("allow_pickle")), bool(models.get("trust_remote_code")),
                    layers)


def _zoo_models(zoo_config: Mapping[str, Any], build: bool, log) -> tuple[str, dict[str, str], list[str], str]:
    from evomerge.zoo.build import Zoo, ZooConfig, build_zoo
    from evomerge.zoo.tasks import task_name

    config = ZooConfig.from_dict(dict(zoo_config))
    zoo = Zoo.at(config)
    if not zoo.is_built():
        if not build:
            raise UserError(f"the zoo {zoo.root} is not built; run `evomerge zoo build`")
        log(f"the zoo is not cached yet: building it ({zoo.root})")
    zoo = build_zoo(config, log=log)  # on a built zoo: only the scored task folder, if missing
    tasks = [task_name(skill) for skill in config.skills]
    return str(zoo.base), {k: str(v) for k, v in zoo.experts.items()}, tasks, str(zoo.task_dir)


def _named_experts(experts: Any) -> dict[str, str]:
    if isinstance(experts, Mapping):
        named = {str(k): str(v) for k, v in experts.items()}
    elif isinstance(experts, (list, tuple)):
        named = {}
        for ref in experts:
            name = Path(str(ref).rstrip("/")).name or str(ref)
            if name in named:
                raise UserError(f"experts {named[name]!r} and {ref!r} would both be named {name!r}; "
                                f"give models.experts as a mapping name: path")
            named[name] = str(ref)
    else:
        named = {}
    if not named:
        raise UserError(f"models.experts={experts!r} must list at least one expert model (path or hub id)")
    return named


def _check_models(base: str, experts: Mapping[str, str], allow_pickle: bool, trust_remote_code: bool) -> int:
    """Check every expert against the base (metadata only); returns the base's block count."""
    from evomerge.pool import check_mergeable, inspect_model, layer_index

    options = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    info = inspect_model(base, **options)
    for ref in experts.values():
        check_mergeable(info, inspect_model(ref, **options))
    layers = [i for i in map(layer_index, info.shapes) if i is not None]
    if not layers:
        raise UserError(f"base model {base} has no numbered decoder blocks (model.layers.N.*); "
                        f"evomerge merges transformer LMs layer by layer")
    return max(layers) + 1


def search_fingerprint(config: Mapping[str, Any]) -> str:
    """Hash of what a run searches: everything but the settings listed in RESUMABLE."""
    reduced = json.loads(json.dumps(dict(config), default=str))
    for key in RESUMABLE:
        parts = key.split(".")
        node = reduced
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return hashlib.sha256(json.dumps(reduced, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key in sorted(set(old) | set(new)):
        path = f"{prefix}{key}"
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            keys += changed_keys(a, b, path + ".")
        elif a != b and not any(path == r or path.startswith(r + ".") for r in RESUMABLE):
            keys.append(path)
    return keys
