"""Data-parallel training (refham.training.distributed): the sharding of batches and random draws, the
single-process path, and — under `mpiexec -n 2` subprocesses, each with a timeout so that a hang
fails instead of stalling — equivalence with one process, resume across world sizes, faults,
the sweep. The MPI tests skip only where mpi4py or mpiexec is missing; the GPU ones where CuPy
or (for NCCL) a second GPU is."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import refham.training.distributed as distributed
from refham.cli import commands as cli
from refham.backend import rng
from refham.files.checkpoint import load_checkpoint
from refham.training.distributed import ShardedGenerator, shard
from refham.training.metaformer_train import TrainSettings, train as train_metaformer
from refham.study.sweep import run_sweep
from refham.training.train import train
from refham.training.train_config import TrainConfig
from tests.test_train import _interrupt_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
needs_mpi = pytest.mark.skipif(
    importlib.util.find_spec("mpi4py") is None or MPIEXEC is None,
    reason='mpi4py or mpiexec is not installed (pip install "refham[mpi]")')
TIMEOUT = 120   # seconds for one mpiexec job: far above its few seconds, far below a CI stall
# float64, AsymMixer with λ, drop path, crop/flip and noise; 179 training images in batches of
# 179 digits, 159 after the validation split; batch 32: 4 full steps and a last one of 31 images
# (kept: drop_last off), split 15/16 over two ranks
TINY = dict(model="asymmixer", lam=0.01, data="digits", train_fraction=0.1, dim=16, depth=2,
            epochs=1, batch_size=32, drop_last=False, dtype="float64", drop_path=0.2,
            augment=True, input_noise=0.3, progress=False)
METAFORMER = dict(hidden=16, steps=3, batch_size=30, epochs=1, progress=False)


def _cupy_gpus():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount()
    except Exception:   # no CuPy, or no usable CUDA driver
        return 0


def _options(settings):
    """TrainConfig-style settings → `--option value` arguments of the CLI."""
    args = []
    for key, value in settings.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        else:
            args += [flag, str(value)]
    return args


def _env():
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
            "OMP_NUM_THREADS": "1"}


def _mpiexec(args, n=2, code=None):
    """[mpiexec -n n python (-m refham.cli.commands | -c code)] + args."""
    program = ["-c", code] if code else ["-m", "refham.cli"]
    return [MPIEXEC, "-n", str(n), sys.executable, *program, *args]


def _run(args, n=2, code=None):
    result = subprocess.run(_mpiexec(args, n, code), capture_output=True, text=True,
                            timeout=TIMEOUT, env=_env(), cwd=ROOT)
    return result


def _close(a, b, rtol=1e-12):
    """max |a − b| ≤ rtol · max |b| (relative to the tensor's scale)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return np.max(np.abs(a - b), initial=0.0) <= rtol * np.max(np.abs(b), initial=0.0)


def _assert_same_state(path_a, path_b):
    a, b = load_checkpoint(path_a), load_checkpoint(path_b)
    assert a.step == b.step
    for name in b.params:
        assert _close(a.params[name], b.params[name]), name
    for key, value in b.optim_state.items():
        assert _close(a.optim_state[key], value), key
    return a, b


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


# ------------------------------------------------------------------------- no MPI needed
@pytest.mark.parametrize("n, size", [(32, 2), (19, 2), (7, 3), (1, 2), (10, 4)])
def test_sharded_draws_are_the_rows_of_one_process_draws(n, size):
    whole = rng(5)
    expected = (whole.integers(0, 9, size=(n, 2)), whole.random(n),
                whole.standard_normal((n, 3, 2)))
    pieces = [[], [], []]
    for rank in range(size):
        comm = type("Rank", (), {"rank": rank, "size": size})()
        rows = shard(n, comm)
        gen = ShardedGenerator(rng(5), n, rows)
        local = rows.stop - rows.start
        for piece, draw in zip(pieces, (gen.integers(0, 9, size=(local, 2)), gen.random(local),
                                        gen.standard_normal((local, 3, 2)))):
            piece.append(draw)
    for piece, whole_draw in zip(pieces, expected):
        assert np.array_equal(np.concatenate(piece), whole_draw)
    with pytest.raises(ValueError, match="per sample"):
        ShardedGenerator(rng(5), n, slice(0, 1)).random(n + 1)


def test_one_process_never_imports_mpi4py(tmp_path):
    code = ("import sys; from refham.cli.commands import main; "
            f"code = main(['train', '--out', {str(tmp_path)!r}] + {_options(TINY)!r}); "
            "assert 'mpi4py' not in sys.modules, 'mpi4py was imported'; sys.exit(code)")
    env = {k: v for k, v in _env().items() if k not in distributed._LAUNCHER_SIZE}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=TIMEOUT, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr


def test_comm_mpi_without_mpi4py_says_what_to_install(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mpi4py", None)      # makes `import mpi4py` fail
    monkeypatch.setattr(distributed, "_WORLD", {})
    assert cli.main(["train", "--comm", "mpi", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and 'pip install "refham[mpi]"' in err
    assert cli.main(["train", "--comm", "nccl", "--backend", "numpy",
                     "--out", str(tmp_path / "run")]) == 2
    assert "needs --backend cupy" in capsys.readouterr().err


# ------------------------------------------------------------------------- under mpiexec
# TINY's 5 steps end on a batch split 15/16; batch 158 leaves each epoch a last batch of ONE
# image, so that rank 0 has none
@needs_mpi
@pytest.mark.parametrize("changes", [{}, {"batch_size": 158, "epochs": 2}])
def test_two_ranks_train_exactly_like_one_process(tmp_path, changes):
    settings = {**TINY, **changes}
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(TrainConfig(**settings, out=one))
    result = _run(["train", "--out", two] + _options(settings))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(f"finished {settings['epochs']} epochs") == 1   # rank 0 alone
    a, b = _assert_same_state(os.path.join(two, "last.npz"), os.path.join(one, "last.npz"))
    assert (a.config["world_size"], b.config["world_size"]) == (2, 1)
    for ra, rb in zip(_metrics(two), _metrics(one), strict=True):
        assert ra["test_acc"] == rb["test_acc"] and ra["train_acc"] == rb["train_acc"]
        for key in ("test_loss", "train_loss"):
            assert _close(ra[key], rb[key]), key


@needs_mpi
def test_metaformer_two_ranks_train_like_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train_metaformer(TrainSettings(**METAFORMER, out=one))
    result = _run(["metaformer", "train", "--out", two, "--no-progress"]
                  + _options({k: v for k, v in METAFORMER.items() if k != "progress"}))
    assert result.returncode == 0, result.stderr
    _assert_same_state(os.path.join(two, "last.npz"), os.path.join(one, "last.npz"))
    (ra,), (rb,) = _metrics(two), _metrics(one)
    for key in ("train_loss", "test_loss_clean", "test_loss_standardised"):
        assert _close(ra[key], rb[key]), key


# an odd global batch (33) splits 16/17 over two ranks: a run of one process resumes on two
@needs_mpi
def test_run_stopped_on_one_rank_resumes_on_two_exactly(tmp_path, monkeypatch):
    settings = {**TINY, "epochs": 2, "batch_size": 33}
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    train(TrainConfig(**settings, out=whole))
    _interrupt_at(monkeypatch, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert train(TrainConfig(**settings, out=split))["step"] == 3
    monkeypatch.undo()
    result = _run(["train", "--resume", "--out", split, "--no-progress"])
    assert result.returncode == 0, result.stderr
    _assert_same_state(os.path.join(split, "last.npz"), os.path.join(whole, "last.npz"))


CRASH_ON_RANK_1 = """
import sys
from refham.cli import commands as cli
from refham.training import train
original = train._EpochLoop._train_step
def crash(self, images, labels):
    if self.comm.rank == 1 and self.state.step == 2:
        raise RuntimeError("simulated failure on one rank")
    return original(self, images, labels)
train._EpochLoop._train_step = crash
sys.exit(cli.main(sys.argv[1:]))
"""

# writes each rank's pid into the folder given first, then runs the CLI
WITH_PIDS = """
import os, sys
from refham.cli import commands as cli
from refham.training.distributed import launched_rank
with open(os.path.join(sys.argv[1], f"pid{launched_rank()}"), "w") as f:
    f.write(str(os.getpid()))
sys.exit(cli.main(sys.argv[2:]))
"""
LONG = {**TINY, "epochs": 500, "eval_every": 500, "checkpoint_every": 2, "dtype": "float32"}


@needs_mpi
def test_an_exception_on_one_rank_ends_the_job_with_its_message(tmp_path):
    started = time.monotonic()
    result = _run(["train", "--out", str(tmp_path)] + _options(LONG), code=CRASH_ON_RANK_1)
    assert result.returncode != 0
    assert "rank 1: RuntimeError: simulated failure on one rank" in result.stderr
    assert time.monotonic() - started < TIMEOUT / 2


def _start_long_run(tmp_path):
    """A long 2-rank run, returned once its first checkpoint exists → (Popen, run folder)."""
    out = tmp_path / "run"
    job = subprocess.Popen(_mpiexec([str(tmp_path), "train", "--out", str(out)] + _options(LONG),
                                    code=WITH_PIDS),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                           cwd=ROOT)
    wait_for_checkpoint(job, lambda: (out / "last.npz").exists())
    return job, out


def wait_for_checkpoint(job, written):
    """Return once `written()` is true (a checkpoint exists); fail if `job` ends first."""
    deadline = time.monotonic() + TIMEOUT
    while not written():
        if job.poll() is not None or time.monotonic() > deadline:
            job.kill()
            pytest.fail(f"the job ended or stalled before its first checkpoint: "
                        f"{job.communicate()[1]}")
        time.sleep(0.1)


def _finish(job, timeout=60):
    try:
        return job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job.kill()
        job.communicate()
        pytest.fail(f"the job did not end within {timeout} s")


@needs_mpi
def test_sigterm_to_mpiexec_stops_all_ranks_at_one_step_and_rank_0_saves(tmp_path):
    job, out = _start_long_run(tmp_path)
    job.send_signal(signal.SIGTERM)
    stdout, stderr = _finish(job)
    assert job.returncode == 0, stderr
    step = load_checkpoint(out / "last.npz").step
    assert f"stopped by SIGTERM at step {step} " in stdout


@needs_mpi
def test_kill_9_of_one_rank_ends_the_job_and_keeps_a_good_checkpoint(tmp_path):
    job, out = _start_long_run(tmp_path)
    os.kill(int((tmp_path / "pid1").read_text()), signal.SIGKILL)
    _finish(job, timeout=30)
    assert job.returncode != 0
    # last.npz is written every checkpoint_every steps and at the end of each epoch (5 steps)
    step = load_checkpoint(out / "last.npz").step
    assert step % LONG["checkpoint_every"] == 0 or step % 5 == 0


@needs_mpi
def test_sweep_spread_over_two_ranks_writes_what_a_serial_sweep_does(tmp_path):
    settings = dict(train_fraction=0.1, epochs=1, dim=16, depth=2, batch_size=32)
    kwargs = dict(models=("paramixer", "asymmixer"), lams=(0.1, 0.0), seeds=(0,))
    run_sweep(str(tmp_path / "serial"), settings, **kwargs, log=lambda line: None)
    result = _run(["sweep", "--out", str(tmp_path / "mpi"), "--models", *kwargs["models"],
                   "--lams", "0.1", "0", "--seeds", "0"] + _options(settings))
    assert result.returncode == 0, result.stderr
    timing = ("wall_time", "run_id")
    lines = {}
    for name in ("serial", "mpi"):
        with open(tmp_path / name / "results.jsonl", encoding="utf-8") as f:
            lines[name] = [{k: v for k, v in json.loads(line).items() if k not in timing}
                           for line in f]
    assert lines["mpi"] == lines["serial"] and len(lines["mpi"]) == 3
    assert (tmp_path / "mpi" / "results.md").read_text() == \
        (tmp_path / "serial" / "results.md").read_text()


# ------------------------------------------------------------------------- GPUs
@needs_mpi
@pytest.mark.skipif(_cupy_gpus() < 1, reason="needs CuPy and a GPU")
def test_two_ranks_on_cupy_arrays_over_mpi_train_like_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(TrainConfig(**TINY, backend="cupy", out=one))
    result = _run(["train", "--out", two, "--backend", "cupy", "--comm", "mpi"] + _options(TINY))
    assert result.returncode == 0, result.stderr
    _assert_same_state(os.path.join(two, "last.npz"), os.path.join(one, "last.npz"))


@needs_mpi
@pytest.mark.skipif(_cupy_gpus() < 2, reason="NCCL across GPUs needs CuPy and two GPUs")
def test_two_gpus_over_nccl_train_like_one_process(tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    train(TrainConfig(**TINY, backend="cupy", out=one))
    result = _run(["train", "--out", two, "--backend", "cupy", "--comm", "nccl"]
                  + _options(TINY))
    assert result.returncode == 0, result.stderr
    _assert_same_state(os.path.join(two, "last.npz"), os.path.join(one, "last.npz"))
