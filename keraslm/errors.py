"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad input from the user: the scripts print its message on one line and exit with code 2.

    The message names the problem and, where there is one, the fix.
    """


def first_line(error, limit=200):
    """The first line of an exception's message, for one-line errors that quote a library's."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
