"""The validation split (held out of the training images, stratified, seeded; it chooses
best.npz) and training batches as timm's loader makes them (drop_last): which images each
split holds, how many steps an epoch takes, and what the summary reports."""
import json
import os

import numpy as np
import pytest

from refham.backend import rng
from refham.cli.commands import main
from refham.training.data import DataError, hold_out, load_dataset
from refham.training.train import _EpochLoop, run_datasets, train
from refham.training.train_config import TrainConfig, TrainConfigError


def _cfg(tmp_path, **settings):
    base = dict(data="synthetic", dim=8, depth=1, epochs=2, batch_size=32, progress=False,
                out=str(tmp_path / "run"))
    return TrainConfig(**{**base, **settings})


@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_hold_out_is_stratified_disjoint_and_seeded(fraction):
    train_set, _ = load_dataset("digits", train_fraction=0.25)
    kept, held = hold_out(train_set, fraction, rng(7))
    assert len(kept) + len(held) == len(train_set)
    rows = lambda d: {r.tobytes() for r in d.images.reshape(len(d), -1)}
    assert not rows(kept) & rows(held)                      # digits has no duplicate images
    for k in range(10):
        n_k = int((train_set.labels == k).sum())
        assert (held.labels == k).sum() == round(fraction * n_k)
    again, _ = hold_out(train_set, fraction, rng(7))
    other, _ = hold_out(train_set, fraction, rng(8))
    assert np.array_equal(again.labels, kept.labels) and np.array_equal(again.images, kept.images)
    assert not np.array_equal(other.images, kept.images)
    with pytest.raises(DataError, match="val_fraction must be a number in"):
        hold_out(train_set, 1.0, rng(0))


def test_validation_split_comes_out_of_training_and_is_fixed_across_seeds(tmp_path):
    runs = [run_datasets(_cfg(tmp_path, seed=seed)) for seed in (0, 1)]
    (train_set, val_set, test_set), (_, other_val, _) = runs
    assert len(train_set) + len(val_set) == 256                    # make_synthetic's n_train
    assert len(test_set) == 128                                    # the test split stays whole
    assert np.array_equal(val_set.images, other_val.images)
    moved = run_datasets(_cfg(tmp_path, data_seed=1))[1]
    assert not np.array_equal(moved.images, val_set.images)


def test_without_validation_there_is_no_best_checkpoint(tmp_path):
    cfg = _cfg(tmp_path, val_fraction=0.0)
    summary = train(cfg)
    assert not os.path.exists(os.path.join(cfg.out, "best.npz"))
    assert summary["best_epoch"] is summary["best_test_acc"] is summary["best_val_acc"] is None
    with open(os.path.join(cfg.out, "metrics.jsonl"), encoding="utf-8") as f:
        assert all(json.loads(line)["val_acc"] is None for line in f)
    assert summary["step"] == 2 * (256 // 32)


@pytest.mark.parametrize("drop_last, steps", [(True, 232 // 30), (False, -(-232 // 30))])
def test_drop_last_sets_the_steps_of_an_epoch(tmp_path, monkeypatch, drop_last, steps):
    seen = []
    original = _EpochLoop._train_step

    def record(self, images, labels):
        seen.append(len(labels))
        return original(self, images, labels)
    monkeypatch.setattr(_EpochLoop, "_train_step", record)
    summary = train(_cfg(tmp_path, batch_size=30, epochs=1, drop_last=drop_last))
    assert summary["step"] == len(seen) == steps
    assert seen[:7] == [30] * 7 and (drop_last or seen[-1] == 232 - 7 * 30)


def test_bad_validation_and_batch_settings_are_refused(tmp_path, capsys):
    with pytest.raises(TrainConfigError, match=r"val_fraction must lie in \[0, 1\)"):
        TrainConfig(val_fraction=1.0)
    with pytest.raises(TrainConfigError, match="pass --no-drop-last"):
        train(_cfg(tmp_path, batch_size=512))
    assert main(["train", "--data", "synthetic", "--batch-size", "512", "--no-progress",
                 "--out", str(tmp_path / "cli")]) == 2
    assert "exceeds the 232 training images" in capsys.readouterr().err
