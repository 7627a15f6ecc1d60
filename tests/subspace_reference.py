"""Independent references for the subspace merge methods and CABS, written from the papers'
reference code as it reads (fixed-size factor buffers, scipy's polar decomposition, float64
numpy, element loops for CABS) rather than from evomerge's implementation."""

from __future__ import annotations

import numpy as np
from scipy.linalg import polar


def _orthogonal(a: np.ndarray) -> np.ndarray:
    """Nearest matrix with orthonormal columns (rows when wide): scipy's polar factor."""
    if a.shape[0] >= a.shape[1]:
        return polar(a)[0]
    return polar(a.T)[0].T


def tsv_m(deltas: np.ndarray, weights: list[float], lam: float, fraction: float | None) -> np.ndarray:
    count, m, n = deltas.shape
    r = min(m, n)
    k = max(1, int(r * (1 / count if fraction is None else fraction)))
    sum_u, sum_s, sum_v = np.zeros((m, count * k)), np.zeros(count * k), np.zeros((count * k, n))
    for t, delta in enumerate(deltas):
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        sum_u[:, t * k:(t + 1) * k] = u[:, :k]
        sum_s[t * k:(t + 1) * k] = weights[t] * s[:k]
        sum_v[t * k:(t + 1) * k] = vt[:k]
    return lam * _orthogonal(sum_u) @ np.diag(sum_s) @ _orthogonal(sum_v)


def iso_c(deltas: np.ndarray, weights: list[float], lam: float) -> np.ndarray:
    total = sum(w * d for w, d in zip(weights, deltas))
    u, s, vt = np.linalg.svd(total, full_matrices=False)
    return lam * u @ np.diag(np.full_like(s, s.mean())) @ vt


def iso_cts(deltas: np.ndarray, weights: list[float], lam: float, fraction: float) -> np.ndarray:
    count, m, n = deltas.shape
    r = min(m, n)
    common = int(r * fraction)
    task_total = round((r - common) / count) * count
    common = r - task_total
    per_task = int((r - common) / count)
    weighted = [w * d for w, d in zip(weights, deltas)]
    u, s, vt = np.linalg.svd(sum(weighted), full_matrices=False)
    u_c = u[:, :common]
    comb_u, comb_s, comb_v = np.zeros((m, r)), np.zeros(r), np.zeros((r, n))
    for t, delta in enumerate(weighted):
        own = delta - u_c @ u_c.T @ delta
        ut, st, vtt = np.linalg.svd(own, full_matrices=False)
        comb_u[:, t * per_task:(t + 1) * per_task] = ut[:, :per_task]
        comb_s[t * per_task:(t + 1) * per_task] = st[:per_task]
        comb_v[t * per_task:(t + 1) * per_task] = vtt[:per_task]
    start = count * per_task
    comb_u[:, start:start + common] = u_c
    comb_s[start:start + common] = s[:common]
    comb_v[start:start + common] = vt[:common]
    return lam * comb_s.mean() * _orthogonal(comb_u) @ _orthogonal(comb_v)


def star(deltas: np.ndarray, weights: list[float], lam: float, eta: float) -> np.ndarray:
    out = np.zeros(deltas.shape[1:])
    for w, delta in zip(weights, deltas):
        u, s, vt = np.linalg.svd(delta, full_matrices=False)
        total, running, keep = s.sum(), 0.0, 0
        while running < eta * total:
            running += s[keep]
            keep += 1
        kept = s[:keep] * total / s[:keep].sum()
        out += w * (u[:, :keep] * kept) @ vt[:keep]
    return lam * out / len(deltas)


def cabs(deltas: list[list[float]], weights: list[float], densities: list[float], lam: float,
         block: int) -> list[float]:
    """Experts in order; each keeps, per block of ``block`` consecutive elements, its largest
    round(density * block) magnitudes among the positions no earlier expert kept."""
    numel = len(deltas[0])
    taken = [False] * numel
    update = [0.0] * numel
    for delta, w, d in zip(deltas, weights, densities):
        keep = min(block, round(d * block))
        chosen = []
        for start in range(0, numel, block):
            free = [j for j in range(start, min(start + block, numel)) if not taken[j]]
            chosen += sorted(free, key=lambda j: -abs(delta[j]))[:keep]
        for j in chosen:
            taken[j] = True
            update[j] += lam * w * delta[j]
    return update


def mean_fallback(deltas: np.ndarray, weights: list[float], lam: float) -> np.ndarray:
    """What the subspace methods do outside the block matrices: lambda times the weighted mean."""
    return lam * sum(w * d for w, d in zip(weights, deltas)) / len(deltas)
