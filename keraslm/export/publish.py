"""Publishing a version: the workspace it is built in, its number, and the rename into place.

A version is built in a hidden, locked folder beside the others (TF Serving only watches integer
names) and renamed into place once checked; --overwrite swaps the old and new folders in one step.
"""

import contextlib
import errno
import os
import re
import shutil
import tempfile

from keraslm import locks
from keraslm.errors import ArgumentError, UsageError
from keraslm.files import RANDOM_PART, cannot_write, current_umask, exchange, rename_new
from keraslm.versions import MAX_VERSION, versions

# Versions are built in hidden folders beside the others (TF Serving only watches integer names).
WORKSPACE_PREFIX = ".export-"


def next_version(base_dir):
    """One more than the largest version in base_dir (1 when there is none)."""
    number = max(versions(base_dir), default=0) + 1
    if number > MAX_VERSION:
        raise ArgumentError(
            "{path} holds version 2^63 - 1, the largest TF Serving reads; give {version} N", path=base_dir
        )
    return number


def check_version_number(version):
    """Refuse a --version TF Serving cannot read (None: the next number is taken)."""
    if version is not None and not 1 <= version <= MAX_VERSION:
        raise ArgumentError.about(
            "version", f"must be in [1, 2^63 - 1] (TF Serving reads 64-bit versions), got {version}"
        )


def refuse_existing_version(base_dir, version, overwrite):
    """Refuse, before any work, to replace a version without --overwrite (publish checks again)."""
    if version is not None and os.path.exists(os.path.join(base_dir, str(version))) and not overwrite:
        raise ArgumentError(
            "{path} exists; pass {overwrite} to replace it or omit {version}", path=f"{base_dir}/{version}"
        )


def open_workspace(base_dir, stack):
    """A new folder in base_dir to build a version in, locked and finally removed through `stack`.

    Folders of exports that were killed (their lock died with them) are removed first. The model
    base is locked meanwhile, so a new folder is locked before any other export can see it.
    """
    try:
        os.makedirs(base_dir, exist_ok=True)
        with locks.held(base_dir):
            for entry in os.scandir(base_dir):
                abandoned = re.fullmatch(re.escape(WORKSPACE_PREFIX) + RANDOM_PART, entry.name)
                if abandoned and entry.is_dir(follow_symlinks=False) and not locks.is_held(entry.path):
                    shutil.rmtree(entry.path, ignore_errors=True)
            tmp = tempfile.mkdtemp(prefix=WORKSPACE_PREFIX, dir=base_dir)
            # mkdtemp's folder is private (0700); the published version must be readable by
            # a server running as another user, as a folder made by mkdir would be.
            os.chmod(tmp, 0o777 & ~current_umask())
            stack.enter_context(locks.held(tmp))
    except FileExistsError:
        raise ArgumentError(
            "{out}: {path} exists and is not a folder; give another {out} or {name}", path=base_dir
        ) from None
    except OSError as e:
        raise ArgumentError.about("out", cannot_write(base_dir, e), ": ") from None
    # After publishing, the folder is gone, or holds the version --overwrite replaced.
    stack.callback(shutil.rmtree, tmp, ignore_errors=True)
    return tmp


def publish(tmp, base_dir, version, overwrite):
    """Rename the finished folder into place as an integer version: a new number never replaces
    anything, and --overwrite swaps the old and new version in one step, so TF Serving's poller
    (or a kill at any moment) sees the old version or the new one, never none."""
    if version is None:
        # Two exports racing for one number cannot both win: the loser takes the next number.
        for _ in range(100):
            target = os.path.join(base_dir, str(next_version(base_dir)))
            with contextlib.suppress(FileExistsError):
                rename_new(tmp, target)
                return target
        raise UsageError(f"could not claim a version number in {base_dir}")
    target = os.path.join(base_dir, str(version))
    try:
        rename_new(tmp, target)
        return target
    except FileExistsError:
        if not overwrite:
            raise ArgumentError("{path} exists; pass {overwrite} to replace it", path=target) from None
    if not os.path.isdir(target) or os.path.islink(target):
        raise ArgumentError("{path} is not a version folder; remove it or choose another {version}", path=target)
    try:
        exchange(tmp, target)
    except OSError as e:
        if e.errno in (errno.ENOSYS, errno.EINVAL):
            raise ArgumentError(
                "{overwrite} needs a file system that swaps two folders in one step (Linux renameat2), and"
                " {path} is not on one; export to a new version instead",
                path=base_dir,
            ) from None
        raise ArgumentError.about("overwrite", cannot_write(target, e), ": ") from None
    return target


def folder_size(directory, exclude=None):
    total = 0
    for root, dirs, files in os.walk(directory):
        dirs[:] = [d for d in dirs if d != exclude]
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
