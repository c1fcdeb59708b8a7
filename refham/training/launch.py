"""How a job of several ranks (`mpiexec -n N refham …`) starts and ends: the ranks check that
they run the same settings, and a failing rank ends the whole job within seconds with one line
naming it — however early it fails, MPI started or not.

    with job_output():                       # ranks ≠ 0 hold their error lines until the end
        code = command(args)
    return end_job(code)                     # every rank: agree, or end the job

`end_job` is where every rank of the job arrives when its command returns. The ranks meet on a
communicator of their own (MPICommunicator.ending), waiting without spinning:

- all arrive (all finished, or all failed alike — a setting every rank refuses): the job ends
  normally, each rank with its status; rank 0 prints its lines, then those of other ranks that
  differ from its own, each once, as `rank r: …`. No MPI_Abort, so no line is lost (an abort
  can end mpiexec before it has forwarded the ranks' last output).
- a rank that failed finds the others elsewhere (waiting in a collective for it) for
  GRACE_SECONDS: it prints `rank r: …` and aborts the job (MPI_Abort), which ends every rank.

A rank that fails before MPI started (REFHAM_BACKEND unusable, a launcher variable that is not a
number, a run folder its node cannot see) starts MPI here to reach the others; should MPI itself
not start within START_SECONDS, the process exits alone.
"""
import contextlib
import hashlib
import io
import json
import os
import sys
import threading
import time
import traceback

from refham.training.distributed import (
    CommError, SingleProcess, get_communicator, launched_rank, launched_size, started_world,
    wait)

GRACE_SECONDS = 3.0    # how long a failed rank waits for the others before ending the job
START_SECONDS = 30.0   # how long MPI may take to start on a rank that failed before it had


@contextlib.contextmanager
def job_output():
    """In a job of several ranks, hold what ranks ≠ 0 write to stderr (the error lines that
    every rank would print alike) until `end_job` decides what rank 0 prints; rank 0 writes as
    usual and remembers its complete lines, to print no line of another rank twice."""
    try:
        size, rank = launched_size(), launched_rank()
    except CommError:          # the command reports it
        size, rank = 1, 0
    if size == 1:
        yield
        return
    real = sys.stderr
    sys.stderr = stream = _Stream(real if rank == 0 else None)
    try:
        yield
    finally:
        sys.stderr = real
        if stream.real is None and stream.pending:     # a last line without its newline
            _Held.lines.append(stream.pending)


class _Stream(io.StringIO):
    """stderr inside job_output: held (`real` None), or written to `real` and remembered."""

    def __init__(self, real):
        super().__init__()
        self.real, self.pending = real, ""

    def write(self, text):
        if self.real is not None:
            self.real.write(text)
        *complete, self.pending = (self.pending + text).split("\n")
        if self.real is None:
            _Held.lines += complete
        else:   # rank 0 remembers its last lines, not its progress bars (redrawn with \r)
            _Held.lines = (_Held.lines + [line for line in complete if "\r" not in line])[-100:]
        return len(text)

    def flush(self):
        if self.real is not None:
            self.real.flush()


class _Held:
    lines = []      # the lines job_output held (ranks ≠ 0) or printed (rank 0)


def end_job(code):
    """Every rank's last call: returns `code` for the process to exit with, once the ranks
    agree, or ends the whole job when the others are not here (see the module docstring)."""
    try:
        size, rank = launched_size(), launched_rank()
    except CommError:
        size, rank = 1, 0
    world = started_world()
    if size == 1 or (world is None and not code) or isinstance(world, SingleProcess):
        return _flush_held(rank, code)     # alone, or the ranks never meet (--comm none)
    if world is None:
        world = _start_mpi(rank, code)
        if world is None:
            return _flush_held(rank, code)
    arrived = wait(world.ending.Ibarrier(),
                   None if not code else time.monotonic() + GRACE_SECONDS)
    if not arrived:
        if world.rank:
            _print(world.rank, _Held.lines or [f"ended with status {code}"])
        world.abort(code)
    reports = world.ending.gather(_Held.lines, root=0)
    if world.rank == 0:
        shown = set(reports[0])
        for other, lines in enumerate(reports[1:], start=1):
            _print(other, [line for line in lines if line not in shown])
            shown.update(lines)
    _Held.lines = []
    return code


def _print(rank, lines):
    """Each of `lines` as `rank r: line` on the real stderr."""
    sys.__stderr__.write("".join(f"rank {rank}: {line}\n" for line in lines))
    sys.__stderr__.flush()


def _flush_held(rank, code):
    """Print what job_output held (no other rank is there to agree with) → code."""
    if rank:
        _print(rank, _Held.lines)
    _Held.lines = []
    return code


def _start_mpi(rank, code):
    """Start MPI to reach the other ranks from a rank that failed before it started → the world
    communicator, or None when MPI is missing or does not start within START_SECONDS (the
    others never start it either, as under --comm none: then this process ends alone, with
    `code`)."""
    def give_up():
        _flush_held(rank, code)
        os._exit(code)
    timer = threading.Timer(START_SECONDS, give_up)
    timer.daemon = True
    timer.start()
    try:
        return get_communicator("mpi")
    except CommError:
        return None
    finally:
        timer.cancel()


def report_crash(kind, value, tb):
    """sys.excepthook for a job of several ranks: the traceback, then `end_job` (a bug on one
    rank must not leave the others waiting in their next collective)."""
    lines = "".join(traceback.format_exception(kind, value, tb)).splitlines()
    if launched_rank():
        _Held.lines += lines
    else:
        sys.stderr.write("".join(line + "\n" for line in lines))
    end_job(1)


def settings_digest(settings):
    """SHA-256 of the JSON of `settings` (a dict), keys sorted: equal settings, equal digests."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


def check_same_settings(comm, settings, what="settings"):
    """Raise CommError on every rank unless every rank of `comm` holds the same `settings` (a
    JSON-able dict): ranks started with different options would silently train another run
    than the one rank 0 records, or wait forever for each other."""
    if comm.size == 1:
        return
    digests = comm.allgather(settings_digest(settings))
    if len(set(digests)) == 1:
        return
    rank = next(r for r, d in enumerate(digests) if d != digests[0])
    theirs = comm.allgather(settings)
    differing = sorted(k for k in set(theirs[0]) | set(theirs[rank])
                       if theirs[0].get(k) != theirs[rank].get(k))
    shown = "; ".join(f"{k}: {theirs[0].get(k)!r} on rank 0, {theirs[rank].get(k)!r} on rank "
                      f"{rank}" for k in differing[:4])
    raise CommError(f"the ranks were started with different {what} ({shown}): start every rank "
                    f"with the same options")


def under_launcher():
    """True in a job of several ranks (False for a launcher variable that is not a number: the
    command reports it)."""
    try:
        return launched_size() > 1
    except CommError:
        return False
