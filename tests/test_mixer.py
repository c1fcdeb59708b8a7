"""refham.mixer: whole-model gradients against autograd, an independent named-axis reference
forward (S ≠ C ≠ N_s, so swapped token/channel axes fail), the SymMixer block as ∇F, AsymMixer
symmetry breaking, drop path, config and input validation, and the timm state interop."""
import dataclasses
import inspect
import pathlib
import re
import sys

import pytest
from tests.oracle import autograd, anp, asp  # (the module skips without autograd)
import numpy as np
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from refham import mixer as M
from refham.backend import asarray, get_dtype, rng, set_dtype, to_numpy
from refham.init_rules import TRUNC_NORMAL_STD
from refham.layers import InputError
from tests.oracle import TOL, autograd_numpy, rel_err

VARIANTS = [("vanilla", False), ("vanilla", True), ("paramixer", False), ("paramixer", True),
            ("symmixer", False), ("asymmixer", False)]


@st.composite
def small_configs(draw, model, bias=False, **fixed):
    """Small configs with S ≠ C (and N_s = int(C/2)·r ≠ N_c = 4C·r by construction)."""
    grid, patch = draw(st.integers(2, 3)), draw(st.integers(1, 2))
    tokens = grid * grid
    dim = draw(st.integers(3, 7).filter(lambda c: c != tokens))  # C = 2: LN output ≈ ±1, flat
    return M.make_config(model, image_size=grid * patch, in_chans=draw(st.integers(1, 2)),
                         patch=patch, dim=dim, depth=draw(st.integers(1, 2)), bias=bias,
                         num_classes=draw(st.integers(2, 4)),
                         hidden_ratio=draw(st.sampled_from([1.0, 1.5])), **fixed)


def random_params(model, seed):
    """Parameters away from the init (whose zero head would zero most gradients)."""
    r = rng(seed)
    return {name: 0.5 * r.standard_normal(shape) + (1.0 if ".norm" in f".{name}" else 0.0)
            for name, shape in model.param_shapes.items()}


def random_batch(config, seed, batch=3):
    r = rng(seed + 1)
    images = r.standard_normal((batch, config.in_chans, config.image_size, config.image_size))
    return images, r.integers(0, config.num_classes, batch)


def on_backend(params):
    return {name: asarray(value) for name, value in params.items()}


def check_loss_and_grads(config, seed, lam, smoothing, drop_seed=None):
    model = M.Mixer(config)
    params, (images, labels) = random_params(model, seed), random_batch(config, seed)
    drop = (lambda: rng(drop_seed)) if drop_seed is not None else (lambda: None)
    loss, logits, grads = model.loss_and_grads(on_backend(params), asarray(images), labels,
                                               lam=lam, label_smoothing=smoothing,
                                               drop_rng=drop())
    with autograd_numpy():
        def objective(p):
            return model.objective(p, images, labels, lam, smoothing, drop())
        expected_loss = objective(params)
        expected = autograd.grad(objective)(params)
    assert abs(loss - expected_loss) <= 1e-12 * abs(expected_loss)
    assert tuple(logits.shape) == (images.shape[0], config.num_classes)
    assert list(grads) == list(model.param_shapes)
    scale = max(np.abs(g).max() for g in expected.values())
    for name in grads:
        if np.abs(expected[name]).max() <= 1e-12 * scale:
            # exactly zero in exact arithmetic, e.g. the token-MLP output bias (a per-token
            # shift) when only per-token norms over C follow: compare absolutely
            assert np.abs(to_numpy(grads[name])).max() <= 1e-12 * scale, name
        else:
            assert rel_err(grads[name], expected[name]) <= TOL, name


@pytest.mark.parametrize("norm", M.NORMS)
@pytest.mark.parametrize("n_iter", [1, 2])
@pytest.mark.parametrize("model, bias", VARIANTS)
@settings(max_examples=8)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_loss_and_grads_match_autograd(model, bias, norm, n_iter, data, seed):
    config = data.draw(small_configs(model, bias, norm=norm, n_iter=n_iter))
    lam = data.draw(st.sampled_from([0.3, 1e-2])) if model == "asymmixer" else 0.0
    check_loss_and_grads(config, seed, lam, data.draw(st.sampled_from([0.0, 0.1])))


@pytest.mark.parametrize("model, bias", VARIANTS)
@settings(max_examples=5)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_loss_and_grads_with_drop_path_match_autograd(model, bias, data, seed):
    config = data.draw(small_configs(model, bias, n_iter=2, drop_path=0.5))
    check_loss_and_grads(config, seed, 0.1 if model == "asymmixer" else 0.0, 0.1, drop_seed=seed)


# --------------------------------------------------------------------------------------------
# An independent forward with named axes: b batch, s tokens, c channels, n/m hidden units
# --------------------------------------------------------------------------------------------
def gelu_np(z):
    return z * 0.5 * (1 + scipy.special.erf(z / np.sqrt(2)))


def reference_logits(config, p, images):
    """The Mixer of the docs (mixer page) written out with loops and einsum on named axes."""
    batch, _, height, width = images.shape
    q, grid = config.patch, config.image_size // config.patch
    kernel = p["stem.proj.weight"]
    x = np.zeros((batch, grid * grid, config.dim))
    for i in range(grid):
        for j in range(grid):
            window = images[:, :, i * q:(i + 1) * q, j * q:(j + 1) * q]
            x[:, i * grid + j] = np.einsum("bkuv,ckuv->bc", window, kernel) + p["stem.proj.bias"]

    def norm(x, prefix, axes):
        mean = x.mean(axis=axes, keepdims=True)
        var = ((x - mean) ** 2).mean(axis=axes, keepdims=True)
        x_hat = (x - mean) / np.sqrt(var + config.ln_eps)
        return x_hat * p[prefix + ".weight"] + p[prefix + ".bias"]

    def mlp(g, pre, mixed, hidden):
        """The MLP mixing axis `mixed` ('s' tokens | 'c' channels) of g[b, s, c] through the
        hidden axis `hidden` ('n' | 'm'); weights (hidden, mixed) or (mixed, hidden)."""
        state = "bsc"
        inner = state.replace(mixed, hidden)

        def bias(name, letter, axes):
            return p[pre + name].reshape([-1 if a == letter else 1 for a in axes]) \
                if config.bias else 0.0

        if config.mlp_kind == "sym":
            w = p[pre + "fc2.weight"]
            a = gelu_np(np.einsum(f"{hidden}{mixed},{state}->{inner}", w, g))
            return np.einsum(f"{hidden}{mixed},{inner}->{state}", w, a)
        w1, w2 = p[pre + "fc1.weight"], p[pre + "fc2.weight"]
        a = gelu_np(np.einsum(f"{hidden}{mixed},{state}->{inner}", w1, g)
                    + bias("fc1.bias", hidden, inner))
        out = np.einsum(f"{mixed}{hidden},{inner}->{state}", w2, a) + bias("fc2.bias", mixed, state)
        if config.mlp_kind == "asym":
            out = out + np.einsum(f"{hidden}{mixed},{inner}->{state}", w1, a)
        return out

    def token_mlp(g, pre):
        return mlp(g, pre, "s", "n")

    def channel_mlp(g, pre):
        return mlp(g, pre, "c", "m")

    axes = (1, 2) if config.norm == "joint" else (2,)
    for i in range(config.depth):
        pre = f"blocks.{i}."
        for _ in range(config.n_iter):
            if config.serial:
                x = x + token_mlp(norm(x, pre + "norm1", axes), pre + "mlp_tokens.")
                x = x + channel_mlp(norm(x, pre + "norm2", axes), pre + "mlp_channels.")
            else:
                g = norm(x, pre + "norm", axes)
                x = x + token_mlp(g, pre + "mlp_tokens.") + channel_mlp(g, pre + "mlp_channels.")
    pooled = norm(x, "norm", (2,)).mean(axis=1)
    return np.einsum("kc,bc->bk", p["head.weight"], pooled) + p["head.bias"]


@pytest.mark.parametrize("norm", M.NORMS)
@pytest.mark.parametrize("model, bias", VARIANTS)
@settings(max_examples=5)
@given(data=st.data(), seed=st.integers(0, 2**31 - 1))
def test_forward_matches_named_axis_reference(model, bias, norm, data, seed):
    config = data.draw(small_configs(model, bias, norm=norm, n_iter=2))
    mixer = M.Mixer(config)
    params, (images, _) = random_params(mixer, seed), random_batch(config, seed)
    logits, _ = mixer.forward(on_backend(params), asarray(images))
    assert rel_err(logits, reference_logits(config, params, images)) <= 1e-11


# --------------------------------------------------------------------------------------------
# SymMixer = gradient step on F; AsymMixer breaks the symmetry
# --------------------------------------------------------------------------------------------
def gelu_lagrangian(x):
    """Φ(x) = ¼(x² + (x² − 1)·erf(x/√2) + x·√(2/π)·e^{−x²/2}), Φ′ = GELU (docs: lagrangians)."""
    return 0.25 * (x**2 + (x**2 - 1) * asp.erf(x / np.sqrt(2))
                   + x * np.sqrt(2 / np.pi) * anp.exp(-x**2 / 2))


def test_gelu_lagrangian_derivative_is_gelu():
    x = np.linspace(-5, 5, 41)
    assert rel_err(autograd.elementwise_grad(gelu_lagrangian)(x), gelu_np(x)) <= 1e-13


def block_setup(model, seed, grid=3, dim=4):
    config = M.make_config(model, image_size=grid, patch=1, dim=dim, depth=1)
    mixer = M.Mixer(config)
    r = rng(seed)
    return mixer, random_params(mixer, seed), r.standard_normal((2, grid * grid, dim))


@given(seed=st.integers(0, 2**31 - 1))
def test_symmixer_block_update_is_gradient_of_F(seed):
    mixer, params, g = block_setup("symmixer", seed)
    w_t, w_c = params["blocks.0.mlp_tokens.fc2.weight"], params["blocks.0.mlp_channels.fc2.weight"]

    def energy_F(g_):  # F(g) = Σ Φ(W_t g) + Σ Φ(g W_cᵀ), hidden layers (B, N_s, C) and (B, S, N_c)
        return anp.sum(gelu_lagrangian(anp.matmul(w_t, g_))) + \
            anp.sum(gelu_lagrangian(anp.matmul(g_, w_c.T)))

    update = mixer.block_update(on_backend(params), 0, asarray(g))
    assert rel_err(update, autograd.grad(energy_F)(g)) <= TOL


def update_jacobian(mixer, params, g):
    with autograd_numpy():
        jac = autograd.jacobian(lambda v: mixer.block_update(params, 0, v))(g[:1])
    return jac.reshape(g[0].size, g[0].size)


@given(seed=st.integers(0, 2**31 - 1))
def test_asym_breaks_symmetry_and_reduces_to_sym_at_zero_w2(seed):
    asym, params, g = block_setup("asymmixer", seed)
    sym = M.Mixer(dataclasses.replace(asym.config, model="symmixer"))
    sym_params = {name.replace("fc1.", "fc2."): value for name, value in params.items()
                  if not name.endswith("fc2.weight")}
    jac_sym = update_jacobian(sym, sym_params, g)
    assert np.abs(jac_sym - jac_sym.T).max() <= 1e-12 * np.abs(jac_sym).max()
    jac_asym = update_jacobian(asym, params, g)
    assert np.abs(jac_asym - jac_asym.T).max() >= 1e-2 * np.abs(jac_asym).max()
    # W₂ = 0: the same update, logits and (for W₁ vs W) gradients as the SymMixer
    zero_w2 = {name: np.zeros_like(v) if name.endswith("fc2.weight") else v
               for name, v in params.items()}
    assert rel_err(asym.block_update(on_backend(zero_w2), 0, asarray(g)),
                   sym.block_update(on_backend(sym_params), 0, asarray(g))) <= 1e-13
    images, labels = random_batch(asym.config, seed)
    loss_a, logits_a, grads_a = asym.loss_and_grads(on_backend(zero_w2), asarray(images), labels)
    loss_s, logits_s, grads_s = sym.loss_and_grads(on_backend(sym_params), asarray(images), labels)
    assert rel_err(logits_a, to_numpy(logits_s)) <= 1e-13 and abs(loss_a - loss_s) <= 1e-13
    for name, grad in grads_s.items():
        assert rel_err(grads_a[name.replace("fc2.", "fc1.")], to_numpy(grad)) <= 1e-12


def test_block_update_is_for_parallel_models():
    mixer, params, g = block_setup("vanilla", 0)
    with pytest.raises(M.ConfigError, match="parallel models"):
        mixer.block_update(params, 0, g)


# --------------------------------------------------------------------------------------------
# Drop path, penalty, init, dtype
# --------------------------------------------------------------------------------------------
def test_drop_path_rate_is_uniform_over_depth_and_masks_drop_whole_samples():
    config = M.make_config("paramixer", image_size=2, patch=1, dim=3, depth=2, drop_path=0.99)
    assert M.drop_path_rates(config) == [0.99, 0.99]  # the paper's code: one rate for every block
    mixer = M.Mixer(config)
    params, (images, _) = random_params(mixer, 0), random_batch(config, 0, batch=2)
    # at rate 0.99 every branch of every block is dropped for this seed
    dropped, _ = mixer.forward(on_backend(params), asarray(images), drop_rng=rng(0))
    without_mlps = {name: np.zeros_like(v) if ".mlp_" in name else v
                    for name, v in params.items()}
    assert rel_err(dropped, mixer.forward(on_backend(without_mlps), images)[0]) <= 1e-13
    assert rel_err(mixer.forward(on_backend(params), images)[0], to_numpy(dropped)) > 1e-3
    mask = to_numpy(M.drop_path_mask(0.25, 20000, rng(1), get_dtype()))
    assert mask.shape == (20000, 1, 1) and set(np.unique(mask)) == {0.0, 1 / 0.75}
    assert abs(mask.mean() - 1.0) < 0.02
    assert M.drop_path_mask(0.25, 3, None, get_dtype()) is None


def test_penalty_is_lambda_sum_of_squared_w2_and_only_for_asym():
    mixer = M.Mixer(M.make_config("asymmixer", image_size=4, patch=2, dim=3, depth=2))
    params = random_params(mixer, 0)
    w2 = [v for n, v in params.items() if n.endswith("fc2.weight")]
    assert len(w2) == 4
    assert mixer.penalty(params, 0.7) == pytest.approx(0.7 * sum((w**2).sum() for w in w2), 1e-14)
    para = M.Mixer(M.make_config("paramixer", image_size=4, patch=2, dim=3, depth=2))
    with pytest.raises(InputError, match="has none"):
        para.penalty(random_params(para, 0), 0.1)
    with pytest.raises(InputError, match="lam must be a finite real number"):
        mixer.penalty(params, -1.0)


def test_init_follows_design():
    config = M.make_config("asymmixer", "digits")
    mixer = M.Mixer(config)
    params = mixer.init(seed=3)
    assert all(rel_err(params[n], mixer.init(seed=3)[n]) == 0 for n in params)
    for name, value in params.items():
        value = to_numpy(value)
        assert value.shape == mixer.param_shapes[name] and value.dtype == get_dtype()
        if name.endswith("bias") or name == "head.weight":
            assert not value.any(), name
        elif ".norm" in f".{name}":
            assert (value == 1).all(), name
        elif name == "stem.proj.weight":
            std = np.sqrt(1 / (config.in_chans * config.patch**2))  # lecun, fan_in = C_in·p·p
            assert np.abs(value).max() <= 2 * std / TRUNC_NORMAL_STD
            assert abs(value.std() / std - 1) < 0.1
        else:  # xavier uniform: U(±√(6/(fan_in + fan_out)))
            bound = np.sqrt(6 / sum(value.shape))
            assert np.abs(value).max() <= bound and np.abs(value).max() > 0.9 * bound, name
            assert abs(value.std() / (bound / np.sqrt(3)) - 1) < 0.1, name


def docstring_parameter_table():
    """[(name regex, allowed shapes as symbol tuples, models)] from the table in Mixer's
    docstring; models: those its role names (all when it names none)."""
    lines = inspect.getdoc(M.Mixer).splitlines()
    rules = [i for i, line in enumerate(lines) if line.startswith("=====")]
    name_width, shape_end = lines[rules[0]].index(" "), lines[rules[0]].rindex(" ")
    rows = []
    for line in lines[rules[1] + 1:rules[2]]:
        if line[:name_width].strip():
            segments = line.split()[0].split(".")
            pattern = r"\.".join(r"\d+" if seg == "{i}" else ".+" if seg == "…" else f"({seg})"
                                  for seg in segments)
            rows.append((re.compile(pattern + "$"), [], []))
        rows[-1][1].extend(re.findall(r"\(([^)]*)\)", line[name_width:shape_end]))
        rows[-1][2].append(line[shape_end:])
    table = []
    for pattern, shapes, role in rows:
        models = {m for m in M.MODELS if re.search(rf"\b{m}\b", " ".join(role))}
        table.append((pattern, {tuple(p.strip() for p in shape.split(",") if p.strip())
                                for shape in shapes}, models or set(M.MODELS)))
    return table


def test_docstring_parameter_table_is_the_parameters():
    """Every parameter of every variant has a row in the Mixer docstring's table for its model,
    with its shape (the fc2 trap: (S, N_s) or (N_s, S) by model); every row is used (sizes all
    distinct)."""
    table = docstring_parameter_table()
    symbols = {"S": 16, "C": 10, "N_s": 5, "N_c": 40, "C_in": 3, "p": 2, "K": 4}
    used = set()
    for model, bias in VARIANTS:
        for norm in M.NORMS:
            config = M.make_config(model, image_size=8, patch=2, in_chans=3, dim=10,
                                   num_classes=4, depth=2, bias=bias, norm=norm)
            for name, shape in M.param_shapes(config).items():
                rows = [i for i, (pattern, _, models) in enumerate(table)
                        if pattern.match(name) and model in models]
                assert rows, f"{name} of {model} has no row in the table"
                used.update(rows)
                shapes = {tuple(symbols[s] for s in allowed) for i in rows
                          for allowed in table[i][1]}
                assert not shapes or shape in shapes, (model, name, shape, shapes)
    assert used == set(range(len(table)))


def test_init_numbers_are_pinned():
    """The init rules draw the same numbers as when the golden files and runs were made."""
    params = M.Mixer(M.make_config("asymmixer", "digits")).init(seed=3)
    assert np.array_equal(to_numpy(params["blocks.1.mlp_channels.fc2.weight"])[:2, :2].round(8),
                          [[-0.09890886, -0.02712957], [0.09238809, 0.07466651]])
    assert np.array_equal(to_numpy(params["stem.proj.weight"])[0, 0, 0].round(8),
                          [-0.71411489, -0.3855708])


def test_float32_end_to_end():
    config = M.make_config("asymmixer", image_size=4, patch=2, dim=3, depth=2, num_classes=3)
    mixer = M.Mixer(config)
    params64, (images, labels) = random_params(mixer, 0), random_batch(config, 0)
    loss64, _, grads64 = mixer.loss_and_grads(on_backend(params64), images, labels, lam=0.1)
    set_dtype("float32")
    try:
        params = on_backend(params64)
        loss, logits, grads = mixer.loss_and_grads(params, images, labels, lam=0.1)
        assert mixer.init(0)["stem.proj.weight"].dtype == np.float32
    finally:
        set_dtype("float64")
    assert logits.dtype == np.float32
    assert all(g.dtype == np.float32 for g in grads.values())
    assert abs(loss - loss64) <= 1e-5 * abs(loss64)
    assert all(rel_err(grads[n], grads64[n]) <= 1e-4 for n in grads)


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model, size, overrides, match", [
    ("mixer", "digits", {}, "unknown model 'mixer': choose one of vanilla, paramixer"),
    ("symmixer", "xl", {}, "unknown size 'xl': choose one of s16"),
    ("symmixer", "digits", {"norm": "token"}, "unknown norm 'token': choose one of joint"),
    ("symmixer", "digits", {"width": 3}, "unknown config field.* width"),
    ("symmixer", "digits", {"patch": 3}, "patch 3 does not divide image_size 8"),
    ("symmixer", "digits", {"dim": 0}, "dim must be an integer ≥ 1"),
    ("symmixer", "digits", {"depth": 2.0}, "depth must be an integer ≥ 1"),
    ("symmixer", "digits", {"n_iter": 0}, "n_iter must be an integer ≥ 1"),
    ("symmixer", "digits", {"num_classes": True}, "num_classes must be an integer ≥ 1"),
    ("symmixer", "digits", {"bias": True}, "bias=True is for the vanilla MLPs"),
    ("asymmixer", "digits", {"bias": True}, "bias=True is for the vanilla MLPs"),
    ("paramixer", "digits", {"bias": 1}, "bias must be True or False"),
    ("paramixer", "digits", {"drop_path": 1.0}, r"drop_path must be in \[0, 1\)"),
    ("paramixer", "digits", {"drop_path": -0.1}, r"drop_path must be in \[0, 1\)"),
    ("paramixer", "digits", {"hidden_ratio": 0.0}, "hidden_ratio must be a finite real number > 0"),
    ("paramixer", "digits", {"dim": 3, "hidden_ratio": 0.5}, r"no hidden units \(N_s = 0\)"),
    ("paramixer", "digits", {"ln_eps": 0.0}, "ln_eps must be a finite real number > 0"),
])
def test_config_validation(model, size, overrides, match):
    with pytest.raises(M.ConfigError, match=match):
        M.make_config(model, size, **overrides)


def test_sizes_and_derived_properties():
    s16 = M.make_config("vanilla", "s16")
    assert (s16.num_tokens, s16.dim, s16.token_hidden, s16.channel_hidden) == (196, 512, 256, 2048)
    assert s16.serial and s16.mlp_kind == "vanilla"
    l32, b32 = M.make_config("asymmixer", "l32"), M.make_config("symmixer", "b32")
    assert (l32.depth, l32.dim, l32.num_tokens, b32.depth, b32.dim) == (24, 1024, 49, 12, 768)
    digits = M.make_config("symmixer", hidden_ratio=1.5)
    assert (digits.num_tokens, digits.token_hidden, digits.channel_hidden) == (16, 48, 384)
    assert not digits.serial and digits.mlp_kind == "sym"
    odd = M.make_config("symmixer", dim=7, hidden_ratio=1.5)  # int(int(3.5)·1.5), not int(5.25)
    assert (odd.token_hidden, odd.channel_hidden) == (4, 42)
    with pytest.raises(TypeError, match="MixerConfig"):
        M.Mixer("symmixer")


def test_input_validation():
    config = M.make_config("paramixer", image_size=4, in_chans=3, patch=2, dim=5, depth=1)
    mixer = M.Mixer(config)
    params = mixer.init(0)
    images, labels = random_batch(config, 0, batch=2)
    with pytest.raises(InputError, match=r"looks like NHWC; transpose to \(B, C_in, H, W\)"):
        mixer.forward(params, images.transpose(0, 2, 3, 1))
    with pytest.raises(InputError, match=r"= \(B, 3, 4, 4\) for this config, got shape \(3, 4, 4\)"):
        mixer.forward(params, images[0])
    with pytest.raises(InputError, match="NaN or inf"):
        mixer.forward(params, np.where(images > 1, np.nan, images))
    with pytest.raises(InputError, match="must lie in"):
        mixer.loss_and_grads(params, images, labels + config.num_classes)
    with pytest.raises(InputError, match="labels must have shape"):
        mixer.loss_and_grads(params, images, labels[:, None])
    logits, cache = mixer.forward(params, images)
    with pytest.raises(InputError, match="dlogits must have the logits' shape"):
        mixer.backward(params, cache, logits[:, :-1])
    broken = dict(params, extra=params["head.bias"])
    del broken["head.weight"]
    broken["norm.bias"] = params["norm.bias"][:-1]
    with pytest.raises(M.ParamError, match=r"missing: head.weight; unexpected: extra; wrong shape:"
                                           r" norm.bias: \(4,\), expected \(5,\)"):
        mixer.forward(broken, images)


# --------------------------------------------------------------------------------------------
# timm names (docs: mixer, parameter table)
# --------------------------------------------------------------------------------------------
def expected_state_shapes(model, norm, bias):
    """Names and shapes of the paper's models for C_in 2, p 2, S = 4, C = 6 (N_s 3, N_c 24),
    depth 2, K 5, written out from the docs' parameter table in state_dict order."""
    S, C, Ns, Nc = 4, 6, 3, 24
    ln = (S, C) if norm == "joint" else (C,)

    def mlp(prefix, n, h):
        if model == "symmixer":
            return {prefix + "fc2.weight": (h, n)}
        biases = bias and model in ("vanilla", "paramixer")
        return {prefix + "fc1.weight": (h, n), **({prefix + "fc1.bias": (h,)} if biases else {}),
                prefix + "fc2.weight": (n, h), **({prefix + "fc2.bias": (n,)} if biases else {})}

    shapes = {"stem.proj.weight": (C, 2, 2, 2), "stem.proj.bias": (C,)}
    for i in range(2):
        b = f"blocks.{i}."
        if model == "vanilla":
            shapes.update({b + "norm1.weight": ln, b + "norm1.bias": ln,
                           **mlp(b + "mlp_tokens.", S, Ns),
                           b + "norm2.weight": ln, b + "norm2.bias": ln,
                           **mlp(b + "mlp_channels.", C, Nc)})
        else:
            shapes.update({b + "norm.weight": ln, b + "norm.bias": ln,
                           **mlp(b + "mlp_tokens.", S, Ns), **mlp(b + "mlp_channels.", C, Nc)})
    return {**shapes, "norm.weight": (C,), "norm.bias": (C,), "head.weight": (5, C),
            "head.bias": (5,)}


@pytest.mark.parametrize("norm", M.NORMS)
@pytest.mark.parametrize("model, bias", VARIANTS)
def test_timm_state_names_shapes_and_round_trip(model, bias, norm):
    config = M.make_config(model, image_size=4, in_chans=2, patch=2, dim=6, depth=2,
                           num_classes=5, norm=norm, bias=bias)
    params = M.Mixer(config).init(seed=1)
    state = M.to_timm_state(config, params)
    assert [(k, v.shape) for k, v in state.items()] == \
        list(expected_state_shapes(model, norm, bias).items())
    assert all(type(v) is np.ndarray for v in state.values())
    back = M.from_timm_state(config, state)
    assert list(back) == list(state) and all(rel_err(back[k], state[k]) == 0 for k in state)
    with pytest.raises(M.ParamError, match="missing: head.bias"):
        M.from_timm_state(config, {k: v for k, v in state.items() if k != "head.bias"})
    with pytest.raises(M.ParamError, match=r"unexpected: blocks.9.norm.weight"):
        M.from_timm_state(config, {**state, "blocks.9.norm.weight": state["norm.weight"]})
    with pytest.raises(M.ParamError, match=r"wrong shape: stem.proj.weight: \(6, 2, 4\)"):
        M.from_timm_state(config, {**state, "stem.proj.weight": np.ones((6, 2, 4))})
    with pytest.raises(M.ParamError, match="NaN or inf in head.weight"):
        M.from_timm_state(config, {**state, "head.weight": np.full((5, 6), np.inf)})


# --------------------------------------------------------------------------------------------
# PyTorch cross-check (skipped without torch): the paper's models in examples/torch_mixer.py,
# with timm's module names, load our state with strict=True and agree in float64
# --------------------------------------------------------------------------------------------
def torch_mixer(config):
    torch = pytest.importorskip("torch")
    examples = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import torch_mixer as peer
    return torch, peer.TorchMixer(config).double()


@pytest.mark.parametrize("norm", M.NORMS)
@pytest.mark.parametrize("model, bias", VARIANTS)
def test_agrees_with_pytorch_model_loaded_by_timm_names(model, bias, norm):
    config = M.make_config(model, image_size=6, in_chans=2, patch=2, dim=5, depth=2, n_iter=2,
                           num_classes=4, norm=norm, bias=bias)
    torch, reference = torch_mixer(config)
    mixer = M.Mixer(config)
    params, (images, labels) = random_params(mixer, 7), random_batch(config, 7)
    lam = 0.2 if model == "asymmixer" else 0.0
    state = M.to_timm_state(config, on_backend(params))
    assert list(reference.state_dict()) == list(state)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    logits_ref = reference(torch.from_numpy(images))
    loss_ref = torch.nn.functional.cross_entropy(logits_ref, torch.from_numpy(labels),
                                                 label_smoothing=0.1)
    loss_ref = loss_ref + lam * sum((p**2).sum() for n, p in reference.named_parameters()
                                    if n.endswith("fc2.weight") and model == "asymmixer")
    loss_ref.backward()
    loss, logits, grads = mixer.loss_and_grads(on_backend(params), images, labels, lam=lam,
                                               label_smoothing=0.1)
    assert rel_err(logits, logits_ref.detach().numpy()) <= 1e-12
    assert abs(loss - loss_ref.item()) <= 1e-12 * abs(loss)
    torch_grads = {n: p.grad.numpy() for n, p in reference.named_parameters()}
    assert list(torch_grads) == list(grads)
    scale = max(np.abs(g).max() for g in torch_grads.values())
    for name, grad in grads.items():  # absolute floor: structurally zero gradients (see above)
        assert np.abs(to_numpy(grad) - torch_grads[name]).max() <= \
            1e-10 * max(np.abs(torch_grads[name]).max(), 1e-4 * scale), name
    round_trip = M.from_timm_state(config, reference.state_dict())
    assert all(rel_err(round_trip[n], params[n]) == 0 for n in params)
