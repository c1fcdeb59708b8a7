"""One optimiser step — the one the Mixer loop (refham.training.train) and the Energy MetaFormer
loop (refham.training.metaformer_train) share — with ONE device→host transfer:

    J_r, ∇J_r  ← loss_and_grads(θ)                         this rank's n_r of the batch's n samples
    J, ∇J      ← Σ_r (n_r/n) J_r,  Σ_r (n_r/n) ∇J_r         one allreduce (several ranks only)
    ∇J, ‖∇J‖   ← clip by global norm, :eq:`T-clip`          (optional)
    θ', s'     ← the optimiser's update at lr
    J, correct, ‖∇J‖, finite(θ', s'), stop  → the host     `fetch_scalars`: one transfer

Until the fetch nothing waits for the device: the update is computed before its finiteness is
known. It is committed only when J, ‖∇J‖ and every array of θ' and s' are finite; otherwise the
step raises the loop's divergence error and the caller keeps θ and s, so a diverged state never
becomes a run's state or a checkpoint.
"""
import dataclasses
import math

import numpy

from refham.backend import to_numpy, xp
from refham.files.checkpoint import describe_names, nonfinite_entries
from refham.optim import clip_by_global_norm
from refham.training.distributed import SingleProcess, combine_gradients


def fetch_scalars(*scalars):
    """The 0-d arrays of the backend (or host numbers) `scalars` as host floats, in ONE
    device→host transfer: stacked in float64 on the device, then copied together. Every number
    the host reads from the device in a training step or an evaluation batch passes here."""
    stacked = xp.stack([xp.asarray(s, dtype=xp.float64) for s in scalars])
    return tuple(float(value) for value in to_numpy(stacked))


@dataclasses.dataclass(frozen=True)
class StepScalars:
    """What a step reports to the host."""
    loss: float         # J over the global batch
    correct: int        # top-1 hits over the global batch (0 for an objective without classes)
    grad_norm: float    # ‖∇J‖ before clipping
    stop: bool          # some rank asked to stop (a signal); always False for one process


def optimiser_step(params, opt_state, loss_and_grads, optimizer, lr, diverged, *, clip=None,
                   comm=SingleProcess(), n_local=1, n_global=1, stop=False):
    """One step of `optimizer` at learning rate `lr` → (θ', s', StepScalars).

    `loss_and_grads(params)` → (J, correct, {name: ∂J/∂θ}) on this rank's `n_local` of the
    batch's `n_global` samples: J a 0-d array, correct a 0-d array or 0 (it is not called when
    n_local = 0: a last batch smaller than the number of ranks leaves a rank no sample).
    `clip` is the largest global gradient norm (None: no clipping). `stop` is this rank's
    request to stop, reduced with the gradients so that every rank learns it at the same step.
    When a value is not finite raises `diverged(what)` (the loop's error for it), `what`
    saying which."""
    if n_local:
        loss, correct, grads = loss_and_grads(params)
    else:
        loss, correct, grads = 0.0, 0, {name: xp.zeros_like(p) for name, p in params.items()}
    stops = stop
    if comm.size > 1:
        grads, (loss_sum, correct, stops) = combine_gradients(
            comm, grads, n_local, n_global, (loss * n_local, correct, stop))
        loss = loss_sum / n_global
    grads, grad_norm = clip_by_global_norm(grads, clip)
    # a diverging update's NaN/inf is reported below, by the finiteness check; NumPy's warnings
    # about it would only add noise
    with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
        new_params, new_state = optimizer.update(params, grads, opt_state, lr)
    arrays = [a for a in (*new_params.values(), *new_state.values()) if hasattr(a, "shape")]
    finite = xp.stack([xp.isfinite(a).all() for a in arrays]).all()
    loss, correct, grad_norm, finite, stops = fetch_scalars(loss, correct, grad_norm, finite,
                                                            stops)
    scalars = StepScalars(loss, int(correct), grad_norm, stops > 0)
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        raise diverged(f"loss {loss}, gradient norm {grad_norm}")
    if not finite:     # rare, and fatal: naming the arrays may cost a second transfer
        overflowed = nonfinite_entries({**new_params, **new_state}, xp)
        raise diverged(f"loss {loss} and gradient norm {grad_norm:.3g} were finite, but the "
                       f"update made {describe_names(overflowed)} NaN/inf")
    return new_params, new_state, scalars
