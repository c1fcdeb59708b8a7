"""When does one Euler step of the SymMixer block's HAM dynamics raise its energy?

For each block of a `digits` SymMixer, the block's inputs x for the test images (from the model's
own forward pass) take one step x' = x + dt(u(g) − x) of (M3) with κ = 1 and the energy-exact
(scalar γ) layer norm; the script prints, per block and dt, the share of inputs whose Lyapunov
energy E (M2) rose, and how far the energy-exact block's unit step lies from the model's own
(‖Δ‖/‖update‖). The MixerBlock docstring states the proven bound; the docs' step-size section
(docs/ham.md) these observations.

Run it:   python examples/euler_step_size.py [CHECKPOINT.npz] [--seed 0] [--dt 1 1.5 2 2.2 3]
Without a checkpoint (a refham training checkpoint of a digits SymMixer, e.g. from
`refham train --model symmixer --out runs/sym`, then runs/sym/last.npz) it uses init weights.
"""
import argparse
import sys

import numpy as np

from refham.files.checkpoint import CheckpointError, load_checkpoint
from refham.training.data import load_dataset
from refham.mixer import Mixer, MixerConfig, make_config
from refham.mixer_energy import MixerBlock


def model_and_params(checkpoint, seed):
    """(config, float64 params, train fraction): from the checkpoint, or the init with `seed`."""
    if checkpoint is None:
        config = make_config("symmixer", "digits")
        return config, Mixer(config).init(seed), 0.8
    ck = load_checkpoint(checkpoint)
    config = MixerConfig(**ck.config["model"])
    if config.model != "symmixer" or ck.config["train"]["data"] != "digits":
        raise CheckpointError(f"{checkpoint} holds a {config.model} trained on "
                              f"{ck.config['train']['data']}: give a digits SymMixer checkpoint")
    params = {name: np.asarray(value, dtype=np.float64) for name, value in ck.params.items()}
    return config, params, ck.config["train"]["train_fraction"]


def rises(block, x, dts):
    """{dt: share of the inputs x whose E rose in one κ = 1 Euler step of size dt}."""
    energy, velocity = block.lyapunov_energy(x), block.velocity(x, 1)
    return {dt: float(np.mean(block.lyapunov_energy(x + dt * velocity) - energy
                              > 1e-12 * np.abs(energy))) for dt in dts}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a digits SymMixer training checkpoint")
    parser.add_argument("--seed", type=int, default=0, help="init seed without a checkpoint")
    parser.add_argument("--dt", type=float, nargs="+", default=[1.0, 1.5, 2.0, 2.2, 3.0])
    args = parser.parse_args(argv)
    try:
        config, params, train_fraction = model_and_params(args.checkpoint, args.seed)
    except (CheckpointError, OSError, KeyError, TypeError) as exc:
        print(f"euler_step_size: cannot use {args.checkpoint}: {exc}", file=sys.stderr)
        return 2
    _, test = load_dataset("digits", train_fraction=train_fraction, seed=0)
    states = {}
    Mixer(config).forward(params, np.asarray(test.images, dtype=np.float64),
                          observe=lambda block, t, x: states.setdefault((block, t), x))
    print(f"{len(test.images)} test images; share of block inputs whose E rose after one step:")
    for i in range(config.depth):
        x, own = states[i, 0], states[i, 1]
        block = MixerBlock(config, params, i, "scalar")
        apart = np.linalg.norm(block.unit_step(x) - own) / np.linalg.norm(own - x)
        shares = ", ".join(f"dt {dt:g}: {100 * share:.1f}%"
                           for dt, share in rises(block, x, args.dt).items())
        print(f"block {i}: {shares}; scalar-γ unit step vs the model's: {100 * apart:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
