"""The command line against careless and hostile use (issue 11 §3-§6): outputs never silently
replace a file (never a checkpoint), impossible sizes are refused from an estimate before
anything is allocated, ordinary mistakes and every expected error are one line and exit 2,
and values that must be refused are. Each test reruns one reproduction of the issue."""
import dataclasses
import importlib.util
import json
import os
import warnings

import numpy as np
import pytest

from refham.backend import to_numpy
from refham.cli import commands as cli

from refham.files import memory
from refham.cli.commands import main
from refham.layers import InputError
from refham.mixer import Mixer, ParamError, make_config
from refham.oracle.golden import GoldenError, ham_golden, mixer_golden, write_golden
from refham.training.train_config import TrainConfig, TrainConfigError

TINY = ["--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "32",
        "--no-progress", "--epochs", "1"]
GOLDEN = ["oracle", "write", "--model", "paramixer", "--set", "depth=1", "dim=8", "num_classes=4"]


@pytest.fixture
def run(capsys):
    """main(argv) → (exit status, stderr), asserting the error, if any, is one line."""
    def call(*argv):
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no noise around the one line
            status = main(list(argv))
        err = capsys.readouterr().err
        if status:
            assert err.count("\n") == 1 and "Traceback" not in err, err
        return status, err
    return call


@pytest.fixture
def trained(tmp_path, run):
    out = tmp_path / "run"
    assert run("train", *TINY, "--out", str(out))[0] == 0
    return out


# ------------------------------------------------------------------------------ §3 overwrites
@pytest.mark.parametrize("argv", [
    ["export", "--format", "npz", "--checkpoint", "{run}/last.npz", "--out", "{run}/last.npz"],
    [*GOLDEN, "--out", "{run}/last.npz"],
    ["import", "{run}/timm.npz", "--model", "paramixer", "--set", "depth=1", "dim=8", "num_classes=4", "--out",
     "{run}/last.npz"],
    ["descend", "--visible", "4", "--hidden", "3", "--out", "{run}/last.npz"],
])
@pytest.mark.parametrize("force", [[], ["--force"]])
def test_a_checkpoint_is_never_overwritten_by_another_kind_of_file(trained, run, argv, force):
    assert run("export", "--format", "npz", "--checkpoint", f"{trained}/last.npz", "--out",
               f"{trained}/timm.npz")[0] == 0
    before = (trained / "last.npz").read_bytes()
    status, err = run(*[a.format(run=trained) for a in argv], *force)
    assert status == 2 and "training checkpoint" in err and "never replaced" in err
    assert (trained / "last.npz").read_bytes() == before


@pytest.mark.parametrize("argv", [
    ["export", "--format", "npz", "--checkpoint", "{run}/last.npz", "--out", "{out}"],
    [*GOLDEN, "--out", "{out}"],
    ["import", "{run}/timm.npz", "--model", "paramixer", "--set", "depth=1", "dim=8", "num_classes=4", "--out",
     "{out}"],
    ["descend", "--visible", "4", "--hidden", "3", "--steps", "2", "--out", "{out}"],
])
def test_an_existing_file_is_replaced_only_with_force(trained, run, argv):
    assert run("export", "--format", "npz", "--checkpoint", f"{trained}/last.npz", "--out",
               f"{trained}/timm.npz")[0] == 0
    out = trained / "mine.dat"
    out.write_bytes(b"precious")
    argv = [a.format(run=trained, out=out) for a in argv]
    status, err = run(*argv)
    assert status == 2 and "exists: pass --force" in err and out.read_bytes() == b"precious"
    if argv[0] == "descend" and importlib.util.find_spec("matplotlib") is None:
        return
    assert run(*argv, "--force")[0] == 0 and out.read_bytes() != b"precious"


def test_only_regular_files_are_replaced_and_a_trailing_slash_means_a_folder(tmp_path, run):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    status, err = run(*GOLDEN, "--out", str(fifo), "--force")
    assert status == 2 and "not a regular file" in err and fifo.is_fifo()
    status, err = run(*GOLDEN, "--out", f"{tmp_path}/new/")
    assert status == 2 and "is a folder" in err and not (tmp_path / "new").exists()


def test_import_as_checkpoint_may_replace_a_checkpoint_with_force(trained, run):
    assert run("export", "--format", "npz", "--checkpoint", f"{trained}/last.npz", "--out",
               f"{trained}/timm.npz")[0] == 0
    argv = ["import", f"{trained}/timm.npz", "--model", "paramixer", "--set", "depth=1", "dim=8", "num_classes=4",
            "--as", "checkpoint", "--out", f"{trained}/best.npz"]
    assert "exists: pass --force" in run(*argv)[1]
    assert run(*argv, "--force")[0] == 0


def test_metaformer_figures_are_not_overwritten_without_force(tmp_path, run):
    pytest.importorskip("matplotlib")
    out = tmp_path / "mf"
    assert run("metaformer", "train", "--data", "synthetic", "--hidden", "4", "--steps", "2",
               "--epochs", "1", "--out", str(out), "--no-progress")[0] == 0
    figures = ["metaformer", "figures", "--checkpoint", f"{out}/last.npz", "--samples", "2",
               "--steps", "2"]
    assert run(*figures)[0] == 0
    status, err = run(*figures)
    assert status == 2 and "exists: pass --force" in err
    assert run(*figures, "--force")[0] == 0


# --------------------------------------------------------------------------------- §4 memory
@pytest.mark.parametrize("argv", [
    ["train", "--depth", "100000"], ["train", "--hidden-ratio", "1e6"],
    ["train", "--dim", "1000000"], ["train", "--n-iter", "100000"],
    ["descend", "--hidden", "10000000", "--out", ""],
    ["descend", "--batch", "100000000", "--out", ""],
    ["descend", "--steps", "100000000", "--out", ""],
    ["metaformer", "train", "--hidden", "100000000"],
    ["metaformer", "train", "--batch-size", "100000000", "--steps", "1000000"],
    ["oracle", "write", "--model", "paramixer", "--batch", "100000000"],
    ["oracle", "write", "--ham", "metaformer", "--hidden", "1000000000"],
    ["oracle", "write", "--model", "vanilla", "--set", "depth=1000000"],
])
def test_impossible_sizes_are_refused_from_an_estimate(tmp_path, monkeypatch, run, argv):
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * memory.GIB)
    out = [] if argv[0] == "descend" else ["--out", str(tmp_path / "out")]
    status, err = run(*argv, *out)
    assert status == 2 and "would need about" in err and "8.0 GiB available" in err
    assert not os.path.exists(tmp_path / "out" / "last.npz")


def test_max_memory_limits_training(tmp_path, run):
    status, err = run("train", *TINY, "--max-memory", "0.0001", "--out", str(tmp_path / "r"))
    assert status == 2 and "allowed by --max-memory" in err
    assert run("train", *TINY, "--max-memory", "1", "--out", str(tmp_path / "r"))[0] == 0
    with pytest.raises(TrainConfigError, match="max_memory"):
        TrainConfig(max_memory=0)


def test_import_of_a_huge_claimed_model_is_one_short_line(trained, monkeypatch, run):
    assert run("export", "--format", "npz", "--checkpoint", f"{trained}/last.npz", "--out",
               f"{trained}/timm.npz")[0] == 0
    status, err = run("import", f"{trained}/timm.npz", "--model", "paramixer", "--set",
                      "depth=1000", "dim=8", "--out", f"{trained}/p.npz")
    assert status == 2 and "missing" in err and "more" in err and len(err) < 2000


def test_safetensors_claiming_a_million_blocks_is_one_short_line(tmp_path, monkeypatch, run):
    safetensors_numpy = pytest.importorskip("safetensors.numpy")
    monkeypatch.setattr(memory, "available_bytes", lambda: 8 * memory.GIB)
    config = dataclasses.asdict(make_config("paramixer", "digits", depth=10 ** 6))
    raw = safetensors_numpy.save({"head.weight": np.zeros((10, 64))}, metadata={
        "format": "refham-weights", "version": "1", "model": json.dumps(config)})
    (tmp_path / "w.safetensors").write_bytes(raw)
    status, err = run("import", str(tmp_path / "w.safetensors"), "--out", str(tmp_path / "p.npz"))
    assert status == 2 and "would need about" in err and len(err) < 400


# ------------------------------------------------------------------------ §5 ordinary mistakes
def _bad_paths(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("x")
    folder = tmp_path / "folder"
    folder.mkdir()
    return {"a file as parent folder": str(afile / "x"), "empty": "",
            "a missing parent folder": str(tmp_path / "no" / "such" / "x"),
            "a folder as output file": str(folder), "an existing file as folder": str(afile),
            "unwritable": "/proc/refham-x/y"}


@pytest.mark.parametrize("case", ["a file as parent folder", "empty", "a missing parent folder",
                                  "a folder as output file", "unwritable"])
@pytest.mark.parametrize("command", [
    [*GOLDEN], ["export", "--format", "npz", "--checkpoint", "{run}/last.npz"],
    ["import", "{run}/timm.npz", "--model", "paramixer", "--set", "depth=1", "dim=8", "num_classes=4"],
    ["descend", "--visible", "4", "--hidden", "3"]])
def test_bad_output_files_are_one_line(tmp_path, trained, run, case, command):
    assert run("export", "--format", "npz", "--checkpoint", f"{trained}/last.npz", "--out",
               f"{trained}/timm.npz")[0] == 0
    path = _bad_paths(tmp_path)[case]
    if command[0] == "descend" and case == "empty":
        return  # `--out ''` means: no plot
    status, _ = run(*[a.format(run=trained) for a in command], "--out", path)
    assert status == 2


@pytest.mark.parametrize("case", ["a file as parent folder", "empty", "an existing file as folder",
                                  "unwritable"])
@pytest.mark.parametrize("command", [
    ["train", *TINY], ["sweep", "--models", "paramixer", "--seeds", "0", "--data", "synthetic",
                       "--dim", "8", "--depth", "1", "--epochs", "1", "--no-progress"],
    ["metaformer", "train", "--data", "synthetic", "--hidden", "4", "--epochs", "1"]])
def test_bad_output_folders_are_one_line(tmp_path, run, case, command):
    status, _ = run(*command, "--out", _bad_paths(tmp_path)[case])
    assert status == 2


@pytest.mark.parametrize("argv", [
    ["train", "--seed", "-1"], ["train", "--data-seed", "-1"],
    ["metaformer", "train", "--seed", "-1"], ["eval", "--checkpoint", "x", "--threads", "-1"],
    ["eval", "--checkpoint", "x", "--batch-size", "0"],
    ["descend", "--state-scale", "1e300", "--out", ""],
    ["descend", "--batch", "-1", "--out", ""], ["descend", "--steps", "-1", "--out", ""],
    [*GOLDEN, "--perturb", "1e300", "--out", "{tmp}/g.npz"],
    [*GOLDEN, "--batch", "-1", "--out", "{tmp}/g.npz"],
])
def test_ordinary_mistakes_are_one_line_and_exit_2(tmp_path, run, argv):
    status, err = run(*[a.format(tmp=tmp_path) for a in argv], *(
        ["--out", str(tmp_path / "o")] if argv[0] in ("train", "metaformer") else []))
    assert status == 2 and err.startswith(f"refham {argv[0]}")
    assert not os.path.exists(tmp_path / "g.npz")


def test_every_expected_error_class_is_one_line_and_others_keep_their_traceback(
        monkeypatch, run):
    for error in cli.expected_errors():
        def fail(args, error=error):
            raise error("what went wrong")
        monkeypatch.setitem(cli.COMMANDS, "eval", (*cli.COMMANDS["eval"][:2], fail))
        status, err = run("eval", "--checkpoint", "x")
        assert status in (1, 2) and "what went wrong" in err
    def interrupt(args):
        raise KeyboardInterrupt
    monkeypatch.setitem(cli.COMMANDS, "eval", (*cli.COMMANDS["eval"][:2], interrupt))
    assert run("eval", "--checkpoint", "x") == (130, "refham eval: interrupted\n")
    monkeypatch.setitem(cli.COMMANDS, "eval", (*cli.COMMANDS["eval"][:2], lambda args: 1 / 0))
    with pytest.raises(ZeroDivisionError):
        main(["eval", "--checkpoint", "x"])


# ------------------------------------------------------------------- §6 refused, not accepted
@pytest.mark.parametrize("option", [["--atol", "inf"], ["--rtol", "nan"], ["--atol", "-1"],
                                    ["--rtol=-inf"]])
def test_oracle_check_tolerances_follow_the_tol_rule(tmp_path, run, option):
    golden = str(tmp_path / "g.npz")
    assert run(*GOLDEN, "--out", golden)[0] == 0
    status, err = run("oracle", "check", golden, golden, *option)
    assert status == 2 and "finite and >= 0" in err
    assert run("oracle", "check", golden, golden)[0] == 0


def test_import_refuses_complex_tensors(trained, run):
    assert run("export", "--format", "npz", "--checkpoint", f"{trained}/last.npz", "--out",
               f"{trained}/timm.npz")[0] == 0
    state = dict(np.load(trained / "timm.npz"))
    state["head.weight"] = state["head.weight"] + 1j
    np.savez(trained / "complex.npz", **state)
    status, err = run("import", f"{trained}/complex.npz", "--model", "paramixer", "--set",
                      "depth=1", "dim=8", "--out", f"{trained}/p.npz")
    assert status == 2 and "head.weight are not real numbers" in err


def test_golden_files_are_never_written_non_finite(tmp_path):
    tensors = ham_golden(visible=4, hidden=3)
    tensors["output/dEdt"] = tensors["output/dEdt"] * np.inf
    with pytest.raises(GoldenError, match="NaN or inf in output/dEdt"):
        write_golden(tmp_path / "g.npz", tensors)
    assert not (tmp_path / "g.npz").exists()


def test_export_refuses_nan_weights(tmp_path, run):
    tensors = mixer_golden("paramixer", depth=1, dim=8)
    tensors["param/head.bias"] = tensors["param/head.bias"] * np.nan
    np.savez(tmp_path / "g.npz", **tensors)
    status, err = run("export", "--checkpoint", str(tmp_path / "g.npz"), "--format", "npz",
                      "--out", str(tmp_path / "e.npz"))
    assert status == 2 and "NaN or inf in head.bias" in err
    assert not (tmp_path / "e.npz").exists()


def test_mnist_test_images_must_match_the_training_size(tmp_path, run):
    for prefix, shape in (("train", (20, 28, 28)), ("t10k", (5, 14, 56))):
        header = bytes([0, 0, 8, 3]) + np.array(shape, ">u4").tobytes()
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(
            header + np.ones(shape, np.uint8).tobytes())
    status, err = run("metaformer", "train", "--data", "mnist", "--data-path", str(tmp_path),
                      "--out", str(tmp_path / "o"))
    assert status == 2 and "both splits need one image size" in err


def test_mnist_too_small_to_hold_out_a_test_split(tmp_path, run):
    header = bytes([0, 0, 8, 3]) + np.array((3, 28, 28), ">u4").tobytes()
    (tmp_path / "train-images-idx3-ubyte").write_bytes(header + bytes(3 * 28 * 28))
    status, err = run("metaformer", "train", "--data", "mnist", "--data-path", str(tmp_path),
                      "--out", str(tmp_path / "o"))
    assert status == 2 and "at least 10" in err


def test_python_api_refuses_complex_images_empty_batches_and_list_parameters():
    mixer = Mixer(make_config("paramixer", "digits", depth=1, dim=8))
    params = mixer.init(0)
    images = np.zeros((2, 1, 8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InputError, match="real numbers"):
            mixer.forward(params, images + 1j)
    with pytest.raises(InputError, match="empty batch"):
        mixer.forward(params, images[:0])
    with pytest.raises(InputError, match="empty batch"):
        mixer.loss_and_grads(params, images[:0], np.zeros(0, int))
    lists = {name: to_numpy(value).tolist() for name, value in params.items()}
    with pytest.raises(ParamError, match="not arrays"):
        mixer.forward(lists, images)
