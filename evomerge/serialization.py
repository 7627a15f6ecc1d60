"""How evomerge's plain data is written and read back: canonical JSON for hashing, YAML for
people, and the checks that turn a malformed file into one line naming what is wrong.

Recipes, layer paths, mergekit configs and search spaces all cross a file boundary, and each
must refuse bad input the same way (a :class:`UserError` naming the place and the value), so
these helpers have one home below all of them.
"""

from __future__ import annotations

import json
from typing import Any, Mapping, Sequence

import yaml

from evomerge.errors import UserError


def short_repr(value: Any) -> str:
    """``repr(value)`` cut to 80 characters: a message names a bad value without pasting a file."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def checked_mapping(data: Any, where: str, required: Sequence[str] = (),
                    optional: Sequence[str] | None = None) -> dict[str, Any]:
    """``data`` as a dict with string keys; with ``optional`` given, no keys beyond the valid."""
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping, got {short_repr(data)}")
    for key in data:
        if not isinstance(key, str):
            raise UserError(f"{where} has a non-string key {short_repr(key)}")
        if optional is not None and key not in required and key not in optional:
            raise UserError(f"unknown key {key!r} in {where}; valid keys: "
                            f"{', '.join(sorted([*required, *optional]))}")
    for key in required:
        if key not in data:
            raise UserError(f"{where} is missing {key!r}")
    return data


def canonical_json(data: Any) -> str:
    """One text per value, whatever its float noise, key order or -0.0: what a hash is taken of,
    so equal recipes hash alike."""
    def canon(x: Any) -> Any:
        if isinstance(x, float):
            return float(f"{x:.12g}") + 0.0  # + 0.0 turns -0.0 into 0.0
        if isinstance(x, dict):
            return {k: canon(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [canon(v) for v in x]
        return x
    return json.dumps(canon(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML in the order ``data`` holds its keys (the order a reader expects), lists inline."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=None, allow_unicode=True)


def load_yaml(text: str, what: str) -> Any:
    """``text`` parsed; malformed YAML is a one-line UserError naming ``what`` and the place."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error)
        raise UserError(f"malformed {what} YAML{at}: {' '.join(problem.split())}") from None
