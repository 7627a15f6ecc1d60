"""The composed config of a search, read and checked before anything expensive starts.

``read_config`` turns the plain data into typed groups (a bad key or value fails with one line
naming it); here the models are inspected (config, tensor names and shapes, vocabulary, no
weights) and the tasks resolved, so a typo in an expert path or a task name costs a second, not
a worker start-up. Reading builds and writes nothing: a search of the zoo needs the zoo built
first, the explicit step ``build_zoo_for`` the CLI takes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from evomerge.architecture import Layout
from evomerge.config import AlgorithmConfig, FitnessConfig, RefineConfig, RuntimeConfig, SpaceConfig, read_config
from evomerge.errors import UserError
from evomerge.search.workers import WorkerSpec
from evomerge.zoo_config import ZooConfig

# Settings that may change between a run and its resume without changing what it searches. The
# evaluation batch is one: it sets how fast items are scored (the memory plan lowers it where
# the configured one does not fit).
RESUMABLE = ("name", "runs_dir", "runtime", "algorithm.generations", "fitness.batch_size")
_BEFORE_BATCH_RESUMABLE = RESUMABLE[:-1]  # the fingerprint of runs made before it was


@dataclass
class Settings:
    config: dict[str, Any]  # as composed, plain data: what the run folder's config.yaml holds
    base: str
    experts: dict[str, str]
    tasks: list[str]
    include_path: str | None
    space: SpaceConfig
    algorithm: AlgorithmConfig
    fitness: FitnessConfig
    runtime: RuntimeConfig
    seed: int
    allow_pickle: bool
    trust_remote_code: bool
    num_layers: int
    refine: RefineConfig

    def worker_spec(self) -> WorkerSpec:
        return WorkerSpec(base=self.base, experts=dict(self.experts), tasks=list(self.tasks),
                          include_path=self.include_path, fitness=self.fitness, runtime=self.runtime,
                          allow_pickle=self.allow_pickle, trust_remote_code=self.trust_remote_code,
                          refine=self.refine)


def build_zoo_for(config: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    """When ``config`` searches the zoo: build it if it is not (fine-tuning included; minutes to
    build the real one) and write its scored task folder. Checks the whole config first, so a
    typo never waits for a build."""
    from evomerge.zoo.build import Zoo, build_zoo

    typed = read_config(config)
    if not typed.searches_zoo:
        return
    if not Zoo.at(typed.zoo).is_built():
        log(f"the zoo is not cached yet: building it ({Zoo.at(typed.zoo).root})")
    build_zoo(typed.zoo, log=log)  # on a built zoo: only the scored task folder, if missing


def read_settings(config: Mapping[str, Any]) -> Settings:
    """Check ``config`` top to bottom and resolve models and tasks; reads files, writes none."""
    typed = read_config(config)
    models = typed.models
    tasks, include_path = typed.tasks, typed.include_path
    from evomerge.pool import named_experts
    from evomerge.zoo.build import model_refs

    if typed.searches_zoo:
        base, experts = model_refs(typed)
        zoo_tasks, zoo_path = _zoo_tasks(typed.zoo)
        tasks = tasks if tasks is not None else zoo_tasks
        include_path = include_path if include_path is not None else zoo_path
    else:
        base = str(models.base)
        from evomerge.pool import resolve

        resolve(base, allow_pickle=models.allow_pickle)  # a bad path fails before anything else
        experts = named_experts(models.experts)
        if not tasks:
            raise UserError("tasks is empty; with your own models name the lm-eval tasks to "
                            "optimize, e.g. tasks=[arc_easy,hellaswag]")
    if not tasks:
        raise UserError(f"tasks={tasks!r} must be a non-empty list of lm-eval task names")
    layout = _check_models(base, experts, models.allow_pickle, models.trust_remote_code)
    if typed.space.kind == "dataflow":
        layout.writers()  # a family whose scales cannot fold is refused before any model loads
    if typed.space.split_components or typed.refine.split_components:
        layout.marks()
    refine = effective_refine(typed.refine, typed.space)
    return Settings(config=dict(config), base=base, experts=experts, tasks=[str(t) for t in tasks],
                    include_path=include_path, space=typed.space, algorithm=typed.algorithm,
                    fitness=typed.fitness, runtime=typed.runtime, seed=typed.seed,
                    allow_pickle=models.allow_pickle, trust_remote_code=models.trust_remote_code,
                    num_layers=layout.num_layers, refine=refine)


def effective_refine(refine: RefineConfig, space: SpaceConfig) -> RefineConfig:
    """``refine`` as the search runs it: ``auto`` becomes ``final`` where the space's recipes can
    be refined and ``off`` where not; ``final`` on a space that cannot be refined is one line."""
    reason = _unrefinable(space)
    if refine.at == "auto":
        return dataclasses.replace(refine, at="off" if reason else "final")
    if refine.at == "final" and reason:
        raise UserError(reason)
    return refine


def _unrefinable(space: SpaceConfig) -> str | None:
    """Why gradient refinement cannot run on ``space``'s recipes (their weights must enter
    linearly), or None."""
    from evomerge.merge.registry import DIFFERENTIABLE_METHODS

    if space.kind != "params":
        return (f"refine.at needs a parameter space; space.kind={space.kind} evolves layer paths, "
                f"which have no weights to refine (set refine.at=off)")
    odd = [m for m in space.methods if m not in DIFFERENTIABLE_METHODS]
    if odd:
        return (f"refine.at needs methods linear in their weights, but space.methods has {odd[0]!r}; "
                f"valid: {', '.join(DIFFERENTIABLE_METHODS)} (or set refine.at=off)")
    return None


def _zoo_tasks(config: ZooConfig) -> tuple[list[str], str]:
    """The zoo's task names and lm-eval task folder (its base and experts: ``model_refs``)."""
    from evomerge.zoo.build import Zoo
    from evomerge.zoo.tasks import task_name

    zoo = Zoo.at(config)
    if not zoo.has_task_dir():
        raise UserError(f"the zoo's task folder {zoo.task_dir} (zoo.validation_size="
                        f"{config.validation_size}) is not written; run `evomerge zoo build` with the "
                        f"same zoo settings")
    return [task_name(skill) for skill in config.skills], str(zoo.task_dir)


def _check_models(base: str, experts: Mapping[str, str], allow_pickle: bool, trust_remote_code: bool) -> Layout:
    """Check every expert against the base (metadata only); returns where the base keeps its blocks."""
    from transformers import AutoConfig

    from evomerge.architecture import layout_of_files
    from evomerge.pool import check_expert, inspect_model

    options = {"allow_pickle": allow_pickle, "trust_remote_code": trust_remote_code}
    info = inspect_model(base, **options)
    for ref in experts.values():
        check_expert(info, ref, **options)
    gguf = {"gguf_file": info.gguf_file} if info.gguf_file else {}
    config = AutoConfig.from_pretrained(info.folder, trust_remote_code=trust_remote_code, **gguf)
    return layout_of_files(config, info.shapes)


def search_fingerprint(config: Mapping[str, Any], resumable: Sequence[str] = RESUMABLE) -> str:
    """Hash of what a run searches: everything but the ``resumable`` settings. A
    ``space.initial`` entry without a method is hashed with the method it takes (the space's
    first), so a run that spelled it out and one that did not are the same search."""
    reduced = json.loads(json.dumps(dict(config), default=str))
    space = reduced.get("space")
    if isinstance(space, dict) and isinstance(space.get("initial"), list) and space.get("methods"):
        space["initial"] = [{"method": space["methods"][0], **entry} if isinstance(entry, dict) else entry
                            for entry in space["initial"]]
    for key in resumable:
        parts = key.split(".")
        node = reduced
        for part in parts[:-1]:
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(parts[-1], None)
    return hashlib.sha256(json.dumps(reduced, sort_keys=True).encode()).hexdigest()[:16]


def same_search(config: Mapping[str, Any], fingerprint: str, recorded: Mapping[str, Any]) -> bool:
    """Whether ``config`` searches what the run whose ``run.json`` holds ``fingerprint`` and the
    ``recorded`` config searched. A run made before ``fitness.batch_size`` was resumable has a
    fingerprint of its recorded config by the rule of then: ``config`` is compared with that
    config by today's."""
    today = search_fingerprint(config)
    if today == fingerprint:
        return True
    return (fingerprint == search_fingerprint(recorded, _BEFORE_BATCH_RESUMABLE)
            and today == search_fingerprint(recorded))


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
