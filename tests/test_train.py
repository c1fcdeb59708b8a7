"""The training loop on tiny models and synthetic data: every variant learns, checkpoints hold
the run, a resumed run equals an uninterrupted one bit for bit (NumPy), NaN/inf stops before
the bad update, and bad settings are refused with clear errors."""
import json
import math
import os
import signal

import numpy as np
import pytest

from refham.backend import asarray, backend_name, get_dtype, rng, to_numpy
from refham.files.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from refham.training.data import Dataset
from refham.mixer import MODELS, Mixer, make_config
from refham.optim import cosine_lr
from refham.training.evaluation import evaluate, evaluate_checkpoint
from refham.training.resume import ResumeError
from refham.training.train import TrainingDiverged, _EpochLoop, prepare_batch, train
from refham.training.train_config import TrainConfig, TrainConfigError

STEPS_PER_EPOCH = 7  # the synthetic set's 256 training images less 24 for validation, in full
                     # batches of 32 (drop_last)


def _cfg(tmp_path, name="run", **settings):
    base = dict(data="synthetic", dim=8, depth=1, epochs=2, batch_size=32, progress=False,
                out=str(tmp_path / name))
    return TrainConfig(**{**base, **settings})


def _records(cfg):
    with open(os.path.join(cfg.out, "metrics.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("model, settings", [
    *[(model, dict(lr=1e-2, lam=0.01 if model == "asymmixer" else 0.0)) for model in MODELS],
    ("paramixer", dict(optimizer="sgd", nesterov=True, lr=0.1)),
])
def test_every_variant_learns_the_synthetic_set(tmp_path, model, settings):
    cfg = _cfg(tmp_path, model=model, epochs=4, **settings)
    summary = train(cfg)
    records = _records(cfg)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    assert records[-1]["train_loss"] < records[0]["train_loss"] - 0.1
    assert summary["status"] == "finished" and summary["test_acc"] > 0.6   # chance: 0.25
    assert summary["step"] == 4 * STEPS_PER_EPOCH
    for r in records:                                  # the lr logged is the schedule's
        expected = cosine_lr(r["step"] - 1, 4 * STEPS_PER_EPOCH, settings["lr"],
                             round(0.05 * 4 * STEPS_PER_EPOCH))
        assert r["lr"] == pytest.approx(expected)
        assert r["symmetry"] and all(math.isfinite(v) for v in r["symmetry"].values())


def test_checkpoints_config_and_summary_agree(tmp_path):
    cfg = _cfg(tmp_path, epochs=3, dtype="float64")
    before = backend_name(), get_dtype(), signal.getsignal(signal.SIGINT)
    summary = train(cfg)
    # train restores the global switches and the signal handler it found (which is not always
    # Python's default: a shell starts background jobs with SIGINT ignored)
    assert (backend_name(), get_dtype(), signal.getsignal(signal.SIGINT)) == before
    with open(os.path.join(cfg.out, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert config["train"] == cfg.to_dict() and config["model"]["dim"] == 8
    last = load_checkpoint(os.path.join(cfg.out, "last.npz"))
    assert (last.step, last.epoch) == (3 * STEPS_PER_EPOCH, 3)
    assert all(a.dtype == np.float64 for a in last.params.values())
    assert evaluate_checkpoint(os.path.join(cfg.out, "last.npz"))["acc"] == summary["test_acc"]
    best = evaluate_checkpoint(os.path.join(cfg.out, "best.npz"))       # test split
    records = _records(cfg)
    assert summary["best_val_acc"] == max(r["val_acc"] for r in records)   # chosen on validation
    assert summary["best_val_acc"] == records[summary["best_epoch"] - 1]["val_acc"]
    assert best["acc"] == summary["best_test_acc"] == records[best["epoch"] - 1]["test_acc"]
    assert best["epoch"] == summary["best_epoch"]
    assert summary["test_acc"] == records[-1]["test_acc"]
    again = train(cfg, resume=True)                     # a finished run: nothing left to do
    assert again == {**summary, "wall_time": again["wall_time"]}
    assert len(_records(cfg)) == 3


def test_prepare_batch_augments_deterministically():
    images = asarray(rng(0).standard_normal((16, 1, 8, 8)))
    data = Dataset(np.zeros((1, 1, 8, 8), np.float32), np.zeros(1, np.int64), 2, "d",
                   (0.5,), (2.0,))
    plain = TrainConfig(data="synthetic")
    normalised = (to_numpy(images) - 0.5) / 2.0
    assert np.allclose(to_numpy(prepare_batch(images, data, plain, rng(1))), normalised)
    assert np.allclose(to_numpy(prepare_batch(images, data, TrainConfig(input_noise=0.3), None)),
                       normalised)                      # evaluation: no noise
    noisy = to_numpy(prepare_batch(images, data, TrainConfig(input_noise=0.3), rng(1)))
    assert np.std(noisy - normalised) == pytest.approx(0.3, rel=0.1)
    augment = TrainConfig(augment=True)
    cropped = to_numpy(prepare_batch(images, data, augment, rng(1)))
    assert not np.allclose(cropped, normalised)
    assert np.array_equal(cropped, to_numpy(prepare_batch(images, data, augment, rng(1))))


# a run that uses every random stream: batch order, noise, crop, flip, drop path
EXACT = dict(model="asymmixer", lam=0.01, epochs=3, input_noise=0.3, augment=True,
             drop_path=0.2, clip_grad=1.0, checkpoint_every=3)


def _interrupt_at(monkeypatch, at_step, action):
    """Make `action()` happen right after optimiser step `at_step` of the next run."""
    original = _EpochLoop._train_step

    def step_then_act(self, images, labels):
        result = original(self, images, labels)
        if self.state.step == at_step:
            action()
        return result
    monkeypatch.setattr(_EpochLoop, "_train_step", step_then_act)


def _assert_same_run(cfg_a, cfg_b):
    a = load_checkpoint(os.path.join(cfg_a.out, "last.npz"))
    b = load_checkpoint(os.path.join(cfg_b.out, "last.npz"))
    assert a.step == b.step == EXACT["epochs"] * STEPS_PER_EPOCH
    for name in a.params:
        assert np.array_equal(a.params[name], b.params[name]), name
    for key in a.optim_state:
        assert np.array_equal(a.optim_state[key], b.optim_state[key]), key
    timing = ("wall_time", "img_per_s")
    strip = lambda records: [{k: v for k, v in r.items() if k not in timing} for r in records]
    assert strip(_records(cfg_a)) == strip(_records(cfg_b))


def _crash():
    raise RuntimeError("simulated crash")


def _crash_at_epoch_end_save(monkeypatch, at_step):
    """Crash after epoch-end bookkeeping (metrics line, best.npz) but before last.npz."""
    original = _EpochLoop._save

    def save_or_crash(self, name):
        if name == "last.npz" and self.state.step == at_step:
            _crash()
        original(self, name)
    monkeypatch.setattr(_EpochLoop, "_save", save_or_crash)


@pytest.mark.parametrize("at_step, how", [
    (11, "sigint"),          # mid-epoch 2: saved at the next step boundary, resumed from there
    (STEPS_PER_EPOCH, "sigterm"),   # at an epoch's last step: the epoch is finished on resume
    (11, "crash"),           # like kill -9: resume from the step-9 checkpoint, redo steps 10-11
    (2 * STEPS_PER_EPOCH, "crash at epoch end"),  # epoch 2 logged, not saved: redone, logged once
])
def test_resumed_run_equals_an_uninterrupted_one_bit_for_bit(tmp_path, monkeypatch, at_step,
                                                              how):
    straight = _cfg(tmp_path, "straight", **EXACT)
    train(straight)
    broken = _cfg(tmp_path, "broken", **EXACT)
    if how.startswith("crash"):
        if how == "crash":
            _interrupt_at(monkeypatch, at_step, _crash)
        else:
            _crash_at_epoch_end_save(monkeypatch, at_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            train(broken)
        last_good = 9 if how == "crash" else 12      # the last step-multiple of 3 before
        assert load_checkpoint(os.path.join(broken.out, "last.npz")).step == last_good
    else:
        sig = signal.SIGINT if how == "sigint" else signal.SIGTERM
        _interrupt_at(monkeypatch, at_step, lambda: os.kill(os.getpid(), sig))
        summary = train(broken)
        assert (summary["status"], summary["signal"], summary["step"]) == \
            ("interrupted", sig.name, at_step)
    monkeypatch.undo()
    summary = train(broken, resume=True)
    assert summary["status"] == "finished"
    _assert_same_run(straight, broken)
    with pytest.raises(ResumeError, match="already holds a run"):
        train(broken)                                  # never overwrite a run by accident


@pytest.mark.parametrize("threads", [1, 2])
def test_blas_threads_are_limited_during_training_only(tmp_path, monkeypatch, threads):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    before, seen = blas_threads(), []
    _interrupt_at(monkeypatch, 3, lambda: seen.append(blas_threads()))
    train(_cfg(tmp_path, threads=threads))
    assert seen == [[min(threads, n) for n in before]] and blas_threads() == before


def test_a_second_signal_aborts_at_once(tmp_path, monkeypatch):
    def two_signals():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)
    _interrupt_at(monkeypatch, 3, two_signals)
    found = signal.getsignal(signal.SIGINT)   # not always Python's default (background jobs)
    with pytest.raises(KeyboardInterrupt):
        train(_cfg(tmp_path))
    assert signal.getsignal(signal.SIGINT) is found
    assert not os.path.exists(tmp_path / "run" / "last.npz")


@pytest.mark.parametrize("bad", ["nan loss", "inf gradient"])
def test_divergence_stops_before_the_bad_update_and_keeps_the_last_checkpoint(
        tmp_path, monkeypatch, bad):
    original, calls = Mixer._loss_and_grads, []     # the core the training step calls

    def poisoned(self, *args, **kwargs):
        loss, logits, grads = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2 * STEPS_PER_EPOCH:          # the last step of epoch 2
            if bad == "nan loss":
                loss = float("nan")
            else:
                grads = {**grads, "head.bias": grads["head.bias"] + np.inf}
        return loss, logits, grads
    monkeypatch.setattr(Mixer, "_loss_and_grads", poisoned)
    cfg = _cfg(tmp_path, epochs=3)
    with pytest.raises(TrainingDiverged, match="the last checkpoint.*last.npz.* is kept"):
        train(cfg)
    last = load_checkpoint(os.path.join(cfg.out, "last.npz"))
    assert last.step == STEPS_PER_EPOCH
    assert all(np.isfinite(a).all() for a in last.params.values())
    assert len(_records(cfg)) == 1


def test_divergence_before_any_checkpoint_says_so(tmp_path, monkeypatch):
    monkeypatch.setattr(Mixer, "_loss_and_grads", lambda self, params, x, labels, *args: (
        float("inf"), x[:, 0, 0], {name: 0 * p for name, p in params.items()}))
    with pytest.raises(TrainingDiverged, match="step 0 .*no checkpoint was written yet"):
        train(_cfg(tmp_path))


@pytest.mark.parametrize("settings, kept_step", [
    # issue 11 §1: Adam's first update at lr 1e38 overflows (the loss and gradient are finite)
    (dict(lr=1e38, warmup=0.0, batch_size=232, epochs=4), None),
    # SGD with weight decay 1e15: the step-2 checkpoint is finite, the step-3 update is not
    (dict(optimizer="sgd", weight_decay=1e15, warmup=0.0, checkpoint_every=1, epochs=3), 2),
])
def test_an_update_that_overflows_never_becomes_the_run_state(tmp_path, settings, kept_step):
    cfg = _cfg(tmp_path, **settings)
    kept = "no checkpoint was written yet" if kept_step is None else "the last checkpoint"
    with pytest.raises(TrainingDiverged, match=f"the update made .*NaN/inf; {kept}"):
        train(cfg)
    last = os.path.join(cfg.out, "last.npz")
    assert os.path.exists(last) == (kept_step is not None)
    assert not os.path.exists(os.path.join(cfg.out, "best.npz"))
    if kept_step is not None:
        ck = load_checkpoint(last)                  # refuses non-finite tensors itself
        assert ck.step == kept_step


def test_evaluating_a_checkpoint_whose_outputs_overflow_is_refused(tmp_path):
    cfg = _cfg(tmp_path, epochs=1)
    train(cfg)
    path = os.path.join(cfg.out, "last.npz")
    ck = load_checkpoint(path)
    huge = {name: a * np.float32(1e30) for name, a in ck.params.items()}   # finite in float32
    save_checkpoint(path, huge, ck.optim_state, step=ck.step, epoch=ck.epoch,
                    rng_state=ck.rng_state, config=ck.config, metrics=ck.metrics)
    with pytest.raises(CheckpointError, match="test loss is nan .* overflow in float32"):
        evaluate_checkpoint(path)


def test_evaluate_normalises_and_weights_every_image_once():
    gen = rng(1)
    images = (3.0 + 2.0 * gen.standard_normal((10, 2, 4, 4))).astype(np.float32)
    data = Dataset(images, gen.integers(0, 3, 10).astype(np.int64), 3, "test",
                   (3.0, 2.5), (2.0, 0.5))
    model = Mixer(make_config("paramixer", image_size=4, in_chans=2, patch=2, dim=6, depth=1,
                              num_classes=3))
    params = model.init(0)
    params["head.weight"] = asarray(gen.standard_normal((3, 6)))   # init has a zero head
    got = evaluate(model, params, data, batch_size=4)
    mean = np.array([3.0, 2.5]).reshape(1, 2, 1, 1)
    std = np.array([2.0, 0.5]).reshape(1, 2, 1, 1)
    logits = to_numpy(model.forward(params, asarray((images - mean) / std))[0])
    log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    assert got["loss"] == pytest.approx(-log_p[np.arange(10), data.labels].mean(), rel=1e-5)
    assert got["acc"] == np.mean(logits.argmax(axis=1) == data.labels)
    assert got["n"] == 10


@pytest.mark.parametrize("settings, message", [
    (dict(model="resnet"), "unknown model 'resnet'"),
    (dict(data="mnist"), "unknown data 'mnist'"),
    (dict(lam=0.1), "lam = 0.1 .* 'paramixer' has none"),
    (dict(epochs=0), "epochs must be > 0"),
    (dict(warmup=1.0), r"warmup must lie in \[0, 1\)"),
    (dict(label_smoothing=-0.1), "label_smoothing"),
    (dict(clip_grad=0.0), "clip_grad must be > 0"),
    (dict(min_lr=1.0), "min_lr 1.0 exceeds"),
    (dict(dtype="float16"), "unknown dtype"),
    (dict(epochs="5"), r"epochs must be of type int, got '5'"),
    (dict(lr=float("inf")), r"lr must be of type float \(finite\)"),
    (dict(augment=1), "augment must be of type bool"),
    (dict(clip_grad=float("nan")), "clip_grad must be of type float"),
])
def test_bad_settings_are_refused(tmp_path, settings, message):
    with pytest.raises(TrainConfigError, match=message):
        _cfg(tmp_path, **settings)


def test_impossible_runs_are_refused(tmp_path):
    with pytest.raises(TrainConfigError, match="patch 3 does not divide image_size 8"):
        train(_cfg(tmp_path, patch=3))
    with pytest.raises(TrainConfigError, match="warm-up of 7 steps leaves no training"):
        train(_cfg(tmp_path, epochs=1, warmup=0.99))
    with pytest.raises(ResumeError, match="nothing to resume"):
        train(_cfg(tmp_path, "empty"), resume=True)
    with pytest.raises(TrainConfigError, match="unknown training setting"):
        TrainConfig.from_dict({"model": "paramixer", "learning_rate": 1})
    train(_cfg(tmp_path, "done", epochs=1))
    with pytest.raises(ResumeError, match=r"lr: 0.002 → 0.1"):
        train(_cfg(tmp_path, "done", epochs=1, lr=0.1), resume=True)
