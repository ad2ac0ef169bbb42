"""Atomic writes: a file is either the old one or the complete new one, never half of either."""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    On any exception the temporary file is removed and `path` is left as it was.

    Example:
        with atomic_path("run/model.keras") as tmp:
            model.save(tmp)
    """
    directory, name = os.path.split(os.path.abspath(path))
    # Keep the real suffix last: some writers (Keras) insist on their extension.
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{os.path.splitext(name)[1]}", dir=directory)
    os.close(fd)
    # mkstemp makes the file private (0600); give it the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path, text):
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def remove_stale_temporaries(directory):
    """Delete temporary files that `atomic_path` left behind when its process was killed (-9)."""
    for name in os.listdir(directory):
        if name.startswith(".") and ".tmp" in name:
            os.remove(os.path.join(directory, name))
