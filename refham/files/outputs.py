"""Where refham may write: every output file and folder is checked before any work starts, so a
mistake costs one clear line instead of a traceback after minutes of computing, and nothing a
user has is silently replaced.

    check_output_file("g.npz", force=False)      # OutputError if it exists, is a folder, ...
    prepare_folder("runs/para")                  # creates it; OutputError if it cannot be one
    atomic_write("g.npz", lambda f: f.write(data))   # then writes, all or nothing

Rules: a path must be non-empty; an output file's folder must exist and be writable and the
file must not be a folder; an existing file is replaced only with `force`, and a refham training
checkpoint (an .npz with a `meta/json` entry) only by another checkpoint — never by an export, a
golden file or a plot, even with `force`, because it may be a run's only copy of its weights;
what is not a regular file (/dev/null, a pipe) is never replaced: the rename would remove it.

Every file refham writes goes through `atomic_write`: a temporary file in the target folder is
flushed, fsync'ed and renamed over the target with `os.replace`, so a crash leaves either the old
file or the new one, never half of one. A `kill -9` in the middle of a write can leave the
temporary file behind; it is named `.<target>.<random>.refham-tmp` (`is_temporary`), so that a
run that holds its folder's lock can recognise and remove it.
This module imports nothing of refham but the error base.
"""
import os
import tempfile
import zipfile

from refham.errors import RefhamError

TEMPORARY_SUFFIX = ".refham-tmp"


class OutputError(RefhamError, ValueError):
    """An output path refham must not or cannot write to."""


def _text(path, what):
    """`path` as a str after checking it is a non-empty path."""
    try:
        text = os.fspath(path)
    except TypeError:
        raise OutputError(f"{what} must be a path, got {path!r}") from None
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if not text.strip():
        raise OutputError(f"{what} is empty: give a path")
    return text


def _check_ancestors(folder, what):
    """The nearest existing ancestor of `folder` (itself included) is a writable folder."""
    existing = os.path.abspath(folder)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise OutputError(f"{what}: {existing} is a file, not a folder; choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"{what}: no permission to write in {existing}; choose another path")


def is_checkpoint(path):
    """True when `path` is a refham training checkpoint (a zip with a meta/json.npy member)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return "meta/json.npy" in archive.namelist()
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def check_output_file(path, force=False, checkpoint=False, what="output file"):
    """Raise OutputError unless `path` can receive a new file: non-empty, not a folder, in an
    existing writable folder, and either absent, or present with `force` and not a refham
    checkpoint (unless `checkpoint`: the new file is one too). Returns the path as a str."""
    text = _text(path, what)
    if os.path.isdir(text) or text.endswith((os.sep, "/")):
        raise OutputError(f"{what} {text} is a folder; give the name of a file to write")
    folder = os.path.dirname(os.path.abspath(text))
    _check_ancestors(folder, f"{what} {text}")
    if not os.path.isdir(folder):
        raise OutputError(f"{what} {text}: the folder {folder} does not exist; create it first "
                          f"(mkdir -p {folder})")
    if os.path.lexists(text):
        if os.path.exists(text) and not os.path.isfile(text):
            raise OutputError(f"{text} is not a regular file (a device, pipe or socket); "
                              f"refham replaces only files, even with --force")
        if is_checkpoint(text) and not checkpoint:
            raise OutputError(f"{text} is a refham training checkpoint; it is never replaced by "
                              f"another kind of file, even with --force: choose another path")
        if not force:
            raise OutputError(f"{text} exists: pass --force to replace it, or choose another "
                              f"path")
    return text


def prepare_folder(path, what="output folder"):
    """Create the folder `path` (and its parents) if needed, after checking that it is a
    non-empty path whose existing part is a writable folder; OutputError otherwise. Returns
    the path as a str."""
    text = _text(path, what)
    if os.path.exists(text) and not os.path.isdir(text):
        raise OutputError(f"{what} {text} is a file; give a folder (it may not exist yet)")
    _check_ancestors(text, f"{what} {text}")
    try:
        os.makedirs(text, exist_ok=True)
    except OSError as exc:
        raise OutputError(f"{what} {text} cannot be created: {exc.strerror or exc}") from exc
    return text


def atomic_write(path, write):
    """Create or replace the file `path` atomically: `write(f)` fills a temporary binary file in
    the same folder, which is fsync'ed and renamed over `path`. On any failure (Ctrl-C included)
    the temporary file is removed and `path` keeps its previous content. The file gets the
    usual permissions (0o666 less the umask), not mkstemp's private 0o600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.",
                               suffix=TEMPORARY_SUFFIX)
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(folder)


def is_temporary(name):
    """True for the name of an `atomic_write` temporary file (`.<target>.<random>.refham-tmp`)."""
    return name.startswith(".") and name.endswith(TEMPORARY_SUFFIX)


def _current_umask():
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
