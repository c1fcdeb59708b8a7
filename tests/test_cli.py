"""`refham …` commands: --help everywhere, smoke runs of train / eval / sweep with tiny budgets
(synthetic data, 1 epoch, a tiny model via overrides), clear errors and non-zero exit codes for
bad options, and SIGTERM to a running `refham train` leaving a valid checkpoint and exit code 0."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from refham.files.checkpoint import load_checkpoint
from refham.cli.commands import COMMANDS, main

TINY = ["--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "32",
        "--no-progress"]


@pytest.mark.parametrize("command", [None] + sorted(COMMANDS))
def test_help_of_every_command(capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"] if command is None else [command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: refham") and (command is None or COMMANDS[command][0][:30]
                                                 in " ".join(out.split()))


def test_train_eval_and_resume_from_the_command_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert main(["train", *TINY, "--epochs", "1", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "finished 1 epochs" in printed and "test top-1" in printed
    assert sorted(os.listdir(out)) == ["best.npz", "config.json", "last.npz", "metrics.jsonl"]
    assert main(["eval", "--checkpoint", os.path.join(out, "last.npz")]) == 0
    printed = capsys.readouterr().out
    assert "paramixer on synthetic, epoch 1" in printed and "(128 images)" in printed
    assert main(["train", "--resume", "--out", out]) == 0          # settings from the checkpoint
    assert "resuming paramixer" in capsys.readouterr().out
    assert main(["train", "--resume", "--out", out, "--epochs", "2"]) == 2
    assert "epochs: 1 → 2" in capsys.readouterr().err
    assert main(["train", *TINY, "--epochs", "1", "--out", out]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--patch", "3"], "patch 3 does not divide image_size 8"),
    (["train", "--lam", "0.1"], "'paramixer' has none"),
    (["train", "--data", "cifar10"], "cifar10 needs path="),
    (["train", "--warmup", "1.5"], r"warmup must lie in [0, 1)"),
    (["train", "--resume"], "nothing to resume"),
    (["eval", "--checkpoint", "missing.npz"], "no file at missing.npz"),
    (["sweep", "--lams", "-1"], "λ values must be finite and ≥ 0"),
])
def test_bad_options_give_clear_errors_and_exit_2(tmp_path, monkeypatch, capsys, argv,
                                                  message):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--model", "resnet"], "invalid choice: 'resnet'"),
    (["train", "--epochs", "many"], "invalid int value: 'many'"),
    (["eval"], "the following arguments are required: --checkpoint"),
    (["sweep", "--models", "gpt"], "invalid choice: 'gpt'"),
])
def test_unparseable_options_are_usage_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_eval_refuses_a_corrupt_checkpoint(tmp_path, capsys):
    bad = tmp_path / "last.npz"
    bad.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["eval", "--checkpoint", str(bad)]) == 2
    assert "truncated, corrupted or not an .npz of plain arrays" in capsys.readouterr().err


def test_sweep_writes_results_table_and_plot_and_skips_finished_runs(tmp_path, capsys):
    out = str(tmp_path / "sweep")
    argv = ["sweep", *TINY, "--epochs", "1", "--seeds", "0", "1", "--models", "paramixer",
            "asymmixer", "--lams", "0.1", "0", "--out", out]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[6/6] asymmixer-lam0-lr0.002-e1-seed1" in printed
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        results = [json.loads(line) for line in f]
    assert [(r["model"], r["lam"], r["seed"]) for r in results] == [
        ("paramixer", 0.0, 0), ("asymmixer", 0.1, 0), ("asymmixer", 0.0, 0),
        ("paramixer", 0.0, 1), ("asymmixer", 0.1, 1), ("asymmixer", 0.0, 1)]
    assert all(r["settings"]["train_fraction"] == 0.25 and r["settings"]["input_noise"] == 0.6
               for r in results)                     # the sweep's defaults where not overridden
    with open(os.path.join(out, "results.md"), encoding="utf-8") as f:
        table = f.read()
    assert "| ParaMixer | 1 | 0.002 |" in table and "| AsymMixer λ=0.1 | 1 |" in table
    assert " ± " in table
    if importlib.util.find_spec("matplotlib") is None:
        assert "matplotlib is not installed, so no figures" in printed
    else:
        for name in ("accuracy_vs_lambda.png", "curves.png"):
            with open(os.path.join(out, name), "rb") as f:
                assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert main(argv) == 0                               # everything done: nothing retrained
    assert "[1/6]" not in capsys.readouterr().out
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        assert len(f.readlines()) == 6
    assert main([*argv, "--weight-decay", "0.01"]) == 2
    assert "other settings (differing: ['weight_decay']" in capsys.readouterr().err
    assert main([*argv, "--part", "3/2"]) == 2
    assert "--part '3/2' must read I/N" in capsys.readouterr().err


def test_sigterm_to_a_training_process_saves_a_checkpoint_and_exits_0(tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "refham.cli", "train", *TINY, "--epochs", "500", "--out",
         str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 60
    while not (metrics.exists() and metrics.stat().st_size) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "stopped by SIGTERM" in stdout and "--resume" in stdout
    checkpoint = load_checkpoint(out / "last.npz")
    assert 0 < checkpoint.step < 500 * 8


def test_an_abort_exits_130_with_a_message(tmp_path, monkeypatch, capsys):
    def abort(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("refham.training.train.train", abort)
    monkeypatch.setattr("refham.study.sweep.train", abort)
    assert main(["train"]) == 130
    assert "aborted; the last checkpoint written stays valid" in capsys.readouterr().err
    assert main(["sweep", "--out", "sweep"]) == 130
    assert "aborted; finished runs are kept" in capsys.readouterr().err
