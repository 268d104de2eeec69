"""One exception type for mistakes a user can fix, and the wrapper that turns it into one line.

Entry points catch `UserError` and print `error: <message>` on stderr with exit code 2, so a typo
never ends in a traceback. The message always names the problem and the fix.
"""

from __future__ import annotations

import functools
import sys


class UserError(Exception):
    """A problem with the user's input (config, paths, files), reported as a single line."""


def first_line(err: BaseException, limit: int = 120) -> str:
    """`TypeName: the first line of its message`, short enough to quote inside a one-line error."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:limit]}"


def exit_on_user_error(fn):
    """Decorator for `main()` functions: UserError → one line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
