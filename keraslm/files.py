"""Every file keraslm writes goes through here.

A file is either the old one or the complete new one, never half of either; a special file (a
FIFO, a device, a directory) is never replaced by a regular one; and an OS error at the boundary
(disk full, read-only file system, permission) is one UsageError naming the path.
"""

import contextlib
import ctypes
import errno
import os
import re
import stat
import tempfile

from keraslm.errors import ArgumentError, UsageError

# tempfile's random part: 8 characters of this alphabet. The exact pattern lets stale temporaries
# be told apart from a user's own dot-files.
RANDOM_PART = "[a-z0-9_]{8}"


def cannot_write(path, error):
    """The UsageError for an OSError met while writing `path`."""
    if error.errno == errno.ENOENT:
        return UsageError(f"cannot write {path}: its folder does not exist; create it or give another path")
    reason = error.strerror or str(error)
    return UsageError(f"cannot write {path}: {reason}; check the path, its permissions and the free space")


def _regular_target(path):
    """The file `path` names after following symbolic links; refuses an existing non-regular one."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return os.path.realpath(path)  # new (or a dangling link): created where the link points
    except OSError as e:  # a symlink loop, a component that is not a directory …
        raise cannot_write(path, e) from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise UsageError(f"cannot write {path}: it is {kind}; give a file name")
    return os.path.realpath(path)


def current_umask():
    """The process's umask (read by setting it, the only way POSIX offers, and setting it back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _temporary_name_pattern(name):
    """The regular expression of `atomic_path`'s temporaries for a file called `name`."""
    suffix = os.path.splitext(name)[1]
    return rf"\.{re.escape(name)}\.{RANDOM_PART}\.tmp{re.escape(suffix)}"


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; on success fsync it and rename it onto `path`.

    On any exception the temporary file is removed and `path` is left as it was. A symbolic link
    is followed (the file it points to is replaced, the link kept); an existing directory, FIFO or
    device is refused. OS errors become a UsageError naming `path`.

    Example:
        with atomic_path("run/model.keras") as tmp:
            model.save(tmp)
    """
    target = _regular_target(path)
    directory, name = os.path.split(target)
    try:
        # Keep the real suffix last: some writers (Keras) insist on their extension.
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".tmp{os.path.splitext(name)[1]}", dir=directory)
    except OSError as e:
        raise cannot_write(path, e) from None
    try:
        os.close(fd)
        # mkstemp makes the file private (0600): keep the replaced file's permissions, or give
        # a new one those of a plain open().
        try:
            mode = stat.S_IMODE(os.stat(target).st_mode)
        except FileNotFoundError:
            mode = 0o666 & ~current_umask()
        os.chmod(tmp, mode)
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_directory(directory)
    except OSError as e:
        raise cannot_write(path, e) from None
    finally:
        if os.path.lexists(tmp):
            os.remove(tmp)


def _fsync_directory(directory):
    """Make a rename in `directory` durable (a power cut must not bring the old name back)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path, text):
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


class OutputFile:
    """A file a command writes when its work is done, checked before the work starts.

    A regular file (or a new one) is written atomically beside its final name, and the temporary
    is made at once, so a missing folder, a read-only file system or a name that is a directory
    fails before anything is computed. A FIFO or a character device (a pipe, /dev/null,
    /dev/stdout) is written through, never replaced; sockets and block devices are refused.

    Args:
        path: the file to write.
        argument: the argument that named it, for messages (the command line words it as a flag).

    Example:
        with OutputFile(args.out) as out:
            text = generate(...)          # work happens only once the destination is known good
            out.write(text)
    """

    def __init__(self, path, argument="out"):
        self.path = path
        self.argument = argument
        self._text = ""
        self._stack = contextlib.ExitStack()

    def __enter__(self):
        try:
            mode = os.stat(self.path).st_mode
        except FileNotFoundError:
            mode = None
        except OSError as e:
            raise self._refused(f"{self.path}: {e.strerror}") from None
        self._through = mode is not None and (stat.S_ISFIFO(mode) or stat.S_ISCHR(mode))
        if mode is not None and not self._through and not stat.S_ISREG(mode):
            kind = "a directory" if stat.S_ISDIR(mode) else "a socket or block device"
            raise self._refused(f"{self.path} is {kind}; give a file name")
        if self._through:
            if not os.access(self.path, os.W_OK):
                raise self._refused(f"{self.path} is not writable")
        else:
            try:
                self._tmp = self._stack.enter_context(atomic_path(self.path))
            except UsageError as e:
                raise self._refused(e, separator=": ") from None
        return self

    def write(self, text):
        """Set the text (UTF-8) written when the block ends without an error: a string, or an
        iterable of strings written one after another (a long output never whole in memory)."""
        self._text = text

    def __exit__(self, kind, value, traceback):
        if kind is not None:
            return self._stack.__exit__(kind, value, traceback)  # removes the temporary
        error = None
        try:
            with open(self.path if self._through else self._tmp, "w", encoding="utf-8") as f:
                f.writelines([self._text] if isinstance(self._text, str) else self._text)
        except OSError as e:
            error = self._refused(cannot_write(self.path, e), separator=": ")
        except BaseException as e:  # an interrupt, or an error of the pieces' iterable: no rename
            self._stack.__exit__(type(e), e, e.__traceback__)
            raise
        try:
            self._stack.__exit__(type(error) if error else None, error, None)  # renames only without error
        except UsageError as e:
            raise self._refused(e, separator=": ") from None
        if error:
            raise error
        return False

    def _refused(self, problem, separator=" "):
        return ArgumentError.about(self.argument, str(problem), separator)


def remove_stale_temporaries(directory, names):
    """Delete the temporaries that `atomic_path` left for the files `names` when its process was
    killed (-9); nothing else (a user's `.notes.tmp` stays, and so does any folder)."""
    patterns = [re.compile(_temporary_name_pattern(name)) for name in names]
    for entry in os.scandir(directory):
        if entry.is_file(follow_symlinks=False) and any(p.fullmatch(entry.name) for p in patterns):
            os.remove(entry.path)


# renameat2(2) flags (Linux 3.15+; glibc 2.28+ has the wrapper).
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


def _renameat2(source, destination, flags):
    """renameat2, or an OSError(ENOSYS) where the system or the file system has none."""
    libc = ctypes.CDLL(None, use_errno=True)
    function = getattr(libc, "renameat2", None)
    if function is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_fdcwd = -100
    if function(at_fdcwd, os.fsencode(source), at_fdcwd, os.fsencode(destination), flags) != 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number), destination)


def exchange(first, second):
    """Swap two directories in one step: anyone looking sees the one or the other, never none.

    Raises:
        OSError: ENOSYS or EINVAL where the system or the file system cannot swap atomically.
    """
    _renameat2(first, second, _RENAME_EXCHANGE)


def rename_new(source, destination):
    """Rename `source` to `destination`, which must not exist (an empty folder is not replaced).

    Raises:
        FileExistsError: `destination` exists.
    """
    try:
        _renameat2(source, destination, _RENAME_NOREPLACE)
    except OSError as e:
        if e.errno not in (errno.ENOSYS, errno.EINVAL):
            raise
        # No renameat2 here: a directory renamed onto a non-empty one fails, onto an empty one
        # replaces it; check first, which leaves only a harmless race with an empty folder.
        if os.path.lexists(destination):
            raise FileExistsError(errno.EEXIST, "File exists", destination) from None
        os.rename(source, destination)
