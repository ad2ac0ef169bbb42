"""A TF Serving model base: the integer-named version directories inside it.

TF Serving reads a version number as a signed 64-bit integer and skips folders whose names are not
one, so a version is ASCII digits with a value of at most 2^63 - 1. `str.isdigit` is not that
test: it accepts "²" and other Unicode digits, which `int` then refuses.
"""

import os
import re

MAX_VERSION = 2**63 - 1


def version_number(name):
    """The version a folder name stands for, or None when TF Serving would not serve it."""
    if not re.fullmatch(r"[0-9]+", name):
        return None
    number = int(name)
    return number if number <= MAX_VERSION else None


def versions(base_dir):
    """{version number: folder name} of the version directories in `base_dir` (empty when it is
    missing); "007" is version 7, as TF Serving reads it."""
    if not os.path.isdir(base_dir):
        return {}
    numbers = ((version_number(name), name) for name in os.listdir(base_dir))
    return {n: name for n, name in numbers if n is not None and os.path.isdir(os.path.join(base_dir, name))}
