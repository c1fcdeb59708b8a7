"""The pieces of a training run: the shared optimiser step and its device→host transfers (one per
Mixer training step and per evaluation batch, a few per Energy MetaFormer step), the backend a
run takes by default, and the run folder's lock.

Every transfer refham makes goes through `backend.to_numpy`; here each module's binding of it is
counted (the CuPy stand-in of the tests also counts the implicit ones a real GPU would make)."""
import dataclasses
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from refham import backend
from refham.backend import asarray
from refham.training import evaluation, metaformer_train as mft, step, train as training
from refham.training.data import make_synthetic
from refham.mixer import Mixer
from refham.training.train_config import TrainConfig, model_config


def test_fetch_scalars_brings_every_scalar_in_order_as_host_floats():
    values = step.fetch_scalars(asarray(1.5), asarray(3, dtype=np.int64), True, 0.25,
                                asarray(np.float32(np.nan), dtype=np.float32))
    assert values[:4] == (1.5, 3.0, 1.0, 0.25) and np.isnan(values[4])
    assert all(type(v) is float for v in values)


@pytest.fixture
def transfers(monkeypatch):
    """A list that grows by one entry per call of `to_numpy` anywhere in refham."""
    calls, plain = [], backend.to_numpy

    def counted(a):
        calls.append(1)
        return plain(a)
    for name, module in list(sys.modules.items()):
        if name.startswith("refham") and getattr(module, "to_numpy", None) is plain:
            monkeypatch.setattr(module, "to_numpy", counted)
    return calls


def _counted(monkeypatch, owner, name, transfers):
    """Wrap owner.name so that each call records the transfers it made."""
    original, per_call = getattr(owner, name), []

    def wrapper(*args, **kwargs):
        before = len(transfers)
        result = original(*args, **kwargs)
        per_call.append(len(transfers) - before)
        return result
    monkeypatch.setattr(owner, name, wrapper)
    return per_call


@pytest.mark.parametrize("settings", [
    dict(model="asymmixer", lam=0.01, clip_grad=1.0, drop_path=0.1, input_noise=0.3,
         augment=True),
    dict(model="vanilla", optimizer="sgd"),
])
def test_a_mixer_training_step_and_an_evaluation_batch_make_one_transfer(
        tmp_path, monkeypatch, transfers, settings):
    steps = _counted(monkeypatch, training._EpochLoop, "_train_step", transfers)
    evaluations = _counted(monkeypatch, training, "evaluate", transfers)
    cfg = TrainConfig(data="synthetic", dim=8, depth=1, epochs=2, batch_size=64,
                      progress=False, out=str(tmp_path / "run"), **settings)
    training.train(cfg)
    assert len(steps) == 2 * (230 // 64) and set(steps) == {1}
    # per epoch the validation split (< 64 images) and the test split (128) in batches of 64; at
    # the end perhaps best.npz's test
    assert evaluations[:4] == [1, 2] * 2 and set(evaluations) == {1, 2}


def test_evaluation_makes_one_transfer_per_batch(transfers):
    from refham.mixer import make_config

    _, test = make_synthetic(seed=0)
    model = Mixer(make_config("paramixer", image_size=8, in_chans=1, patch=2, dim=8, depth=1,
                              num_classes=test.num_classes))
    result = evaluation.evaluate(model, model.init(0), test, batch_size=50)
    assert len(transfers) == 3 and result["n"] == 128     # ⌈128 / 50⌉ batches


def test_a_metaformer_step_makes_a_handful_of_transfers(tmp_path, monkeypatch, transfers):
    steps = _counted(monkeypatch, mft, "optimiser_step", transfers)
    mft.train(mft.TrainSettings(data="synthetic", hidden=8, steps=3, batch_size=64, epochs=1,
                                out=str(tmp_path / "run"), progress=False))
    # the states' and the weights' finiteness, checked once per loss; the step's one fetch
    assert steps and set(steps) == {3}


def test_the_backend_of_train_and_eval_defaults_to_the_active_one(standin, tmp_path, monkeypatch):
    """REFHAM_BACKEND picks the active backend at import; a TrainConfig made then, `refham
    train` and `refham eval` use that one unless told otherwise (the CuPy stand-in is active)."""
    from refham.cli.commands import build_parser

    seen = []

    class Chosen(Exception):
        pass

    def record(name, dtype, threads=0):
        seen.append(name)
        raise Chosen
    monkeypatch.setattr(training, "active_backend", record)
    monkeypatch.setattr(evaluation, "active_backend", record)
    monkeypatch.setattr(evaluation, "load_checkpoint", lambda path: _checkpoint())
    cfg = TrainConfig(out=str(tmp_path / "run"))
    assert cfg.backend == "cupy" and TrainConfig(backend="numpy").backend == "numpy"
    with pytest.raises(Chosen):
        training.train(cfg)
    args = build_parser().parse_args(["eval", "--checkpoint", "c.npz"])
    with pytest.raises(Chosen):
        evaluation.evaluate_checkpoint(args.checkpoint, backend=args.backend)
    with backend.active_backend(None, "float64"):
        assert backend.backend_name() == "cupy"
    assert seen == ["cupy", None]


def _checkpoint():
    """A checkpoint of a digits ParaMixer, enough for evaluate_checkpoint to reach the backend."""
    cfg = TrainConfig(backend="numpy", dtype="float64")
    config = model_config(cfg, make_synthetic(seed=0)[0])
    return SimpleNamespace(config={"train": cfg.to_dict(), "model": dataclasses.asdict(config)},
                           params={k: backend.to_numpy(v)
                                   for k, v in Mixer(config).init(0).items()},
                           step=0, epoch=0)


def test_a_run_folder_is_locked_inside_its_block_and_released_however_it_ends(tmp_path):
    from refham.files.runlock import RunLock, RunLocked
    from refham.training.distributed import SingleProcess
    from refham.training.run_folder import RunFolder

    out = str(tmp_path / "run")
    with pytest.raises(ValueError, match="inside"):
        with RunFolder(out, SingleProcess()) as folder:
            folder.write("config.json", "{}")
            with pytest.raises(RunLocked):
                RunLock(out).acquire()
            raise ValueError("inside")
    RunLock(out).acquire().release()                        # free again
    rank_1 = SimpleNamespace(rank=1, size=2)
    with RunFolder(str(tmp_path / "other"), rank_1) as folder:   # not the writer: no lock,
        folder.write("config.json", "{}")                   # no folder, no file
    assert not (tmp_path / "other").exists()
