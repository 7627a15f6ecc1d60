"""Estimators: which items of a task a candidate runs, and how its full-split score is estimated.

Scoring a candidate on every validation item is what makes a search slow. An estimator picks a
small item set per task (the same one for every candidate, so candidates are compared on equal
terms) and turns the candidate's answers on it into an estimate of the full score:

- ``full``: every item; the estimate is the score.
- ``random``: a seeded random subset; its mean.
- ``anchors`` (tinyBenchmarks' anchor points): items are clustered by how a probe population of
  models answered them, so items that models pass or fail together share a cluster; the items
  nearest each cluster's centre are run and weighted by their cluster's share of the split.
  This is stratified sampling with strata learned from the probes: a candidate that solves an
  anchor very likely solves its cluster. Unlike tinyBenchmarks (one anchor per cluster, fitted
  on hundreds of models) there are at most half as many clusters as items: with ~10 probes a
  cluster is not homogeneous, and a lone anchor carrying a large cluster's weight makes the
  estimate jumpy (measured on the zoo at 10 items per task: MAE 5.8 points with one anchor per
  cluster, 4.0 with two on average, same rank correlation).
- ``irt``: a two-parameter logistic IRT model, P(correct) = sigmoid(a_i * theta + d_i), fitted on
  the probes' answers; a candidate's ability theta is fitted from its answers on the anchors, and
  the unseen items' scores are predicted from it (p-IRT). The estimate blends p-IRT with the
  anchor estimate (gp-IRT), with the blend weight chosen by leave-one-out on the probes.

The probe population of a search is small (base, experts and a few random merges, about ten
models), so every fit is regularized: clustering runs on the distinct answer patterns (often
fewer than the budget; spare budget then goes to the largest strata), and IRT parameters carry
Gaussian priors that keep items no probe solved at a small but finite probability.
"""

from __future__ import annotations

import zlib
from typing import Mapping, Sequence

import numpy as np

from evomerge.config import ESTIMATORS
from evomerge.errors import UserError

THETA_GRID = np.linspace(-6.0, 6.0, 1201)
PRIOR_LOG_A = 0.5  # std of log discrimination: a stays within ~[0.4, 2.7]
PRIOR_D = 3.0  # std of item easiness d


def task_rng(seed: int, task: str) -> np.random.Generator:
    """A generator per (seed, task): stable across processes (unlike ``hash``) and independent
    of which other tasks a run scores."""
    return np.random.default_rng([seed, zlib.crc32(task.encode())])


class Estimator:
    """``full``: every item, scored exactly. The base the others specialize."""

    name = "full"
    needs_probes = False  # whether ``fit`` on a probe population must come before ``select``

    def __init__(self, budget: int, seed: int) -> None:
        self.budget, self.seed = budget, seed
        self.tasks: dict[str, dict] = {}  # per-task fitted state (JSON-able)

    def select(self, task: str, n: int) -> list[int]:
        return list(range(n))

    def estimate(self, task: str, ids: Sequence[int], values: Sequence[float]) -> float:
        return float(np.mean(values))

    def fit(self, responses: Mapping[str, np.ndarray]) -> dict:
        """Fit on probe responses (task -> models x items, values in [0, 1]); returns the state."""
        self.tasks = {task: self._fit_task(task, np.asarray(y, dtype=float)) for task, y in responses.items()}
        return self.state()

    def _fit_task(self, task: str, y: np.ndarray) -> dict:
        return {"n": int(y.shape[1]), "items": self.select(task, y.shape[1])}

    def state(self) -> dict:
        return {"estimator": self.name, "budget": self.budget, "seed": self.seed, "tasks": self.tasks}

    def load_state(self, state: Mapping) -> None:
        if (state.get("estimator"), state.get("budget"), state.get("seed")) != (self.name, self.budget, self.seed):
            raise UserError(f"the stored estimator state is for estimator {state.get('estimator')!r} with "
                            f"{state.get('budget')} items per task, seed {state.get('seed')}; this run uses "
                            f"{self.name!r} with {self.budget}, seed {self.seed}")
        self.tasks = {task: dict(s) for task, s in state["tasks"].items()}

    def _fitted(self, task: str, n: int) -> dict:
        if task not in self.tasks:
            raise RuntimeError(f"the {self.name} estimator has no fit for task {task!r}; call "
                               f"Evaluator.fit on probe evaluations or load_state first")
        if self.tasks[task]["n"] != n:
            raise UserError(f"task {task!r} has {n} items but the estimator was fitted on "
                            f"{self.tasks[task]['n']}; refit the probes")
        return self.tasks[task]


class RandomSubset(Estimator):
    """A seeded random subset, the same for every candidate; needs no probes."""

    name = "random"

    def select(self, task: str, n: int) -> list[int]:
        if self.budget >= n:
            return list(range(n))
        return sorted(int(i) for i in task_rng(self.seed, task).choice(n, self.budget, replace=False))


class Anchors(Estimator):
    """Anchor points from clustering items on the probes' answers; cluster-share weights."""

    name = "anchors"
    needs_probes = True

    def select(self, task: str, n: int) -> list[int]:
        return list(self._fitted(task, n)["items"])

    def estimate(self, task: str, ids: Sequence[int], values: Sequence[float]) -> float:
        state = self.tasks[task]
        weight = dict(zip(state["items"], state["weights"]))
        return float(sum(weight[i] * v for i, v in zip(ids, values)))

    def _fit_task(self, task: str, y: np.ndarray) -> dict:
        items, weights = anchor_points(y, self.budget, task_rng(self.seed, task))
        return {"n": int(y.shape[1]), "items": items, "weights": weights}


class Irt(Anchors):
    """gp-IRT on the anchor items: p-IRT blended with the anchor estimate."""

    name = "irt"

    def estimate(self, task: str, ids: Sequence[int], values: Sequence[float]) -> float:
        state = self.tasks[task]
        anchor = super().estimate(task, ids, values)
        p_irt = irt_predict(np.array(state["a"]), np.array(state["d"]), list(ids), np.array(values, dtype=float))
        return float(state["beta"] * anchor + (1 - state["beta"]) * p_irt)

    def _fit_task(self, task: str, y: np.ndarray) -> dict:
        state = super()._fit_task(task, y)
        a, d, _ = fit_irt(y)
        state.update(a=a.tolist(), d=d.tolist(), beta=_loo_beta(y, state["items"], state["weights"]))
        return state


ESTIMATOR_CLASSES: dict[str, type[Estimator]] = {c.name: c for c in (Estimator, RandomSubset, Anchors, Irt)}


def make_estimator(name: str, budget: int, seed: int) -> Estimator:
    if name not in ESTIMATOR_CLASSES:
        raise UserError(f"unknown fitness estimator {name!r}; valid: {', '.join(ESTIMATORS)}")
    return ESTIMATOR_CLASSES[name](budget, seed)


# --- anchor points -------------------------------------------------------------------------------


def anchor_points(y: np.ndarray, budget: int, rng: np.random.Generator) -> tuple[list[int], list[float]]:
    """Items to run and their weights (summing to 1) from probe responses ``y`` (models x items).

    Items are grouped by answer pattern; when there are more distinct patterns than half the
    budget they are clustered (k-means, weighted by how many items share a pattern) into
    ``ceil(budget / 2)`` strata, otherwise each pattern is a stratum. Every stratum gets one item,
    the spare budget goes to strata in proportion to their size, and within a stratum the items
    nearest its centre come first (random among ties). A chosen item's weight is its stratum's
    share of the split divided by the items chosen from that stratum.
    """
    n = y.shape[1]
    if budget >= n:
        return list(range(n)), [1.0 / n] * n
    strata_wanted = -(-budget // 2)
    patterns, inverse, counts = np.unique(y.T, axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    if len(patterns) <= strata_wanted:
        labels, centres = inverse, patterns
    else:
        pattern_labels, centres = weighted_kmeans(patterns, counts.astype(float), strata_wanted, rng)
        labels = pattern_labels[inverse]
    strata = [np.flatnonzero(labels == c) for c in range(len(centres))]
    strata = [s for s in strata if len(s)]
    sizes = np.array([len(s) for s in strata])
    take = _allocate(sizes, budget)
    items: list[int] = []
    weights: list[float] = []
    for stratum, count, centre in zip(strata, take, (centres[labels[s[0]]] for s in strata)):
        distance = np.linalg.norm(y.T[stratum] - centre, axis=1)
        order = np.lexsort((rng.random(len(stratum)), distance))
        chosen = stratum[order[:count]]
        items.extend(int(i) for i in chosen)
        weights.extend([len(stratum) / (n * count)] * count)
    order = np.argsort(items)
    return [items[i] for i in order], [weights[i] for i in order]


def _allocate(sizes: np.ndarray, budget: int) -> np.ndarray:
    """One item per stratum, then each spare item to the stratum with the most items per chosen
    item (D'Hondt: allocation proportional to size), never more than a stratum holds."""
    take = np.ones(len(sizes), dtype=int)
    for _ in range(budget - len(sizes)):
        room = sizes - take
        if not room.any():
            break
        share = np.where(room > 0, sizes / take, -1.0)  # give to the stratum least covered per item
        take[int(np.argmax(share))] += 1
    return take


def weighted_kmeans(points: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator,
                    iterations: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Lloyd's k-means with k-means++ seeding on weighted points; returns labels and centres.
    Small enough to write out, which keeps scikit-learn out of the dependencies."""
    centres = [points[rng.choice(len(points), p=weights / weights.sum())]]
    for _ in range(1, k):
        gap = np.min([np.sum((points - c) ** 2, axis=1) for c in centres], axis=0) * weights
        if gap.sum() == 0:
            break
        centres.append(points[rng.choice(len(points), p=gap / gap.sum())])
    centres_arr = np.array(centres, dtype=float)
    labels = np.zeros(len(points), dtype=int)
    for step in range(iterations):
        distance = ((points[:, None, :] - centres_arr[None]) ** 2).sum(-1)
        new = distance.argmin(1)
        if step and np.array_equal(new, labels):
            break
        labels = new
        for c in range(len(centres_arr)):
            member = labels == c
            if member.any():
                centres_arr[c] = np.average(points[member], axis=0, weights=weights[member])
    return labels, centres_arr


# --- IRT -----------------------------------------------------------------------------------------


def fit_irt(y: np.ndarray, steps: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """MAP fit of a 2PL IRT model to responses ``y`` (models x items, in [0, 1]).

    Priors: theta ~ N(0, 1) (fixes the scale), log a ~ N(0, PRIOR_LOG_A^2) (discrimination stays
    positive and moderate), d ~ N(0, PRIOR_D^2). With ~10 probe models the priors, not the data,
    keep items every probe failed (or passed) from running off to infinity. Returns a, d, theta.
    """
    import torch

    target = torch.tensor(y, dtype=torch.float64)
    m, n = target.shape
    theta = torch.zeros(m, dtype=torch.float64, requires_grad=True)
    log_a = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    d = torch.zeros(n, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([theta, log_a, d], max_iter=steps, tolerance_grad=1e-9,
                                  line_search_fn="strong_wolfe")

    def loss():
        optimizer.zero_grad()
        logits = log_a.exp()[None, :] * theta[:, None] + d[None, :]
        value = torch.nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum")
        value = value + 0.5 * (theta ** 2).sum() + 0.5 * ((log_a / PRIOR_LOG_A) ** 2).sum() \
            + 0.5 * ((d / PRIOR_D) ** 2).sum()
        value.backward()
        return value

    optimizer.step(loss)
    return log_a.exp().detach().numpy(), d.detach().numpy(), theta.detach().numpy()


def fit_ability(a: np.ndarray, d: np.ndarray, values: np.ndarray) -> float:
    """MAP ability of one model from its answers on the items ``a``, ``d`` describe (grid search
    over theta: one dimension, so exhaustive and deterministic)."""
    logits = THETA_GRID[:, None] * a[None, :] + d[None, :]
    loglik = (values[None, :] * -np.logaddexp(0, -logits) + (1 - values[None, :]) * -np.logaddexp(0, logits)).sum(1)
    return float(THETA_GRID[np.argmax(loglik - 0.5 * THETA_GRID ** 2)])


def irt_predict(a: np.ndarray, d: np.ndarray, ids: Sequence[int], values: np.ndarray) -> float:
    """p-IRT: the seen items count as answered, every unseen item adds its predicted P(correct)
    at the ability fitted from the seen ones."""
    theta = fit_ability(a[list(ids)], d[list(ids)], values)
    unseen = np.ones(len(a), dtype=bool)
    unseen[list(ids)] = False
    predicted = 1 / (1 + np.exp(-(a[unseen] * theta + d[unseen])))
    return float((values.sum() + predicted.sum()) / len(a))


def _loo_beta(y: np.ndarray, items: list[int], weights: list[float]) -> float:
    """Blend weight of the anchor estimate in gp-IRT: the least-squares choice over the probes,
    each predicted by an IRT model fitted without it (so the weight reflects unseen models)."""
    if len(items) == y.shape[1] or y.shape[0] < 3:
        return 0.5
    w = np.array(weights)
    anchor, p_irt, truth = [], [], []
    for j in range(y.shape[0]):
        a, d, _ = fit_irt(np.delete(y, j, axis=0))
        anchor.append(float(w @ y[j, items]))
        p_irt.append(irt_predict(a, d, items, y[j, items]))
        truth.append(float(y[j].mean()))
    gap, lift = np.array(p_irt) - np.array(truth), np.array(anchor) - np.array(p_irt)
    if not lift.any():
        return 0.5
    return float(np.clip(-(gap @ lift) / (lift @ lift), 0.0, 1.0))
