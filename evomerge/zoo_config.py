"""What a zoo is made of (its kind, skills, splits, fine-tuning, adapters) and the names those
fields are checked against: the ``zoo`` section of the config, kept apart from the search's
sections because the zoo's identity (its hash, the cache folder's name) is computed from it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from evomerge.errors import UserError

ZOO_KINDS = ("smollm2", "gemma3", "pico")
# How a zoo's experts are made from its base: full fine-tunes, or peft LoRA adapters.
ZOO_EXPERTS = ("full", "lora")
# The zoo's skills (evomerge.zoo.skills generates their items): those an expert is fine-tuned on,
# and the cross-skill probes no expert learns, scored to see whether a merge composes skills.
TRAINED_SKILLS = ("add", "reverse", "sort", "upper")
PROBE_SKILLS = ("shout",)
SKILLS = TRAINED_SKILLS + PROBE_SKILLS
ZOO_FORMAT = 3  # bump when a change to evomerge.zoo's build code changes what a config produces


@dataclass
class FinetuneConfig:
    """How each zoo expert is fine-tuned from the base (see ``evomerge.zoo.finetune``)."""

    steps: int = 150
    batch_size: int = 16
    lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.0
    # Stop once the expert masters its skill: every extra step only grows the task vector, and
    # larger task vectors interfere more when merged (over-trained experts made every uniform
    # merge of the zoo score ~0). ``check_every`` = 0 trains all ``steps``.
    check_every: int = 10
    target_accuracy: float = 0.98


@dataclass
class LoraZooConfig:
    """The adapters of a LoRA zoo (peft's ``LoraConfig``: rank, alpha, target modules)."""

    rank: int = 16
    alpha: float = 32.0
    # peft's "all-linear": every linear layer in the decoder blocks, whatever the family names them
    target_modules: str = "all-linear"


@dataclass
class ZooConfig:
    """What a zoo is made of; its hash names the cache folder (see ``evomerge.zoo.build``)."""

    kind: str = "smollm2"
    seed: int = 0
    skills: list[str] = field(default_factory=lambda: ["add", "reverse", "sort", "upper"])
    probes: list[str] = field(default_factory=lambda: ["shout"])  # scored, never trained
    train_size: int = 2400
    eval_size: int = 100
    # Validation items per task that searches score; None: eval_size. Not part of the zoo's
    # identity: the extra items are drawn after the build, disjoint from every split, so the
    # same experts serve any size (see Zoo.task_dir).
    validation_size: int | None = None
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    merge_scales: list[float] = field(default_factory=lambda: [0.3, 0.5, 0.7, 1.0])
    experts: str = "full"  # one of ZOO_EXPERTS
    lora: LoraZooConfig = field(default_factory=LoraZooConfig)  # read when experts is "lora"

    def __post_init__(self) -> None:
        if self.experts not in ZOO_EXPERTS:
            raise UserError(f"zoo.experts={self.experts!r} is unknown; valid: {', '.join(ZOO_EXPERTS)}")
        if self.experts == "lora" and (self.lora.rank < 1 or self.lora.alpha <= 0):
            raise UserError(f"zoo.lora.rank={self.lora.rank} and zoo.lora.alpha={self.lora.alpha} "
                            f"must be a rank >= 1 and an alpha > 0")

        if self.kind not in ZOO_KINDS:
            raise UserError(f"zoo kind {self.kind!r} is unknown; valid: {', '.join(ZOO_KINDS)}")
        for name in (*self.skills, *self.probes):
            if name not in SKILLS:
                raise UserError(f"skill {name!r} is unknown; valid: {', '.join(SKILLS)}")
        for name in self.skills:
            if name not in TRAINED_SKILLS:
                raise UserError(f"skill {name!r} is a cross-skill probe and cannot train an expert; "
                                f"list it under probes")
        if len(self.skills) < 2:
            raise UserError(f"a zoo needs at least 2 skills to merge, got {list(self.skills)}")
        if min(self.train_size, self.eval_size, self.finetune.steps) < 1:
            raise UserError("train_size, eval_size and finetune.steps must all be at least 1")
        if self.validation_size is not None and (
                not isinstance(self.validation_size, int) or isinstance(self.validation_size, bool)
                or self.validation_size < 1):
            raise UserError(f"zoo.validation_size={self.validation_size!r} must be an integer >= 1, "
                            f"or null for the zoo's eval_size ({self.eval_size})")

    @property
    def scored_validation_size(self) -> int:
        return self.eval_size if self.validation_size is None else self.validation_size

    @property
    def name(self) -> str:
        """The zoo's name without its hash: ``smollm2``, ``smollm2-lora``, ``gemma3``, ``pico``."""
        return self.kind if self.experts == "full" else f"{self.kind}-{self.experts}"

    def built_fields(self) -> dict:
        """What the built zoo depends on: every field but the scored validation size (and, for
        full fine-tunes, the adapter fields, which full zoos built before them never had)."""
        skipped = {"validation_size"} | ({"experts", "lora"} if self.experts == "full" else set())
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in skipped}

    def fingerprint(self) -> str:
        blob = json.dumps({"format": ZOO_FORMAT, **self.built_fields()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]
