"""The one exception type a user can cause.

The CLI turns it into a single line and exit code 2 with no traceback; everything else is a bug
and keeps its traceback. Messages name the bad value and what would be valid.
"""


class UserError(Exception):
    """Bad input: a path, a name, a value. Raised before any expensive work starts."""


def check_keys(data, config_class, group: str) -> None:
    """One-line error for a key ``config_class`` (a dataclass mirroring a hydra group) lacks."""
    from dataclasses import fields

    known = {f.name for f in fields(config_class)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise UserError(f"unknown {group} setting {unknown[0]!r}; valid: {', '.join(sorted(known))}")
