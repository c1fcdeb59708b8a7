"""Golden files: refham as a test oracle for faster implementations (:ref:`sec-oracle`;
llm.c-style).

A golden file is a plain .npz (no pickle, written atomically) of float64 tensors keyed by name.
Parameters use timm's names and PyTorch's layouts — refham stores exactly those layouts (Linear
weights (out, in), the stem a Conv2d kernel (C, C_in, p, p)), so there is no conversion either way.

Mixer golden (`mixer_golden`; the keys in this order):

    meta/config            0-d str: JSON of every setting, the MixerConfig, refham and format
                           versions
    input/images           (B, C_in, H, W)    standard normal
    input/labels           (B,) int64         in [0, K)
    param/<timm name>      as in the paper's state_dict(): init(seed) + perturb·N(0,1), so no
                           gradient is structurally zero (the init's zero head would zero them all)
    output/logits          (B, K)
    output/loss            ()                 J = CE_s(logits, labels) + λ Σ_blocks ‖W₂‖²
    grad/<timm name>       ∂J/∂θ, shaped like the parameter
    block/<i>/out          (B, S, C)          block i's output (after its n_iter iterations)
    block/<i>/energy       (B, n_iter + 1)    SymMixer only: E₀(x⁽ᵗ⁾) = −F(g(x⁽ᵗ⁾)) (M4),
                           t = 0..n_iter, x⁽⁰⁾ the block's input; g the block's own LN with its
                           per-element affine
    train/losses           (K_steps,)         with steps > 0: J before each of the AdamW steps
    train/param/<name>     the parameters after them (same batch every step, constant lr,
                           timm's weight-decay grouping: ndim ≥ 2 and not a bias)

HAM golden (`ham_golden`, the Energy MetaFormer's s — v — c HAM of :ref:`sec-metaformer`):

    input/state/<A>              (B, n_A)  x_A for A in s, v, c: state_scale·N(0,1)
    param/sv, param/vc           (N_h, D), (D, N_h):
                                 E_sv = −⟨g_s, W_sv g_v⟩, E_vc = −⟨g_v, W_vc g_c⟩
    output/activation/<A>        g_A(x_A)  (relu, layernorm over D, relu)
    output/energy/layers/<A>     (B,)  ⟨x_A, g_A⟩ − L_A(x_A)
    output/energy/synapses/<s>   (B,)  E_s
    output/energy/total          (B,)  E (H1)
    output/dEdg/<A>              ∂E/∂g_A (H2)
    output/dEdt                  (B,)  (H4)
    output/step/<A>              x_A − α ∂E/∂g_A, one descent step (H5)

`write_golden` / `read_golden` store and load them; refham.oracle.check compares a candidate.
"""
import contextlib
import dataclasses
import inspect
import json
import os

import numpy

from refham import __version__
from refham.backend import asarray, get_dtype, rng, set_dtype, to_numpy, xp
from refham.checks import finite_real, integer_at_least
from refham.fast.settings import compiled_enabled, use_compiled
from refham.files.checkpoint import read_npz
from refham.files.memory import mixer_bytes, require, require_three_layer_ham
from refham.mixer import Mixer, make_config
from refham.optim import AdamW
from refham.files.outputs import atomic_write, check_output_file
from refham.errors import RefhamError, short_list

FORMAT = "refham-golden"
FORMAT_VERSION = 1
META_KEY = "meta/config"
HAMS = ("metaformer",)


class GoldenError(RefhamError, ValueError):
    """Bad golden-file settings, or a file that is not a readable golden (or candidate) file."""


def setting_defaults(writer):
    """{setting: default} of a golden writer (mixer_golden or ham_golden): its keyword-only
    parameters, which the CLI exposes as options."""
    return {name: p.default for name, p in inspect.signature(writer).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY}


@contextlib.contextmanager
def computing_in_float64():
    """Golden values are always the definitions' own numbers in float64, whatever the session's
    default dtype: the elementwise chains run as written (refham.fast.compiled's loops, where
    numba is installed, may differ from them in the last bits)."""
    saved = get_dtype(), compiled_enabled()
    set_dtype("float64")
    use_compiled(False)
    try:
        yield
    finally:
        set_dtype(saved[0])
        use_compiled(saved[1])


def _meta(kind, settings, **extra):
    """The meta/config entry: a 0-d unicode array holding JSON (loads without pickle)."""
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "refham_version": __version__,
            "kind": kind, "dtype": "float64", "settings": settings, **extra}
    return numpy.array(json.dumps(meta, sort_keys=True))


def _host(tensors):
    """{name: host float64 (or integer) NumPy array}."""
    return {name: numpy.asarray(to_numpy(value)) for name, value in tensors.items()}


# ---------------------------------------------------------------------------------------------
# Mixer golden files
# ---------------------------------------------------------------------------------------------
def mixer_golden(model, *, size="digits", n_iter=1, norm="joint", lam=0.0, label_smoothing=0.0,
                 batch=2, seed=0, steps=0, lr=1e-3, weight_decay=0.05, perturb=0.02,
                 **overrides):
    """The golden tensors of one Mixer (see the module docstring for the keys) as a dict of host
    float64 arrays. Parameters: Mixer(config).init(seed) + perturb·N(0,1); the perturbation,
    then the images, then the labels are drawn from rng(seed + 1). `overrides` are further
    MixerConfig fields (dim=, depth=, num_classes=, bias=, hidden_ratio=, …)."""
    settings = dict(model=model, size=size, n_iter=n_iter, norm=norm, lam=lam,
                    label_smoothing=label_smoothing, batch=batch, seed=seed, steps=steps, lr=lr,
                    weight_decay=weight_decay, perturb=perturb, overrides=overrides)
    batch, seed, steps = (integer_at_least(name, value, least, GoldenError) for name, value, least
                          in (("batch", batch, 1), ("seed", seed, 0), ("steps", steps, 0)))
    lr = finite_real("lr", lr, GoldenError)
    perturb = finite_real("perturb", perturb, GoldenError, allow_zero=True)
    optimizer = AdamW(weight_decay=finite_real("weight_decay", weight_decay, GoldenError,
                                               allow_zero=True))
    with computing_in_float64():
        config = make_config(model, size, n_iter=n_iter, norm=norm, **overrides)
        require(mixer_bytes(config, batch, 8, optimizer_slots=2), f"a {model} golden file "
                f"(batch {batch}, depth {config.depth}, dim {config.dim})",
                advice="lower --batch or the model's size")
        if config.drop_path:
            raise GoldenError(f"golden files are deterministic: drop_path must be 0, got "
                              f"{config.drop_path}")
        mixer = Mixer(config)
        generator = rng(seed + 1)
        params = {name: asarray(to_numpy(value) + perturb * generator.standard_normal(value.shape))
                  for name, value in mixer.init(seed).items()}
        images = generator.standard_normal(
            (batch, config.in_chans, config.image_size, config.image_size))
        labels = generator.integers(0, config.num_classes, batch)
        tensors = {META_KEY: _meta("mixer", settings, model=dataclasses.asdict(config),
                                   optimizer=dataclasses.asdict(optimizer)),
                   "input/images": images, "input/labels": labels.astype(numpy.int64),
                   **{f"param/{name}": value for name, value in params.items()},
                   **mixer_outputs(mixer, params, images, labels, lam, label_smoothing)}
        if steps:
            losses, trained = _adamw_steps(mixer, optimizer, params, asarray(images), labels,
                                           steps, lr, lam, label_smoothing)
            tensors["train/losses"] = xp.stack(losses)
            tensors.update({f"train/param/{name}": value for name, value in trained.items()})
        return _host(tensors)


def mixer_outputs(mixer, params, images, labels, lam=0.0, label_smoothing=0.0, drop_rng=None):
    """The output tensors of a Mixer golden file — output/logits, output/loss, grad/<name>,
    block/<i>/out, block/<i>/energy (SymMixer) — for given parameters and inputs, in the active
    dtype (golden files: float64). With `drop_rng` (and drop_path > 0) the forward passes draw
    their drop-path masks from two copies of it, so that both see the same masks."""
    config = mixer.config
    images = asarray(images)
    copies = [None, None] if drop_rng is None else [_copy_rng(drop_rng) for _ in range(2)]
    loss, logits, grads = mixer.loss_and_grads(params, images, labels, lam, label_smoothing,
                                               drop_rng=copies[0])
    states = {}  # (block, t) → x⁽ᵗ⁾
    mixer.forward(params, images, drop_rng=copies[1],
                  observe=lambda block, t, x: states.__setitem__((block, t), x))
    tensors = {"output/logits": logits, "output/loss": loss,   # 0-d float64, on the device
               **{f"grad/{name}": value for name, value in grads.items()}}
    for block in range(config.depth):
        tensors[f"block/{block}/out"] = states[block, config.n_iter]
        if config.mlp_kind == "sym":
            tensors[f"block/{block}/energy"] = _block_energies(config, params, block, states)
    return _host(tensors)


def _copy_rng(generator):
    """An independent numpy Generator in `generator`'s current state."""
    copy = numpy.random.Generator(type(generator.bit_generator)())
    copy.bit_generator.state = generator.bit_generator.state
    return copy


def _block_energies(config, params, block, states):
    """(B, n_iter + 1): E₀(x⁽ᵗ⁾) = −F(g(x⁽ᵗ⁾)) of block `block` with the model's own affine."""
    from refham.mixer_energy import MixerBlock
    energy_block = MixerBlock(config, params, block)  # the default affine: the model's own
    return numpy.stack([to_numpy(energy_block.energy0(states[block, t]))
                        for t in range(config.n_iter + 1)], axis=1)


def _adamw_steps(mixer, optimizer, params, images, labels, steps, lr, lam, label_smoothing):
    """`steps` AdamW steps on one batch at a constant lr → ([J before each step], params after)."""
    state, losses = optimizer.init(params), []
    for _ in range(steps):
        loss, _, grads = mixer.loss_and_grads(params, images, labels, lam, label_smoothing)
        losses.append(loss)
        params, state = optimizer.update(params, grads, state, lr)
    return losses, params


# ---------------------------------------------------------------------------------------------
# HAM golden files
# ---------------------------------------------------------------------------------------------
def ham_golden(ham="metaformer", *, visible=64, hidden=100, batch=2, seed=0, alpha=0.1,
               state_scale=1.0, weight_scale=0.02):
    """The golden tensors of the Energy MetaFormer's HAM s — v — c (:ref:`sec-metaformer`; see the
    module docstring for the keys): weights weight_scale·N(0,1) from rng(seed), states
    state_scale·N(0,1) from rng(seed + 1), one (H5) step of size alpha."""
    if ham not in HAMS:
        raise GoldenError(f"unknown HAM {ham!r}: choose one of {', '.join(HAMS)}")
    settings = dict(ham=ham, visible=visible, hidden=hidden, batch=batch, seed=seed, alpha=alpha,
                    state_scale=state_scale, weight_scale=weight_scale)
    from refham.metaformer import three_layer_ham
    visible, hidden, batch, seed = (
        integer_at_least(name, value, least, GoldenError) for name, value, least in
        (("visible", visible, 2), ("hidden", hidden, 1), ("batch", batch, 1), ("seed", seed, 0)))
    alpha = finite_real("alpha", alpha, GoldenError)
    require_three_layer_ham(visible, hidden, batch, 1)
    with computing_in_float64():
        net = three_layer_ham(visible, hidden)
        weights = net.init_weights(seed, scale=finite_real("weight_scale", weight_scale,
                                                           GoldenError, allow_zero=True))
        states = net.init_states(batch, seed=seed + 1,
                                 scale=finite_real("state_scale", state_scale, GoldenError))
        tensors = {META_KEY: _meta("ham", settings, graph=ham_graph(net)),
                   **{f"input/state/{name}": x for name, x in states.items()},
                   **{f"param/{name}": w for name, w in weights.items()},
                   **ham_outputs(net, states, weights, alpha)}
        return _host(tensors)


def ham_graph(net):
    """A JSON-able description of a HAM's layers and synapses (the golden meta's `graph`)."""
    return {"layers": {name: {"shape": layer.shape, "lagrangian": repr(layer.lagrangian),
                              "tau": layer.tau} for name, layer in net.layers.items()},
            "synapses": {name: repr(s) for name, s in net.synapses.items()}}


def ham_outputs(net, states, weights, alpha, steps=1):
    """The output tensors of a HAM golden file — output/activation/<A>, output/energy/…,
    output/dEdg/<A>, output/dEdt, output/step/<A> — for a refham.ham.HAM, states and weights, in
    the active dtype. With steps > 1, output/step/<k>/<A> holds the states after k = 1..steps
    Euler steps (:eq:`H5`) instead."""
    tree = net.energy_tree(states, weights)
    tensors = {**{f"output/activation/{name}": g for name, g in net.activations(states).items()},
               **{f"output/energy/layers/{name}": e for name, e in tree["layers"].items()},
               **{f"output/energy/synapses/{name}": e for name, e in tree["synapses"].items()},
               "output/energy/total": tree["total"],
               **{f"output/dEdg/{name}": d for name, d in net.dEdg(states, weights).items()},
               "output/dEdt": net.dEdt(states, weights)}
    current = states
    for k in range(1, steps + 1):
        current = net.step(current, weights, alpha)
        prefix = "output/step/" if steps == 1 else f"output/step/{k}/"
        tensors.update({f"{prefix}{name}": x for name, x in current.items()})
    return _host(tensors)


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------
def write_golden(path, tensors, force=False):
    """Write {name: array} to `path` as a plain .npz, atomically (temp file + rename). Every
    tensor must be numeric and finite (a golden value of inf or NaN tests nothing), and an
    existing file is replaced only with `force` (refham.files.outputs.check_output_file)."""
    check_output_file(path, force)
    for name, value in tensors.items():
        kind = numpy.asarray(value).dtype.kind
        if kind not in "iuf" and not (name == META_KEY and kind == "U"):
            raise GoldenError(f"{name}: golden tensors must be numeric arrays, got dtype "
                              f"{numpy.asarray(value).dtype}")
    bad = [name for name, value in tensors.items() if name != META_KEY
           and not numpy.all(numpy.isfinite(value))]
    if bad:
        raise GoldenError(f"NaN or inf in {short_list(bad)}: the settings overflow float64 "
                          f"(e.g. --perturb or a scale too large); nothing was written")
    atomic_write(path, lambda f: numpy.savez(f, **tensors))


def load_npz(path):
    """{name: array} of the .npz at `path`, read without pickle; GoldenError when it is missing,
    truncated, corrupted or holds objects."""
    return read_npz(os.fspath(path), error=GoldenError)


def read_meta(tensors, path="golden file"):
    """The parsed meta/config of a golden file, after checking its format tag and version."""
    if META_KEY not in tensors:
        raise GoldenError(f"{path} has no {META_KEY} entry: not a refham golden file")
    try:
        meta = json.loads(str(tensors[META_KEY]))
    except json.JSONDecodeError as exc:
        raise GoldenError(f"{path}: {META_KEY} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise GoldenError(f"{path}: {META_KEY} lacks the format tag {FORMAT!r}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise GoldenError(f"{path} has golden format version {meta.get('format_version')!r}; "
                          f"this refham reads version {FORMAT_VERSION}")
    return meta


def read_golden(path):
    """(meta dict, {name: array}) of the golden file at `path`, format checked."""
    tensors = load_npz(path)
    return read_meta(tensors, path), tensors
