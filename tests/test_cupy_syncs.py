"""Device→host syncs per training step, per evaluation batch and per MetaFormer step, counted on
the CuPy stand-in (tests/cupy_standin.py: `.get()`, `asnumpy`, `float()`, `int()`, `bool()`,
`.item()`, `format()` of device arrays). Each is a stall of the GPU pipeline: the loss, correct
count, finiteness check and gradient norm of a step travel together in one fetch."""
import pytest

from refham.training import metaformer_train
from refham.training import train as train_module
from refham.training.data import make_synthetic
from refham.training.evaluation import evaluate
from refham.mixer import Mixer
from refham.asym_init import initial_params
from refham.training.metaformer_train import TrainSettings
from refham.training.train import train
from refham.training.train_config import TrainConfig, model_config

MIXER_STEP, EVAL_BATCH, METAFORMER_STEP = 1, 1, 3


@pytest.mark.parametrize("settings", [
    dict(model="paramixer"),
    dict(model="asymmixer", lam=0.01, clip_grad=1.0, drop_path=0.1, input_noise=0.3,
         augment=True, noise_rng="counter"),
])
def test_one_sync_per_mixer_training_step(standin, tmp_path, monkeypatch, settings):
    per_step, real_step = [], train_module._EpochLoop._train_step

    def counted(self, images, labels):
        before = standin.syncs()
        result = real_step(self, images, labels)
        per_step.append(standin.syncs() - before)
        return result
    monkeypatch.setattr(train_module._EpochLoop, "_train_step", counted)
    train(TrainConfig(data="synthetic", dim=8, depth=2, batch_size=32, epochs=1,
                      progress=False, backend="cupy", out=str(tmp_path / "run"), **settings))
    assert per_step and max(per_step) <= MIXER_STEP, f"syncs per step: {per_step}"


def test_one_sync_per_evaluation_batch(standin):
    train_set, test_set = make_synthetic(n_test=64)
    cfg = TrainConfig(data="synthetic", dim=8, depth=2)
    config = model_config(cfg, train_set)
    params = initial_params(config, 0, "official")
    before = standin.syncs()
    evaluate(Mixer(config), params, test_set, batch_size=64)        # one batch
    assert standin.syncs() - before <= EVAL_BATCH


def test_a_handful_of_syncs_per_metaformer_step(standin, tmp_path, monkeypatch):
    per_step, real_tqdm = [], metaformer_train.tqdm

    def counted(iterable, *args, **kwargs):
        for item in real_tqdm(iterable, *args, **kwargs):
            before = standin.syncs()
            yield item
            per_step.append(standin.syncs() - before)
    monkeypatch.setattr(metaformer_train, "tqdm", counted)
    metaformer_train.train(TrainSettings(data="synthetic", hidden=8, steps=3, batch_size=64,
                                         epochs=1, progress=False, out=str(tmp_path / "mf")))
    assert per_step and max(per_step) <= METAFORMER_STEP, f"syncs per step: {per_step}"
