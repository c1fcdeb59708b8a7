"""Implementations nobody here wrote, checked with refham.testing as their users would: the PyPI
package mlp-mixer-pytorch, timm's MlpMixer and hamux's HAM (JAX). Each runs where its package is
installed (the `peers` extra: pip install -e ".[peers]" after the CPU torch wheel) and skips,
with the reason, elsewhere. The adapters here are the worked examples of docs/oracle.md."""
import contextlib
import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refham.backend import to_numpy
from refham.mixer import Mixer, MixerConfig
from refham.testing import assert_matches, check_case, check_ham_implementation, mixer_reference
from refham.testing.strategies import HAMCase


# --------------------------------------------------------------------------------------------
# mlp-mixer-pytorch (lucidrains): nn.Sequential(Rearrange, Linear, blocks, LayerNorm, Reduce,
# Linear); each block two PreNormResidual(LayerNorm over C, FeedForward): token mixing with
# Conv1d(kernel 1) over the S patches, channel mixing with Linear. In its 0.3 release the token
# MLP is expansion_factor·C wide and the channel MLP expansion_factor_token·C.
# --------------------------------------------------------------------------------------------
def mlp_mixer_pytorch_config(image_size, channels, patch_size, dim, depth, num_classes,
                             expansion_factor=4, expansion_factor_token=0.5):
    """The refham MixerConfig of mlp_mixer_pytorch.MLPMixer(...): the vanilla (serial) Mixer,
    per-token norms with PyTorch's ε = 1e-5, MLP biases, and its hidden widths."""
    return MixerConfig(model="vanilla", image_size=image_size, in_chans=channels,
                       patch=patch_size, dim=dim, depth=depth, num_classes=num_classes,
                       norm="channel", bias=True, ln_eps=1e-5,
                       token_hidden_units=int(expansion_factor * dim),
                       channel_hidden_units=int(expansion_factor_token * dim))


def mlp_mixer_pytorch_names(config):
    """{refham (timm) name: (its state_dict name, to its layout, back to refham's)}."""
    same = (lambda w: w, lambda w: w)
    conv1d = (lambda w: w[..., None], lambda w: w[..., 0])        # (out, in) ↔ (out, in, 1)
    p, c_in, dim = config.patch, config.in_chans, config.dim
    stem = (lambda w: w.transpose(0, 2, 3, 1).reshape(dim, p * p * c_in),   # (p1 p2 c) order
            lambda w: w.reshape(dim, p, p, c_in).transpose(0, 3, 1, 2))
    names = {"stem.proj.weight": ("1.weight", *stem), "stem.proj.bias": ("1.bias", *same)}
    for i in range(config.depth):
        block = f"{2 + i}"
        for ours, theirs, layout in (("norm1", "0.norm", same), ("norm2", "1.norm", same),
                                     ("mlp_tokens.fc1", "0.fn.0", conv1d),
                                     ("mlp_tokens.fc2", "0.fn.3", conv1d),
                                     ("mlp_channels.fc1", "1.fn.0", same),
                                     ("mlp_channels.fc2", "1.fn.3", same)):
            names[f"blocks.{i}.{ours}.weight"] = (f"{block}.{theirs}.weight", *layout)
            names[f"blocks.{i}.{ours}.bias"] = (f"{block}.{theirs}.bias", *same)
    final, head = 2 + config.depth, 4 + config.depth
    names.update({"norm.weight": (f"{final}.weight", *same), "norm.bias": (f"{final}.bias", *same),
                  "head.weight": (f"{head}.weight", *same), "head.bias": (f"{head}.bias", *same)})
    return names


@pytest.fixture(scope="module")
def mlp_mixer_pytorch():
    torch = pytest.importorskip("torch", reason="PyTorch CPU wheel not installed")
    pytest.importorskip("einops", reason="einops (the peers extra) not installed")
    peer = pytest.importorskip("mlp_mixer_pytorch",
                               reason="mlp-mixer-pytorch not installed (the peers extra)")
    return torch, peer


@settings(max_examples=6)
@given(st.data())
def test_mlp_mixer_pytorch_matches_refham(mlp_mixer_pytorch, data):
    """Its own initialisation, mapped onto refham; forward, loss and every gradient."""
    torch, peer = mlp_mixer_pytorch
    patch, grid = data.draw(st.integers(1, 2)), data.draw(st.integers(1, 3))
    sizes = dict(image_size=patch * grid, channels=data.draw(st.integers(1, 3)),
                 patch_size=patch, dim=data.draw(st.integers(2, 8)),
                 depth=data.draw(st.integers(1, 2)), num_classes=data.draw(st.integers(2, 5)))
    batch, seed = data.draw(st.integers(1, 3)), data.draw(st.integers(0, 2 ** 16))
    profile = data.draw(st.sampled_from(("float64", "float32")))
    config = mlp_mixer_pytorch_config(**sizes)
    torch.manual_seed(seed)
    model = peer.MLPMixer(**sizes).to(getattr(torch, profile))
    names = mlp_mixer_pytorch_names(config)
    state = model.state_dict()
    assert set(state) == {theirs for theirs, _, _ in names.values()}
    params = {ours: back(state[theirs].double().numpy())
              for ours, (theirs, _, back) in names.items()}
    generator = np.random.default_rng(seed)
    images = generator.standard_normal((batch, config.in_chans, config.image_size,
                                        config.image_size))
    labels = generator.integers(0, config.num_classes, batch)
    block_outputs = {}
    for i in range(config.depth):
        model[2 + i].register_forward_hook(
            lambda module, args, out, i=i: block_outputs.__setitem__(f"block/{i}/out", out))
    logits = model(torch.from_numpy(images).to(getattr(torch, profile)))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    grads = {f"grad/{ours}": back(dict(model.named_parameters())[theirs].grad.double().numpy())
             for ours, (theirs, _, back) in names.items()}
    reference = mixer_reference(config, params, images, labels)
    assert_matches(reference, {"output/logits": logits, "output/loss": loss, **grads,
                               **block_outputs}, profile)


def test_the_mlp_mixer_pytorch_layouts_go_both_ways():
    config = mlp_mixer_pytorch_config(4, 3, 2, 5, 1, 4)
    params = Mixer(config).init(0)
    for ours, (_, there, back) in mlp_mixer_pytorch_names(config).items():
        value = to_numpy(params[ours]) + np.arange(np.size(params[ours])).reshape(
            np.shape(params[ours]))
        np.testing.assert_array_equal(back(there(value)), value)


# --------------------------------------------------------------------------------------------
# timm's MlpMixer: the paper's code builds on it, and refham keeps its names and layouts
# --------------------------------------------------------------------------------------------
def test_timm_mlp_mixer_matches_refham():
    torch = pytest.importorskip("torch", reason="PyTorch CPU wheel not installed")
    try:
        from timm.models.mlp_mixer import MlpMixer
    except Exception as exc:  # ImportError, or torchvision's own error on a mismatched torch
        # justified: timm's import itself fails here (no torchvision for the CPU torch wheel),
        # so the client cannot be built; where timm imports, the test runs
        pytest.skip(f"timm does not import here ({type(exc).__name__}): it needs a torchvision "
                    f"built for the installed torch, which the CPU torch wheel used in CI lacks")
    import functools
    from refham.mixer import make_config, to_timm_state
    config = make_config("vanilla", image_size=8, in_chans=2, patch=2, dim=6, depth=2,
                         num_classes=4, norm="channel", bias=True)
    model = MlpMixer(num_classes=4, img_size=8, in_chans=2, patch_size=2, num_blocks=2,
                     embed_dim=6, mlp_ratio=(0.5, 4.0),
                     norm_layer=functools.partial(torch.nn.LayerNorm, eps=1e-6)).double()
    generator = np.random.default_rng(0)
    params = {k: to_numpy(v) + 0.1 * generator.standard_normal(np.shape(v))
              for k, v in Mixer(config).init(0).items()}
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           to_timm_state(config, params).items()}, strict=True)
    images = generator.standard_normal((3, 2, 8, 8))
    labels = generator.integers(0, 4, 3)
    logits = model(torch.from_numpy(images))
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(labels))
    loss.backward()
    reference = mixer_reference(config, params, images, labels)
    candidate = {"output/logits": logits, "output/loss": loss,
                 **{f"grad/{n}": p.grad for n, p in model.named_parameters()}}
    outputs = {k: v for k, v in reference.tensors.items() if not k.startswith("block/")}
    assert_matches(type(reference)(outputs, reference.sensitivity), candidate, "float64")


# --------------------------------------------------------------------------------------------
# hamux (JAX): the same HAM built from refham's, energies, ∂E/∂g, dE/dt and Euler steps
# --------------------------------------------------------------------------------------------
HAMUX_LAGRANGIANS = ("identity", "relu", "repu", "tanh", "sigmoid", "softmax", "layernorm",
                     "spherical")


@pytest.fixture(scope="module")
def hamux():
    pytest.importorskip("jax", reason="jax not installed (the peers extra)")
    hamux = pytest.importorskip("hamux", reason="hamux not installed (the peers extra)")
    import jax
    jax.config.update("jax_enable_x64", True)   # float64 where the arrays are float64
    return hamux


def hamux_lagrangian(hamux, lagrangian):
    """hamux's Lagrangian function for a refham Lagrangian (same definitions, same parameters)."""
    import functools
    kind = lagrangian.name
    if kind in ("layernorm", "spherical"):
        function = hamux.lagr_layernorm if kind == "layernorm" else hamux.lagr_spherical_norm
        return functools.partial(function, gamma=lagrangian.gamma, delta=lagrangian.delta,
                                 eps=lagrangian.eps)
    if kind == "repu":
        return functools.partial(hamux.lagr_repu, n=lagrangian.n)
    if kind in ("tanh", "sigmoid", "softmax"):
        return functools.partial(getattr(hamux, f"lagr_{kind}"), beta=lagrangian.beta)
    return getattr(hamux, f"lagr_{kind}")


def hamux_candidate(hamux, case, dtype):
    """Every output of a HAM golden file computed by hamux (via `ham.energy_tree`, `dEdact` and
    the activations' JVP), on refham's graph, states and weights in `dtype`."""
    import jax
    import jax.numpy as jnp
    net = case.net
    with contextlib.redirect_stdout(io.StringIO()):   # hamux's NeuronLayer prints "Post init"
        neurons = {name: hamux.NeuronLayer(hamux_lagrangian(hamux, layer.lagrangian),
                                           layer.shape) for name, layer in net.layers.items()}
    synapses = {name: hamux.LinearSynapse(jnp.asarray(w.astype(dtype)))
                for name, w in case.weights.items()}
    connections = [(tuple(s.layers), name) for name, s in net.synapses.items()]
    ham = hamux.HAM(neurons, synapses, connections).vectorize()
    tau = {name: layer.tau for name, layer in net.layers.items()}

    @jax.jit   # one compilation per graph, instead of one per operation and shape
    def outputs(xs):
        gs = ham.activations(xs)
        tree = ham.energy_tree(gs, xs)
        dEdg = ham.dEdact(gs, xs)
        velocity = {name: -dEdg[name] / tau[name] for name in xs}
        _, hessian_velocity = jax.jvp(ham.activations, (xs,), (velocity,))
        out = {**{f"output/activation/{n}": g for n, g in gs.items()},
               **{f"output/energy/layers/{n}": e for n, e in tree["neurons"].items()},
               **{f"output/energy/synapses/{name}": e
                  for (_, name), e in zip(connections, tree["connections"])},
               "output/energy/total": ham.energy(gs, xs),
               **{f"output/dEdg/{n}": d for n, d in dEdg.items()},
               "output/dEdt": -sum(tau[n] * (velocity[n] * hessian_velocity[n]).sum(-1)
                                   for n in xs)}
        for k in range(1, case.steps + 1):
            step = ham.dEdact(ham.activations(xs), xs)
            xs = {n: x - case.alpha / tau[n] * step[n] for n, x in xs.items()}
            prefix = "output/step/" if case.steps == 1 else f"output/step/{k}/"
            out.update({f"{prefix}{n}": x for n, x in xs.items()})
        return out

    out = outputs({name: jnp.asarray(x.astype(dtype)) for name, x in case.states.items()})
    return {name: np.asarray(value) for name, value in out.items()}


def compared_names(case):
    """Every output but the neuron energies of layer-norm and spherical layers (and so the
    total): hamux writes those as ⟨x, g⟩ − L, which cancels (the finding below)."""
    normalised = {n for n, layer in case.net.layers.items()
                  if layer.lagrangian.name in ("layernorm", "spherical")}
    return ["output/activation/*", "output/energy/synapses/*", "output/dEdg/*", "output/dEdt",
            "output/step/*"] + [f"output/energy/layers/{n}" for n in case.net.layers
                                if n not in normalised] + \
        ([] if normalised else ["output/energy/total"])


@pytest.mark.parametrize("profile", ["float64", "float32"])
def test_hamux_matches_refham_on_drawn_graphs(hamux, profile):
    check_ham_implementation(lambda case: hamux_candidate(hamux, case, profile), profile,
                             names=compared_names, max_examples=5,
                             lagrangians=HAMUX_LAGRANGIANS)


def layernorm_case(state_scale):
    """The finding's reproduction: v (layernorm over 16) — h (relu, 8), one dense synapse."""
    return HAMCase({"layers": {"v": [[16], "layernorm", {"eps": 1e-5}, 1.0],
                               "h": [[8], "relu", {}, 1.0]},
                    "synapses": {"W": ["v", "h"]}, "batch": 2, "seed": 0,
                    "state_scale": state_scale, "weight_scale": 0.1, "alpha": 0.1, "steps": 1})


@pytest.mark.parametrize("profile, scale", [("float64", 1e3), ("float32", 10.0)])
def test_finding_hamux_layernorm_energy_loses_precision_at_large_state_scales(
        hamux, profile, scale):
    """hamux computes a neuron's energy as ⟨x, g⟩ − L(x). For a layer norm that is
    γDσ·var/(var + ε) − γDσ = −γDε/σ: two terms of size γDσ cancelling to one of size γDε/σ, a
    relative error of about u·σ²/ε (σ² the variance of x over the layer), beyond the float64
    profile from σ² ≈ 1e3·ε and O(1) in float32 from σ ≈ 10. refham writes it in closed form.
    Everything else agrees."""
    case = layernorm_case(scale)
    outputs = hamux_candidate(hamux, case, profile)
    with pytest.raises(AssertionError, match="NOT OK +output/energy/layers/v"):
        check_case(case, lambda c: outputs, profile, ["output/energy/layers/v"])
    check_case(case, lambda c: outputs, profile,   # everything else agrees
               ["output/activation/*", "output/dEdg/*", "output/dEdt", "output/step/*",
                "output/energy/synapses/*", "output/energy/layers/h"])
