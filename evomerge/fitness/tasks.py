"""Tasks: any lm-eval task by name, on one split, scored item by item on a resident model.

lm-eval defines what a task is (its documents, prompts, filters and metric); evomerge reuses
that definition and only replaces the model calls where it can do them faster. A task whose
requests are greedy generations or log-likelihoods (``generate_until`` without sampling,
``multiple_choice``, ``loglikelihood``) is built into lm-eval's own requests once, then run by
:mod:`evomerge.fitness.native` in batches with no per-call overhead, and judged by the task's
own filters and ``process_results``: the same per-item numbers lm-eval gives. Any other task
(sampling, repeats, rolling log-likelihood, multimodal) goes through ``lm_eval.evaluate`` with
one model wrapper and one task object built per split and reused for every candidate; only
``samples=`` changes between calls.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Sequence

import numpy as np

from evomerge.errors import UserError
from evomerge.fitness import native

SPLITS = ("validation", "test")
_NATIVE_TYPES = ("generate_until", "multiple_choice", "loglikelihood")


@dataclass
class ItemResults:
    """Per-item outcomes of one task run, aligned lists.

    ``correct`` is the task's metric on the item (0/1 for accuracy and exact match);
    ``confidence`` the model's probability for its own answer (NaN where lm-eval does not expose
    one); ``length`` the tokens generated (0 for log-likelihood tasks, which generate nothing);
    ``margin`` how far the model was from flipping the item, in log-probability (the reference
    choice's lead over the best other choice; for generation, see :func:`native.generate`), NaN
    where the task gives no single reference or lm-eval ran it.
    """

    ids: list[int]
    correct: list[float]
    confidence: list[float]
    length: list[int]
    margin: list[float]

    def mean(self) -> float:
        return float(np.mean(self.correct))


def _offline() -> None:
    """Runs score local or already-cached data; a worker must never stall on the hub. Set before
    lm-eval imports ``datasets``; an explicit ``=0`` from the user still wins."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


@lru_cache(maxsize=8)
def _manager(include_path: str | None, defaults: bool):
    """Indexing lm-eval's ~15k built-in task files takes ~10 s: done once per process, and
    skipped entirely when every requested task lives under ``include_path``."""
    _offline()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, include_defaults=defaults)


def _resolve_manager(names: Sequence[str], include_path: str | None):
    if include_path is not None and not os.path.isdir(include_path):
        raise UserError(f"task include_path {include_path!r} is not a folder")
    if include_path is not None:
        local = _manager(include_path, False)
        if all(n in local.all_tasks for n in names):
            return local
    manager = _manager(include_path, True)
    for name in names:
        if name not in manager.all_tasks:
            close = difflib.get_close_matches(name, manager.all_tasks, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            where = f"lm-eval's tasks and include_path={include_path}" if include_path else \
                "lm-eval's built-in tasks (no include_path given)"
            raise UserError(f"unknown lm-eval task {name!r}{hint} (searched {where})")
    return manager


def _leaves(task_dict: dict) -> dict[str, Any]:
    """Groups (e.g. ``mmlu``) expand to their tasks, each scored and reported on its own."""
    out: dict[str, Any] = {}
    for key, value in task_dict.items():
        out.update(_leaves(value) if isinstance(value, dict) else {key: value})
    return out


def load_lm_eval_tasks(names: Sequence[str], include_path: str | None, split: str) -> dict[str, Any]:
    """lm-eval task objects whose evaluation documents are ``split``.

    lm-eval evaluates a task's test split when it has one; for validation the test split is
    unset on this (private) task object so ``lm_eval.evaluate`` sees validation documents."""
    if split not in SPLITS:
        raise UserError(f"split {split!r} is unknown; valid: {', '.join(SPLITS)}")
    from lm_eval.tasks import get_task_dict

    leaves = _leaves(get_task_dict(list(names), _resolve_manager(names, include_path)))
    # In the order asked for (lm-eval reorders); a group's tasks follow in lm-eval's order.
    tasks = {n: leaves[n] for n in names if n in leaves} | {n: t for n, t in leaves.items() if n not in names}
    for name, task in tasks.items():
        if getattr(task.config, f"{split}_split", None) is None:
            raise UserError(f"lm-eval task {name!r} has no {split} split; evomerge searches on "
                            f"validation and reports test")
        if split == "validation":
            task.set_config("test_split", None)
    return tasks


def _is_native(task) -> bool:
    config = task.config
    if task.OUTPUT_TYPE not in _NATIVE_TYPES or (config.repeats or 1) != 1:
        return False
    if config.doc_to_image or config.doc_to_audio:
        return False
    if task.OUTPUT_TYPE == "generate_until":
        kwargs = config.generation_kwargs or {}
        return not kwargs.get("do_sample") and not kwargs.get("temperature")
    return True


class Task:
    """One lm-eval task on one split: its documents, its metric, and how its items are run."""

    def __init__(self, name: str, lm_task, split: str, *, allow_native: bool = True) -> None:
        self.name, self.split, self.lm_task = name, split, lm_task
        self.output_type: str = lm_task.OUTPUT_TYPE
        self.docs = list(lm_task.validation_docs() if split == "validation" else lm_task.test_docs())
        if not self.docs:
            raise UserError(f"lm-eval task {name!r} has no documents in its {split} split")
        metrics = list(lm_task._metric_fn_list)
        if not metrics:
            raise UserError(f"lm-eval task {name!r} defines no metric")
        self.metric: str = metrics[0]
        self.higher_is_better = bool(lm_task.higher_is_better().get(self.metric, True))
        self.filter = lm_task._filters[0]
        self.native = allow_native and _is_native(lm_task)
        kwargs = lm_task.config.generation_kwargs or {}
        self.max_gen_toks = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256))) \
            if self.output_type == "generate_until" else 0
        self._requests: dict[int, list] = {}
        self._references: dict[int, list[int] | None] = {}

    def __len__(self) -> int:
        return len(self.docs)

    def requests(self, doc_id: int) -> list:
        """lm-eval's requests for a document (context built with the task's few-shot, description
        and target-delimiter settings), built once and kept: prompts never change."""
        if doc_id not in self._requests:
            task, doc = self.lm_task, self.docs[doc_id]
            context = task.fewshot_context(doc, num_fewshot=task.config.num_fewshot or 0,
                                           gen_prefix=task.doc_to_prefix(doc))
            made = task.construct_requests(doc=doc, ctx=context, metadata=(self.name, doc_id, 1))
            self._requests[doc_id] = made if isinstance(made, list) else [made]
        return self._requests[doc_id]

    def run_native(self, model, tokenizer, ids: Sequence[int], batch_size: int) -> ItemResults:
        """The task's own requests, run natively, then filtered and judged by the task itself."""
        owners: list[int] = []
        requests = []
        for doc_id in ids:
            for request in self.requests(doc_id):
                owners.append(doc_id)
                requests.append(request)
        if self.output_type == "generate_until":
            references = [self._reference_ids(doc_id, tokenizer) for doc_id in owners]
            generations = self._generate(model, tokenizer, requests, batch_size, references)
            raw: list[Any] = [g.text for g in generations]
        else:
            raw = native.loglikelihoods(model, tokenizer, [r.args[:2] for r in requests], batch_size=batch_size)
        filtered = [[value] for value in raw]
        docs = [self.docs[i] for i in owners]
        for step in self.filter.filters:
            filtered = step().apply(filtered, docs)
        filtered = list(filtered)  # filters may return lazy iterables
        per_doc: dict[int, list[int]] = {}
        for index, doc_id in enumerate(owners):
            per_doc.setdefault(doc_id, []).append(index)
        results = ItemResults([], [], [], [], [])
        for doc_id in ids:
            rows = per_doc[doc_id]
            value = self.lm_task.process_results(self.docs[doc_id], [filtered[i] for i in rows])[self.metric]
            if self.output_type == "generate_until":
                made = generations[rows[0]]
                confidence, length, margin = math.exp(made.logprob), made.tokens, made.margin
            else:
                lls = [raw[i][0] for i in rows]
                confidence, length, margin = self._choice_confidence(doc_id, lls), 0, self._choice_margin(doc_id, lls)
            results.ids.append(doc_id)
            results.correct.append(_number(self.name, self.metric, value))
            results.confidence.append(confidence)
            results.length.append(length)
            results.margin.append(margin)
        return results

    @property
    def teacher_forceable(self) -> bool:
        """Whether an item can be judged from its reference alone: exact match on a greedy
        generation, where the answer is right when decoding reproduces the reference."""
        return self.native and self.output_type == "generate_until" and self.metric == "exact_match"

    def run_teacher_forced(self, model, tokenizer, ids: Sequence[int], batch_size: int) -> ItemResults:
        """Each item judged by one forward pass over prompt + reference: right when greedy
        decoding would reproduce the reference's tokens (:func:`native.reference_margins`).
        It skips the decoding loop (the stop string, other spellings of the same text and the
        task's filters are not checked, so it estimates exact match rather than computing it);
        a document without a single string reference is generated as usual."""
        references = [self._reference_ids(doc_id, tokenizer) for doc_id in ids]
        if not all(r and len(r) <= self.max_gen_toks for r in references):
            return self.run_native(model, tokenizer, ids, batch_size)
        prompts = [self.requests(doc_id)[0].args[0] for doc_id in ids]
        margins = native.reference_margins(model, tokenizer, prompts, references,  # type: ignore[arg-type]
                                           max_new_tokens=self.max_gen_toks, batch_size=batch_size)
        return ItemResults(list(ids), [float(m > 0) for m in margins], [math.nan] * len(ids),
                           [len(r) for r in references], margins)  # type: ignore[arg-type]

    def reference_pairs(self, ids: Sequence[int], tokenizer) -> list[tuple[str, list[int]]]:
        """``(prompt, reference token ids)`` of each item that has a single string reference, as
        teacher forcing scores them: what a supervised gradient step learns from."""
        pairs = []
        for doc_id in ids:
            reference = self._reference_ids(doc_id, tokenizer)
            if reference and self.output_type == "generate_until":
                pairs.append((self.requests(doc_id)[0].args[0], reference[:self.max_gen_toks]))
        return pairs

    def prompts(self, ids: Sequence[int]) -> list[str]:
        """Each item's generation prompt (no reference needed): what an unsupervised step reads."""
        return [self.requests(doc_id)[0].args[0] for doc_id in ids if self.output_type == "generate_until"]

    def _reference_ids(self, doc_id: int, tokenizer) -> list[int] | None:
        """Token ids of the answer a generation should give (target delimiter + target, as the
        task's few-shot examples write it), or None where the task has no single string target.
        Built once per document and kept, as the requests are."""
        if doc_id not in self._references:
            target = self.lm_task.doc_to_target(self.docs[doc_id])
            if isinstance(target, list) and len(target) == 1:
                target = target[0]
            delimiter = self.lm_task.config.target_delimiter or ""
            self._references[doc_id] = (tokenizer(delimiter + target, add_special_tokens=False).input_ids
                                        if isinstance(target, str) and target else None)
        return self._references[doc_id]

    def _choice_margin(self, doc_id: int, lls: list[float]) -> float:
        """Multiple choice: the reference choice's log-likelihood lead over the best other one."""
        if self.output_type != "multiple_choice" or len(lls) < 2:
            return math.nan
        doc = self.docs[doc_id]
        gold = self.lm_task.doc_to_target(doc)
        if isinstance(gold, str):
            choices = list(self.lm_task.doc_to_choice(doc))
            gold = choices.index(gold) if gold in choices else None
        if not isinstance(gold, int) or not 0 <= gold < len(lls):
            return math.nan
        return float(lls[gold] - max(ll for i, ll in enumerate(lls) if i != gold))

    def _generate(self, model, tokenizer, requests: list, batch_size: int,
                  references: list[list[int] | None]) -> list[native.Generation]:
        """Requests grouped by generation settings (a task may vary them per document)."""
        out: list[native.Generation | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        for indices in groups.values():
            kwargs = requests[indices[0]].args[1]
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            limit = int(kwargs.get("max_gen_toks", kwargs.get("max_new_tokens", 256)))
            made = native.generate(model, tokenizer, [requests[i].args[0] for i in indices],
                                   until=until, max_new_tokens=limit, batch_size=batch_size,
                                   references=[references[i] for i in indices])
            for i, generation in zip(indices, made):
                out[i] = generation
        return out  # type: ignore[return-value]

    def _choice_confidence(self, doc_id: int, lls: list[float]) -> float:
        """Softmax probability of the chosen answer over the choices (multiple choice), or the
        probability of the scored continuation (a single log-likelihood request)."""
        if self.output_type != "multiple_choice":
            return math.exp(lls[0])
        n = len(self.lm_task.doc_to_choice(self.docs[doc_id]))
        scores = np.array(lls[:n])
        probs = np.exp(scores - scores.max())
        return float(probs.max() / probs.sum())

    def from_samples(self, samples: list[dict], tokenizer, ids: Sequence[int]) -> ItemResults:
        """Per-item results from lm-eval's logged samples (the non-native path)."""
        mine = {s["doc_id"]: s for s in samples if s["filter"] == self.filter.name}
        results = ItemResults([], [], [], [], [])
        for doc_id in ids:
            sample = mine[doc_id]
            length = 0
            if self.output_type == "generate_until":
                length = len(tokenizer(sample["resps"][0][0], add_special_tokens=False).input_ids)
            results.ids.append(doc_id)
            results.correct.append(_number(self.name, self.metric, sample[self.metric]))
            results.confidence.append(math.nan)
            results.length.append(length)
            results.margin.append(math.nan)
        return results


def _number(task: str, metric: str, value: Any) -> float:
    if isinstance(value, (bool, int, float, np.number, np.bool_)):
        return float(value)
    raise UserError(f"lm-eval task {task!r}: its metric {metric!r} is not a per-item number "
                    f"({type(value).__name__}); evomerge needs a metric averaged over items")


class TaskSuite:
    """The tasks an Evaluator scores, per split, plus the one lm-eval model wrapper the
    non-native tasks share. Task objects are built on first use of a split and kept."""

    def __init__(self, names: Sequence[str], tokenizer, *, include_path: str | None = None,
                 native: bool = True, batch_size: int = 32, device: str = "cpu") -> None:
        if not names:
            raise UserError("no tasks given; name at least one lm-eval task")
        if len(set(names)) != len(names):
            raise UserError(f"tasks repeat a name: {list(names)}")
        self.names = list(names)
        self.tokenizer, self.include_path = tokenizer, include_path
        self.allow_native, self.batch_size, self.device = native, batch_size, device
        self._splits: dict[str, dict[str, Task]] = {}
        self._lm = None
        self._lm_model_id: int | None = None

    def tasks(self, split: str = "validation") -> dict[str, Task]:
        if split not in self._splits:
            loaded = load_lm_eval_tasks(self.names, self.include_path, split)
            self._splits[split] = {name: Task(name, t, split, allow_native=self.allow_native)
                                   for name, t in loaded.items()}
        return self._splits[split]

    def run(self, model, split: str, selection: dict[str, Sequence[int]], *,
            teacher_forcing: bool = False) -> dict[str, ItemResults]:
        """Run the selected items (document ids, per task) of ``split`` on ``model``; with
        ``teacher_forcing``, exact-match generation tasks are judged against their references
        (:meth:`Task.run_teacher_forced`) instead of decoded."""
        tasks = self.tasks(split)
        results: dict[str, ItemResults] = {}
        via_lm_eval = {}
        for name, ids in selection.items():
            ids = sorted(ids)  # lm-eval maps ``samples`` back to ids assuming sorted order
            if teacher_forcing and tasks[name].teacher_forceable:
                results[name] = tasks[name].run_teacher_forced(model, self.tokenizer, ids, self.batch_size)
            elif tasks[name].native:
                results[name] = tasks[name].run_native(model, self.tokenizer, ids, self.batch_size)
            else:
                via_lm_eval[name] = ids
        if via_lm_eval:
            from lm_eval.evaluator import evaluate

            out = evaluate(lm=self._wrapper(model), task_dict={n: tasks[n].lm_task for n in via_lm_eval},
                           samples=via_lm_eval, log_samples=True, verbosity="ERROR")
            for name, ids in via_lm_eval.items():
                results[name] = tasks[name].from_samples(out["samples"][name], self.tokenizer, ids)
        return {name: results[name] for name in selection}

    def _wrapper(self, model):
        """lm-eval's HF wrapper around the resident model, built once: in-place weight changes
        reach it, so only a different model object needs a new one."""
        if self._lm is None or self._lm_model_id != id(model):
            from lm_eval.models.huggingface import HFLM

            self._lm = HFLM(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size,
                            device=self.device)
            self._lm_model_id = id(model)
        return self._lm
