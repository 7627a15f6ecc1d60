"""The one exception type a user can cause.

The CLI turns it into a single line and exit code 2 with no traceback; everything else is a bug
and keeps its traceback. Messages name the bad value and what would be valid.
"""


def first_line(error: BaseException | str) -> str:
    """What an error (or an archived error's text) says, in one line for a UserError that wraps
    it: its first line, or its type where it says nothing (a hub download's errors run to pages)."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return "error" if isinstance(error, str) else type(error).__name__


class UserError(Exception):
    """Bad input: a path, a name, a value. Raised before any expensive work starts."""


class DiskError(UserError):
    """A write the machine refused (disk full, read-only or vanished folder, quota): not a bug,
    and not bad input either, but something the user fixes, so it takes the same one-line path."""

    @classmethod
    def of(cls, path: object, error: OSError, advice: str) -> "DiskError":
        reason = error.strerror or type(error).__name__
        return cls(f"cannot write {path}: {reason}; {advice}")
