"""Where an AsymMixer starts (refham.asym_init): official (the paper's), zero (a SymMixer) and
para (the ParaMixer of the same seed, the same function), and the training option."""
import dataclasses
import math

import numpy as np
import pytest

from refham import mixer as M
from refham.asym_init import ASYM_INITS, initial_params
from refham.backend import to_numpy
from refham.mixer_energy import symmetry_measures
from refham.training.train import train
from refham.training.train_config import TrainConfig, TrainConfigError
from tests.oracle import rel_err
from tests.test_mixer import random_batch

CONFIG = M.make_config("asymmixer", "digits")


def _w2(params):
    return {k: to_numpy(v) for k, v in params.items() if k.endswith(".fc2.weight")}


@pytest.mark.parametrize("seed", [0, 5])
def test_para_starts_as_the_paramixer_of_the_same_seed(seed):
    para_config = dataclasses.replace(CONFIG, model="paramixer")
    asym, para = initial_params(CONFIG, seed, "para"), M.Mixer(para_config).init(seed)
    images = random_batch(CONFIG, seed, batch=4)[0]
    x_asym, x_para = [], []                     # every block's states (the head starts at zero)
    M.Mixer(CONFIG).forward(asym, images, observe=lambda b, t, x: x_asym.append(x))
    M.Mixer(para_config).forward(para, images, observe=lambda b, t, x: x_para.append(x))
    assert len(x_asym) == 2 * CONFIG.depth
    for got, want in zip(x_asym, x_para):
        assert rel_err(got, want) <= 1e-5                                  # float32 rounding
    measures = symmetry_measures(CONFIG, asym)
    assert all(abs(v) < 0.15 for k, v in measures.items() if k.endswith(".cos"))


def test_zero_starts_symmetric_and_official_is_half_symmetric():
    zero, official = initial_params(CONFIG, 1, "zero"), initial_params(CONFIG, 1)
    assert all(not w.any() for w in _w2(zero).values())
    assert all(v == pytest.approx(1.0) for k, v in symmetry_measures(CONFIG, zero).items()
               if k.endswith(".cos"))
    for name, w in M.Mixer(CONFIG).init(1).items():                 # official = Mixer.init
        assert np.array_equal(to_numpy(official[name]), to_numpy(w)), name
    # W₁ and W₂ drawn alike: W_out = W₁ᵀ + W₂ has cos(W_out, W₁ᵀ) ≈ 1/√2
    cosines = [v for k, v in symmetry_measures(CONFIG, official).items() if k.endswith(".cos")]
    assert np.mean(cosines) == pytest.approx(1 / math.sqrt(2), abs=0.05)
    others = [k for k in official if not k.endswith(".fc2.weight")]
    assert all(np.array_equal(to_numpy(zero[k]), to_numpy(official[k])) for k in others)


def test_only_the_asymmixer_takes_another_init(tmp_path):
    with pytest.raises(M.ConfigError, match="unknown asym_init 'ones'"):
        initial_params(CONFIG, 0, "ones")
    with pytest.raises(M.ConfigError, match="'symmixer' has none"):
        initial_params(M.make_config("symmixer"), 0, "zero")
    with pytest.raises(TrainConfigError, match="use --model asymmixer"):
        TrainConfig(model="paramixer", asym_init="para")
    assert set(ASYM_INITS) == {"official", "zero", "para"}


def test_training_starts_from_the_chosen_init(tmp_path, monkeypatch):
    started = {}
    import refham.training.run_state as T    # where a run draws its initial parameters
    original = T.initial_params
    monkeypatch.setattr(T, "initial_params", lambda *args: started.setdefault(
        "params", original(*args)))
    train(TrainConfig(model="asymmixer", asym_init="zero", data="synthetic", dim=8, depth=1,
                      epochs=1, batch_size=32, progress=False, out=str(tmp_path / "run")))
    assert all(not w.any() for w in _w2(started["params"]).values())
