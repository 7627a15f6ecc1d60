"""Ray workers that keep a merge pool resident and evaluate many candidates each.

A ``MergeWorker`` actor loads base and task vectors once (a ``Merger``) and builds its
``Evaluator`` once; a candidate then costs one in-place materialization plus its evaluation.
The ``WorkerPool`` hands candidates to idle actors, reports each result the moment it arrives
(so the archive is written before anything else happens), and when an actor dies it starts a
replacement and gives the candidate to another actor: nothing is lost, nothing runs twice to
completion.
"""

from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Hashable, Mapping, Sequence, TypeVar

from evomerge.config import FitnessConfig, RefineConfig, RuntimeConfig
from evomerge.errors import UserError
from evomerge.search.hooks import SearchHooks
from evomerge.search.messages import EvalRequest, EvalResult, RefineRequest, RefineResult

if TYPE_CHECKING:
    from evomerge.layer_path import Plan


@dataclass
class WorkerSpec:
    """All a worker needs to build itself; plain data, so Ray ships it to any node."""

    base: str
    experts: dict[str, str]
    tasks: list[str]
    include_path: str | None
    fitness: FitnessConfig
    runtime: RuntimeConfig
    allow_pickle: bool = False
    trust_remote_code: bool = False
    estimator_state: dict[str, Any] | None = None
    refine: RefineConfig = field(default_factory=RefineConfig)
    hooks: SearchHooks = field(default_factory=SearchHooks)


class MergeWorker:
    """One resident merge pool and evaluator; ``evaluate`` never raises for a bad candidate."""

    def __init__(self, spec: WorkerSpec, name: str) -> None:
        import torch

        from evomerge.fitness.evaluator import Evaluator
        from evomerge.merge.engine import Merger
        from evomerge.merge.memory import delta_format
        from evomerge.pool import ModelPool

        torch.set_num_threads(spec.runtime.threads_per_worker)
        self.name = name
        self.spec = spec
        device = spec.runtime.resolved_device()
        dtype = getattr(torch, spec.runtime.dtype)
        # the pool stores each task vector in the merger's format as it loads (see ModelPool)
        deltas = delta_format(spec.runtime.delta_dtype, dtype)
        pool = ModelPool(spec.base, spec.experts, delta_dtype=deltas, allow_pickle=spec.allow_pickle,
                         trust_remote_code=spec.trust_remote_code)
        self.merger = Merger(pool, device=device, dtype=dtype, delta_dtype=deltas)
        if spec.runtime.memory_limit_gb is not None and \
                self.merger.memory_plan().total > spec.runtime.memory_limit_gb * 2**30:
            raise UserError(f"a worker needs {self.merger.memory_plan().summary()}, more than "
                            f"runtime.memory_limit_gb={spec.runtime.memory_limit_gb}; lower "
                            f"runtime.workers, set runtime.delta_dtype=bfloat16 or int8, or raise the limit")
        self.evaluator = Evaluator(spec.fitness, spec.tasks, pool.tokenizer,
                                   include_path=spec.include_path, device=device)
        if spec.estimator_state is not None:
            self.evaluator.load_state(spec.estimator_state)
        self.hooks = spec.hooks
        self._sources = None  # a data-flow search's source models, materialized on first use
        self._refiner = None  # built on the first refinement
        # Time inside the model's forward passes, so benchmarks can tell evaluation from overhead.
        self.forward_seconds = 0.0
        self._timed(self.merger.model)

    def _timed(self, model) -> None:
        model.register_forward_pre_hook(self._forward_starts)
        model.register_forward_hook(self._forward_ends)

    def _model_for(self, plan: Plan):
        """The model a candidate is scored with: the working model with the recipe merged in
        place, or a layer path's model over the resident source models (no weight copied)."""
        from evomerge.layer_path import LayerPath

        if not isinstance(plan, LayerPath):
            return self.merger.materialize(plan)
        from evomerge.merge.path_model import PathSources, path_model

        if self._sources is None:
            self._sources = PathSources(self.merger)
        model = path_model(plan, self._sources)
        self._timed(model)
        return model

    def _forward_starts(self, module, args) -> None:
        self._forward_started = time.perf_counter()

    def _forward_ends(self, module, args, output) -> None:
        self.forward_seconds += time.perf_counter() - self._forward_started

    def load_state(self, state: dict[str, Any]) -> None:
        self.evaluator.load_state(state)

    def refine(self, request: RefineRequest) -> RefineResult:
        """Refine a recipe; a failure comes back as ``error``, never raised."""
        from evomerge.search.refine import Refiner

        try:
            if self._refiner is None:
                self._refiner = Refiner(self.merger, self.evaluator.suite, self.spec.refine)
            return RefineResult(self.name, self._refiner.refine(request.recipe, seed=request.seed))
        except Exception as error:  # noqa: BLE001 - one candidate's failure costs that candidate
            return RefineResult(self.name, error=f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}")
        finally:
            _give_back_freed_memory()

    def evaluate(self, request: EvalRequest) -> EvalResult:
        """Merge the recipe in place and score it; failures come back as ``error``, not raised."""
        import torch

        result = EvalResult(self.name)
        started = time.perf_counter()
        forward_before = self.forward_seconds
        try:
            self.hooks.candidate_starts(self.name, request)
            model = self._model_for(request.recipe)
            self.hooks.materialized(self.name, request, model)
            # A sum is NaN or inf when any element is: one read per tensor, no mask allocated.
            bad = next((n for n, p in model.named_parameters() if not torch.isfinite(p.sum())), None)
            result.merge_seconds = time.perf_counter() - started
            if bad is not None:
                result.error = f"merged weights are not finite (first: {bad})"
                return result
            scored = time.perf_counter()
            self.hooks.before_scoring(self.name, request)
            result.evaluation = self.evaluator.score(model, split=request.split, full=request.full,
                                                       like_estimates=request.like_estimates)
            result.eval_seconds = time.perf_counter() - scored
            result.forward_seconds = self.forward_seconds - forward_before
        except Exception as error:  # one candidate's failure costs that candidate, not the run
            result.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        return result


Key = TypeVar("Key", bound=Hashable)


class WorkerPool:
    """A fixed number of ``MergeWorker`` actors on local Ray or a cluster joined by address."""

    def __init__(self, spec: WorkerSpec, log: Callable[[str], None] = print) -> None:
        runtime = spec.runtime
        if runtime.address and runtime.auth_token_file:
            _use_token_file(runtime.auth_token_file)  # before ray is imported: it reads them then
        import ray

        self.spec = spec
        self.log = log
        if not ray.is_initialized():
            if runtime.address:
                _check_reachable(runtime.address)
                try:
                    ray.init(address=runtime.address, log_to_driver=False)
                except (ConnectionError, RuntimeError, ray.exceptions.RaySystemError) as error:
                    raise UserError(f"cannot join the Ray cluster at runtime.address={runtime.address}: "
                                    f"{_last_line(error)}; is `ray start --head` running there, and if it was "
                                    f"started with RAY_AUTH_MODE=token, does runtime.auth_token_file (or "
                                    f"RAY_AUTH_TOKEN) hold its token?") from None
            else:  # "local": a fresh instance, never a stray cluster this machine happens to run
                ray.init(address="local", num_cpus=max(os.cpu_count() or 1, runtime.workers * runtime.threads_per_worker),
                         include_dashboard=False, log_to_driver=False)
        gpu = runtime.resolved_device().startswith("cuda")
        self._actor_class = ray.remote(num_cpus=runtime.threads_per_worker, num_gpus=1 if gpu else 0)(MergeWorker)
        self._serial = 0
        self.actors = [self._start() for _ in range(runtime.workers)]
        try:
            ray.get([actor.__ray_ready__.remote() for actor, _ in self.actors])
        except ray.exceptions.RayActorError as error:
            self.shutdown()
            raise UserError(_first_user_error(error) or f"a merge worker failed to start: "
                            f"{str(error).strip().splitlines()[-1]}") from None
        except ray.exceptions.OutOfMemoryError:
            self.shutdown()
            raise UserError(f"Ray killed a merge worker for memory while it loaded its pool; lower "
                            f"runtime.workers (now {runtime.workers}) or set runtime.delta_dtype=bfloat16 or "
                            f"int8 (`evomerge plan` shows what each worker holds)") from None

    def _start(self):
        name = f"w{self._serial}"
        self._serial += 1
        return self._actor_class.remote(self.spec, name), name

    def load_state(self, state: dict[str, Any]) -> None:
        import ray

        self.spec.estimator_state = state
        ray.get([actor.load_state.remote(state) for actor, _ in self.actors])

    def run(self, jobs: Mapping[Key, EvalRequest | RefineRequest],
            on_result: Callable[[Key, EvalResult | RefineResult], None]) -> None:
        """Evaluate every request; ``on_result(key, result)`` runs in the driver as each finishes.

        A request whose actor dies goes back to the queue (up to ``max_retries`` times, then it is
        reported as an error) and the actor is replaced, so the pool keeps its size."""
        import ray
        from ray.exceptions import OutOfMemoryError, RayActorError

        queue = deque((key, request, 0) for key, request in jobs.items())
        idle = deque(range(len(self.actors)))
        running: dict[Any, tuple[int, tuple[Key, EvalRequest | RefineRequest, int]]] = {}
        while queue or running:
            while queue and idle:
                slot = idle.popleft()
                job = queue.popleft()
                actor, _ = self.actors[slot]
                serve = actor.refine if isinstance(job[1], RefineRequest) else actor.evaluate
                running[serve.remote(job[1])] = (slot, job)
            done, _ = ray.wait(list(running), num_returns=1)
            ref = done[0]
            slot, (key, request, attempts) = running.pop(ref)
            try:
                result = ray.get(ref)
            except (RayActorError, OutOfMemoryError) as error:  # Ray's memory monitor kills a worker too
                lost = self.actors[slot][1]
                self.actors[slot] = self._start()
                self.log(f"worker {lost} died ({type(error).__name__}); started "
                         f"{self.actors[slot][1]} and retrying its candidate")
                if attempts + 1 > self.spec.runtime.max_retries:
                    died = f"worker died {attempts + 1} times on this candidate"
                    on_result(key, RefineResult(lost, error=died) if isinstance(request, RefineRequest)
                              else EvalResult(lost, error=died))
                else:
                    queue.appendleft((key, request, attempts + 1))
                idle.append(slot)
                continue
            idle.append(slot)
            on_result(key, result)

    def shutdown(self) -> None:
        import ray

        for actor, _ in self.actors:
            ray.kill(actor)
        self.actors = []


def _give_back_freed_memory() -> None:
    """Return the heap the refinement's backward pass freed to the OS. glibc keeps freed blocks
    in its arenas, so a worker stayed gigabytes above its plan after refining (on Gemma 3 the
    memory monitor then killed it while it scored the picks); ``malloc_trim`` releases them.
    A no-op where the C library is not glibc."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _use_token_file(path: str) -> None:
    """Authenticate this driver to a token-protected cluster the way Ray reads it: token mode,
    the token from a file, in the environment Ray reads when it is first imported (set later,
    they are ignored). The file is authoritative: a RAY_AUTH_TOKEN left in the environment would
    take precedence in Ray, so it goes."""
    import sys

    if "ray" in sys.modules and os.environ.get("RAY_AUTH_TOKEN_PATH") != str(Path(path).expanduser().resolve()):
        raise UserError(f"runtime.auth_token_file={path} must be in place before Ray is imported, and this "
                        f"process imported it already; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH={path} "
                        f"in the environment instead")
    os.environ["RAY_AUTH_MODE"] = "token"
    os.environ["RAY_AUTH_TOKEN_PATH"] = str(Path(path).expanduser().resolve())
    os.environ.pop("RAY_AUTH_TOKEN", None)


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    return lines[-1] if lines else type(error).__name__


def _check_reachable(address: str) -> None:
    """Fail in seconds on a wrong address: Ray itself retries an unreachable GCS for minutes."""
    import socket

    if address == "auto" or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host or "127.0.0.1", int(port)), timeout=10).close()
    except (OSError, ValueError) as error:
        raise UserError(f"cannot join the Ray cluster at runtime.address={address}: {error}; start one "
                        f"there with `ray start --head --port=PORT` or fix the address") from None


def _first_user_error(error: Exception) -> str | None:
    """The UserError message a worker's constructor raised, if that is why it died."""
    for line in str(error).splitlines():
        if "UserError: " in line:
            return line.split("UserError: ", 1)[1].strip()
    return None


def worst_objectives(objectives: Sequence[Any]) -> dict[str, float]:
    """What a failed candidate scores: every objective at its reference (its worst) value."""
    return {o.name: float(o.reference) if math.isfinite(o.reference) else
            (-math.inf if o.direction == "max" else math.inf) for o in objectives}
