"""One writer per run folder: a second `refham train` (fresh or --resume), `metaformer train` or
`sweep` on a folder in use is refused with a line naming the holder; the lock goes with its
process however it ends (kill -9 included), and the temporary files a killed save left behind
are removed by the next run that takes the folder."""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from refham.training import metaformer_train as mft
from refham.files.checkpoint import load_checkpoint
from refham.files.outputs import is_temporary
from refham.cli.commands import main
from refham.files.runlock import LOCK_NAME, RunLock, RunLocked, _still_linked

TINY = ["--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "32",
        "--no-progress"]


def _start_training(out, *extra):
    """A `refham train` process on `out`, returned once it has finished an epoch (so that it
    holds the lock and has written last.npz)."""
    process = subprocess.Popen(
        [sys.executable, "-m", "refham.cli", "train", *TINY, "--epochs", "500", "--out",
         str(out), *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "last.npz").exists() and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    return process


def test_a_second_writer_is_refused_naming_the_holder_until_it_ends(tmp_path, capsys):
    out = tmp_path / "run"
    holder = _start_training(out, "--seed", "0")
    try:
        named = (rf"pid {holder.pid} on {socket.gethostname()} since 20\d\d-.*"
                 rf" train --data synthetic")
        for argv in (["train", *TINY, "--seed", "1", "--out", str(out)],
                     ["train", "--resume", "--out", str(out)]):
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "is in use by another refham process" in err
            assert re.search(named, err), err
        holder.send_signal(signal.SIGTERM)
        assert holder.wait(timeout=60) == 0
    finally:
        holder.kill()
        holder.communicate()
    assert not (out / LOCK_NAME).exists()                  # released and removed on exit
    assert load_checkpoint(out / "last.npz").step > 0
    assert main(["train", "--resume", "--out", str(out), "--epochs", "1"]) == 2
    assert "cannot resume" in capsys.readouterr().err      # got past the lock this time


def test_kill_9_releases_the_lock_and_the_next_run_removes_orphaned_temporary_files(tmp_path):
    out = tmp_path / "run"
    holder = _start_training(out)
    holder.kill()                                            # SIGKILL: no handler, no clean-up
    holder.communicate()
    assert (out / LOCK_NAME).exists()                        # the file stays, the lock does not
    orphan = out / ".last.npz.k2x9q_1.refham-tmp"            # what a save cut short leaves
    orphan.write_bytes(b"half a checkpoint")
    keep = out / "notes.txt"
    keep.write_text("mine")
    with RunLock(out) as lock:
        # the planted orphan, and a real one if the kill landed in the middle of a save
        assert orphan.name in lock.removed and all(is_temporary(n) for n in lock.removed)
    assert not any(is_temporary(n) for n in os.listdir(out))
    assert keep.exists() and not (out / LOCK_NAME).exists()


def test_the_lock_is_exclusive_within_one_process_too_and_reusable_after_release(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(RunLocked, match=rf"pid {os.getpid()} on .* since 20"):
            RunLock(tmp_path).acquire()
        with pytest.raises(RunLocked, match="in use"):
            mft.train(mft.TrainSettings(data="synthetic", hidden=4, steps=2, epochs=1,
                                      out=str(tmp_path), progress=False))
    assert os.listdir(tmp_path) == []
    with RunLock(tmp_path):
        pass
    RunLock(tmp_path).release()                              # not held: nothing to do


def test_a_waiter_that_locked_a_removed_lock_file_sees_it_is_stale(tmp_path):
    lock = RunLock(tmp_path).acquire()
    early = os.open(lock.path, os.O_RDWR)                    # a second writer opened the file...
    lock.release()                                           # ...just before the holder ended
    try:
        assert not _still_linked(early, lock.path)
        with RunLock(tmp_path) as again:                     # a new file, a new lock
            assert _still_linked(again._fd, again.path)
    finally:
        os.close(early)


@pytest.mark.parametrize("argv", [
    ["sweep", "--models", "vanilla", "--seeds", "0", "--epochs", "1"],
    ["metaformer", "train", "--data", "synthetic", "--epochs", "1"],
])
def test_sweep_and_metaformer_refuse_a_folder_in_use(tmp_path, capsys, argv):
    with RunLock(tmp_path):
        assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "is in use by another refham process" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("plant", ["folder", "symlink"])
def test_a_lock_path_that_is_not_a_plain_file_is_refused_and_never_written_through(tmp_path,
                                                                                  plant):
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep")
    if plant == "folder":
        (tmp_path / LOCK_NAME).mkdir()
    else:
        (tmp_path / LOCK_NAME).symlink_to(target)
    with pytest.raises(RunLocked, match=f"cannot lock .*{LOCK_NAME} cannot be opened as a file"):
        RunLock(tmp_path).acquire()
    assert target.read_text() == "keep"
