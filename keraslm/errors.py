"""The one exception type that means "the user asked for something we cannot do"."""


class UsageError(Exception):
    """Bad input from the user: the scripts print its message on one line and exit with code 2.

    The message names the problem and, where there is one, the fix.
    """
