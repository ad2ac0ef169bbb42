"""The exceptions that mean "the user asked for something we cannot do", and how they are worded.

Library code names an argument as Python callers know it (`dropout`); only the command-line
layer (keraslm.cli) words it as a flag (`--dropout`).
"""

import string


class UsageError(Exception):
    """Bad input from the user: the scripts print its message on one line and exit with code 2.

    The message names the problem and, where there is one, the fix.
    """

    def within(self, context):
        """The same error with `context` before its message ("train split: ...")."""
        return UsageError(f"{context}: {self}")


class ArgumentError(UsageError, ValueError):
    """A bad value of a named argument.

    The message is a template in which `{name}` stands for an argument and every other field is
    filled from `values`. `str()` names each argument as it is spelled in Python; the command line
    words the same message with flags (`worded(flag)`), so both read naturally.

    Args:
        template: the message, e.g. "{dropout} must be in [0, 1), got {got}".
        **values: the template's fields that are not arguments.

    Example:
        >>> error = ArgumentError("{dropout} must be in [0, 1), got {got}", got=1.5)
        >>> str(error), error.name
        ('dropout must be in [0, 1), got 1.5', 'dropout')
        >>> error.worded(lambda name: "--" + name)
        '--dropout must be in [0, 1), got 1.5'
    """

    def __init__(self, template, **values):
        self.template, self.values = template, values
        fields = [field for _, field, _, _ in string.Formatter().parse(template) if field]
        self.names = tuple(dict.fromkeys(field for field in fields if field not in values))
        super().__init__(self.worded(str))

    @classmethod
    def about(cls, name, problem, separator=" "):
        """The common case, the argument and then the problem: `about("bptt", "must be positive")`."""
        return cls(f"{{{name}}}{{separator}}{{problem}}", separator=separator, problem=problem)

    @classmethod
    def unknown(cls, name, value, choices):
        """A value outside `choices`: "unknown cell 'lstmx'; choose one of lstm, gru"."""
        return cls(
            f"unknown {{{name}}} {{value!r}}; choose one of {{choices}}", value=value, choices=", ".join(choices)
        )

    @property
    def name(self):
        """The argument the error is about (the first one its message names)."""
        return self.names[0]

    def worded(self, name_of):
        """The message with each argument spelled `name_of(argument)`."""
        return self.template.format_map({name: name_of(name) for name in self.names} | self.values)

    def within(self, context):
        """The same error with `context` (plain text) before its message; its arguments stay arguments."""
        escaped = context.replace("{", "{{").replace("}", "}}")
        return ArgumentError(f"{escaped}: {self.template}", **self.values)


def first_line(error, limit=200):
    """The first line of an exception's message, for one-line errors that quote a library's."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__
