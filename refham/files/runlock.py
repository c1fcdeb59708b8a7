"""One writer per run folder: an exclusive lock held for the life of a run.

    with RunLock("runs/para"):       # RunLocked, naming the holder, if another process has it
        ...                          # train, resume, sweep, metaformer train

The lock is an `fcntl.flock` on `<folder>/.refham.lock`. The operating system drops it when the
holding process ends, however it ends (`kill -9` included), so a lock is never stale and never
needs breaking; the file's content (pid, host, start time and command line of the holder) only
feeds the message that refuses a second writer. On release the lock file is removed; a writer
that locked a file just removed by the holder before it notices and takes the new one.

While it holds the lock, a run is the folder's only writer, so the temporary files of
`outputs.atomic_write` found there (`.<target>.<random>.refham-tmp`) belong to writers that
are gone — a crash in the middle of a save — and `RunLock` removes them when it is acquired.
"""
import datetime
import fcntl
import json
import os
import shlex
import socket
import sys

from refham.errors import RefhamError
from refham.files.outputs import is_temporary

LOCK_NAME = ".refham.lock"


class RunLocked(RefhamError, RuntimeError):
    """The run folder is held by another process (a run, a resume or a sweep writing there), or
    its lock file cannot be opened."""


class RunLock:
    """The exclusive lock on a run folder (which must exist); `acquire`/`release` or `with`."""

    def __init__(self, folder):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_NAME)
        self.removed = []           # the orphaned temporary files removed on acquiring
        self._fd = None

    def acquire(self):
        """Take the lock or raise RunLocked naming its holder; then remove orphaned temporary
        files. → self."""
        while True:
            try:                    # O_NOFOLLOW: a symlink planted there is not written through
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o666)
            except OSError as exc:
                raise RunLocked(f"cannot lock {self.folder}: {self.path} cannot be opened as a "
                                f"file ({exc.strerror}); remove it if it is not refham's lock "
                                f"file, or choose another --out") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe(os.pread(fd, 1 << 16, 0))
                os.close(fd)
                raise RunLocked(f"{self.folder} is in use by another refham process ({holder}): "
                                f"only one run may write to a folder; wait for it to end, stop "
                                f"it, or choose another --out") from None
            if _still_linked(fd, self.path):
                break
            os.close(fd)            # we locked a file its last holder had just removed: retry
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "since": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds"),
                  "command": shlex.join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode(), 0)
        self._fd = fd
        self._remove_orphans()
        return self

    def release(self):
        """Remove the lock file, then let go of the lock (in this order: see the module
        docstring). Releasing a lock not held does nothing."""
        if self._fd is None:
            return
        try:
            os.unlink(self.path)
        finally:
            os.close(self._fd)
            self._fd = None

    def _remove_orphans(self):
        """Delete the atomic_write temporary files in the folder (their writers are gone)."""
        for name in sorted(os.listdir(self.folder)):
            if is_temporary(name):
                try:
                    os.unlink(os.path.join(self.folder, name))
                except FileNotFoundError:
                    continue
                self.removed.append(name)

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def _still_linked(fd, path):
    """True if the open file `fd` is still the file at `path` (not unlinked or replaced)."""
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _describe(content):
    """'pid 123 on host h since 2026-…: refham train …' from a lock file's bytes (or a note
    that the holder has not written them yet)."""
    try:
        holder = json.loads(content)
        return (f"pid {holder['pid']} on {holder['host']} since {holder['since']}: "
                f"{holder['command']}")
    except (ValueError, TypeError, KeyError):
        return "its holder has not recorded itself yet"
