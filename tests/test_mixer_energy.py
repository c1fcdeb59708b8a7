"""refham.mixer_energy: the SymMixer block energy (M2), E₀ and their rates (M4) against autograd;
E and E₀ never rise along the continuous dynamics (M3) with a scalar γ; found examples where
they do rise (per-element γ of mixed sign, per-element γ all positive, and the unit Euler step
that the block takes); the AsymMixer pseudo-energy; symmetry measures. S ≠ C and N_s ≠ N_c
throughout (N_s = int(C/2)·r, N_c = 4C·r)."""
import importlib.util
import json
import pathlib

import pytest
from tests.oracle import autograd  # (the module skips without autograd)
import numpy as np
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

from refham.backend import asarray, rng, to_numpy
from refham.blocks import BRANCH_AXIS, parallel_block_forward
from refham.mixer import NORMS, Mixer, make_config
from refham.mixer_energy import EnergyError, MixerBlock, symmetry_measures
from tests.oracle import TOL, autograd_numpy, rel_err

seeds = st.integers(0, 2**31 - 1)


@st.composite
def configs(draw, model="symmixer"):
    """Small parallel models with S = grid² ≠ C, either norm, one or two blocks."""
    grid = draw(st.integers(2, 3))
    dim = draw(st.integers(3, 6).filter(lambda c: c != grid * grid))
    return make_config(model, image_size=grid, patch=1, in_chans=1, dim=dim,
                       depth=draw(st.integers(1, 2)), norm=draw(st.sampled_from(NORMS)),
                       hidden_ratio=draw(st.sampled_from([1.0, 1.5])))


def tiny_config(model="symmixer", grid=2, dim=3, depth=1):
    return make_config(model, image_size=grid, patch=1, in_chans=1, dim=dim, depth=depth)


def draw_params(config, seed, gamma="scalar", weight_scale=1.0, delta_scale=0.3):
    """Host float64 parameters: MLP weights weight_scale·N(0, 1/fan_in); block norms with bias
    δ = delta_scale·N(0, 1) and weight γ a positive constant in [0.5, 2] ("scalar"), N(0, 1)
    per element ("mixed") or e^{N(0, 1)/2} per element ("positive"); stem and head zero."""
    r, params = rng(seed), {}
    for name, shape in Mixer(config).param_shapes.items():
        if ".mlp_" in name:
            params[name] = weight_scale * r.standard_normal(shape) / np.sqrt(shape[1])
        elif name.startswith("blocks") and name.endswith("norm.bias"):
            params[name] = delta_scale * r.standard_normal(shape)
        elif name.startswith("blocks") and name.endswith("norm.weight"):
            params[name] = {"scalar": lambda: np.full(shape, r.uniform(0.5, 2.0)),
                            "mixed": lambda: r.standard_normal(shape),
                            "positive": lambda: np.exp(0.5 * r.standard_normal(shape))}[gamma]()
        else:
            params[name] = np.zeros(shape)
    return params


def on_backend(params):
    return {name: asarray(value) for name, value in params.items()}


def draw_state(config, seed, scale=1.0, batch=2):
    return scale * rng(seed + 1).standard_normal((batch, config.num_tokens, config.dim))


def blocks(config, params, block, affine):
    """(hand-written path on the active backend, autograd path on NumPy) for one block."""
    hand = MixerBlock(config, on_backend(params), block, affine)
    with autograd_numpy():
        return hand, MixerBlock(config, params, block, affine)


def autograd_grad(fn, x):
    """∇ₓ Σ_b fn(x)_b under autograd (samples are independent: per-sample gradients)."""
    with autograd_numpy():
        return autograd.grad(lambda v: fn(v).sum())(x)


def per_sample_inner(a, b):
    return np.sum(to_numpy(a) * to_numpy(b), axis=(-2, -1))


def assert_never_increases(energies, rtol=1e-10):
    """E_{k+1} ≤ E_k + rtol·max|E| along a recorded trajectory (n+1, B)."""
    e = to_numpy(energies)
    rise = np.diff(e, axis=0).max()
    assert rise <= rtol * np.abs(e).max(), f"the energy rose by {rise:.3e} in one step"


# ------------------------------------------------------------------------------- gradients

@given(config=configs(), seed=seeds, data=st.data())
def test_energy_gradient_is_x_minus_update(config, seed, data):
    """∂F/∂g = u (the model's block update), so ∂E/∂g = x − u (H2), and ∇ₓE = H_v(x − u)."""
    block = data.draw(st.integers(0, config.depth - 1))
    params, x = draw_params(config, seed), draw_state(config, seed)
    hand, ref = blocks(config, params, block, "scalar")
    g = to_numpy(hand.activation(asarray(x)))
    grad_F = autograd_grad(ref.hidden_lagrangian, g)
    assert rel_err(hand.update(asarray(g)), grad_F) <= TOL
    dEdg = hand.dEdg(asarray(x))
    assert rel_err(dEdg, x - grad_F) <= TOL
    assert rel_err(hand.norm_jvp(asarray(x), dEdg), autograd_grad(ref.lyapunov_energy, x)) <= TOL


@given(config=configs(), seed=seeds, gamma=st.sampled_from(["scalar", "mixed", "positive"]))
def test_norm_jvp_is_the_jacobian_of_the_norm(config, seed, gamma):
    """J v = γ⊙(H₀v) is ∂g/∂x · v, per-element γ included."""
    affine = "scalar" if gamma == "scalar" else "per_element"
    params, x = draw_params(config, seed, gamma), draw_state(config, seed, batch=1)
    hand, ref = blocks(config, params, 0, affine)
    v = rng(seed + 2).standard_normal(x.shape)
    with autograd_numpy():
        jacobian = autograd.jacobian(ref.activation)(x).reshape(x.size, x.size)
    assert rel_err(hand.norm_jvp(asarray(x), asarray(v)), (jacobian @ v.ravel()).reshape(
        x.shape)) <= TOL


@given(config=configs(), seed=seeds, kappa=st.sampled_from([0, 1]),
       gamma=st.sampled_from(["scalar", "mixed", "positive"]))
def test_closed_form_rates_match_autograd(config, seed, kappa, gamma):
    """dE/dt = ⟨x − u, H_v ẋ⟩ and dE₀/dt = −⟨u, γ⊙H₀ẋ⟩ equal ⟨∇ₓE, ẋ⟩ and ⟨∇ₓE₀, ẋ⟩."""
    affine = "scalar" if gamma == "scalar" else "per_element"
    params, x = draw_params(config, seed, gamma), draw_state(config, seed)
    hand, ref = blocks(config, params, 0, affine)
    velocity = to_numpy(hand.velocity(asarray(x), kappa))
    expected = per_sample_inner(autograd_grad(ref.energy0, x), velocity)
    assert rel_err(hand.energy0_rate(asarray(x), kappa), expected) <= TOL
    if affine == "scalar":
        expected = per_sample_inner(autograd_grad(ref.lyapunov_energy, x), velocity)
        assert rel_err(hand.lyapunov_energy_rate(asarray(x), kappa), expected) <= TOL


@given(config=configs(), seed=seeds)
def test_default_block_is_the_models_block(config, seed):
    """With the default affine (the model's own), unit_step is the model's parallel block; the
    scalar (energy-exact) affine is a different block once γ is not uniform."""
    params = on_backend(draw_params(config, seed, "positive"))
    x = asarray(draw_state(config, seed))
    model_step, _ = parallel_block_forward(x, Mixer(config).block_weights(params, 0), "sym",
                                           eps=config.ln_eps)
    block = MixerBlock(config, params, 0)
    assert block.affine == "per_element"
    assert rel_err(block.unit_step(x), model_step) <= 1e-13
    assert rel_err(MixerBlock(config, params, 0, "scalar").unit_step(x), model_step) > 1e-6


@given(config=configs(), seed=seeds)
def test_uniform_gamma_is_scalar(config, seed):
    """A uniform per-element γ gives the same block, E₀ and rates as the scalar form."""
    params, x = on_backend(draw_params(config, seed)), asarray(draw_state(config, seed))
    per_element = MixerBlock(config, params, 0, "per_element")
    scalar = MixerBlock(config, params, 0, "scalar")
    assert rel_err(per_element.unit_step(x), scalar.unit_step(x)) <= 1e-13
    for kappa in (0, 1):
        assert rel_err(per_element.energy0_rate(x, kappa), scalar.energy0_rate(x, kappa)) <= 1e-13
    assert rel_err(per_element.energy0(x), scalar.energy0(x)) <= 1e-13


# ------------------------------------------------------------------------------- descent

@given(config=configs(), seed=seeds, scale=st.sampled_from([0.3, 1.0, 3.0]),
       weight_scale=st.sampled_from([0.5, 1.0, 2.0]))
def test_energies_never_rise_along_the_dynamics_with_scalar_gamma(config, seed, scale,
                                                                  weight_scale):
    """(M4): E along κ = 1 and E₀ along κ = 0, RK4 with a small step, never increase."""
    params = on_backend(draw_params(config, seed, weight_scale=weight_scale))
    block = MixerBlock(config, params, config.depth - 1, "scalar")
    x0 = asarray(draw_state(config, seed, scale))
    for kappa in (1, 0):
        trajectory = block.integrate(x0, dt=0.02, n_steps=40, kappa=kappa)
        assert tuple(trajectory.energies.shape) == (41, 2)
        assert_never_increases(trajectory.energies)
        assert np.all(to_numpy(trajectory.energies[-1] < trajectory.energies[0]))
        rate = block.lyapunov_energy_rate if kappa == 1 else block.energy0_rate
        assert np.all(to_numpy(rate(trajectory.final, kappa)) <= 0)


GELU_MIN_SLOPE = -0.12890414518515442  # min GELU′ = Φ_N(−√2) − √2 φ(√2)


@given(config=configs(), seed=seeds, dt=st.sampled_from([1e-3, 0.3, 1.0, 2.0, 3.0]),
       weight_scale=st.sampled_from([0.5, 2.0]), scale=st.sampled_from([0.3, 3.0]))
def test_euler_step_obeys_the_proven_energy_bound(config, seed, dt, weight_scale, scale):
    """The MixerBlock docstring's bound for x' = x + dt(u − x): E(x') − E(x) ≤
    −((1 − dt)/dt)⟨Δx, Δg⟩ + (ρ/2)‖Δg‖², ρ = −min GELU′·(‖W_t‖₂² + ‖W_c‖₂²), and
    ⟨Δx, Δg⟩ ≥ ‖Δg‖²/M, M = γ/√ε (so E cannot rise for dt ≤ 1/(1 + ρM/2))."""
    params = draw_params(config, seed, weight_scale=weight_scale)
    block = MixerBlock(config, on_backend(params), 0, "scalar")
    x = asarray(draw_state(config, seed, scale))
    x_next = block.integrate(x, dt, 1, kappa=1, method="euler").final
    dx = to_numpy(x_next) - to_numpy(x)
    dg = to_numpy(block.activation(x_next)) - to_numpy(block.activation(x))
    rho = -GELU_MIN_SLOPE * sum(np.linalg.norm(params[f"blocks.0.{mlp}.fc2.weight"], 2) ** 2
                                for mlp in BRANCH_AXIS)
    big_m = float(to_numpy(block.gamma)) / np.sqrt(config.ln_eps)
    rise = to_numpy(block.lyapunov_energy(x_next)) - to_numpy(block.lyapunov_energy(x))
    bound = -(1 - dt) / dt * per_sample_inner(dx, dg) + rho / 2 * per_sample_inner(dg, dg)
    slack = 1e-10 * (1 + np.abs(to_numpy(block.lyapunov_energy(x))))
    assert np.all(rise <= bound + slack)
    assert np.all(per_sample_inner(dx, dg) >= per_sample_inner(dg, dg) / big_m - slack)


def test_mixed_sign_gamma_makes_E0_rise_and_the_descent_check_catches_it():
    """Found by drawing seeds 0, 1, … (γ ~ N(0, 1) per element, x ~ N(0, 1)): about half of
    all draws have dE₀/dt > 0 at x; seed 1 is the first."""
    config = tiny_config()
    params, x0 = draw_params(config, seed=1, gamma="mixed"), draw_state(config, 1, batch=1)
    block = MixerBlock(config, on_backend(params), 0, "per_element")
    assert float(to_numpy(block.energy0_rate(asarray(x0), 0))[0]) > 0.1
    trajectory = block.integrate(asarray(x0), dt=1e-3, n_steps=20, kappa=0)
    energies = to_numpy(trajectory.energies)[:, 0]
    assert np.all(np.diff(energies) > 0) and energies[-1] - energies[0] > 1e-3
    with pytest.raises(AssertionError, match="rose"):
        assert_never_increases(trajectory.energies)


# Found by a hill-climb: autograd ascent of dE₀/dt / (‖u‖²/std x) over x and log γ with
# |log γ| ≤ 0.1, weights of draw_params(seed 7), δ = 0; γ lies in [0.905, 1.105], all positive.
# The ascent finds a rise for 6 of 12 weight seeds (11 of 12 with |log γ| ≤ 0.2). Random draws
# (x ~ N(0, 1), δ ~ N(0, 1)) find none in 32 000 with γ ~ U[0.5, 1.5] or e^{N(0, 1/4)}, and 4
# and 7 in 32 000 with γ ~ e^{N(0, 1)} and e^{N(0, 4)}. At the found x, 99.8% of ‖u‖² lies along
# 1 and x̂, the directions H₀ annuls, where dE₀/dt = −⟨γ⊙u, H₀u⟩ has a cross term of either sign.
POSITIVE_GAMMA = [[0.905, 0.905, 0.925], [0.905, 1.105, 0.905], [0.905, 0.905, 1.105],
                  [0.913, 1.105, 0.905]]
POSITIVE_GAMMA_X0 = [[0.199, 0.147, 0.129], [0.27, -0.198, 0.279], [-1.0, -0.455, 0.855],
                     [0.27, -0.213, 0.236]]


def test_all_positive_gamma_can_make_E0_rise():
    config = tiny_config()
    params = draw_params(config, seed=7, delta_scale=0.0)
    params["blocks.0.norm.weight"] = np.array(POSITIVE_GAMMA)
    block = MixerBlock(config, on_backend(params), 0, "per_element")
    x0 = asarray(np.array([POSITIVE_GAMMA_X0]))
    assert float(to_numpy(block.energy0_rate(x0, 0))[0]) > 0.01
    energies = to_numpy(block.integrate(x0, dt=1e-3, n_steps=20, kappa=0).energies)[:, 0]
    assert np.all(np.diff(energies) > 0)
    # the same state and weights with γ replaced by its mean: descent again
    uniform = MixerBlock(config, on_backend(params), 0, "scalar")
    assert float(to_numpy(uniform.energy0_rate(x0, 0))[0]) < 0


def test_the_unit_euler_step_can_raise_E0_with_scalar_gamma():
    """The block x ← x + u(g) is a unit Euler step: E₀ may rise although dE₀/dt < 0 at x and a
    small step descends. Found by random search over sparse weights of random scale, δ, γ and
    x (3 rises in 96 000 draws; none in 1 600 draws of the 'digits' size with its init weights
    ×1 or ×3 and x of scale 0.1 to 10). Each rise found has hidden pre-activations in GELU's
    concave region (z < −0.75, Φ not convex) and persists with ε → 0."""
    config = tiny_config(grid=1)  # S = 1, C = 3: only the channel MLP matters
    params = draw_params(config, seed=0, delta_scale=0.0)
    params["blocks.0.mlp_tokens.fc2.weight"] = np.zeros((1, 1))
    w_c = np.zeros((12, 3))
    w_c[0, 2], w_c[1, 2], w_c[2, 0] = 1.58, 0.45, 0.69
    params["blocks.0.mlp_channels.fc2.weight"] = w_c
    params["blocks.0.norm.weight"] = np.full((1, 3), 2.5)
    params["blocks.0.norm.bias"] = np.array([[0.22, -2.35, -4.61]])
    block = MixerBlock(config, on_backend(params), 0, "scalar")
    x = asarray(np.array([[[-0.011, 0.0027, 0.0016]]]))
    e0 = float(to_numpy(block.energy0(x))[0])
    assert float(to_numpy(block.energy0_rate(x, 0))[0]) < 0
    assert float(to_numpy(block.energy0(block.unit_step(x)))[0]) > e0 + 0.1
    small_step = block.integrate(x, dt=0.01, n_steps=1, kappa=0, method="euler")
    assert float(to_numpy(small_step.energies[-1])[0]) < e0


def test_euler_step_size_example_reports_the_observed_rises(capsys, tmp_path):
    """examples/euler_step_size.py on init weights (seed 0): no rise at dt = 1, the deepest
    block's E rises for most inputs at dt = 2.2, as docs/ham.md (step sizes) says."""
    path = pathlib.Path(__file__).parents[1] / "examples" / "euler_step_size.py"
    spec = importlib.util.spec_from_file_location("euler_step_size", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--dt", "1", "2.2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("359 test images") and len(lines) == 5
    assert all("dt 1: 0.0%" in line for line in lines[1:])
    assert float(lines[4].split("dt 2.2: ")[1].split("%")[0]) > 50
    assert example.main([str(tmp_path / "missing.npz")]) == 2
    assert "cannot use" in capsys.readouterr().err


# ------------------------------------------------------------------------------- AsymMixer

@given(config=configs("asymmixer"), seed=seeds)
def test_asym_pseudo_energy(config, seed):
    """W₂ = 0: the SymMixer energy with W = W₁. W₂ ≠ 0: that energy plus
    ½⟨g, W₂ᵗᵒᵏ GELU(W₁ᵗᵒᵏ g)⟩ + ½⟨g, GELU(g W₁ᶜʰᵀ) W₂ᶜʰᵀ⟩ (written here with named axes)."""
    params, x = draw_params(config, seed), draw_state(config, seed)
    sym_config = make_config("symmixer", **{k: getattr(config, k) for k in (
        "image_size", "patch", "in_chans", "dim", "depth", "norm", "hidden_ratio")})
    sym_params = {name.replace(".fc1.", ".fc2."): value for name, value in params.items()
                  if not name.endswith("fc2.weight")}
    sym = MixerBlock(sym_config, on_backend(sym_params), 0, "scalar")
    zero_w2 = {name: 0 * v if name.endswith("fc2.weight") else v for name, v in params.items()}
    asym_zero = MixerBlock(config, on_backend(zero_w2), 0, "scalar")
    assert rel_err(asym_zero.pseudo_energy(asarray(x)),
                   to_numpy(sym.lyapunov_energy(asarray(x)))) <= 1e-13
    asym = MixerBlock(config, on_backend(params), 0, "scalar")
    g = to_numpy(sym.activation(asarray(x)))
    w1t, w2t = (params[f"blocks.0.mlp_tokens.{fc}.weight"] for fc in ("fc1", "fc2"))
    w1c, w2c = (params[f"blocks.0.mlp_channels.{fc}.weight"] for fc in ("fc1", "fc2"))
    tokens = np.einsum("bsc,sn,bnc->b", g, w2t, host_gelu(np.einsum("ns,bsc->bnc", w1t, g)))
    channels = np.einsum("bsc,cm,bsm->b", g, w2c, host_gelu(np.einsum("mc,bsc->bsm", w1c, g)))
    expected = to_numpy(sym.lyapunov_energy(asarray(x))) + 0.5 * (tokens + channels)
    assert rel_err(asym.pseudo_energy(asarray(x)), expected) <= 1e-12
    for method in ("lyapunov_energy", "energy0", "dEdg"):
        with pytest.raises(EnergyError, match="no energy"):
            getattr(asym, method)(asarray(x))
    assert asym.integrate(asarray(x), 0.01, 2).energies.shape == (3, 2)


def host_gelu(z):
    """GELU(z) = z·Φ_N(z) on the host, independently of refham."""
    return z * 0.5 * (1.0 + scipy.special.erf(z / np.sqrt(2.0)))


# ------------------------------------------------------------------------------- symmetry

def measures_for(model, edit, depth=2, seed=0):
    config = tiny_config(model, depth=depth)
    params = draw_params(config, seed)
    edit(params)
    return symmetry_measures(config, on_backend(params))


def test_symmetry_measures_on_constructed_weights():
    sym = measures_for("symmixer", lambda p: None)
    assert sorted(sym) == sorted(f"blocks.{i}.{mlp}.{m}" for i in (0, 1) for mlp in BRANCH_AXIS
                                 for m in ("cos", "norm_ratio", "breaking_ratio", "norm_out"))
    json.dumps(sym, allow_nan=False)
    assert all(type(v) is float for v in sym.values())
    for key, value in ((k, v) for k, v in sym.items() if not k.endswith(".norm_out")):
        assert value == pytest.approx({"cos": 1.0, "norm_ratio": 1.0, "breaking_ratio": 0.0}[
            key.rsplit(".", 1)[1]], abs=1e-12), key

    def tie(factor):
        def edit(p):
            for name in [n for n in p if n.endswith("fc1.weight")]:
                p[name.replace("fc1", "fc2")] = factor * p[name].T
        return edit

    for factor, cos, ratio, breaking in ((1.0, 1.0, 1.0, 0.0), (-1.0, -1.0, 1.0, 2.0),
                                         (3.0, 1.0, 3.0, 2.0)):
        for key, value in measures_for("paramixer", tie(factor)).items():
            if key.endswith(".norm_out"):
                continue
            kind = key.rsplit(".", 1)[1]
            assert value == pytest.approx(
                {"cos": cos, "norm_ratio": ratio, "breaking_ratio": breaking}[kind]), key
    # asym W₂ = W₁ᵀ: the applied map is 2W₁ᵀ; the breaking ratio is ‖W₂‖/‖W₁‖ = 1
    asym = measures_for("asymmixer", tie(1.0))
    assert asym["blocks.1.mlp_tokens.cos"] == pytest.approx(1.0)
    assert asym["blocks.1.mlp_tokens.norm_ratio"] == pytest.approx(2.0)
    assert asym["blocks.1.mlp_channels.breaking_ratio"] == pytest.approx(1.0)


def test_symmetry_measures_on_random_weights_use_the_right_matrices():
    config = tiny_config("vanilla", depth=2)
    params = draw_params(config, 3)
    measures = symmetry_measures(config, on_backend(params))
    for i in (0, 1):
        for mlp in BRANCH_AXIS:
            w1, w2 = (params[f"blocks.{i}.{mlp}.{fc}.weight"] for fc in ("fc1", "fc2"))
            cos = np.sum(w2 * w1.T) / (np.linalg.norm(w1) * np.linalg.norm(w2))
            assert measures[f"blocks.{i}.{mlp}.cos"] == pytest.approx(cos, rel=1e-12)
            assert measures[f"blocks.{i}.{mlp}.norm_ratio"] == pytest.approx(
                np.linalg.norm(w2) / np.linalg.norm(w1), rel=1e-12)
            assert measures[f"blocks.{i}.{mlp}.norm_out"] == pytest.approx(np.linalg.norm(w2),
                                                                           rel=1e-12)
    asym_config = tiny_config("asymmixer")
    params = draw_params(asym_config, 3)
    measures = symmetry_measures(asym_config, on_backend(params))
    w1, w2 = (params[f"blocks.0.mlp_channels.{fc}.weight"] for fc in ("fc1", "fc2"))
    assert measures["blocks.0.mlp_channels.breaking_ratio"] == pytest.approx(
        np.linalg.norm(w2) / np.linalg.norm(w1), rel=1e-12)
    assert measures["blocks.0.mlp_channels.norm_out"] == pytest.approx(
        np.linalg.norm(w1.T + w2), rel=1e-12)


# ------------------------------------------------------------------------------- bad input

def test_bad_input_is_rejected():
    config = tiny_config()
    params = on_backend(draw_params(config, 0))
    block = MixerBlock(config, params, 0, "scalar")
    x = asarray(draw_state(config, 0))
    with pytest.raises(EnergyError, match="untied MLPs"):
        MixerBlock(tiny_config("paramixer"), on_backend(draw_params(tiny_config("paramixer"),
                                                                    0)), 0)
    with pytest.raises(EnergyError, match="unknown affine"):
        MixerBlock(config, params, 0, "diagonal")
    with pytest.raises(EnergyError, match="does not exist"):
        MixerBlock(config, params, 1)
    with pytest.raises(TypeError, match="MixerConfig"):
        MixerBlock("symmixer", params, 0)
    negative = dict(params, **{"blocks.0.norm.weight": -params["blocks.0.norm.weight"]})
    with pytest.raises(EnergyError, match="γ > 0"):
        MixerBlock(config, negative, 0, "scalar")
    nan = dict(params, **{"blocks.0.norm.bias": params["blocks.0.norm.bias"] * np.nan})
    with pytest.raises(EnergyError, match="NaN"):
        MixerBlock(config, nan, 0)
    per_element = MixerBlock(config, params, 0)  # the model's own affine: per element
    for method in ("lyapunov_energy", "dEdg"):
        with pytest.raises(EnergyError, match="Lagrangian"):
            getattr(per_element, method)(x)
    with pytest.raises(EnergyError, match="Lagrangian"):
        per_element.integrate(x, 0.1, 2, kappa=1)
    with pytest.raises(EnergyError, match="kappa"):
        block.lyapunov_energy_rate(x, 0.5)
    with pytest.raises(EnergyError, match="record"):
        block.integrate(x, 0.1, 2, record="E")
    with pytest.raises(EnergyError, match="use lyapunov_energy"):
        block.pseudo_energy(x)
    with pytest.raises(EnergyError, match=r"\(B, S, C\)"):
        block.lyapunov_energy(x[0])
    with pytest.raises(EnergyError, match="NaN"):
        block.energy0(x * np.nan)
    with pytest.raises(Exception, match="missing"):
        symmetry_measures(config, {})
