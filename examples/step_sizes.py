"""How large may the (H5) step be? The proven bound against what the energy does.

`HAM.descent_step_bound` proves that a step x_A ← x_A − (α/τ_A) ∂E/∂g_A does not raise E when
α ≤ min_A τ_A/(1 + K_A ρ_A) (K_A: the Hessian's largest eigenvalue along the step, ρ_A: half
the summed spectral norms of A's synapses). This runs the paper's three-layer HAM s — v — c
(relu — layernorm — relu, dense synapses; refham.metaformer.three_layer_ham) from
state_scale·N(0,1) for several α and counts, over every (step, sample), the steps that raised E
(by more than 1e-12 relative), separately for steps within the bound and beyond it. Within it
the count must be 0; beyond it is what one can expect of a larger step.

    python examples/step_sizes.py                                 # D = 784, N_h = 900, W 0.02·N
    python examples/step_sizes.py --weight-scale 0.3 --alphas 0.5 0.9 1 1.5

For layernorm, K_v = γ/σ_min with σ_min ≥ √((‖Px‖ − ‖PΔx‖)₊²/D + ε) on the step (P: centring).
"""
import argparse
import sys

import numpy

from refham.backend import to_numpy
from refham.metaformer import three_layer_ham


def layernorm_curvature(x, dx, eps):
    """max over the batch of 1/σ_min, σ_min a lower bound of σ on the segment [x, x + dx]."""
    def centred_norm(a):
        a = a - a.mean(axis=1, keepdims=True)
        return numpy.sqrt((a * a).sum(axis=1))
    gap = numpy.maximum(centred_norm(x) - centred_norm(dx), 0.0)
    return float(numpy.max(1.0 / numpy.sqrt(gap ** 2 / x.shape[1] + eps)))


def count_rises(ham, weights, states, alpha, steps):
    """(steps within the bound, rises among them, steps beyond it, rises among those)."""
    counts = numpy.zeros(4, dtype=int)
    eps = ham.layers["v"].lagrangian.eps
    for _ in range(steps):
        energy, grads = ham.total_energy_and_dEdg(states, weights)
        dx_v = -alpha * to_numpy(grads["v"])  # every τ is 1
        curvature = {"s": 1.0, "c": 1.0,
                     "v": layernorm_curvature(to_numpy(states["v"]), dx_v, eps)}
        within = alpha <= ham.descent_step_bound(weights, curvature)
        states = ham.step(states, weights, alpha)
        before, after = to_numpy(energy), to_numpy(ham.total_energy(states, weights))
        rose = int(numpy.sum(after - before > 1e-12 * numpy.maximum(1.0, numpy.abs(before))))
        counts += [before.size, rose, 0, 0] if within else [0, 0, before.size, rose]
    return counts


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--visible", type=int, default=784, help="D (784)")
    p.add_argument("--hidden", type=int, default=900, help="N_h (900)")
    p.add_argument("--weight-scale", type=float, default=0.02, help="W = s·N(0,1) (0.02)")
    p.add_argument("--state-scale", type=float, default=10.0, help="x⁰ = s·N(0,1) (10)")
    p.add_argument("--batch", type=int, default=32, help="(32)")
    p.add_argument("--steps", type=int, default=28, help="(28)")
    p.add_argument("--seeds", type=int, default=3, help="weight draws (3)")
    p.add_argument("--alphas", type=float, nargs="+",
                   default=[0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.5, 2.0])
    args = p.parse_args(argv)
    if min(args.alphas) <= 0 or args.weight_scale < 0 or args.state_scale <= 0:
        p.error("alphas and --state-scale must be > 0, --weight-scale >= 0")
    ham = three_layer_ham(args.visible, args.hidden)
    print(f"s—v—c, D={args.visible}, N_h={args.hidden}, W = {args.weight_scale:g}·N(0,1), "
          f"x⁰ = {args.state_scale:g}·N(0,1), {args.seeds} seeds × {args.batch} samples × "
          f"{args.steps} steps per α")
    print(f"{'alpha':>6} {'within bound':>13} {'rose':>5} {'beyond':>7} {'rose':>6} {'share':>7}")
    for alpha in args.alphas:
        counts = sum(count_rises(ham, ham.init_weights(seed, scale=args.weight_scale),
                                 ham.init_states(args.batch, seed=seed + 100,
                                                 scale=args.state_scale), alpha, args.steps)
                     for seed in range(args.seeds))
        share = counts[3] / counts[2] if counts[2] else float("nan")
        print(f"{alpha:6.2f} {counts[0]:13d} {counts[1]:5d} {counts[2]:7d} {counts[3]:6d} "
              f"{share:7.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
