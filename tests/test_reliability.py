"""Reliability in one process (issue 20): no signal lost by a sweep, nothing blocking on a FIFO,
a run folder that knows whose it is, the real error of a failed write, and one clear line for
a bad environment or argument. The jobs of several ranks are in test_reliability_mpi.py."""
import errno
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest

from refham.backend import SeedError, rng
from refham.cli.commands import main
from refham.files import outputs
from refham.files.checkpoint import load_checkpoint
from refham.files.outputs import WriteError, append_line, atomic_write
from refham.files.runlock import LOCK_NAME, RunFolderReplaced, RunLock
from refham.mixer import Mixer, make_config
from refham.training.train import _EpochLoop, train
from tests.test_train import _cfg, _interrupt_at

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "32",
        "--no-progress"]
SWEEP = ["sweep", "--models", "paramixer", "symmixer", "--seeds", "0", "--epochs", "1",
         "--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "16"]


def _refham(args, env=None, timeout=60):
    """`refham args` in a subprocess (for what happens at import time, or could block)."""
    return subprocess.run([sys.executable, "-m", "refham.cli", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), **(env or {})})


def _one_line(err, *parts):
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for part in parts:
        assert part in err, err


# ------------------------------------------------------------------------ no signal is lost
@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_after_a_runs_last_step_stops_the_sweep_which_resumes(tmp_path, monkeypatch,
                                                                       capsys, sig, status):
    original = _EpochLoop._best_on_test      # runs after the last step: the signal was lost there

    def signal_then_evaluate(self):
        os.kill(os.getpid(), sig)
        return original(self)
    monkeypatch.setattr(_EpochLoop, "_best_on_test", signal_then_evaluate)
    out = str(tmp_path / "sweep")
    assert main([*SWEEP, "--out", out]) == status
    assert f"sweep stopped by {sig.name} between runs" in capsys.readouterr().out
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        assert len(f.readlines()) == 1                  # the finished run is kept
    monkeypatch.undo()
    assert main([*SWEEP, "--out", out]) == 0
    assert "[2/2]" in capsys.readouterr().out and os.path.exists(os.path.join(out, "results.md"))


@pytest.mark.parametrize("name", ["metrics.jsonl", "config.json"])
def test_resume_refuses_a_fifo_where_a_file_belongs_instead_of_blocking(tmp_path, name):
    out = tmp_path / "run"
    train(_cfg(tmp_path, epochs=1))
    os.remove(out / name)
    os.mkfifo(out / name)
    result = _refham(["train", "--resume", "--out", str(out), "--epochs", "1"])
    assert result.returncode == 2
    _one_line(result.stderr, f"{name} cannot be read (not a file: a pipe or device)")


# ------------------------------------------------------------------ a run folder is its own
def test_every_artifact_carries_the_run_id_and_a_foreign_best_or_log_is_named(tmp_path,
                                                                              capsys):
    a, b = _cfg(tmp_path, "a", epochs=1), _cfg(tmp_path, "b", epochs=1, seed=1)
    run_id = train(a)["run_id"]
    train(b)
    with open(os.path.join(a.out, "config.json"), encoding="utf-8") as f:
        assert json.load(f)["run_id"] == run_id
    for name in ("last.npz", "best.npz"):
        assert load_checkpoint(os.path.join(a.out, name)).config["run_id"] == run_id
    with open(os.path.join(a.out, "metrics.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["run"] for line in f] == [run_id]
    for name, what in (("best.npz", "best.npz belongs to another run"),
                       ("metrics.jsonl", "metrics.jsonl (record 1) belongs to another run")):
        shutil.copy(os.path.join(a.out, name), tmp_path / "kept")
        shutil.copy(os.path.join(b.out, name), os.path.join(a.out, name))
        assert main(["train", "--resume", "--out", a.out]) == 2
        _one_line(capsys.readouterr().err, what)
        shutil.copy(tmp_path / "kept", os.path.join(a.out, name))
    assert main(["train", "--resume", "--out", a.out, "--epochs", "2"]) == 2   # all its own now
    assert "epochs: 1 → 2" in capsys.readouterr().err


def test_a_fresh_run_refuses_another_runs_files_unless_forced(tmp_path, capsys):
    cfg = _cfg(tmp_path, epochs=1)
    train(cfg)
    os.remove(os.path.join(cfg.out, "last.npz"))          # e.g. after a disk-full failure
    argv = ["train", *TINY, "--epochs", "1", "--seed", "1", "--out", cfg.out]
    assert main(argv) == 2
    _one_line(capsys.readouterr().err, "already holds a run (config.json, metrics.jsonl, "
                                       "best.npz)", "--force")
    assert main(argv + ["--force"]) == 0
    with open(os.path.join(cfg.out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["train"]["seed"] == 1
    assert load_checkpoint(os.path.join(cfg.out, "best.npz")).config["run_id"] == config["run_id"]


def test_a_folder_replaced_under_a_run_stops_it_and_gets_nothing_written(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path, epochs=3)

    def replace_folder():
        shutil.rmtree(cfg.out)
        os.mkdir(cfg.out)
        (tmp_path / "run" / "theirs.txt").write_text("another run's")
    _interrupt_at(monkeypatch, 3, replace_folder)
    with pytest.raises(RunFolderReplaced, match="was deleted, moved or replaced while this run "
                                                "held it"):
        train(cfg)
    assert os.listdir(cfg.out) == ["theirs.txt"]          # not even the lock was touched


def test_releasing_a_lock_never_raises_nor_removes_another_holders_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    first = RunLock(folder).acquire()
    shutil.rmtree(folder)
    first.release()                       # the folder is gone: nothing to remove, no error
    folder.mkdir()
    first = RunLock(folder).acquire()
    shutil.rmtree(folder)
    folder.mkdir()
    second = RunLock(folder).acquire()
    first.release()
    assert (folder / LOCK_NAME).exists()  # second's lock file stays
    second.release()
    assert not (folder / LOCK_NAME).exists()


# ----------------------------------------------------------------- the real error, once
def test_a_full_disk_names_the_file_and_keeps_the_previous_content(tmp_path):
    path = tmp_path / "last.npz"
    path.write_bytes(b"previous")

    def disk_full(f):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(WriteError) as caught:
        atomic_write(path, disk_full)
    assert str(caught.value) == (f"cannot write {path}: No space left on device (the disk is "
                                 f"full: free space, then resume); its previous content is kept")
    assert path.read_bytes() == b"previous" and os.listdir(tmp_path) == ["last.npz"]


def test_a_short_write_of_a_line_is_an_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs.os, "write", lambda fd, data: os.pwrite(fd, data[:3], 0))
    with pytest.raises(WriteError, match=r"cannot write .*results.jsonl: only 3 of 9 bytes"):
        append_line(tmp_path / "results.jsonl", '{"a": 1}')


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_outputs_are_never_written_through_a_symlink_or_into_a_fifo(tmp_path, plant):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    for name, write in (("results.jsonl", lambda p: append_line(p, "{}")),
                        ("curves.png", lambda p: atomic_write(p, lambda f: f.write(b"png")))):
        path = tmp_path / name
        if plant == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to(target)
        with pytest.raises(WriteError, match=f"cannot write {path}: it is"):
            write(path)
        assert target.read_text() == "keep" and os.path.lexists(path)


# ----------------------------------------------------- environment and arguments: one line
def test_an_unusable_refham_backend_is_one_line_and_help_still_works():
    env = {"REFHAM_BACKEND": "garbage"}
    result = _refham(["--help"], env)
    assert result.returncode == 0 and "usage: refham" in result.stdout
    result = _refham(["descend", "--visible", "4", "--hidden", "4", "--out", ""], env)
    assert result.returncode == 2
    _one_line(result.stderr, "REFHAM_BACKEND='garbage': unknown backend")


def test_output_names_that_are_not_utf8_or_too_long_are_handled(tmp_path):
    name = os.fsencode(str(tmp_path)) + b"/run-\xff"
    result = subprocess.run([sys.executable, "-m", "refham.cli", "train", *TINY, "--epochs", "1",
                             "--out", name], capture_output=True, timeout=60, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]), "PYTHONIOENCODING": "utf-8"})
    assert result.returncode == 0, result.stderr
    assert os.path.exists(os.path.join(name, b"last.npz"))
    assert main(["train", *TINY, "--out", str(tmp_path / ("x" * 300))]) == 2


def test_launcher_variables_that_are_not_numbers_are_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PMI_SIZE", "abc")
    assert main(["train", *TINY, "--out", str(tmp_path / "run")]) == 2
    _one_line(capsys.readouterr().err, "the launcher variable PMI_SIZE='abc' is not a number")


def test_threads_beyond_the_cores_are_capped_with_a_note(tmp_path, capsys):
    assert main(["train", *TINY, "--epochs", "1", "--threads", "99999999999999999999", "--out",
                 str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    _one_line(err, "refham: warning: --threads 99999999999999999999 exceeds the", "using")


def test_splits_that_drop_classes_are_refused(tmp_path, capsys):
    assert main(["train", "--train-fraction", "0.0083", "--val-fraction", "0.6", "--out",
                 str(tmp_path / "run"), "--no-progress"]) == 2
    _one_line(capsys.readouterr().err, "the training split holds images of only",
              "of the 10 classes", "raise --train-fraction or lower --val-fraction")


@pytest.mark.parametrize("seed", [-1, 1.5, True, (1, -2)])
def test_seeds_that_are_not_integers_from_zero_are_one_error(seed, tmp_path, capsys):
    with pytest.raises(SeedError, match="a seed must be an integer >= 0"):
        rng(seed)
    model = Mixer(make_config("paramixer", "digits", image_size=8, in_chans=1, num_classes=10))
    with pytest.raises(SeedError):
        model.init(seed)
    if seed == -1:
        assert main(["descend", "--visible", "4", "--hidden", "4", "--seed", "-1", "--out",
                     ""]) == 2
        _one_line(capsys.readouterr().err, "refham descend: error: a seed must be")


def test_a_damaged_metrics_line_is_a_one_line_warning(tmp_path, capsys):
    cfg = _cfg(tmp_path, epochs=1)
    train(cfg)
    with open(os.path.join(cfg.out, "metrics.jsonl"), "ab") as f:
        f.write(b'{"epoch": 2, "cut sh\n')
    assert main(["train", "--resume", "--out", cfg.out]) == 0
    _one_line(capsys.readouterr().err, "refham: warning: ", "left out 1 damaged line(s)")
