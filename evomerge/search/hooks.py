"""Events of a search that code outside the search may act on (pymoo's ``Callback`` in spirit).

The search calls a ``SearchHooks`` at fixed points: the driver around its writes and at the end,
each ``MergeWorker`` along a candidate's way. Every method here does nothing; a subclass
overrides the events it cares about. This is how the fault tests crash a driver halfway through
a write, kill a worker or poison a merge, and how an experiment changes what the search does at
its end, without a single test branch in the search itself.

The object travels to every worker inside the ``WorkerSpec`` (pickled by Ray), so each worker
holds its own copy: state a subclass keeps (e.g. a call counter) is per worker. A subclass must
be importable by name in the worker processes (a module on their ``PYTHONPATH``), or registered
with ``ray.cloudpickle.register_pickle_by_value``.

A worker hook that raises costs that candidate (recorded with the error), not the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    from evomerge.run import ArchiveEntry, RunDir
    from evomerge.search.messages import EvalRequest


class SearchHooks:
    # --- the driver ------------------------------------------------------------------------------
    def before_archive_line(self, run: RunDir, entry: ArchiveEntry) -> None:
        """``entry`` is about to be appended to ``run``'s archive (nothing else knows of it yet)."""

    def after_generation(self, generation: int, front: Sequence[ArchiveEntry]) -> None:
        """``generation`` is finished: archived, told to the algorithm, its history line and
        ``pareto.json`` written. ``front`` is the current front. A
        resumed run calls it again for the generations it replays from the archive."""

    def before_test_scoring(self, members: Sequence[ArchiveEntry]) -> list[ArchiveEntry]:
        """The search is over and is about to score ``members`` (the front's picks not scored
        yet) on the full test split; returns the ones to score."""
        return list(members)

    # --- each worker -----------------------------------------------------------------------------
    def candidate_starts(self, worker: str, request: EvalRequest) -> None:
        """Worker ``worker`` took ``request``; nothing is merged yet."""

    def materialized(self, worker: str, request: EvalRequest, model: Any) -> None:
        """``model`` holds the request's merged weights, not yet checked or scored."""

    def before_scoring(self, worker: str, request: EvalRequest) -> None:
        """The merged weights are finite; the evaluation starts now."""
