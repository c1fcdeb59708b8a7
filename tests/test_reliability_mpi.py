"""Reliability of jobs of several ranks (issue 20), under `mpiexec -n 2`: a rank that fails —
before MPI starts or after — ends the whole job within seconds with one line naming it; ranks
started with different settings are refused; an error every rank shares is said once (it used to
end some jobs with exit status 2 and no message); a signal to one rank stops all of them; a
sweep stopped by a signal says so and exits 143 without spinning."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from refham.files.checkpoint import load_checkpoint
from refham.training.train import train
from tests.test_distributed import (
    MPIEXEC, ROOT, TIMEOUT, WITH_PIDS, _env, _finish, _mpiexec, _start_long_run, needs_mpi,
    wait_for_checkpoint)
from tests.test_train import _cfg

TINY = ["--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "32",
        "--epochs", "1", "--no-progress"]
QUICK = 30     # seconds: a job that ends "within seconds" (its start-up included) ends before


def _job(rank0, rank1, *, env1=(), wdir=(None, None)):
    """Run rank 0 with `rank0` and rank 1 with `rank1` (refham arguments), rank 1 with the
    environment variables `env1` ((name, value) pairs) → (CompletedProcess, seconds)."""
    command = [MPIEXEC]
    for args, env, folder in ((rank0, (), wdir[0]), (rank1, env1, wdir[1])):
        command += ["-n", "1"] + [x for name, value in env for x in ("-env", name, value)]
        command += ["-wdir", str(folder)] if folder else []
        command += [sys.executable, "-m", "refham.cli", *args, ":"]
    started = time.monotonic()
    result = subprocess.run(command[:-1], capture_output=True, text=True, timeout=TIMEOUT,
                            env=_env(), cwd=ROOT)
    return result, time.monotonic() - started


def _lines(stderr):
    """The lines of stderr that are refham's (not MPI's report of an abort)."""
    return [line for line in stderr.splitlines() if line and "MPI_Abort" not in line]


@needs_mpi
@pytest.mark.parametrize("how", ["environment", "usage"])
def test_a_rank_failing_before_mpi_starts_ends_the_job_with_one_line(tmp_path, how):
    args = ["train", *TINY, "--out", str(tmp_path / "run")]
    if how == "environment":
        result, seconds = _job(args, args, env1=[("REFHAM_BACKEND", "garbage")])
        expected = ["rank 1: refham train: error: REFHAM_BACKEND='garbage': unknown backend "
                    "'garbage': choose one of numpy, cupy; unset it or set it to numpy or cupy"]
    else:               # argparse prints its usage and exits, before any refham code runs
        result, seconds = _job(args, args + ["--bogus"])
        expected = ["usage: refham [-h] COMMAND ...",
                    "refham: error: unrecognized arguments: --bogus", "rank 1: ended with status 2"]
    assert result.returncode != 0 and seconds < QUICK
    assert _lines(result.stderr) == expected


@needs_mpi
def test_a_run_folder_one_rank_cannot_see_ends_the_job_with_one_line(tmp_path):
    seen, unseen = tmp_path / "node0", tmp_path / "node1"
    unseen.mkdir()
    train(_cfg(seen, "run", epochs=1))
    args = ["train", "--resume", "--out", "run", "--epochs", "1"]
    result, seconds = _job(args, args, wdir=(seen, unseen))
    assert result.returncode != 0 and seconds < QUICK
    lines = _lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("rank 1: refham train: error: nothing to "
                                                   "resume in run: no last.npz"), lines


@needs_mpi
def test_ranks_started_with_different_settings_are_refused_in_one_line(tmp_path):
    args = ["train", *TINY, "--out", str(tmp_path / "run")]
    result, _ = _job(args, args + ["--seed", "3"])
    assert result.returncode == 2
    assert _lines(result.stderr) == [
        "refham train: error: the ranks were started with different settings (seed: 0 on rank "
        "0, 3 on rank 1): start every rank with the same options"]
    assert not os.path.exists(tmp_path / "run" / "config.json")


@needs_mpi
def test_an_error_every_rank_shares_is_said_once_with_its_status(tmp_path):
    args = ["train", *TINY, "--out", str(tmp_path / "run"), "--warmup", "2"]
    result, _ = _job(args, args)
    assert result.returncode == 2
    assert _lines(result.stderr) == ["refham train: error: warmup must lie in [0, 1), got 2.0"]


@needs_mpi
def test_sigterm_to_one_rank_stops_every_rank_and_rank_0_saves(tmp_path):
    job, out = _start_long_run(tmp_path)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGTERM)
    stdout, stderr = _finish(job)
    assert job.returncode == 0, stderr
    step = load_checkpoint(out / "last.npz").step
    assert f"stopped by a signal to another rank at step {step} " in stdout


def _start_long_sweep(tmp_path):
    """A sweep of two long runs, one per rank, returned once both have a checkpoint →
    (Popen, sweep folder); the ranks' pids are in tmp_path/pid0, pid1."""
    out = tmp_path / "sweep"
    job = subprocess.Popen(
        _mpiexec([str(tmp_path), "sweep", "--models", "paramixer", "symmixer", "--seeds", "0",
                  "--epochs", "500", "--data", "synthetic", "--dim", "8", "--depth", "1",
                  "--batch-size", "16", "--checkpoint-every", "2", "--out", str(out)],
                 code=WITH_PIDS),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    wait_for_checkpoint(job, lambda: len(list(out.glob("runs/*/last.npz"))) == 2)
    return job, out


@needs_mpi
@pytest.mark.parametrize("to_rank_1", [False, True])
def test_a_sweep_under_mpiexec_stopped_by_a_signal_says_so_and_exits_with_it(tmp_path,
                                                                             to_rank_1):
    job, out = _start_long_sweep(tmp_path)
    if to_rank_1:       # rank 0 hears of it at its next step (each rank trains its own run)
        os.kill(int((tmp_path / "pid1").read_text()), signal.SIGINT)
    else:
        job.send_signal(signal.SIGTERM)
    stdout, stderr = _finish(job, timeout=QUICK)       # it used to spin in a final barrier
    name, status = ("SIGINT", 130) if to_rank_1 else ("SIGTERM", 143)
    assert job.returncode == status, stderr
    assert f"sweep stopped by {name} during" in stdout, stdout
    assert not (out / "results.jsonl").exists() and not (out / "results.md").exists()
