"""Resume refuses, with one clear line, every last.npz that cannot continue its run — another
file kind, another model or run, wrong optimiser state, wrong dtype, a step outside the run,
junk progress — and survives a damaged metrics log (issue 11 §5, §6)."""
import json
import os
import shutil
import signal
import warnings

import numpy as np
import pytest

from refham.files.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from refham.cli.commands import main
from refham.training.resume import MetricsLogWarning, ResumeError
from refham.training.evaluation import evaluate_checkpoint
from refham.training.train import _EpochLoop, train
from refham.training.train_config import TrainConfig

TINY = ["--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "32",
        "--no-progress"]


def _cfg(out, **settings):
    return TrainConfig(**{**dict(data="synthetic", dim=8, depth=1, epochs=3, batch_size=32,
                                 progress=False, out=str(out)), **settings})


@pytest.fixture(scope="module")
def stopped(tmp_path_factory):
    """A tiny run of 3 epochs stopped by SIGINT after 2 (last.npz at step 16)."""
    cfg = _cfg(tmp_path_factory.mktemp("runs") / "run")
    original = _EpochLoop._train_step

    def step_then_stop(self, images, labels):
        result = original(self, images, labels)
        if self.state.step == 16:
            os.kill(os.getpid(), signal.SIGINT)
        return result
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_EpochLoop, "_train_step", step_then_stop)
        assert train(cfg)["status"] == "interrupted"
    return cfg.out


@pytest.fixture
def run(stopped, tmp_path):
    """A copy of the stopped run, to be damaged by the test, and its TrainConfig."""
    shutil.copytree(stopped, tmp_path / "run")
    return _cfg(tmp_path / "run")


def _resave(out, **changes):
    """Write last.npz again (a valid digest, finite arrays) with some fields changed."""
    path = os.path.join(out, "last.npz")
    ck = load_checkpoint(path)
    fields = dict(params=ck.params, optim_state=ck.optim_state, step=ck.step, epoch=ck.epoch,
                  rng_state=ck.rng_state, config=ck.config, metrics=ck.metrics)
    fields.update(changes)
    save_checkpoint(path, fields.pop("params"), fields.pop("optim_state"), **fields)
    return ck


def test_the_untouched_copy_resumes_to_the_end(run):
    assert train(run, resume=True)["step"] == 21


def test_a_progress_field_the_checkpoint_predates_takes_its_default(run):
    ck = load_checkpoint(os.path.join(run.out, "last.npz"))
    _resave(run.out, metrics={k: v for k, v in ck.metrics.items() if k != "wall_time"})
    assert train(run, resume=True)["status"] == "finished"
    assert load_checkpoint(os.path.join(run.out, "last.npz")).step == 21


@pytest.mark.parametrize("damage, message", [
    (lambda ck: dict(optim_state={**ck.optim_state, "m/head.bias": np.zeros((1, 1), "f4")}),
     r"m/head.bias is float32\[1, 1\], its parameter float32\[4\]"),
    (lambda ck: dict(optim_state={**ck.optim_state,
                                  "v/head.bias": ck.optim_state["v/head.bias"].astype("f8")}),
     r"v/head.bias is float64\[4\]"),
    (lambda ck: dict(optim_state={k: v for k, v in ck.optim_state.items()
                                  if not k.startswith("v/")}),
     r"not AdamW's for these parameters \(missing \['v/"),
    (lambda ck: dict(optim_state={**ck.optim_state, "step": 3}),
     "the optimiser's step 3 is not the run's 16"),
    (lambda ck: dict(optim_state={**ck.optim_state, "step": 16.0}),
     "the optimiser's step 16.0 is not the run's 16"),
    (lambda ck: dict(step=10 ** 9, epoch=10 ** 9 // 8), "at step 1000000000, .* of 21 steps"),
    (lambda ck: dict(epoch=1), "at step 16, epoch 1: not a point"),
    (lambda ck: dict(config={**ck.config, "model": {**ck.config["model"], "depth": 2}}),
     "written for another model"),
    (lambda ck: dict(config={**ck.config, "train": {**ck.config["train"], "seed": 5}}),
     r"different settings \(seed: 5 → 0\)"),
    (lambda ck: dict(config={**ck.config, "train": {**ck.config["train"], "lr": "fast"}}),
     "unusable training settings: lr must be of type float"),
    (lambda ck: dict(rng_state={"scheme": "other"}), "records the random state"),
    (lambda ck: dict(metrics={**ck.metrics, "best_epoch": -1}), "progress record"),
    (lambda ck: dict(metrics={"wall_time": 1.0, "junk": 2}), "progress record"),
    (lambda ck: dict(metrics={**ck.metrics, "wall_time": "1 h"}), "progress record"),
    (lambda ck: dict(config={"model": ck.config["model"], "imported_from": "w.npz"}),
     "not a checkpoint of `refham train`"),
])
def test_a_checkpoint_that_cannot_continue_the_run_is_refused(run, damage, message):
    before = open(os.path.join(run.out, "metrics.jsonl"), "rb").read()
    _resave(run.out, **damage(load_checkpoint(os.path.join(run.out, "last.npz"))))
    with pytest.raises(ResumeError, match=message):
        train(run, resume=True)
    assert open(os.path.join(run.out, "metrics.jsonl"), "rb").read() == before


@pytest.mark.parametrize("params, message", [
    (lambda p: {**p, "head.bias": p["head.bias"].astype("f8")},
     "its settings say float32, but head.bias is float64"),
    (lambda p: {k: v.astype(np.int8) for k, v in p.items()}, "but stem.proj.weight is int8, "),
    (lambda p: {**p, "head.bias": p["head.bias"].astype("c8")}, "head.bias is complex64"),
    (lambda p: {k: v for k, v in p.items() if k != "head.bias"},
     "parameters do not match the config; missing: head.bias"),
])
def test_parameters_that_do_not_fit_the_stored_settings_are_refused_by_resume_and_eval(
        run, params, message):
    _resave(run.out, params=params(load_checkpoint(os.path.join(run.out, "last.npz")).params))
    with pytest.raises(CheckpointError, match=message):
        train(run, resume=True)
    with pytest.raises(CheckpointError, match=message):
        evaluate_checkpoint(os.path.join(run.out, "last.npz"))


def test_import_as_checkpoint_then_resume_says_what_the_file_is(run, tmp_path, capsys):
    weights, imported = str(tmp_path / "w.npz"), tmp_path / "imported"
    assert main(["export", "--checkpoint", os.path.join(run.out, "last.npz"), "--format", "npz",
                 "--out", weights]) == 0
    imported.mkdir()
    assert main(["import", weights, "--out", str(imported / "last.npz"), "--as", "checkpoint",
                 "--model", "paramixer", "--set", "dim=8", "depth=1", "image_size=8",
                 "in_chans=1", "num_classes=4"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(imported)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a checkpoint of `refham train`" in err


def test_a_last_npz_copied_from_another_run_is_refused(run, tmp_path, capsys):
    other = _cfg(tmp_path / "other", seed=1, epochs=1)
    train(other)
    shutil.copy(os.path.join(run.out, "last.npz"), os.path.join(other.out, "last.npz"))
    assert main(["train", "--resume", "--out", other.out]) == 2   # settings from the copy
    assert "comes from another run than the one" in capsys.readouterr().err


def test_config_json_unreadable_is_refused_and_missing_is_written_again(run):
    config = os.path.join(run.out, "config.json")
    saved = open(config, "rb").read()
    with open(config, "w") as f:
        f.write("[1, 2")
    with pytest.raises(ResumeError, match="config.json is unreadable .* delete config.json"):
        train(run, resume=True)
    os.remove(config)
    assert train(run, resume=True)["status"] == "finished"
    assert json.loads(open(config, "rb").read()) == json.loads(saved)


def test_metadata_of_the_wrong_type_is_a_clear_error_from_the_command_line(run, capsys):
    _resave(run.out, step=0)
    path = os.path.join(run.out, "last.npz")
    with np.load(path) as archive:
        arrays = dict(archive)
    meta = json.loads(arrays["meta/json"].tobytes())
    arrays["meta/json"] = np.frombuffer(json.dumps({**meta, "step": -1}).encode(), np.uint8)
    np.savez(path, **arrays)
    assert main(["train", "--resume", "--out", run.out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metadata has step -1 (an integer >= 0 expected)" in err


def test_a_metrics_log_that_cannot_be_read_is_a_clear_error(run):
    os.remove(os.path.join(run.out, "metrics.jsonl"))
    os.mkdir(os.path.join(run.out, "metrics.jsonl"))
    with pytest.raises(ResumeError, match=r"metrics.jsonl cannot be read \(Is a directory\)"):
        train(run, resume=True)


def test_damaged_metrics_lines_are_left_out_with_a_warning_and_the_run_continues(run):
    metrics = os.path.join(run.out, "metrics.jsonl")
    good = open(metrics, "rb").read().splitlines()
    assert len(good) == 2
    with open(metrics, "wb") as f:
        f.write(b"\n".join([good[0], b'{"step": 8}', b"[1, 2]", b"\xff\xfe{}", b"{\"epoch\": true}",
                            good[1], b'{"epoch": 2, "cut sh']) + b"\n")
    with pytest.warns(MetricsLogWarning, match=r"left out 5 damaged line\(s\) \(line 2, 3, 4, 5, 7"
                                               r"\).*checkpoint is intact"):
        summary = train(run, resume=True)
    assert summary["status"] == "finished"
    epochs = [json.loads(line)["epoch"] for line in open(metrics, "rb").read().splitlines()]
    assert epochs == [1, 2, 3]
    with warnings.catch_warnings():
        warnings.simplefilter("error")                       # a clean log: no warning at all
        train(_cfg(run.out, epochs=3), resume=True)
