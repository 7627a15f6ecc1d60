"""What every genome space is over: the space's config and the pool it decodes into (base,
experts and where they live, the number of blocks). ``SearchSpace`` (recipes) and ``PathSpace``
(layer paths) both start from it, so a searcher builds either the same way."""

from __future__ import annotations

from dataclasses import dataclass, field

from evomerge.config import SpaceConfig


@dataclass
class PoolSpace:
    config: SpaceConfig
    base: str
    experts: tuple[str, ...]
    num_layers: int
    expert_refs: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.experts = tuple(self.experts)
