"""The Evaluator: a candidate model in, its objectives out.

One Evaluator lives in each worker beside the resident model and is reused for every candidate:
task objects, prompts, lm-eval's model wrapper and the perplexity text are built once, and
``score`` only runs the items the estimator chose. A run fits the estimator once on the probe
population's full evaluations (``fit``), stores the returned state in the run folder, and hands
it to every worker (``load_state``), so all workers and a resumed run estimate alike.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np

from evomerge.config import FitnessConfig
from evomerge.errors import UserError
from evomerge.fitness.estimators import make_estimator
from evomerge.fitness.native import pad_id, perplexity
from evomerge.fitness.objectives import Objective
from evomerge.fitness.tasks import ItemResults, TaskSuite
from evomerge.fitness.text import heldout_text, token_windows

ECE_BINS = 10


@dataclass
class Evaluation:
    """One model's scores: objectives (natural direction), per-task scores (estimated unless the
    evaluation was full) and the per-item results actually run."""

    objectives: dict[str, float]
    scores: dict[str, float]
    items: dict[str, dict[str, list]] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        """JSON-able; NaN (no confidence from lm-eval's path) becomes null."""
        clean = lambda values: [None if isinstance(v, float) and math.isnan(v) else v for v in values]  # noqa: E731
        return {"objectives": dict(self.objectives), "scores": dict(self.scores), "seconds": self.seconds,
                "items": {t: {k: clean(v) for k, v in cols.items()} for t, cols in self.items.items()}}

    @classmethod
    def from_dict(cls, data: Mapping) -> "Evaluation":
        items = {t: {k: [math.nan if v is None else v for v in vals] for k, vals in cols.items()}
                 for t, cols in data.get("items", {}).items()}
        return cls(dict(data["objectives"]), dict(data["scores"]), items, float(data.get("seconds", 0.0)))


def expected_calibration_error(confidence: Sequence[float], correct: Sequence[float],
                               bins: int = ECE_BINS) -> float:
    """ECE: items binned by confidence into ``bins`` equal-width bins; the item-weighted mean of
    |accuracy - mean confidence| per bin. Items without a confidence (NaN) are left out."""
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    keep = ~np.isnan(conf)
    conf, hit = conf[keep], hit[keep]
    if not len(conf):
        return float("nan")
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        member = which == b
        if member.any():
            total += member.sum() * abs(hit[member].mean() - conf[member].mean())
    return float(total / len(conf))


class Evaluator:
    """Scores a (resident, in-place changing) model on the configured tasks and objectives."""

    def __init__(self, config: FitnessConfig, tasks: Sequence[str], tokenizer, *,
                 include_path: str | None = None, device: str = "cpu") -> None:
        self.config, self.tokenizer = config, tokenizer
        self.suite = TaskSuite(list(tasks), tokenizer, include_path=include_path, native=config.native,
                               batch_size=config.batch_size, device=str(device))
        validation = self.suite.tasks("validation")  # loads every task now: bad names fail here
        self.task_names = list(validation)
        self.estimator = make_estimator(config.estimator, config.items_per_task, config.seed)
        self.objectives = self._objectives(validation)
        self._windows = (token_windows(tokenizer, heldout_text(config.perplexity_text),
                                       max_tokens=config.perplexity_tokens)
                         if "perplexity" in config.objectives else [])

    def _objectives(self, tasks) -> list[Objective]:
        out: list[Objective] = []
        generating = [t for t in tasks.values() if t.output_type == "generate_until"]
        for name in self.config.objectives:
            if name == "tasks":
                # Metrics are in [0, 1]: the worst value is 0 when higher is better, else 1.
                out += [Objective(t.name, "max" if t.higher_is_better else "min", 0.0 if t.higher_is_better else 1.0)
                        for t in tasks.values()]
            elif name == "mean":
                out.append(Objective("mean", "max", 0.0))
            elif name == "ece":
                blind = [t.name for t in tasks.values() if not t.native]
                if blind:
                    raise UserError(f"objective ece needs per-item confidence, which lm-eval's path does not "
                                    f"give for {', '.join(blind)}; drop ece or score those tasks natively")
                out.append(Objective("ece", "min", 1.0))
            elif name == "length":
                if not generating:
                    raise UserError("objective length needs a generate_until task; these tasks generate nothing")
                out.append(Objective("length", "min", float(max(t.max_gen_toks for t in generating))))
            else:  # perplexity: a uniform guess over the vocabulary is the worst sensible model
                out.append(Objective("perplexity", "min", float(len(self.tokenizer))))
        return out

    def score(self, model, *, split: str = "validation", full: bool = False,
              like_estimates: bool = False) -> Evaluation:
        """Objectives of ``model``: on the estimator's items (``full=False``, validation only) or
        on every item of ``split`` (decoded, unless ``like_estimates``: scored as the estimator
        scores its items)."""
        started = time.perf_counter()
        if not full and split != "validation":
            raise ValueError("estimators choose validation items; score other splits with full=True")
        tasks = self.suite.tasks(split)
        selection = {name: (list(range(len(t))) if full else self.estimator.select(name, len(t)))
                     for name, t in tasks.items()}
        teacher_forcing = self.config.teacher_forcing and (like_estimates or not full)
        results = self.suite.run(model, split, selection, teacher_forcing=teacher_forcing)
        scores = {name: (r.mean() if full else self.estimator.estimate(name, r.ids, r.correct))
                  for name, r in results.items()}
        objectives = self._measure(model, scores, results)
        items = {name: {"ids": r.ids, "correct": r.correct, "confidence": r.confidence, "length": r.length,
                        "margin": r.margin}
                 for name, r in results.items()}
        return Evaluation(objectives, scores, items, time.perf_counter() - started)

    def _measure(self, model, scores: dict[str, float], results: dict[str, ItemResults]) -> dict[str, float]:
        out: dict[str, float] = {}
        tasks = self.suite.tasks("validation")
        for objective in self.objectives:
            name = objective.name
            if name in scores:
                out[name] = scores[name]
            elif name == "mean":
                out[name] = float(np.mean(list(scores.values())))
            elif name == "ece":
                out[name] = expected_calibration_error([c for r in results.values() for c in r.confidence],
                                                       [c for r in results.values() for c in r.correct])
            elif name == "length":
                out[name] = float(np.mean([n for t, r in results.items() for n in r.length
                                           if tasks[t].output_type == "generate_until"]))
            else:
                out[name] = perplexity(model, self._windows, pad=pad_id(self.tokenizer),
                                       batch_size=max(1, self.config.batch_size // 4))
        return out

    def fit(self, probes: Sequence[Evaluation]) -> dict:
        """Fit the estimator on full validation evaluations of the probe population; returns its
        JSON-able state (store it; ``load_state`` restores it)."""
        if not probes:
            raise ValueError("fit needs at least one probe evaluation")
        responses = {}
        for name, task in self.suite.tasks("validation").items():
            rows = []
            for index, probe in enumerate(probes):
                got = probe.items.get(name)
                if got is None or sorted(got["ids"]) != list(range(len(task))):
                    raise ValueError(f"probe {index} has no full validation result for task {name!r}; "
                                     f"score probes with full=True")
                row = np.empty(len(task))
                row[got["ids"]] = got["correct"]
                rows.append(row)
            responses[name] = np.array(rows)
        return self.estimator.fit(responses)

    def load_state(self, state: Mapping) -> None:
        self.estimator.load_state(state)
