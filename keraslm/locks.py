"""Exclusive locks on the folders keraslm writes: a run directory, a model base, an export in the making.

The locks are flock(2) locks: the kernel drops them when their process ends, however it ends, so
a killed training never leaves a folder locked. The lock file holds a line naming its holder, so
that a refused command can say who is in the way.
"""

import contextlib
import datetime
import fcntl
import os
import socket
import sys

from keraslm.errors import ArgumentError
from keraslm.files import cannot_write

LOCK_FILE = ".keraslm.lock"


def _open_locked(path):
    """A descriptor of `path` holding its exclusive lock, or None when another process holds it.

    A holder that is done unlinks the lock file: a lock taken on a file no longer at `path`
    protects nothing, so it is taken again on the new one."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)


def _holder(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip() or "another process"
    except OSError:
        return "another process"


@contextlib.contextmanager
def locked_directory(directory, what="run directory", argument="run_dir"):
    """Create `directory` if needed and hold its lock for the block; refuse at once when another
    process holds it. A directory this call created and the block left empty is removed again, so
    a command refused before it wrote anything leaves nothing behind.

    Raises:
        ArgumentError: naming `argument` (the one that gave the directory): the directory is locked
            by another process, or cannot be created or written (a file, a symlink loop, a
            read-only file system …).
    """
    created = not os.path.isdir(directory)
    path = os.path.join(directory, LOCK_FILE)
    try:
        os.makedirs(directory, exist_ok=True)
        fd = _open_locked(path)
    except FileExistsError:
        kind = "a symbolic link to nowhere (a loop or a missing target)" if os.path.islink(directory) else "a file"
        raise ArgumentError.about(argument, f"{directory} is {kind}, not a directory; give another path") from None
    except OSError as e:
        raise ArgumentError.about(argument, cannot_write(directory, e), separator=": ") from None
    if fd is None:
        raise ArgumentError.about(
            argument, f"{directory}: the {what} is in use by {_holder(path)}; wait for it to finish or choose another"
        )
    try:
        started = datetime.datetime.now().isoformat(timespec="seconds")
        command = " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]])[:200]
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}: {command}\n".encode())
        yield directory
    finally:
        # Unlinked while still held: whoever opened the old file finds it gone and starts again.
        os.unlink(path)
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                os.rmdir(directory)  # only when empty


@contextlib.contextmanager
def held(path):
    """Hold the lock of `path` (an existing file or directory) for the block, waiting for it if needed."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def is_held(path):
    """Whether some process holds the lock of `path` (a file or a directory) now."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
