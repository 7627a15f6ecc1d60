"""evomerge's config: its schema (the one home of every default), composing it, reading it.

The dataclasses below are hydra structured configs: registered in hydra's ConfigStore and first
in ``conf/config.yaml``'s defaults list, so they hold every default and type, and a group file
in ``conf/<group>/`` holds only what choosing it changes (tests/test_config.py keeps it so).
A composed config is plain data (what a run folder's ``config.yaml`` holds); ``read_config``
turns such data into typed objects, the one way any config becomes a ``Config``. Each dataclass
checks its own values in ``__post_init__``; a bad key, type or value is a one-line UserError
naming it and what would be valid.

Reading is pure: nothing here builds, loads or writes anything.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, TypeVar

from evomerge.errors import UserError
from evomerge.zoo_config import ZooConfig

SCHEMA = "evomerge_schema"  # the root dataclass's name in hydra's ConfigStore
DTYPES = ("float32", "bfloat16", "float16")
# Task vectors may also be stored quantized (evomerge.merge.quantized): format name -> bits per code.
QUANTIZED_DELTAS = {"int8": 8, "int4": 4}
DELTA_DTYPES = DTYPES + tuple(QUANTIZED_DELTAS)
# pymoo algorithms by how many objectives they optimize (evomerge.search.algorithms makes them)
SINGLE = ("ga", "de", "cmaes")
MULTI = ("nsga2", "nsga3", "smsemoa", "agemoea", "moead")
ANY = ("random",)  # any number of objectives: the baseline every other algorithm must beat
# How a candidate's score is estimated and what is optimized (evomerge.fitness implements them)
ESTIMATORS = ("full", "random", "anchors", "irt")
OBJECTIVES = ("tasks", "mean", "ece", "length", "perplexity")

T = TypeVar("T")


# --- the schema ------------------------------------------------------------------------------
@dataclass
class ModelsConfig:
    """The models to merge; ``base`` None merges the zoo's base and experts."""

    base: str | None = None  # a folder, .gguf file or hub id
    experts: Any = None  # a list of references, or a mapping name: reference
    allow_pickle: bool = False  # refuse pytorch_model.bin (pickle can run code); safetensors only
    trust_remote_code: bool = False


SPACE_KINDS = ("params", "dataflow")


@dataclass
class SpaceConfig:
    """What a genome holds (see ``evomerge.search.space``)."""

    granularity: int = 5  # layers per group; 0 = one group for all layers
    # Smooth depth profiles: >= 2 puts each gene at this many knots spread evenly over depth and
    # interpolates every layer between its two nearest knots (granularity is then unused); 0: off.
    knots: int = 3
    split_components: bool = False  # separate genes for attention and MLP tensors
    # TSV-M: on the zoo its uniform merge kept twice the skill of task arithmetic's or TIES' best
    # (experiments/README.md); >1 method adds a method gene per group.
    methods: list[str] = field(default_factory=lambda: ["tsv_m"])
    # Gene ranges: null keeps the range the parameter declares in the method registry.
    weight: Optional[list[float]] = None
    density: Optional[list[float]] = None
    # Known recipes in the first population, besides random ones (see ``SearchSpace.initial_recipes``).
    # An entry without a method takes the space's first method.
    initial: list[Any] = field(default_factory=lambda: [{"weight": 0.3}, {"weight": 0.5}])
    # The input models as candidates: base, each expert alone and uniform merges (the space's
    # first method) at these weights open every archive, so no front is dominated by a model the
    # user gave, and a search starts from the best of them.
    parents: bool = True
    uniform: list[float] = field(default_factory=lambda: [0.3, 0.5, 1.0])
    # params: evolve merge coefficients (everything above). dataflow: evolve the path a token
    # takes through the models' blocks instead (Sakana's data-flow space; evomerge.search.path_space),
    # with the keys below; the parameter keys are then unused.
    kind: str = "params"
    slices: int = 3  # slices of consecutive blocks per path, each from one source model
    overlap: int = 6  # most blocks a boundary between two slices repeats (or skips)
    scale: list[float] = field(default_factory=lambda: [0.5, 2.0])  # a slice's entry scale range
    # PS+DFS: a parameter-space merge as one more source of the path: an evomerge recipe file,
    # or an export folder holding recipe.yaml (from `evomerge export`).
    merge: Optional[str] = None

    def __post_init__(self) -> None:
        from evomerge.merge.registry import METHODS, known_params

        if not isinstance(self.granularity, int) or self.granularity < 0:
            raise UserError(f"space.granularity={self.granularity!r} must be an integer >= 0 "
                            f"(layers per group; 0 = one global group)")
        if not isinstance(self.knots, int) or isinstance(self.knots, bool) or self.knots < 0 or self.knots == 1:
            raise UserError(f"space.knots={self.knots!r} must be 0 (off) or an integer >= 2 "
                            f"(for one value over all layers use space.granularity=0)")
        if self.knots and self.split_components:
            raise UserError("space.knots and space.split_components cannot be combined yet; "
                            "set space.knots=0 or space.split_components=false")
        if not self.methods:
            raise UserError("space.methods is empty; name at least one merge method")
        usable = sorted(n for n, s in METHODS.items() if any(p.name == "weight" for p in s.expert_params))
        for name in self.methods:
            if name not in usable:
                raise UserError(f"space.methods names {name!r}, which is not a merge method the "
                                f"search can weight; valid: {', '.join(usable)}")
        for key in ("weight", "density"):
            bounds = getattr(self, key)
            if bounds is None:
                continue
            if not isinstance(bounds, (list, tuple)) or len(bounds) != 2:
                raise UserError(f"space.{key}={bounds!r} must be [low, high]")
            low, high = bounds
            if not low < high:
                raise UserError(f"space.{key} bounds [{low}, {high}] are inverted or empty; need low < high")
            valid = known_params("expert")[key].range
            if valid.complaint(low) or valid.complaint(high):
                raise UserError(f"space.{key} bounds [{low}, {high}] leave the valid range {valid}")
        for weight in self.uniform:
            if known_params("expert")["weight"].range.complaint(weight):
                raise UserError(f"space.uniform weight {weight!r} is not a finite number")
        if self.kind not in SPACE_KINDS:
            raise UserError(f"space.kind={self.kind!r} is not one of {', '.join(SPACE_KINDS)}")
        if not isinstance(self.slices, int) or isinstance(self.slices, bool) or self.slices < 1:
            raise UserError(f"space.slices={self.slices!r} must be an integer >= 1")
        if not isinstance(self.overlap, int) or isinstance(self.overlap, bool) or self.overlap < 0:
            raise UserError(f"space.overlap={self.overlap!r} must be an integer >= 0 (blocks)")
        if not isinstance(self.scale, (list, tuple)) or len(self.scale) != 2 or \
                not all(isinstance(v, (int, float)) and math.isfinite(v) for v in self.scale) or \
                not 0 < self.scale[0] <= 1 <= self.scale[1]:
            raise UserError(f"space.scale={self.scale!r} must be [low, high] with 0 < low <= 1 <= high")
        if self.merge is not None and self.kind != "dataflow":
            raise UserError(f"space.merge={self.merge} adds a merge to a layer path; it needs space.kind=dataflow")


@dataclass
class AlgorithmConfig:
    """Which pymoo algorithm searches, and for how long (see ``evomerge.search.algorithms``)."""

    # CMA-ES told the tasks' mean over depth profiles: see experiments/README.md for what it beat.
    # Six generations, then gradient refinement (refine.at=auto): about 130 estimates' worth and
    # under 10 minutes on the zoo; twelve without refinement cost about as much and scored 15
    # points less on test (experiments/README.md, "Search that learns").
    name: str = "cmaes"
    pop_size: int = 12
    generations: int = 6
    sigma: float = 0.2  # CMA-ES initial step size, in units of the gene range

    def __post_init__(self) -> None:
        if self.name not in SINGLE + MULTI + ANY:
            raise UserError(f"algorithm {self.name!r} is unknown; valid: {', '.join(SINGLE + MULTI + ANY)}")
        if not isinstance(self.pop_size, int) or self.pop_size < 2:
            raise UserError(f"algorithm.pop_size={self.pop_size!r} must be an integer >= 2")
        if not isinstance(self.generations, int) or isinstance(self.generations, bool) or self.generations < 0:
            raise UserError(f"algorithm.generations={self.generations!r} must be an integer >= 0 (0: score the "
                            f"parents only, e.g. to refine the best of them with refine.at=final)")

    def check_objectives(self, count: int, averageable: bool = False) -> None:
        """``averageable``: the objectives are accuracies on one scale (one per task), which a
        single-objective algorithm is told the mean of."""
        if self.name in SINGLE and count != 1 and not averageable:
            raise UserError(f"algorithm={self.name} optimizes one objective, but the fitness config "
                            f"defines {count} that do not average (not all task accuracies); use "
                            f"fitness.objectives=[mean] or [tasks], or a multi-objective "
                            f"algorithm ({', '.join(MULTI)})")


@dataclass
class FitnessConfig:
    """How a candidate is scored (see ``evomerge.fitness``)."""

    estimator: str = "anchors"  # full | random | anchors | irt
    items_per_task: int = 10  # the budget per task of random / anchors / irt
    objectives: list[str] = field(default_factory=lambda: ["tasks"])  # tasks (one per task), mean, ece, length, perplexity
    probe_merges: int = 4  # random merges added to base + experts in the probe population
    batch_size: int = 32
    seed: int = 0
    # Racing: the share of each generation (by estimated mean) promoted to every validation item,
    # scored as the estimator scores its items; 0 = off. 0.08 promotes one of 12. Off by default:
    # a promotion costs about six estimates here and did not pay (experiments/README.md).
    multi_fidelity: float = 0.0
    # The winner's curse: the best of many 10-item estimates is the luckiest, not the best. When
    # the search ends, this many candidates (best estimated mean first) are re-scored on every
    # validation item, and ``best:mean`` is the best of the verified ones; 0 = off.
    verify: int = 3
    native: bool = True  # batched native scoring where a task allows it; false: everything via lm-eval
    # Estimator items of exact-match generation tasks: one forward pass over prompt + reference,
    # not decoded (false for ece/length).
    teacher_forcing: bool = True
    perplexity_text: str = ""  # a UTF-8 text file; empty: Python standard-library docstrings
    perplexity_tokens: int = 1024  # tokens of that text scored per candidate

    def __post_init__(self) -> None:
        if self.estimator not in ESTIMATORS:
            raise UserError(f"unknown fitness.estimator {self.estimator!r}; valid: {', '.join(ESTIMATORS)}")
        for key in ("items_per_task", "batch_size", "perplexity_tokens"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"fitness.{key}={value!r} must be an integer >= 1")
        if not isinstance(self.probe_merges, int) or self.probe_merges < 0:
            raise UserError(f"fitness.probe_merges={self.probe_merges!r} must be an integer >= 0")
        if not isinstance(self.verify, int) or isinstance(self.verify, bool) or self.verify < 0:
            raise UserError(f"fitness.verify={self.verify!r} must be an integer >= 0 (candidates re-scored on "
                            f"every validation item when the search ends; 0 = off)")
        if not 0.0 <= self.multi_fidelity <= 1.0:
            raise UserError(f"fitness.multi_fidelity={self.multi_fidelity:g} must be in [0, 1] "
                            f"(the share of a generation promoted to every validation item; 0 = off)")
        if not self.objectives:
            raise UserError(f"fitness.objectives is empty; choose from {', '.join(OBJECTIVES)}")
        for name in self.objectives:
            if name not in OBJECTIVES:
                raise UserError(f"unknown fitness objective {name!r}; valid: {', '.join(OBJECTIVES)}")
        if len(set(self.objectives)) != len(self.objectives):
            raise UserError(f"fitness.objectives lists one twice: {list(self.objectives)}")
        decoded = [o for o in self.objectives if o in ("ece", "length")]
        if self.teacher_forcing and decoded:
            raise UserError(f"fitness.teacher_forcing=true scores answers without decoding them, so objective "
                            f"{decoded[0]} has nothing to measure; set teacher_forcing=false or drop {decoded[0]}")
        if self.teacher_forcing and not self.native:
            raise UserError("fitness.teacher_forcing=true needs native scoring; set native=true or teacher_forcing=false")


@dataclass
class RuntimeConfig:
    """Where and how the merge workers run (see ``evomerge.search.workers``)."""

    workers: int = 2
    threads_per_worker: int = 1
    address: str | None = None  # join an existing Ray cluster ("auto" or "host:port"); None: local Ray
    # A file holding that cluster's Ray token (`ray get-auth-token` on its head), for a head
    # started with RAY_AUTH_MODE=token: the driver then authenticates with it. A file, never the
    # token itself: config.yaml is saved in the run folder, which users share.
    auth_token_file: str | None = None
    device: str = "auto"  # auto: cuda when available (one GPU per worker), else cpu
    dtype: str = "float32"
    # e.g. bfloat16 to halve the task vectors' memory, int8 / int4 to store them group-wise
    # quantized (about 0.26 / 0.13 of fp32's bytes); None: the working dtype
    delta_dtype: str | None = None
    max_retries: int = 2  # per candidate, when its worker dies
    memory_limit_gb: float | None = None  # refuse to start a worker whose memory plan exceeds this

    def __post_init__(self) -> None:
        if not isinstance(self.workers, int) or self.workers < 1:
            raise UserError(f"runtime.workers={self.workers!r} must be an integer >= 1")
        if not isinstance(self.threads_per_worker, int) or self.threads_per_worker < 1:
            raise UserError(f"runtime.threads_per_worker={self.threads_per_worker!r} must be an integer >= 1")
        if self.device not in ("auto", "cpu") and not str(self.device).startswith("cuda"):
            raise UserError(f"runtime.device={self.device!r} is not auto, cpu or cuda[:N]")
        for key, valid in (("dtype", DTYPES), ("delta_dtype", DELTA_DTYPES)):
            value = getattr(self, key)
            if value is not None and value not in valid:
                raise UserError(f"runtime.{key}={value!r} is not one of {', '.join(valid)}")
        if self.auth_token_file is not None:
            if not self.address:
                raise UserError(f"runtime.auth_token_file={self.auth_token_file} is for joining a Ray cluster; set "
                                f"runtime.address too (a local Ray makes its own token)")
            token = Path(self.auth_token_file).expanduser()
            if not token.is_file() or not token.read_text().strip():
                raise UserError(f"runtime.auth_token_file={self.auth_token_file} is not a file holding a token; "
                                f"write the cluster's token there (`ray get-auth-token` on its head)")

    def resolved_device(self) -> str:
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"


REFINE_AT = ("off", "auto", "final")
REFINE_SIGNALS = ("supervised", "entropy", "fda")
ANCHOR_INITS = ("gaussian", "weights")  # evomerge.fitness.dual_anchors


@dataclass
class RefineConfig:
    """Gradient refinement of a candidate's weights (see ``evomerge.search.refine``): a few Adam
    steps on per-layer expert weights, each from one backward pass through the merged model."""

    # final: the best verified candidate is refined when the search ends, and the refined recipe is
    # verified and archived as a candidate of its own (its parent and steps recorded); a space whose
    # recipes cannot be refined is refused. auto: final where the space's recipes can be refined
    # (weights that enter linearly) and the gradients fit the device, else off. off: never.
    at: str = "auto"
    steps: int = 12  # the test gain was made in the first ~10 steps (experiments/refine/)
    lr: float = 0.05  # Adam's step size, in units of an expert weight
    # supervised: teacher-forced loss of the validation references; entropy: of the model's own
    # greedy answers (no references needed); fda: functional dual anchors, synthetic inputs built
    # from base and experts alone (no task data read; evomerge.fitness.dual_anchors).
    signal: str = "supervised"
    items_per_task: int = 8  # validation items per task in each step's batch, drawn at random
    anchors: int = 64  # fda: anchors per expert and block
    anchor_steps: int = 15  # fda: Adam steps that build each expert's anchors of a block (experiments/refine/)
    anchor_lr: float = 0.01
    anchor_init: str = "gaussian"  # gaussian (scaled by anchor_scale) or weights (the expert's rows)
    anchor_scale: float = 0.01
    split_components: bool = False  # separate attention and MLP weights per block
    seed: int = 0

    def __post_init__(self) -> None:
        if self.at not in REFINE_AT:
            raise UserError(f"unknown refine.at {self.at!r}; valid: {', '.join(REFINE_AT)}")
        if self.signal not in REFINE_SIGNALS:
            raise UserError(f"unknown refine.signal {self.signal!r}; valid: {', '.join(REFINE_SIGNALS)}")
        if self.anchor_init not in ANCHOR_INITS:
            raise UserError(f"unknown refine.anchor_init {self.anchor_init!r}; valid: {', '.join(ANCHOR_INITS)}")
        for key in ("steps", "items_per_task", "anchors", "anchor_steps"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise UserError(f"refine.{key}={value!r} must be an integer >= 1")
        for key in ("lr", "anchor_lr", "anchor_scale"):
            value = getattr(self, key)
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                    and value > 0):
                raise UserError(f"refine.{key}={value!r} must be a positive number")


@dataclass
class Config:
    """A whole search config, as ``evomerge search`` composes it and a run folder records it."""

    zoo: ZooConfig = field(default_factory=ZooConfig)
    models: ModelsConfig = field(default_factory=ModelsConfig)
    space: SpaceConfig = field(default_factory=SpaceConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    fitness: FitnessConfig = field(default_factory=FitnessConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)
    name: str | None = None  # run folder name under runs_dir; None: the start time
    runs_dir: str = "runs"
    seed: int = 0
    tasks: list[str] | None = None  # lm-eval task names to optimize; None: the zoo's skill tasks
    include_path: str | None = None  # folder of extra lm-eval task YAMLs; None: the zoo's task folder

    @property
    def searches_zoo(self) -> bool:
        return self.models.base is None


# Where each dataclass sits in the root config, for messages: "unknown zoo.finetune setting".
def _places(cls: type, prefix: str = "") -> dict[type, str]:
    places = {cls: prefix}
    for f in dataclasses.fields(cls):
        if isinstance(f.default_factory, type) and dataclasses.is_dataclass(f.default_factory):
            places.update(_places(f.default_factory, f"{prefix}{f.name}."))
    return places


_PLACES = _places(Config)


# --- composing and reading -------------------------------------------------------------------
def conf_dir() -> Path:
    import evomerge.conf

    return Path(evomerge.conf.__path__[0])


def compose(overrides: Sequence[str] = ()) -> dict:
    """The composed config as plain containers, with ``overrides`` in hydra syntax."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    ConfigStore.instance().store(name=SCHEMA, node=Config)
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name="config", overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(f"bad config override in {list(overrides)}: {_explain(error)}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def parse(cls: type[T], data: Mapping[str, Any]) -> T:
    """``data`` (plain containers) as a ``cls`` (a dataclass of the schema): unset keys take the
    dataclass defaults, then every check runs."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), dict(data)))
    except OmegaConfBaseException as error:
        raise UserError(_explain(error)) from None


def read_config(data: Mapping[str, Any]) -> Config:
    """A composed config (or a run folder's ``config.yaml``) as typed objects."""
    return parse(Config, data)


def zoo_config(overrides: Sequence[str] = ()) -> ZooConfig:
    """The ZooConfig that ``overrides`` select, e.g. ``["zoo=pico", "zoo.seed=3"]``."""
    return read_config(compose(overrides)).zoo


def _explain(error: BaseException) -> str:
    """One line for what hydra or OmegaConf refused, in the words the dataclasses use."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

    cause: BaseException | None = error
    while cause is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__ or cause.__context__
    place = _PLACES.get(getattr(cause, "object_type", None))
    if place is None:
        return str(cause or error).strip().splitlines()[0]
    fields = {f.name: f for f in dataclasses.fields(cause.object_type)}
    if isinstance(cause, (ConfigKeyError, ConfigAttributeError)):
        where = f"{place[:-1]} setting" if place else "config key"
        return f"unknown {where} {cause.key!r}; valid: {', '.join(sorted(fields))}"
    key = f"{place}{cause.key}"
    if isinstance(cause, ValidationError) and cause.key in fields:
        if "list[" in str(fields[cause.key].type) and not isinstance(cause.value, (list, tuple)):
            return f"{key}={cause.value!r} must be a list, e.g. {key}=[{cause.value}]"
        # The schema knows only the type; the dataclass's own check says what is valid.
        try:
            dataclasses.replace(OmegaConf.to_object(cause.parent_node), **{cause.key: cause.value})
        except UserError as refused:
            return str(refused)
        except Exception:  # the check could not run on a value of the wrong type: name the type
            pass
    return f"{key}={cause.value!r}: {str(cause.msg).strip().splitlines()[0]}"
