"""Optimisers, learning-rate schedule and gradient clipping, written by hand against `xp`.

An optimiser is a small frozen description (its hyper-parameters) with two pure functions:

    state = opt.init(params)                                  # flat dict, storable in a checkpoint
    params, state = opt.update(params, grads, state, lr)      # one step; nothing is mutated

`params`, `grads` and the array entries of `state` are flat dicts keyed by the parameter's timm name
(`blocks.0.mlp_tokens.fc1.weight`, ...). State keys are `<slot>/<name>` for arrays (`m/…`, `v/…`,
`momentum/…`) and `step` (a Python int: updates done so far).

Weight-decay grouping follows timm's default (`param_groups_weight_decay`), which the paper's
training code uses: a parameter is decayed when it has ≥ 2 dimensions and its name does not end in
`.bias`. Note that this DOES decay the joint-norm weights γ of shape (S, C) (they are 2-D) but not
the per-token norm weights of shape (C,), nor any bias. `decay_norms=False` excludes every norm
weight (a name with a component starting with `norm`), which is the usual choice elsewhere.
"""
import math
from dataclasses import dataclass

from refham.errors import RefhamError
from refham.backend import accelerated, xp

OPTIMIZERS = ("adamw", "sgd")


class OptimizerError(RefhamError, ValueError):
    """Bad optimiser settings, or a state that does not belong to these parameters."""


def is_norm_param(name):
    """True for layer-norm parameters (`blocks.{i}.norm1.weight`, `blocks.{i}.norm.bias`,
    `norm.weight`, ...): some component of the name before the last starts with `norm`."""
    return any(part.startswith("norm") for part in name.split(".")[:-1])


def is_decayed(name, shape, decay_norms=True):
    """timm's grouping: decay ⇔ ndim ≥ 2 and not a bias (with decay_norms=False: not a norm)."""
    if len(shape) < 2 or name.endswith(".bias"):
        return False
    return decay_norms or not is_norm_param(name)


def _check_hyper(weight_decay, **positive):
    """Raise OptimizerError unless weight_decay ≥ 0 and every `positive` value is > 0."""
    for key, value in positive.items():
        if not value > 0:
            raise OptimizerError(f"{key} must be > 0, got {value}")
    if not weight_decay >= 0:
        raise OptimizerError(f"weight_decay must be >= 0, got {weight_decay}")


def _check_state(params, grads, state, slots):
    """Raise unless `grads` and `state` hold exactly one entry per parameter (per slot)."""
    if set(grads) != set(params):
        missing, extra = sorted(set(params) - set(grads)), sorted(set(grads) - set(params))
        raise OptimizerError(
            f"gradients do not match parameters: missing {missing}, unexpected {extra}")
    expected = {f"{slot}/{name}" for slot in slots for name in params} | {"step"}
    if set(state) != expected:
        missing, extra = sorted(expected - set(state)), sorted(set(state) - expected)
        raise OptimizerError(
            f"optimiser state does not belong to these parameters (a different model or "
            f"optimiser?): missing {missing[:5]}, unexpected {extra[:5]}")


@dataclass(frozen=True)
class AdamW:
    """Implements :eq:`T-adamw`: Adam with decoupled weight decay (Loshchilov & Hutter; torch.optim.AdamW's
    arithmetic).

    With t = step + 1, for every parameter p with gradient g:
        m ← β₁m + (1 − β₁)g,   v ← β₂v + (1 − β₂)g²
        p ← p·(1 − lr·wd) − lr · (m / (1 − β₁ᵗ)) / (√(v / (1 − β₂ᵗ)) + ε)
    where wd = weight_decay for decayed parameters (see `is_decayed`) and 0 otherwise.
    """
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    decay_norms: bool = True

    SLOTS = ("m", "v")

    def __post_init__(self):
        """Validate the hyper-parameters."""
        _check_hyper(self.weight_decay, eps=self.eps)
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise OptimizerError(f"betas must lie in [0, 1), got ({self.beta1}, {self.beta2})")

    def init(self, params):
        """Zero moments for every parameter; step 0."""
        state = {"step": 0}
        for name, p in params.items():
            state[f"m/{name}"] = xp.zeros_like(p)
            state[f"v/{name}"] = xp.zeros_like(p)
        return state

    def update(self, params, grads, state, lr):
        """One AdamW step at learning rate `lr` → (new params, new state)."""
        _check_state(params, grads, state, self.SLOTS)
        t = state["step"] + 1
        correction1 = 1.0 - self.beta1 ** t
        correction2 = 1.0 - self.beta2 ** t
        new_params, new_state = {}, {"step": t}
        for name, p in params.items():
            decay = 1.0 - lr * self.weight_decay if is_decayed(name, p.shape, self.decay_norms) \
                else 1.0
            scalars = (decay, lr / correction1, self.beta1, self.beta2, correction2, self.eps)
            new_params[name], new_state[f"m/{name}"], new_state[f"v/{name}"] = adamw_step(
                p, grads[name], state[f"m/{name}"], state[f"v/{name}"],
                *(p.dtype.type(s) for s in scalars))
        return new_params, new_state


@accelerated
def adamw_step(p, g, m, v, decay, step_size, beta1, beta2, correction2, eps):
    """AdamW on one array → (p, m, v) new (one fused kernel on the GPU):

        m ← β₁m + (1 − β₁)g,  v ← β₂v + (1 − β₂)g²,  p ← p·decay − step_size·m/(√(v/c₂) + ε)
    with decay = 1 − lr·wd (1 for undecayed parameters), step_size = lr/c₁, c_k = 1 − β_kᵗ."""
    m = beta1 * m + (1.0 - beta1) * g
    v = beta2 * v + (1.0 - beta2) * (g * g)
    return p * decay - step_size * (m / (xp.sqrt(v / correction2) + eps)), m, v


@dataclass(frozen=True)
class SGD:
    """SGD with momentum μ (torch.optim.SGD's arithmetic, dampening 0), L2 weight decay coupled:

        g ← g + wd·p          (wd only for decayed parameters, see `is_decayed`)
        b ← μb + g
        p ← p − lr·(g + μb)   with nesterov,   p ← p − lr·b   without.
    """
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    decay_norms: bool = True

    SLOTS = ("momentum",)

    def __post_init__(self):
        """Validate the hyper-parameters."""
        _check_hyper(self.weight_decay)
        if not 0 <= self.momentum < 1:
            raise OptimizerError(f"momentum must lie in [0, 1), got {self.momentum}")
        if self.nesterov and self.momentum == 0:
            raise OptimizerError("nesterov needs momentum > 0")

    def init(self, params):
        """Zero momentum buffers; step 0."""
        state = {"step": 0}
        for name, p in params.items():
            state[f"momentum/{name}"] = xp.zeros_like(p)
        return state

    def update(self, params, grads, state, lr):
        """One SGD step at learning rate `lr` → (new params, new state)."""
        _check_state(params, grads, state, self.SLOTS)
        new_params, new_state = {}, {"step": state["step"] + 1}
        for name, p in params.items():
            g = grads[name]
            if self.weight_decay and is_decayed(name, p.shape, self.decay_norms):
                g = g + self.weight_decay * p
            buf = self.momentum * state[f"momentum/{name}"] + g
            direction = g + self.momentum * buf if self.nesterov else buf
            new_params[name] = p - lr * direction
            new_state[f"momentum/{name}"] = buf
        return new_params, new_state


def make_optimizer(name, weight_decay, *, momentum=0.9, nesterov=False, decay_norms=True):
    """'adamw' → AdamW(weight_decay), 'sgd' → SGD(momentum, weight_decay, nesterov)."""
    if name == "adamw":
        return AdamW(weight_decay=weight_decay, decay_norms=decay_norms)
    if name == "sgd":
        return SGD(momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                   decay_norms=decay_norms)
    raise OptimizerError(f"unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")


def cosine_lr(step, total_steps, base_lr, warmup_steps=0, min_lr=0.0):
    """Implements :eq:`T-cosine`: learning rate of optimiser step `step` (0-based) of `total_steps`:

        warm-up (step < W):  lr = base · (step + 1) / W         (reaches base at step W − 1)
        then:                lr = min + ½(base − min)(1 + cos(π (step − W) / (T − W)))
    so lr(W) = base and lr(T) = min; W = 0 is a plain cosine decay.
    """
    if not 0 <= warmup_steps < total_steps:
        raise OptimizerError(
            f"warm-up must be shorter than training: {warmup_steps} warm-up steps of {total_steps}")
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / (total_steps - warmup_steps)
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def global_norm(grads):
    """‖g‖ = sqrt(Σ over all parameters of Σ g²), a 0-d array of the gradients' dtype, left on
    the device (a training step fetches it with its other scalars, `fetch_scalars`)."""
    return xp.sqrt(sum(xp.sum(g * g) for g in grads.values()))


def clip_by_global_norm(grads, max_norm):
    """Implements :eq:`T-clip`: scale all gradients by min(1, max_norm / (‖g‖ + 1e-6)) (torch's
    clip_grad_norm_).

    Returns (clipped grads, ‖g‖ before clipping as a 0-d array). max_norm None or 0 means no
    clipping. The factor is computed on the device, in float64 and rounded to the gradients'
    dtype, so the step never waits for ‖g‖; a factor of 1 leaves every gradient as it is."""
    norm = global_norm(grads)
    if not max_norm:
        return grads, norm
    shifted = norm.astype(xp.float64) + 1e-6
    factor = xp.where(shifted <= max_norm, 1.0, max_norm / shifted)
    return {name: g * factor.astype(g.dtype) for name, g in grads.items()}, norm
