"""The energy-exact Mixer (norm_affine="scalar": one γ per block norm, a per-element δ): its
parameters, hand-written gradients against autograd, the block as an exact energy-descent step,
the PyTorch peer, export to the paper's per-element layout and import back, and training."""
import dataclasses
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refham import mixer as M
from refham.backend import to_numpy
from refham.oracle.interop import InteropError, export_weights, import_weights, read_refham_weights
from refham.mixer_energy import MixerBlock
from refham.optim import is_decayed
from refham.oracle.golden import META_KEY
from refham.training.train import train
from refham.training.train_config import TrainConfig
from tests.oracle import rel_err
from tests.test_mixer import (
    VARIANTS, check_loss_and_grads, on_backend, random_batch, random_params, small_configs,
    torch_mixer)


def test_block_norms_hold_one_gamma_and_the_final_norm_stays_per_element():
    config = M.make_config("symmixer", "digits", norm_affine="scalar")
    shapes = M.param_shapes(config)
    paper = M.param_shapes(dataclasses.replace(config, norm_affine="element"))
    assert list(shapes) == list(paper)
    for name, shape in shapes.items():
        is_gamma = name.startswith("blocks.") and ".norm" in name and name.endswith(".weight")
        assert shape == (() if is_gamma else paper[name]), name
    assert shapes["norm.weight"] == (64,) and not is_decayed("blocks.0.norm.weight", ())
    with pytest.raises(M.ConfigError, match="unknown norm_affine 'mean'"):
        M.make_config("symmixer", norm_affine="mean")


@pytest.mark.parametrize("norm", M.NORMS)
@pytest.mark.parametrize("model, bias", VARIANTS)
@settings(max_examples=4)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_loss_and_grads_match_autograd(model, bias, norm, data, seed):
    config = data.draw(small_configs(model, bias, norm=norm, n_iter=data.draw(st.integers(1, 2)),
                                     norm_affine="scalar"))
    check_loss_and_grads(config, seed, 0.1 if model == "asymmixer" else 0.0, 0.1)


@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), gamma=st.floats(0.3, 3.0))
def test_each_symmixer_block_is_an_exact_energy_descent_step(seed, gamma):
    config = M.make_config("symmixer", image_size=4, in_chans=1, patch=2, dim=3, depth=2,
                           norm_affine="scalar")
    model = M.Mixer(config)
    params = random_params(model, seed)
    params.update({f"blocks.{i}.norm.weight": np.array(gamma * (1 + 0.1 * i)) for i in (0, 1)})
    params = on_backend(params)
    states = {}
    model.forward(params, random_batch(config, seed)[0],
                  observe=lambda block, t, x: states.__setitem__((block, t), x))
    for block in (0, 1):
        exact = MixerBlock(config, params, block, affine="scalar")
        assert rel_err(exact.unit_step(states[block, 0]), states[block, 1]) <= 1e-12
        energies = to_numpy(exact.integrate(states[block, 0], dt=0.05, n_steps=40,
                                              kappa=1).energies)
        rise = np.diff(energies, axis=0)
        assert rise.max() <= 1e-9 * np.abs(energies).max()        # E never rises (M4)


@pytest.mark.parametrize("model, bias", VARIANTS)
def test_agrees_with_the_pytorch_peer(model, bias):
    config = M.make_config(model, image_size=6, in_chans=2, patch=2, dim=5, depth=2, n_iter=2,
                           num_classes=4, bias=bias, norm_affine="scalar")
    torch, reference = torch_mixer(config)
    mixer = M.Mixer(config)
    params, (images, labels) = random_params(mixer, 3), random_batch(config, 3)
    state = M.to_timm_state(config, on_backend(params))
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    logits_ref = reference(torch.from_numpy(images))
    torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels)).backward()
    _, logits, grads = mixer.loss_and_grads(on_backend(params), images, labels)
    assert rel_err(logits, logits_ref.detach().numpy()) <= 1e-12
    for name, p in reference.named_parameters():
        assert np.allclose(to_numpy(grads[name]), p.grad.numpy(), rtol=1e-9, atol=1e-12), name


def test_export_broadcasts_gamma_for_the_papers_models_and_import_takes_it_back(tmp_path):
    config = M.make_config("symmixer", image_size=4, in_chans=1, patch=2, dim=3, depth=2,
                           norm_affine="scalar")
    params = random_params(M.Mixer(config), 5)
    source = tmp_path / "params.npz"
    meta = {"format": "refham-params", "version": 1, "model": dataclasses.asdict(config)}
    np.savez(source, **{META_KEY: np.array(json.dumps(meta))},
             **{f"param/{k}": v for k, v in params.items()})
    export_weights(str(source), str(tmp_path / "paper.npz"), "npz")
    exported = dict(np.load(tmp_path / "paper.npz"))
    paper = M.param_shapes(dataclasses.replace(config, norm_affine="element"))
    assert {k: v.shape for k, v in exported.items()} == paper
    assert np.all(exported["blocks.1.norm.weight"] == params["blocks.1.norm.weight"])
    import_weights(str(tmp_path / "paper.npz"), str(tmp_path / "back.npz"), config)
    _, back = read_refham_weights(str(tmp_path / "back.npz"))
    assert all(np.array_equal(back[k], params[k]) for k in params)
    exported["blocks.0.norm.weight"][0, 1] += 0.5
    np.savez(tmp_path / "varied.npz", **exported)
    with pytest.raises(InteropError, match="blocks.0.norm.weight varies"):
        import_weights(str(tmp_path / "varied.npz"), str(tmp_path / "no.npz"), config)


def test_trains_with_a_scalar_gamma(tmp_path):
    summary = train(TrainConfig(model="symmixer", norm_affine="scalar", data="synthetic", dim=8,
                                depth=1, epochs=2, batch_size=32, lr=1e-2, progress=False,
                                out=str(tmp_path / "run")))
    assert summary["status"] == "finished" and summary["test_acc"] > 0.5
