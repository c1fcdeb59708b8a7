"""refham.metaformer, metaformer_train and metaformer_figures (docs: metaformer): the unrolled
denoising loss's hand-written gradient against autograd on the same forward code, training that
lowers the loss, energy descent with trained weights, the `figures` energy trace against (H1)
evaluated here independently in NumPy, and the `refham metaformer` command.

Test data are drawn with NumPy (backend.rng) and moved with `asarray` for the hand-written path;
autograd differentiates the same forward on NumPy. D ≠ N_h throughout.
"""
import gzip
import importlib.util
import json
import struct
import sys

import pytest
from oracle import autograd  # (the module skips without autograd)
import numpy as np
from hypothesis import given, strategies as st

from oracle import TOL, autograd_numpy, rel_err
from refham import metaformer as mf
from refham.training import metaformer_figures as mff
from refham.training import metaformer_train as mft
from refham.backend import asarray, rng, to_numpy
from refham.files.checkpoint import load_checkpoint, save_checkpoint
from refham.cli.commands import main
from refham.lagrangians import LayerNorm, ReLU

EPS = 1e-5  # the visible layer's ε


def on_backend(arrays):
    return {k: asarray(v) for k, v in arrays.items()}


def unit_images(gen, batch, size):
    """Non-negative images divided by their L2 norm, as the task's clean inputs."""
    return mf.normalise_images(gen.random((batch, size)))


def test_three_layer_ham_is_the_paper_graph():
    ham = mf.three_layer_ham(12, 7)
    assert ham.weight_shapes() == {"sv": (7, 12), "vc": (12, 7)}
    assert isinstance(ham.layers["v"].lagrangian, LayerNorm)
    assert [type(ham.layers[n].lagrangian) for n in "sc"] == [ReLU, ReLU]
    image = mf.three_layer_ham((1, 4, 3), 5)
    assert image.layers["v"].lagrangian.axes == (-3, -2, -1)
    assert image.weight_shapes()["vc"] == (12, 5)


# ---------------------------------------------------------------- the gradient

@st.composite
def denoising_cases(draw):
    """Weights large enough that the relu patterns and the layernorm curvature matter, a batch
    of unit-norm images with noise, and (optionally) non-zero hidden start states."""
    visible, hidden = draw(st.integers(3, 7)), draw(st.integers(2, 7))  # D = 2: LN is ±1
    if hidden == visible:
        hidden += 1
    batch, seed = draw(st.integers(1, 3)), draw(st.integers(0, 2**16))
    gen, scale = rng(seed), draw(st.floats(0.1, 1.5))
    weights = {"sv": scale * gen.standard_normal((hidden, visible)),
               "vc": scale * gen.standard_normal((visible, hidden))}
    clean = unit_images(gen, batch, visible)
    noise = mf.NOISE_STD * gen.standard_normal(clean.shape)
    hidden_start = None
    if draw(st.booleans()):
        # positive entries: every hidden unit acts in step 1, so W has a gradient at T = 1
        hidden_start = {n: np.abs(gen.standard_normal((batch, hidden))) for n in "sc"}
    return weights, clean, noise, hidden_start


@given(case=denoising_cases(), T=st.sampled_from([1, 3]), target=st.sampled_from(mf.TARGETS),
       alpha=st.floats(0.05, 0.5))
def test_unrolled_loss_gradient_matches_autograd(case, T, target, alpha):
    weights, clean, noise, hidden_start = case
    loss, grads = mf.loss_and_grads(
        on_backend(weights), asarray(clean), asarray(noise), T, alpha, target,
        None if hidden_start is None else on_backend(hidden_start))
    with autograd_numpy():
        def unrolled_loss(w):
            return mf.forward(w, clean, noise, T, alpha, target, hidden_start)[0]
        expected_loss = unrolled_loss(weights)
        expected = autograd.grad(unrolled_loss)(weights)
    assert abs(loss - expected_loss) <= TOL * abs(expected_loss)
    assert sorted(grads) == ["sv", "vc"]
    for name in grads:
        assert rel_err(grads[name], expected[name]) <= TOL, name
    if hidden_start is None and T == 1:
        # g_s⁰ = g_c⁰ = 0: the weights first act on x_v in step 2, so one step has no gradient
        assert all(np.all(to_numpy(g) == 0) for g in grads.values())


def test_unrolled_loss_gradient_is_not_trivially_zero():
    """The property above may compare zeros with zeros (every relu unit of a drawn case can stay
    off for all T steps, and then W has no gradient); here the hidden units act, the gradient is
    non-zero and still matches autograd."""
    gen = rng(7)
    weights = {"sv": gen.standard_normal((6, 5)), "vc": gen.standard_normal((5, 6))}
    clean = unit_images(gen, 3, 5)
    noise = mf.NOISE_STD * gen.standard_normal(clean.shape)
    _, grads = mf.loss_and_grads(on_backend(weights), asarray(clean), asarray(noise), 3, 0.3,
                                 "clean")
    with autograd_numpy():
        expected = autograd.grad(
            lambda w: mf.forward(w, clean, noise, 3, 0.3, "clean")[0])(weights)
    for name in grads:
        assert np.abs(expected[name]).min() > 1e-6, name    # every weight matters
        assert rel_err(grads[name], expected[name]) <= TOL, name


@given(visible=st.integers(2, 40), seed=st.integers(0, 2**16), aligned=st.booleans())
def test_paper_loss_is_bounded_below_by_the_floor(visible, seed, aligned):
    """mean((LN(x) − y)²) ≥ (1 − 1/√D)² for every x and unit-norm y: ‖LN x‖ ≈ √D, ‖y‖ = 1."""
    gen = rng(seed)
    y = unit_images(gen, 4, visible)
    x = y if aligned else gen.standard_normal((4, visible))
    loss = np.mean((to_numpy(LayerNorm(eps=EPS).activation(asarray(x))) - y) ** 2, axis=1)
    assert np.all(loss >= mf.loss_floor(visible) - 1e-12)
    # the exact value for x = y: ‖g‖² = D·v/(v + ε), ⟨g, y⟩ = D·v/σ with v = var(y), σ = √(v + ε);
    # it approaches the floor only as y approaches a centred vector (which a unit y cannot be)
    if aligned:
        var = y.var(axis=1)
        exact = var / (var + EPS) - 2 * var / np.sqrt(var + EPS) + 1 / visible
        assert rel_err(loss, exact) <= 1e-12


def test_losses_are_the_same_in_chunks_and_target_standardised_is_ln_of_clean():
    gen = rng(3)
    weights = mf.init_weights(6, 5, seed=1)
    clean = unit_images(gen, 9, 6)
    noise = mf.NOISE_STD * gen.standard_normal(clean.shape)
    whole = mf.denoising_losses(weights, asarray(clean), asarray(noise), 3)
    chunked = mf.denoising_losses(weights, asarray(clean), asarray(noise), 3, chunk=4)
    for target in mf.TARGETS:
        assert abs(whole[target] - chunked[target]) <= 1e-13
        loss, _ = mf.forward(weights, asarray(clean), asarray(noise), 3, target=target)
        assert abs(float(loss) - whole[target]) <= 1e-13
    standardised = to_numpy(mf.denoising_target(asarray(clean), "standardised"))
    centred = clean - clean.mean(axis=1, keepdims=True)
    assert rel_err(standardised, centred / np.sqrt(centred.var(axis=1, keepdims=True) + EPS)) \
        <= 1e-12


@pytest.mark.parametrize("call, message", [
    (lambda w, c, n: mf.forward(w, c, n[:, :-1], 2), "clean and noise must both be"),
    (lambda w, c, n: mf.forward(w, c[0], n[0], 2), "clean and noise must both be"),
    (lambda w, c, n: mf.forward(w, c, n, 0), "T, the number of unrolled steps"),
    (lambda w, c, n: mf.forward(w, c, n, 2, target="noisy"), "unknown target 'noisy'"),
    (lambda w, c, n: mf.forward({"vc": w["vc"]}, c, n, 2), "weights must be a dict"),
    (lambda w, c, n: mf.normalise_images(np.zeros((2, 3))), "cannot be divided by their L2"),
    (lambda w, c, n: mft.TrainSettings(data="mnist"), "needs --data-path"),
    (lambda w, c, n: mft.TrainSettings(lr=0), "lr must be a finite real number > 0"),
    (lambda w, c, n: mft.TrainSettings(epochs=1.5), "epochs must be an integer"),
])
def test_bad_input_raises_a_clear_error(call, message):
    gen = rng(0)
    clean = asarray(unit_images(gen, 2, 4))
    with pytest.raises(mf.MetaFormerError, match=message):
        call(mf.init_weights(4, 3, seed=0), clean, asarray(gen.standard_normal((2, 4))))


# ---------------------------------------------------------------- training, energy, figures

@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short training run on the synthetic images (D = 64, N_h = 24)."""
    settings = mft.TrainSettings(data="synthetic", hidden=24, steps=3, lr=1e-2, batch_size=32,
                                epochs=3, out=str(tmp_path_factory.mktemp("run")),
                                progress=False)
    return settings, mft.train(settings)


def test_training_lowers_both_denoising_losses_and_logs_every_epoch(trained):
    settings, summary = trained
    first, last = summary["history"][0], summary["history"][-1]
    for target in mf.TARGETS:
        assert last[f"test_loss_{target}"] < first[f"test_loss_{target}"] - 0.02, target
    assert last["test_loss_clean"] >= mf.loss_floor(64)
    with open(f"{settings.out}/metrics.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert records == summary["history"][1:] and [r["epoch"] for r in records] == [1, 2, 3]
    saved = load_checkpoint(summary["checkpoint"])
    assert saved.epoch == 3 and saved.step == 3 * 8  # 256 synthetic images, batches of 32
    assert saved.config["image_shape"] == [8, 8] and saved.config["hidden"] == 24
    assert sorted(saved.params) == ["sv", "vc"] and saved.params["sv"].shape == (24, 64)
    with pytest.raises(mf.MetaFormerError, match="already holds a run"):
        mft.train(settings)


def test_an_update_that_overflows_stops_training_before_it_is_kept(tmp_path):
    settings = mft.TrainSettings(data="synthetic", hidden=4, steps=2, lr=1e308, batch_size=32,
                                epochs=2, out=str(tmp_path / "run"), progress=False)
    with pytest.raises(mf.MetaFormerError, match="epoch 1: .*the update made .*NaN/inf; no "
                                                 "checkpoint was written"):
        mft.train(settings)
    assert not (tmp_path / "run" / "last.npz").exists()


def test_training_towards_the_standardised_target_lowers_its_loss(tmp_path):
    settings = mft.TrainSettings(data="synthetic", hidden=12, steps=3, lr=3e-2, batch_size=32,
                                epochs=2, target="standardised", out=str(tmp_path),
                                progress=False)
    history = mft.train(settings)["history"]
    assert history[-1]["test_loss_standardised"] < history[0]["test_loss_standardised"] - 0.2


@pytest.mark.parametrize("alpha", [0.02, 0.1])
def test_energy_never_increases_along_discrete_descent_with_trained_weights(trained, alpha):
    weights = {k: asarray(v) for k, v in load_checkpoint(trained[1]["checkpoint"]).params.items()}
    for scale in (1.0, 10.0):
        energies = to_numpy(mff.energy_descent(weights, samples=6, seed=4, steps=60, alpha=alpha,
                                              state_scale=scale).energies)
        assert np.all(np.diff(energies, axis=0) <= 1e-12 * np.abs(energies).max())
        assert np.all(energies[-1] < energies[0])


def independent_energy_trace(W_sv, W_vc, start, alpha, steps):
    """(H1) along (H5) for s — v — c, written out here in NumPy: relu layers have neuron energy
    ½Σrelu(x)², the layernorm layer ⟨x, g⟩ − Dσ; synapses −⟨g_s, W_sv g_v⟩ − ⟨g_v, W_vc g_c⟩."""
    x_s, x_v, x_c = (np.array(start[n], dtype=np.float64) for n in "svc")
    trace = []
    for step in range(steps + 1):
        g_s, g_c = np.maximum(x_s, 0), np.maximum(x_c, 0)
        sigma = np.sqrt(x_v.var(axis=1, keepdims=True) + EPS)
        g_v = (x_v - x_v.mean(axis=1, keepdims=True)) / sigma
        trace.append(0.5 * (g_s ** 2).sum(1) + 0.5 * (g_c ** 2).sum(1)
                     + (x_v * g_v).sum(1) - x_v.shape[1] * sigma[:, 0]
                     - (g_s * (g_v @ W_sv.T)).sum(1) - (g_v * (g_c @ W_vc.T)).sum(1))
        x_s, x_v, x_c = (x_s - alpha * (x_s - g_v @ W_sv.T),
                         x_v - alpha * (x_v - g_s @ W_sv - g_c @ W_vc.T),
                         x_c - alpha * (x_c - g_v @ W_vc))
    return np.array(trace)


def test_figures_energy_trace_equals_H1_evaluated_independently(trained, tmp_path):
    pytest.importorskip("matplotlib")
    paths, energies = mff.write_figures(trained[1]["checkpoint"], tmp_path, samples=3, seed=2,
                                       steps=12, alpha=0.5, state_scale=10.0)
    for name in ("receptive_fields.png", "energy_descent.png"):
        with open(paths[name], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(paths["energy_descent.json"], encoding="utf-8") as f:
        record = json.load(f)
    assert record["alpha"] == 0.5 and record["steps"] == 12 and record["samples"] == 3
    params = load_checkpoint(trained[1]["checkpoint"]).params
    with np.load(paths["energy_descent_start.npz"]) as start:
        assert start["v"].shape == (3, 64) and start["s"].shape == (3, 24)
        expected = independent_energy_trace(params["sv"], params["vc"], start, 0.5, 12)
    assert rel_err(np.array(record["energies"]), expected) <= 1e-10
    assert rel_err(energies, expected) <= 1e-10


def test_receptive_fields_are_the_largest_normalised_and_tiled():
    gen = rng(5)
    sv, vc = gen.standard_normal((7, 6)), gen.standard_normal((6, 7))
    fields = mff.receptive_fields({"sv": sv, "vc": vc}, (2, 3), count=3)
    for name, rows in (("sv", sv), ("vc", vc.T)):  # rows of W_sv, columns of W_vc
        largest = sorted(range(7), key=lambda i: -np.linalg.norm(rows[i]))[:3]
        expected = np.stack([rows[i] / np.abs(rows[i]).max() for i in largest])
        assert rel_err(fields[name], expected.reshape(3, 2, 3)) <= 1e-15, name
    mosaic = mff.tile(fields["sv"])
    assert mosaic.shape == (2 * 2 + 1, 2 * 3 + 1)  # 2×2 grid of 2×3 tiles, 1-pixel gaps
    assert np.isnan(mosaic[2]).all() and np.isnan(mosaic[-2:, -3:]).all()  # gap; empty 4th
    assert rel_err(mosaic[3:, :3], fields["sv"][2]) == 0


# ---------------------------------------------------------------- MNIST files

def write_idx(path, pixels):
    """An IDX3 uint8 file (gzipped when the name ends in .gz)."""
    raw = b"\0\0\x08\x03" + struct.pack(">3I", *pixels.shape) + pixels.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


@pytest.mark.parametrize("with_test_file", [True, False])
def test_mnist_idx_files_train_with_t10k_or_a_held_out_split(tmp_path, with_test_file):
    gen = rng(6)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", gen.integers(1, 256, (40, 5, 5)))
    if with_test_file:
        write_idx(tmp_path / "t10k-images-idx3-ubyte", gen.integers(1, 256, (7, 5, 5)))
    train, test, split = mft.load_images("mnist", str(tmp_path))
    assert (len(train), len(test)) == ((40, 7) if with_test_file else (36, 4))
    assert split == ("MNIST t10k" if with_test_file else
                     "10% of the training images, held out (no t10k file)")
    assert train.max() <= 1.0 and train.min() > 0  # p/255
    settings = mft.TrainSettings(data="mnist", data_path=str(tmp_path), hidden=4, steps=2,
                                epochs=1, batch_size=16, out=str(tmp_path / "run"),
                                progress=False)
    assert mft.train(settings)["visible"] == 25


# ---------------------------------------------------------------- the command

TINY = ["--data", "synthetic", "--hidden", "6", "--steps", "2", "--batch-size", "64",
        "--no-progress"]


def test_train_then_figures_from_the_command_line(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = str(tmp_path / "run")
    assert main(["metaformer", "train", *TINY, "--epochs", "1", "--out", run]) == 0
    printed = capsys.readouterr().out
    assert "finished 1 epochs" in printed and "(1 − 1/√D)² = 0.76562 for D = 64" in printed
    assert main(["metaformer", "figures", "--checkpoint", f"{run}/last.npz", "--samples", "2",
                 "--steps", "4"]) == 0
    printed = capsys.readouterr().out
    with open(f"{run}/energy_descent.json", encoding="utf-8") as f:
        energies = json.load(f)["energies"]
    assert len(energies) == 5 and f"{energies[4][1]:12.6g}" in printed.splitlines()[-2]
    assert main(["metaformer", "train", *TINY, "--epochs", "1", "--out", run]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_figures_without_matplotlib_says_so_and_exits_non_zero(trained, tmp_path, capsys,
                                                               monkeypatch):
    for module in ("matplotlib", "matplotlib.figure"):
        monkeypatch.setitem(sys.modules, module, None)  # `import matplotlib` now fails
    out = tmp_path / "figures"
    assert main(["metaformer", "figures", "--checkpoint", trained[1]["checkpoint"],
                 "--out", str(out)]) == 1
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert not out.exists()


def test_figures_refuses_a_checkpoint_of_another_model(tmp_path, capsys):
    pytest.importorskip("matplotlib")  # checked first
    path = tmp_path / "mixer.npz"
    save_checkpoint(path, {"head.weight": np.zeros((2, 3))}, {"step": 0}, step=0, epoch=0,
                    rng_state={}, config={"model": "paramixer"})
    assert main(["metaformer", "figures", "--checkpoint", str(path)]) == 2
    assert "is not a checkpoint of `refham metaformer train`" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["train", "--data", "mnist"], "needs --data-path"),
    (["train", "--paper"], "needs --data-path"),
    (["train", "--steps", "0"], "steps must be an integer ≥ 1"),
    (["train", "--data", "mnist", "--data-path", "absent"], "absent"),
    # figures asks for matplotlib before reading anything (exit 1 without it)
    pytest.param(["figures", "--checkpoint", "missing.npz"], "missing.npz",
                 marks=pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                                          reason="without matplotlib, figures exits 1 first")),
])
def test_bad_options_give_clear_errors_and_exit_2(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)
    assert main(["metaformer", *argv]) == 2
    assert message in capsys.readouterr().err
