"""The MLP-Mixer family of :ref:`sec-mixer` with hand-written backprop: vanilla (serial blocks),
ParaMixer (parallel blocks), SymMixer (parallel, tied MLPs) and AsymMixer(λ) (parallel, tied plus
a symmetry-breaking W₂, trained with λ Σ ‖W₂‖²).

    config = make_config("symmixer", "digits")           # or MixerConfig(...)
    model = Mixer(config)
    params = model.init(seed=0)                          # flat dict, timm names and shapes
    loss, logits, grads = model.loss_and_grads(params, images, labels)   # images (B, C_in, H, W)

A Mixer reads stem → blocks → head: the patch embedding makes the state x (B, S, C), S tokens
(patches, row-major over the patch grid) × C channels; `depth` blocks update it
(`refham.blocks`: the serial block of the vanilla Mixer, the parallel block of the others, each
n_iter times with the same weights); `head_forward` maps it to logits. Parameter names, shapes
and roles: the `Mixer` docstring; init: `refham.init_rules`. Weight interop with the paper's
PyTorch models: `to_timm_state` / `from_timm_state`.
"""
import numpy

from refham.backend import asarray, rng, to_numpy, xp
from refham.blocks import (
    BLOCK_LAYERS, parallel_block_backward, parallel_block_forward, parallel_branches_forward,
    serial_block_backward, serial_block_forward)
from refham.init_rules import initial_value
from refham.checks import finite_real
from refham.errors import RefhamError, short_list
from refham.layers import (
    InputError, _cross_entropy_forward, check_labels, cross_entropy_backward,
    cross_entropy_forward, layernorm_backward, layernorm_forward, linear_backward, linear_forward,
    mlp_param_shapes, patch_embed_backward, patch_embed_forward, token_mean_backward,
    token_mean_forward)

from refham.mixer_config import (  # noqa: F401  (re-exported: the Mixer's settings)
    MODELS, NORM_AFFINES, NORMS, SIZES, ConfigError, MixerConfig, make_config)


class ParamError(RefhamError, ValueError):
    """A parameter dict whose names or shapes do not match the model's configuration."""


# ---------------------------------------------------------------------------------------------
# Parameters: names, shapes, initialisation (docs: mixer, parameter table; training, init)
# ---------------------------------------------------------------------------------------------
def param_shapes(config):
    """{timm name: shape} in the order of the paper's models' state_dict() (the table in the
    `Mixer` docstring)."""
    S, C = config.num_tokens, config.dim
    norm_shape = (S, C) if config.norm == "joint" else (C,)
    mlp_sizes = {"mlp_tokens": (S, config.token_hidden),
                 "mlp_channels": (C, config.channel_hidden)}
    shapes = {"stem.proj.weight": (C, config.in_chans, config.patch, config.patch),
              "stem.proj.bias": (C,)}
    for i in range(config.depth):
        for layer in BLOCK_LAYERS["serial" if config.serial else "parallel"]:
            if layer in mlp_sizes:
                local = mlp_param_shapes(config.mlp_kind, *mlp_sizes[layer], bias=config.bias)
            else:
                local = {"weight": () if config.norm_affine == "scalar" else norm_shape,
                         "bias": norm_shape}
            shapes.update({f"blocks.{i}.{layer}.{name}": shape for name, shape in local.items()})
    shapes.update({"norm.weight": (C,), "norm.bias": (C,),
                   "head.weight": (config.num_classes, C), "head.bias": (config.num_classes,)})
    return shapes


def check_params(shapes, params):
    """Raise ParamError naming the missing, unexpected, non-array and wrongly shaped parameters
    (the first few of each kind, and how many more)."""
    if not hasattr(params, "keys"):  # a dict, or autograd's boxed one
        raise ParamError(f"parameters must be a dict {{name: array}}, got {type(params).__name__}")
    missing = [name for name in shapes if name not in params]
    unexpected = sorted(name for name in params if name not in shapes)
    present = [name for name in shapes if name in params]
    not_arrays = [f"{name} ({type(params[name]).__name__})" for name in present
                  if not hasattr(params[name], "shape") or not hasattr(params[name], "dtype")]
    wrong = [f"{name}: {tuple(params[name].shape)}, expected {shapes[name]}" for name in present
             if hasattr(params[name], "shape") and tuple(params[name].shape) != shapes[name]]
    problems = [f"{title}: {short_list(items)}" for title, items in
                (("missing", missing), ("unexpected", unexpected),
                 ("not arrays (convert with numpy.asarray)", not_arrays), ("wrong shape", wrong))
                if items]
    if problems:
        raise ParamError("parameters do not match the config; " + "; ".join(problems))


# ---------------------------------------------------------------------------------------------
# Stochastic depth, and the head after the blocks
# ---------------------------------------------------------------------------------------------
def drop_path_rates(config):
    """Per-block drop-path rates: config.drop_path for every block, as in the paper's code and
    timm's MlpMixer (not the linearly rising rule of other timm models)."""
    return [float(config.drop_path)] * config.depth


def drop_path_mask(rate, batch, drop_rng, dtype):
    """m_b = Bernoulli(1 − p)/(1 − p) per sample, shape (B, 1, 1) (timm's DropPath); None when
    nothing is dropped (no drop_rng: evaluation, or rate 0)."""
    if drop_rng is None or rate == 0.0:
        return None
    keep = 1.0 - rate
    return asarray((drop_rng.random(batch) < keep) / keep, dtype).reshape(batch, 1, 1)


def head_forward(x, params, eps):
    """logits = W_head mean_tokens(LN(x)) + b_head. Implements :eq:`X-head`: x (B, S, C) →
    (B, K), the final LN over C with its per-element affine ('norm.weight', 'norm.bias')."""
    y, norm_cache = layernorm_forward(x, params["norm.weight"], params["norm.bias"], eps=eps)
    pooled, mean_cache = token_mean_forward(y)
    logits, linear_cache = linear_forward(pooled, params["head.weight"], params["head.bias"])
    return logits, (norm_cache, mean_cache, linear_cache)


def head_backward(cache, dlogits):
    """(dx, {name: grad}) for 'norm.weight', 'norm.bias', 'head.weight', 'head.bias'."""
    norm_cache, mean_cache, linear_cache = cache
    grads = {}
    dpooled, grads["head.weight"], grads["head.bias"] = linear_backward(linear_cache, dlogits)
    dx, grads["norm.weight"], grads["norm.bias"] = layernorm_backward(
        norm_cache, token_mean_backward(mean_cache, dpooled))
    return dx, grads


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------
def _under(params, prefix):
    """{name with `prefix` removed: array} for the parameters whose names start with it."""
    return {name[len(prefix):]: w for name, w in params.items() if name.startswith(prefix)}


class Mixer:
    """A Mixer of the family fixed by `config`: init, forward, hand-written backward and loss.

    Parameters (`param_shapes(config)`), timm names and PyTorch shapes, i = 0..depth−1; S tokens,
    C channels, N_s/N_c token/channel hidden units, K classes, C_in·p·p the patch size:

    ==================================== ================ =====================================
    name                                 shape            role
    ==================================== ================ =====================================
    stem.proj.weight                     (C, C_in, p, p)  patch embedding, :eq:`X-patch-embed`
    stem.proj.bias                       (C,)             patch embedding
    blocks.{i}.norm1|norm2.weight|bias   (S, C) joint,    vanilla only: LN₁, LN₂ of the serial
                                         (C,) channel     block, :eq:`X-serial-block`
    blocks.{i}.norm.weight|bias          as above         the others: the one LN of the
                                                          parallel block, :eq:`X-parallel-block`
    blocks.{i}.mlp_tokens.fc1.weight     (N_s, S)         vanilla, paramixer: W₁ (input);
                                                          asymmixer: W₁ (input, and W₁ᵀ in the
                                                          output); symmixer: absent
    blocks.{i}.mlp_tokens.fc2.weight     (S, N_s)         vanilla, paramixer: W₂ (output),
                                                          :eq:`X-mlp-vanilla`; asymmixer: W₂,
                                                          the symmetry breaking, :eq:`X-mlp-asym`
    blocks.{i}.mlp_tokens.fc2.weight     (N_s, S)         symmixer: the one tied W (input W,
                                                          output Wᵀ), :eq:`X-mlp-sym`
    blocks.{i}.mlp_tokens.fc1|fc2.bias   (N_s,), (S,)     vanilla, paramixer with bias=True only
    blocks.{i}.mlp_channels.…            as mlp_tokens    with (S, N_s) → (C, N_c)
    norm.weight|bias                     (C,)             the final LN over C, :eq:`X-head`
    head.weight|bias                     (K, C), (K,)     the classifier, :eq:`X-head`
    ==================================== ================ =====================================

    The trap: `fc2` is the (h, in) input matrix in the SymMixer but the (in, h) output (vanilla,
    ParaMixer) or breaking (AsymMixer) matrix elsewhere; timm's names are kept so that weights
    load into the paper's models by name. The λ penalty reads every `fc2.weight` of an AsymMixer.
    """

    def __init__(self, config):
        if not isinstance(config, MixerConfig):
            raise TypeError(f"Mixer needs a MixerConfig (see make_config), got {type(config)}")
        self.config = config
        self.param_shapes = param_shapes(config)
        self._norm_axes = 2 if config.norm == "joint" else 1
        self._penalized = [name for name in self.param_shapes if config.mlp_kind == "asym"
                           and name.endswith(".fc2.weight")]
        if config.serial:
            self._block_forward, self._block_backward = serial_block_forward, serial_block_backward
        else:
            self._block_forward = parallel_block_forward
            self._block_backward = parallel_block_backward

    def init(self, seed):
        """Fresh parameters by `initial_value` (:eq:`X-init`), drawn on the host in state_dict
        order with `rng(seed)`, so every backend gets the same numbers; default dtype."""
        generator = rng(seed)
        return {name: asarray(initial_value(name, shape, generator))
                for name, shape in self.param_shapes.items()}

    def block_weights(self, params, block):
        """The parameters of block `block` by their names within the block ('norm.weight',
        'mlp_tokens.fc2.weight', …), as the `blocks` functions take them."""
        return _under(params, f"blocks.{block}.")

    def mlp_weights(self, params, block, mlp):
        """The weights of MLP `mlp` ('mlp_tokens' | 'mlp_channels') of block `block`, keyed by
        their names within the MLP ('fc1.weight', …), as `layers.mlp_forward` takes them."""
        return _under(params, f"blocks.{block}.{mlp}.")

    def block_update(self, params, block, g):
        """u(g) = T(g) + Ch(g): what a parallel block adds to x, at g = LN(x) (B, S, C). For the
        SymMixer u = ∇_g F(g), :eq:`M1`."""
        if self.config.serial:
            raise ConfigError("block_update is defined for the parallel models; the vanilla "
                              "Mixer's serial block has two norms between its MLPs")
        tokens, channels = parallel_branches_forward(g, self.block_weights(params, block),
                                                     self.config.mlp_kind)[0]
        return tokens + channels

    def _check_images(self, images, dtype):
        cfg = self.config
        images = xp.asarray(images)
        if images.dtype.kind not in "biuf":
            raise InputError(f"images must be real numbers, got dtype {images.dtype} (complex "
                             f"images are refused rather than silently losing their imaginary "
                             f"part)")
        images = images.astype(dtype, copy=False)
        expected = (cfg.in_chans, cfg.image_size, cfg.image_size)
        shape = tuple(images.shape)
        channels_last = expected[1:] + expected[:1]  # (H, W, C_in)
        if images.ndim == 4 and shape[1:] == channels_last and channels_last != expected:
            raise InputError(f"images of shape {shape}: looks like NHWC; transpose to "
                             f"(B, C_in, H, W), e.g. images.transpose(0, 3, 1, 2)")
        if images.ndim != 4 or shape[1:] != expected:
            raise InputError(f"images must be (B, C_in, H, W) = (B, {', '.join(map(str, expected))}"
                             f") for this config, got shape {shape}")
        if shape[0] == 0:
            raise InputError(f"images of shape {shape} are an empty batch: pass at least one")
        if not bool(xp.all(xp.isfinite(images))):
            raise InputError("images contain NaN or inf")
        return images

    def forward(self, params, images, drop_rng=None, observe=None):
        """logits = head(blocks(stem(images))): images (B, C_in, H, W) → logits (B, K) through
        the patch embedding, `depth` blocks (`blocks.serial_block_forward` for vanilla,
        `blocks.parallel_block_forward` otherwise, n_iter iterations each) and `head_forward`.
        With `drop_rng` (a numpy Generator) and drop_path > 0, each residual branch is dropped
        per sample (training), with a fresh mask per branch and per iteration, drawn in the
        paper's code's order (block, iteration, tokens before channels); without it, none is
        (evaluation). `observe(block, t, x)`, if given, sees each block's states x⁽ᵗ⁾ (B, S, C),
        t = 0..n_iter (x⁽⁰⁾ the block's input, x⁽ⁿ_iter⁾ its output): the golden files'
        per-block outputs. Returns (logits, cache)."""
        check_params(self.param_shapes, params)
        images = self._check_images(images, params["stem.proj.weight"].dtype)
        return self._forward(params, images, drop_rng, observe)

    def _forward(self, params, images, drop_rng=None, observe=None):
        """The unchecked core of `forward` (see refham.checks): `images` already checked."""
        cfg = self.config
        x, stem_cache = patch_embed_forward(images, params["stem.proj.weight"],
                                            params["stem.proj.bias"])
        block_caches = []
        for block, rate in enumerate(drop_path_rates(cfg)):
            masks = [tuple(drop_path_mask(rate, x.shape[0], drop_rng, x.dtype)
                           for _branch in ("tokens", "channels")) for _ in range(cfg.n_iter)]
            block_observe = None if observe is None else (
                lambda t, state, block=block: observe(block, t, state))
            x, cache = self._block_forward(x, self.block_weights(params, block), cfg.mlp_kind,
                                           cfg.n_iter, cfg.ln_eps, self._norm_axes, masks,
                                           block_observe)
            block_caches.append(cache)
        logits, head_cache = head_forward(x, params, cfg.ln_eps)
        return logits, (stem_cache, block_caches, head_cache)

    def backward(self, params, cache, dlogits):
        """∂(⟨dlogits, logits⟩)/∂θ for every parameter θ: head, blocks in reverse, stem; n_iter
        and tied weights accumulate. The weights are read from `cache` (references saved by
        forward); `params` fixes the names and order of the returned dict."""
        stem_cache, block_caches, head_cache = cache
        expected = head_cache[-1][0].shape[:1] + (self.config.num_classes,)
        if tuple(dlogits.shape) != expected:
            raise InputError(f"dlogits must have the logits' shape {expected}, "
                             f"got {tuple(dlogits.shape)}")
        dx, grads = head_backward(head_cache, dlogits)
        for block in reversed(range(len(block_caches))):
            dx, block_grads = self._block_backward(block_caches[block], dx)
            grads.update({f"blocks.{block}.{name}": g for name, g in block_grads.items()})
        _, grads["stem.proj.weight"], grads["stem.proj.bias"] = patch_embed_backward(stem_cache,
                                                                                      dx)
        return {name: grads[name] for name in params}

    def _penalty_term(self, params, lam):
        """λ Σ_blocks (‖W₂ᵗᵒᵏ‖² + ‖W₂ᶜʰ‖²) as xp code (no ½; the penalty of :eq:`X-objective`),
        asym only."""
        finite_real("lam", lam, InputError, allow_zero=True)
        if lam and not self._penalized:
            raise InputError(f"lam = {lam} penalises the asym W₂ matrices; model "
                             f"{self.config.model!r} has none (use lam=0 or asymmixer)")
        if not lam:
            return 0.0
        return lam * sum((params[name] ** 2).sum() for name in self._penalized)

    def penalty(self, params, lam):
        """λ Σ_blocks (‖W₂ᵗᵒᵏ‖² + ‖W₂ᶜʰ‖²) for the AsymMixer; 0 for lam = 0."""
        return float(to_numpy(self._penalty_term(params, lam)))

    def objective(self, params, images, labels, lam=0.0, label_smoothing=0.0, drop_rng=None):
        """Implements :eq:`X-objective`: J(θ) = CE_s(logits(θ), labels) + λ Σ ‖W₂‖², as forward-only xp code:
        the scalar that `loss_and_grads` differentiates by hand (and the tests with autograd)."""
        logits, _ = self.forward(params, images, drop_rng)
        return cross_entropy_forward(logits, labels, label_smoothing)[0] + \
            self._penalty_term(params, lam)

    def loss_and_grads(self, params, images, labels, lam=0.0, label_smoothing=0.0,
                       drop_rng=None):
        """(J, logits (B, K), ∂J/∂θ for every θ): J of `objective`, gradient by forward,
        cross-entropy backward, model backward, plus 2λW₂ for the penalised W₂. J is a 0-d
        float64 array of the backend (the cross-entropy and the penalty, each in the model's
        dtype, summed in float64), left on the device: read it with `to_numpy`."""
        check_params(self.param_shapes, params)
        images = self._check_images(images, params["stem.proj.weight"].dtype)
        labels = xp.asarray(labels)
        check_labels(labels, images.shape[0], self.config.num_classes)
        return self._loss_and_grads(params, images, labels, lam, label_smoothing, drop_rng)

    def _loss_and_grads(self, params, images, labels, lam=0.0, label_smoothing=0.0,
                        drop_rng=None):
        """The unchecked core of `loss_and_grads` (see refham.checks): the training step calls
        it on batches of a dataset checked (finite images, labels in range) when it was made,
        sparing three device→host transfers per step."""
        penalty = self._penalty_term(params, lam)
        logits, cache = self._forward(params, images, drop_rng)
        loss, loss_cache = _cross_entropy_forward(logits, labels, label_smoothing)
        grads = self.backward(params, cache, cross_entropy_backward(loss_cache))
        objective = xp.asarray(loss, dtype=xp.float64) + xp.asarray(penalty, dtype=xp.float64)
        return objective, logits, self._add_penalty_grad(params, grads, lam)

    def _add_penalty_grad(self, params, grads, lam):
        """`grads` (changed in place and returned) plus ∂(λ Σ ‖W₂‖²)/∂W₂ = 2λW₂ on the
        penalised W₂, :eq:`X-objective`."""
        for name in self._penalized if lam else ():
            grads[name] = grads[name] + (2.0 * lam) * params[name]
        return grads


# ---------------------------------------------------------------------------------------------
# Weight interop with the paper's PyTorch models (timm names)
# ---------------------------------------------------------------------------------------------
def to_timm_state(config, params):
    """{timm name: host numpy array} with exactly the names, order and shapes of the paper's
    models' state_dict(): load with `torch_model.load_state_dict({k: torch.from_numpy(v) …},
    strict=True)`."""
    shapes = param_shapes(config)
    check_params(shapes, params)
    return {name: numpy.array(to_numpy(params[name])) for name in shapes}


def _host_array(value):
    if hasattr(value, "detach"):  # a torch tensor (possibly on a GPU, possibly requiring grad)
        value = value.detach().cpu().numpy()
    return numpy.asarray(to_numpy(value))


def from_timm_state(config, state):
    """Parameters (default dtype, active backend) from a state dict of the paper's models;
    raises ParamError on missing, unexpected or wrongly shaped names, or non-finite values."""
    arrays = {name: _host_array(value) for name, value in state.items()}
    shapes = param_shapes(config)
    check_params(shapes, arrays)
    bad = [name for name in shapes if not numpy.all(numpy.isfinite(arrays[name]))]
    if bad:
        raise ParamError(f"state holds NaN or inf in {short_list(bad)}")
    return {name: asarray(arrays[name]) for name in shapes}
