"""The paper's four Mixer models in PyTorch, with exactly timm's parameter names (refham docs:
mixer).

This is the PyTorch peer of refham's hand-written Mixer (refham/mixer.py): the same models, the
same parameter names and layouts, so refham weights load with `strict=True` and the two agree to
rounding in float64. It is also the eager baseline of refham's benchmark, so it is written the
way an efficient PyTorch user would write it (F.linear, exact F.gelu, F.layer_norm, a strided
Conv2d stem), not op by op against refham.

    vanilla (serial):  x ← x + T(LN₁(x));  x ← x + Ch(LN₂(x))
    parallel:          g = LN(x);  x ← x + T(g) + Ch(g)          (ParaMixer, SymMixer, AsymMixer)
    MLPs on z:         vanilla W₂ GELU(W₁ z + b₁) + b₂ | sym Wᵀ GELU(W z)
                       asym (W₁ᵀ + W₂) GELU(W₁ z)

each block repeated n_iter times with the same weights; T mixes tokens (S → N_s → S), Ch mixes
channels (C → N_c → C); LN is the joint (S, C) norm or the per-token norm over C, with a
per-element γ (the paper's) or, for refham's energy-exact norm_affine="scalar", one γ per norm.

Recipe — refham weights into PyTorch, logits compared (what `main` below does):

    from refham.mixer import Mixer, make_config, to_timm_state
    config = make_config("symmixer", "digits")
    params = Mixer(config).init(seed=0)                 # or load_checkpoint(path).params
    model = TorchMixer(config).double()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in
                           to_timm_state(config, params).items()}, strict=True)
    logits = model(torch.from_numpy(images))            # images (B, C_in, H, W), float64

API: `TorchMixer(config)`, `build(model, size, dtype, **overrides)` (refham's make_config),
`from_refham(config, params)`, `objective(model, logits, labels, lam, label_smoothing)` (refham's
J), `adamw(model, lr, weight_decay)` (timm's decay groups), `golden_candidate(golden)`.

Run it:  python examples/torch_mixer.py [--model symmixer] [--size digits] [--n-iter 2]
                                        [--norm channel] [--bias]       # logits vs refham
         python examples/torch_mixer.py --golden golden.npz --out candidate.npz
         refham oracle check golden.npz candidate.npz      # every golden output, recomputed
"""
import argparse
import json
import math
import sys

import numpy
import torch
import torch.nn.functional as F
from torch import nn

from refham.init_rules import TRUNC_NORMAL_STD
from refham.mixer import MODELS, NORMS, SIZES, MixerConfig, make_config, to_timm_state


class Mlp(nn.Module):
    """One MLP acting on the last axis of z (n_in → n_hidden → n_in), timm's names:
    vanilla fc1 (h, in), fc2 (in, h), optional biases; sym fc2 (h, in) only; asym fc1 (h, in)
    and the symmetry-breaking fc2 (in, h)."""

    def __init__(self, kind, n_in, n_hidden, bias=False):
        super().__init__()
        self.kind = kind
        if kind == "sym":  # the paper names the single tied matrix fc2
            self.fc2 = nn.Linear(n_in, n_hidden, bias=False)
        else:
            self.fc1 = nn.Linear(n_in, n_hidden, bias=bias)
            self.fc2 = nn.Linear(n_hidden, n_in, bias=bias)

    def forward(self, z):
        if self.kind == "sym":
            weight = self.fc2.weight
            return F.linear(F.gelu(F.linear(z, weight)), weight.T)
        hidden = F.gelu(F.linear(z, self.fc1.weight, self.fc1.bias))
        if self.kind == "asym":
            # W₁ᵀa + W₂a as one matmul with (W₁ᵀ + W₂): equal by linearity, one GEMM fewer
            return F.linear(hidden, self.fc1.weight.T + self.fc2.weight)
        return F.linear(hidden, self.fc2.weight, self.fc2.bias)


def drop_path(update, rate, training):
    """timm's DropPath: update · Bernoulli(1 − p)/(1 − p) per sample; the identity in eval."""
    if not training or rate == 0.0:
        return update
    keep = 1.0 - rate
    mask = update.new_empty((update.shape[0],) + (1,) * (update.ndim - 1)).bernoulli_(keep)
    return update * mask.div_(keep)


class ScalarGammaNorm(nn.Module):
    """γ·LN(x) + δ with one γ (a 0-d weight) and a per-element δ: refham's norm_affine="scalar",
    the layer norm that has a Lagrangian (so every SymMixer block descends its energy)."""

    def __init__(self, shape, eps):
        super().__init__()
        self.shape, self.eps = tuple(shape), eps
        self.weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(self.shape))

    def forward(self, x):
        return self.weight * F.layer_norm(x, self.shape, eps=self.eps) + self.bias


class MixerBlock(nn.Module):
    """A serial (vanilla) or parallel block of `config`, applied n_iter times. Names: serial
    norm1, mlp_tokens, norm2, mlp_channels; parallel norm, mlp_tokens, mlp_channels."""

    def __init__(self, config):
        super().__init__()
        tokens, dim = config.num_tokens, config.dim
        norm_shape = (tokens, dim) if config.norm == "joint" else (dim,)

        def norm():
            if config.norm_affine == "scalar":
                return ScalarGammaNorm(norm_shape, config.ln_eps)
            return nn.LayerNorm(norm_shape, eps=config.ln_eps)

        def mlp(n_in, n_hidden):
            return Mlp(config.mlp_kind, n_in, n_hidden, config.bias)

        self.serial, self.n_iter, self.rate = config.serial, config.n_iter, config.drop_path
        if self.serial:
            self.norm1 = norm()
            self.mlp_tokens = mlp(tokens, config.token_hidden)
            self.norm2 = norm()
            self.mlp_channels = mlp(dim, config.channel_hidden)
        else:
            self.norm = norm()
            self.mlp_tokens = mlp(tokens, config.token_hidden)
            self.mlp_channels = mlp(dim, config.channel_hidden)

    def token_mixing(self, g):
        """T(g) on every channel column of g (B, S, C), via the (B, C, S) view as the paper."""
        return self.mlp_tokens(g.transpose(1, 2)).transpose(1, 2)

    def step(self, x):
        """One iteration of the block's update, with a fresh drop-path mask per branch."""
        def branch(update):
            return drop_path(update, self.rate, self.training)

        if self.serial:
            x = x + branch(self.token_mixing(self.norm1(x)))
            return x + branch(self.mlp_channels(self.norm2(x)))
        g = self.norm(x)
        return x + branch(self.token_mixing(g)) + branch(self.mlp_channels(g))

    def forward(self, x):
        for _ in range(self.n_iter):
            x = self.step(x)
        return x


class PatchEmbed(nn.Module):
    """Stride-p p×p convolution; tokens in row-major order of the patch grid (timm's `stem`)."""

    def __init__(self, config):
        super().__init__()
        self.proj = nn.Conv2d(config.in_chans, config.dim, config.patch, stride=config.patch)

    def forward(self, images):
        return self.proj(images).flatten(2).transpose(1, 2)  # (B, C, h, w) → (B, S, C)


class TorchMixer(nn.Module):
    """logits = head(mean_tokens(LN(blocks(stem(images))))) for a refham MixerConfig; its
    state_dict() has refham's `param_shapes(config)` names, order and shapes."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.stem = PatchEmbed(config)
        self.blocks = nn.Sequential(*[MixerBlock(config) for _ in range(config.depth)])
        self.norm = nn.LayerNorm(config.dim, eps=config.ln_eps)
        self.head = nn.Linear(config.dim, config.num_classes)
        init_weights(self)

    def forward(self, images):
        return self.head(self.norm(self.blocks(self.stem(images))).mean(dim=1))


@torch.no_grad()
def init_weights(model):
    """timm's Mixer init (refham docs: training, initialisation): Linear weights xavier-uniform and
    biases 0, head weight and bias 0, stem lecun-normal (N(0,1) truncated at ±2, scaled to std
    √(1/fan_in)), LN 1/0."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            if name == "head":
                nn.init.zeros_(module.weight)
            else:
                nn.init.xavier_uniform_(module.weight)
        elif isinstance(module, nn.Conv2d):
            nn.init.trunc_normal_(module.weight, std=1.0, a=-2.0, b=2.0)
            fan_in = math.prod(module.weight.shape[1:])
            module.weight.mul_(math.sqrt(1.0 / fan_in) / TRUNC_NORMAL_STD)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def build(model, size="digits", dtype=torch.float32, **overrides):
    """TorchMixer(make_config(model, size, **overrides)) in `dtype`: refham's model and size
    names and config fields (n_iter=, norm=, bias=, hidden_ratio=, …)."""
    return TorchMixer(make_config(model, size, **overrides)).to(dtype)


def from_refham(config, params, dtype=torch.float64):
    """A TorchMixer holding refham parameters (timm names, loaded with strict=True)."""
    model = TorchMixer(config).to(dtype)
    state = to_timm_state(config, params)
    model.load_state_dict({name: torch.from_numpy(value) for name, value in state.items()},
                          strict=True)
    return model


def objective(model, logits, labels, lam=0.0, label_smoothing=0.0):
    """J = CE_s(logits, labels) + λ Σ_blocks(‖W₂ᵗᵒᵏ‖² + ‖W₂ᶜʰ‖²), refham's `Mixer.objective`:
    batch-mean cross-entropy with timm's label smoothing, the penalty for AsymMixer only."""
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing)
    if lam:
        if model.config.mlp_kind != "asym":
            raise ValueError(f"lam = {lam} penalises the AsymMixer's W₂; model "
                             f"{model.config.model!r} has none (use lam=0)")
        loss = loss + lam * sum((block.mlp_tokens.fc2.weight ** 2).sum()
                                + (block.mlp_channels.fc2.weight ** 2).sum()
                                for block in model.blocks)
    return loss


def adamw(model, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """torch.optim.AdamW with timm's weight-decay grouping (refham.optim.is_decayed): decay the
    parameters with ndim ≥ 2 whose name does not end in .bias (the 2-D joint-norm γ included)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        (decay if param.ndim >= 2 and not name.endswith(".bias") else no_decay).append(param)
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=eps)


# ---------------------------------------------------------------------------------------------
# A golden-file candidate: every output of `refham oracle write` recomputed here
# ---------------------------------------------------------------------------------------------
def gelu_lagrangian(z):
    """Φ(z) = ¼(z² + (z² − 1)·erf(z/√2) + z·√(2/π)·e^{−z²/2}), whose derivative is GELU."""
    z2 = z * z
    return 0.25 * (z2 + (z2 - 1.0) * torch.special.erf(z / math.sqrt(2.0))
                   + z * math.sqrt(2.0 / math.pi) * torch.exp(-0.5 * z2))


def block_energy0(block, x):
    """E₀(x) = −F(g) = −[Σ Φ(W_t g) + Σ Φ(g W_cᵀ)], g = the block's LN(x): (B,), SymMixer."""
    g = block.norm(x)
    token_hidden = F.linear(g.transpose(1, 2), block.mlp_tokens.fc2.weight)   # (B, C, N_s)
    channel_hidden = F.linear(g, block.mlp_channels.fc2.weight)              # (B, S, N_c)
    return -(gelu_lagrangian(token_hidden).sum((1, 2))
             + gelu_lagrangian(channel_hidden).sum((1, 2)))


def golden_candidate(golden):
    """Recompute in float64 PyTorch every output of a refham Mixer golden file ({name: array},
    e.g. dict(numpy.load(path))): logits, loss, gradients, block outputs, SymMixer block
    energies and the AdamW steps. Returns {name: array} for `refham oracle check`."""
    meta = json.loads(str(golden["meta/config"]))
    config, settings = MixerConfig(**meta["model"]), meta["settings"]
    lam, smoothing = settings["lam"], settings["label_smoothing"]
    params = {name[len("param/"):]: value for name, value in golden.items()
              if name.startswith("param/")}
    images = torch.from_numpy(golden["input/images"])
    labels = torch.from_numpy(golden["input/labels"])
    model = from_refham(config, params)
    block_inputs = {}
    hooks = [block.register_forward_hook(
        lambda module, args, output, i=i: block_inputs.__setitem__(i, args[0]))
        for i, block in enumerate(model.blocks)]
    logits = model(images)
    for hook in hooks:
        hook.remove()
    loss = objective(model, logits, labels, lam, smoothing)
    loss.backward()
    out = {"output/logits": logits, "output/loss": loss,
           **{f"grad/{name}": p.grad for name, p in model.named_parameters()}}
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            states = [block_inputs[i]]
            for _ in range(config.n_iter):
                states.append(block.step(states[-1]))
            out[f"block/{i}/out"] = states[-1]
            if config.mlp_kind == "sym":
                out[f"block/{i}/energy"] = torch.stack([block_energy0(block, x)
                                                        for x in states], dim=1)
    if settings["steps"]:
        trained = from_refham(config, params)
        optimizer = adamw(trained, settings["lr"], settings["weight_decay"],
                          (meta["optimizer"]["beta1"], meta["optimizer"]["beta2"]),
                          meta["optimizer"]["eps"])
        losses = []
        for _ in range(settings["steps"]):
            optimizer.zero_grad()
            step_loss = objective(trained, trained(images), labels, lam, smoothing)
            losses.append(step_loss.item())
            step_loss.backward()
            optimizer.step()
        out["train/losses"] = torch.tensor(losses, dtype=torch.float64)
        out.update({f"train/param/{name}": p for name, p in trained.named_parameters()})
    return {name: value.detach().numpy() for name, value in out.items()}


def compare_logits(args):
    """Load refham's initial weights (biases and head perturbed, so nothing is trivially zero)
    into PyTorch; print max|Δ| of the float64 logits on random images. Exit 1 beyond 1e-10."""
    from refham.backend import rng, to_numpy
    from refham.mixer import Mixer

    config = make_config(args.model, args.size, n_iter=args.n_iter, norm=args.norm,
                         bias=args.bias)
    generator = rng(0)
    params = {name: to_numpy(value) + 0.1 * generator.standard_normal(value.shape)
              for name, value in Mixer(config).init(seed=0).items()}
    images = generator.standard_normal(
        (args.batch, config.in_chans, config.image_size, config.image_size))
    logits_refham = to_numpy(Mixer(config).forward(params, images)[0])
    with torch.no_grad():
        logits_torch = from_refham(config, params)(torch.from_numpy(images)).numpy()
    diff = numpy.abs(logits_refham - logits_torch).max()
    print(f"{args.model} {args.size} (n_iter {args.n_iter}, {args.norm} norm), float64: "
          f"max |logits_refham − logits_torch| = {diff:.3g} (max |logit| "
          f"{numpy.abs(logits_torch).max():.3g})")
    return 0 if diff <= 1e-10 * max(numpy.abs(logits_torch).max(), 1.0) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Compare this PyTorch Mixer with refham (default), or with --golden "
                    "FILE --out FILE recompute a refham golden file's outputs as a candidate "
                    "for `refham oracle check FILE CANDIDATE`.")
    parser.add_argument("--model", choices=MODELS, default="symmixer")
    parser.add_argument("--size", choices=list(SIZES), default="digits")
    parser.add_argument("--n-iter", type=int, default=1)
    parser.add_argument("--norm", choices=NORMS, default="joint")
    parser.add_argument("--bias", action="store_true", help="MLP biases (vanilla, paramixer)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--golden", help="a Mixer golden file written by `refham oracle write`")
    parser.add_argument("--out", help="with --golden: the candidate .npz to write")
    args = parser.parse_args(argv)
    if not args.golden:
        return compare_logits(args)
    if not args.out:
        parser.error("--golden needs --out CANDIDATE.npz")
    with numpy.load(args.golden) as golden:
        candidate = golden_candidate(dict(golden))
    numpy.savez(args.out, **candidate)
    print(f"wrote {args.out}: {len(candidate)} tensors recomputed with PyTorch "
          f"{torch.__version__}; now run: refham oracle check {args.golden} {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
