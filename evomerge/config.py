"""Composes evomerge's hydra configs (``conf/``, shipped as ``evomerge.conf``) with overrides.

The CLI and the tests go through here, so a setting means the same wherever it is given, and a
bad override fails with hydra's own message turned into a one-line UserError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from evomerge.errors import UserError


def conf_dir() -> Path:
    import evomerge.conf

    return Path(evomerge.conf.__path__[0])


def compose(overrides: Sequence[str] = (), config_name: str = "config") -> dict:
    """The composed config as plain containers, with ``overrides`` in hydra syntax."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = hydra_compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as error:
        first = str(error).strip().splitlines()[0]
        raise UserError(f"bad config override in {list(overrides)}: {first}") from None
    return OmegaConf.to_container(cfg, resolve=True)


def zoo_config(overrides: Sequence[str] = ()):
    """The ZooConfig that ``overrides`` select, e.g. ``["zoo=pico", "zoo.seed=3"]``."""
    from evomerge.zoo.build import ZooConfig

    return ZooConfig.from_dict(compose(overrides)["zoo"])
