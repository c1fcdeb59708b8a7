"""A training run's output folder, owned for the life of the run:

    with RunFolder(cfg.out, comm) as folder:      # rank 0 creates and locks it ...
        folder.write("config.json", text)          # ... and alone writes there
    # the lock is released here, however the run ended

Rank 0 checks the path (refham.files.outputs), creates the folder and holds its lock
(refham.files.runlock) from entering the block to leaving it; the other ranks of an MPI job
neither lock nor write (`writer` is the one gate of every write). Whole files are replaced
atomically; the metrics log grows by one line per epoch.
"""
import contextlib
import os

from refham.files.outputs import atomic_write, prepare_folder
from refham.files.runlock import RunLock


class RunFolder:
    """The folder `out` of a run on communicator `comm`; a context manager that holds its lock
    (rank 0) while the run uses it. `path(name)` is where file `name` lives in it."""

    def __init__(self, out, comm):
        self.out, self.writer = out, comm.rank == 0
        self._held = contextlib.ExitStack()

    def __enter__(self):
        if self.writer:
            prepare_folder(self.out)
            self._held.enter_context(RunLock(self.out))
        return self

    def __exit__(self, *exc_info):
        self._held.close()

    def path(self, name):
        """The path of file `name` in the folder."""
        return os.path.join(self.out, name)

    def write(self, name, text):
        """Create or replace file `name` with `text` atomically (rank 0 only)."""
        if self.writer:
            atomic_write(self.path(name), lambda f: f.write(text.encode()))

    def append_line(self, name, line):
        """Append `line` and a newline to file `name` (rank 0 only)."""
        if self.writer:
            with open(self.path(name), "a", encoding="utf-8") as f:
                f.write(line + "\n")
