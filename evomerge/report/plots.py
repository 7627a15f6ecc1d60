"""The run's plots as PNG files (``evomerge inspect`` writes them beside the archive): the front
and the hypervolume per generation, drawn with matplotlib so they open anywhere."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from evomerge import front as fronts
from evomerge.fitness.objectives import Objective
from evomerge.report.run_data import objectives
from evomerge.run import ArchiveEntry, RunDir, atomic_write


def write_plots(run: RunDir) -> list[Path]:
    """Write ``plots/pareto.png`` and ``plots/hypervolume.png``; return their paths. Files are
    replaced atomically, so a viewer refreshing them during a run never reads half a PNG."""
    objs = objectives(run)
    valid = fronts.competing(run.archive(), objs)
    members = fronts.front(valid, objs)
    run.plots.mkdir(parents=True, exist_ok=True)
    written = []
    for name, figure in (("pareto.png", _pareto_figure(objs, valid, members)),
                         ("hypervolume.png", _hypervolume_figure(run.history()))):
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        atomic_write(run.plots / name, buffer.getvalue())
        written.append(run.plots / name)
    return written


def _pareto_figure(objs: Sequence[Objective], valid: Sequence[ArchiveEntry],
                   members: Sequence[ArchiveEntry]):
    """2 objectives: one scatter; more: pairwise panels; 1: objective by evaluation id."""
    from matplotlib.figure import Figure

    if not valid:
        return _message("no successful evaluation yet" if objs else
                        "objectives not known yet (no generation finished)")
    chosen = fronts.knee(members, objs)
    value = lambda entries, o: [e.objectives[o.name] for e in entries]
    if len(objs) == 1:
        figure = Figure(figsize=(6, 4.5), layout="constrained")
        ax = figure.add_subplot()
        (o,) = objs
        ids = [e.id for e in valid]
        running = (np.maximum if o.direction == "max" else np.minimum).accumulate(value(valid, o))
        ax.scatter(ids, value(valid, o), s=12, c="0.65", label="evaluations")
        ax.step(ids, running, where="post", c="tab:blue", label="best so far")
        ax.scatter([chosen.id], [chosen.objectives[o.name]], s=90, marker="*", c="tab:red",
                   label=f"best (id {chosen.id})", zorder=3)
        ax.set(xlabel="evaluation id", ylabel=f"{o.name} ({o.direction})")
        ax.legend(fontsize=8)
        return figure
    n = len(objs)
    if n == 2:
        figure = Figure(figsize=(5.5, 5.5), layout="constrained")
        panels = [(figure.add_subplot(), objs[0], objs[1])]
    else:  # row i, column j plots objective i against objective j; the diagonal, histograms
        figure = Figure(figsize=(2.6 * n, 2.6 * n), layout="constrained")
        grid = figure.subplots(n, n, squeeze=False)
        panels = [(grid[i][j], objs[j], objs[i]) for i in range(n) for j in range(n)]
    for ax, x, y in panels:
        ax.tick_params(labelsize=7)
        if x == y:
            bins = np.histogram_bin_edges(value(valid, x), bins=20)
            ax.hist(value(valid, x), bins=bins, color="0.65")
            ax.hist(value(members, x), bins=bins, color="tab:blue")
            ax.set_xlabel(f"{x.name} ({x.direction}): count", fontsize=8)
            continue
        ordered = sorted(members, key=lambda e: e.objectives[x.name])
        ax.scatter(value(valid, x), value(valid, y), s=10, c="0.7", label="evaluations")
        ax.scatter(value(ordered, x), value(ordered, y), s=22, c="tab:blue", label="front")
        if n == 2:  # with two objectives the front is a staircase worth connecting
            ax.plot(value(ordered, x), value(ordered, y), c="tab:blue", lw=0.8)
        ax.scatter([chosen.objectives[x.name]], [chosen.objectives[y.name]], s=110, marker="*",
                   c="tab:red", label=f"knee (id {chosen.id})", zorder=3)
        ax.set_xlabel(f"{x.name} ({x.direction})", fontsize=8)
        ax.set_ylabel(f"{y.name} ({y.direction})", fontsize=8)
    panels[0 if n == 2 else n][0].legend(fontsize=7)  # the first scatter panel
    figure.suptitle(f"{len(members)} non-dominated of {len(valid)} distinct recipes", fontsize=10)
    return figure


def _hypervolume_figure(history: Sequence[dict[str, Any]]):
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    points = [(h["generation"], h["hypervolume"]) for h in history
              if h.get("generation") is not None and h.get("hypervolume") is not None]
    if not points:
        return _message("no generation finished yet")
    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    x, y = zip(*points)
    ax.plot(x, y, marker="o", c="tab:blue")
    ax.set(xlabel="generation", ylabel="hypervolume", title="hypervolume of the front")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    return figure


def _message(text: str):
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4))
    ax = figure.add_subplot()
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=12)
    ax.set_axis_off()
    return figure
