"""Figures of a trained Energy MetaFormer (:ref:`sec-metaformer`; the paper's Figs. 2b and 2c):
the receptive fields (the columns of W_vc and rows of W_sv of largest norm) and the descent of the
energy (H1) from random states, drawn from a checkpoint of refham.training.metaformer_train.

    write_figures("runs/metaformer/last.npz", "runs/metaformer")         # needs matplotlib
"""
import json
import math
import os

import numpy

from refham.errors import RefhamError
from refham.backend import asarray, to_numpy
from refham.files.checkpoint import load_checkpoint
from refham.metaformer import MetaFormerError, ham_for
from refham.files.outputs import atomic_write, check_output_file, prepare_folder


class PlottingUnavailable(RefhamError, RuntimeError):
    """matplotlib (the optional `plot` extra) is not installed."""


def receptive_fields(weights, image_shape, count=100):
    """{"vc": the columns of W_vc, "sv": the rows of W_sv}, each the `count` of largest L2 norm
    (largest first) as images (count, H, W) divided by their max |w| (host arrays)."""
    fields = {"vc": to_numpy(weights["vc"]).T, "sv": to_numpy(weights["sv"])}  # (N_h, D) each
    chosen = {}
    for name, rows in fields.items():
        order = numpy.argsort(-numpy.linalg.norm(rows, axis=1), kind="stable")[:count]
        top = rows[order]
        top = top / numpy.maximum(numpy.abs(top).max(axis=1, keepdims=True), 1e-300)
        chosen[name] = top.reshape((len(top),) + tuple(image_shape))
    return chosen


def tile(images, gap=1):
    """(n, H, W) images → one 2-D mosaic of ⌈√n⌉ columns, separated by `gap` NaN pixels (drawn
    in the colormap's "bad" colour, apart from every value)."""
    n, height, width = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    mosaic = numpy.full((rows * (height + gap) - gap, columns * (width + gap) - gap), numpy.nan)
    for i, image in enumerate(images):
        top, left = (height + gap) * (i // columns), (width + gap) * (i % columns)
        mosaic[top:top + height, left:left + width] = image
    return mosaic


def energy_descent(weights, samples=8, seed=0, steps=28, alpha=0.5, state_scale=10.0):
    """Descent of (H1) from x⁰ = state_scale·N(0,1) on all layers (drawn with rng(seed)):
    `steps` steps of (H5) with α. Returns the Trajectory (energies: (steps + 1, samples))."""
    ham = ham_for(weights)
    start = ham.init_states(samples, seed=seed, scale=state_scale)
    return ham.descend(start, weights, alpha, max_steps=steps)


def _matplotlib():
    """(Figure, colormaps) from matplotlib, or PlottingUnavailable saying how to install it."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        raise PlottingUnavailable(
            "matplotlib is not installed, so no figures can be drawn: pip install matplotlib "
            "(or refham[plot]) and run the command again") from None
    return Figure, colormaps


def write_figures(checkpoint, out, samples=8, seed=0, steps=28, alpha=0.5, state_scale=10.0,
                  force=False):
    """From a `train` checkpoint write into `out`: receptive_fields.png, energy_descent.png,
    energy_descent.json (the energies, E[t][sample], and the settings) and
    energy_descent_start.npz (the start states x⁰, for independent re-evaluation of (H1)).
    Raises PlottingUnavailable first when matplotlib is missing, OutputError when a file
    exists and `force` is not given. Returns (paths, energies)."""
    Figure, colormaps = _matplotlib()
    paths = {name: os.path.join(prepare_folder(out), name) for name in (
        "receptive_fields.png", "energy_descent.png", "energy_descent.json",
        "energy_descent_start.npz")}
    for path in paths.values():
        check_output_file(path, force)
    saved = load_checkpoint(checkpoint)
    weights = {name: asarray(w) for name, w in saved.params.items()}
    image_shape = tuple(saved.config.get("image_shape") or ())
    if sorted(weights) != ["sv", "vc"] or math.prod(image_shape) != weights["vc"].shape[0]:
        raise MetaFormerError(f"{checkpoint} is not a checkpoint of `refham metaformer train`: "
                              f"it holds {sorted(weights)[:4]} and image shape {image_shape}, "
                              f"not W_sv, W_vc and the shape of their D pixels")
    trajectory = energy_descent(weights, samples, seed, steps, alpha, state_scale)
    energies = to_numpy(trajectory.energies)

    fields = receptive_fields(weights, image_shape)
    figure = Figure(figsize=(9.2, 4.6), layout="constrained")
    axes = figure.subplots(1, 2)
    diverging = colormaps["RdBu_r"].with_extremes(bad="0.7")  # gaps between tiles: grey
    for ax, name, title in zip(axes, ("vc", "sv"), ("columns of $W_{vc}$", "rows of $W_{sv}$")):
        image = ax.imshow(tile(fields[name]), cmap=diverging, vmin=-1, vmax=1,
                          interpolation="nearest")
        ax.set_title(f"{title}: {len(fields[name])} of largest norm", fontsize=10)
        ax.set_axis_off()
    figure.colorbar(image, ax=axes, shrink=0.8, label="w / max|w| (each field)")
    atomic_write(paths["receptive_fields.png"], lambda f: figure.savefig(f, format="png", dpi=90))

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    linear, logarithmic = figure.subplots(1, 2)
    linear.plot(energies, marker="o", markersize=2.5, linewidth=1)
    linear.set(xlabel="step t", ylabel="energy E (H1)")
    logarithmic.semilogy(energies[:-1] - energies[-1], marker="o", markersize=2.5, linewidth=1)
    logarithmic.set(xlabel="step t", ylabel=f"E(t) − E({steps})")
    figure.suptitle(f"energy descent: {samples} samples from {state_scale:g}·N(0,1), "
                    f"{steps} steps of α = {alpha:g}", fontsize=10)
    atomic_write(paths["energy_descent.png"], lambda f: figure.savefig(f, format="png", dpi=90))

    record = {"checkpoint": os.fspath(checkpoint), "samples": samples, "seed": seed,
              "steps": steps, "alpha": alpha, "state_scale": state_scale,
              "energies": energies.tolist()}
    atomic_write(paths["energy_descent.json"], lambda f: f.write(json.dumps(record).encode()))
    start = {name: to_numpy(x) for name, x in trajectory.states[0].items()}
    atomic_write(paths["energy_descent_start.npz"], lambda f: numpy.savez(f, **start))
    return paths, energies
