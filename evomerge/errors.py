"""The one exception type a user can cause.

The CLI turns it into a single line and exit code 2 with no traceback; everything else is a bug
and keeps its traceback. Messages name the bad value and what would be valid.
"""


class UserError(Exception):
    """Bad input: a path, a name, a value. Raised before any expensive work starts."""

