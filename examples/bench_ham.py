"""HAM benchmark: refham's energy + ∂E/∂g against hamux under jax.jit, same process.

The HAM is a chain v — h1 — h2 with dense synapses (layernorm, relu, softmax Lagrangians; the
paper-sized default is 784 — 1024 — 1024) and batch 256. One evaluation is E (B,) and ∂E/∂g for
every layer from the states x: refham's `HAM.total_energy_and_dEdg` (input checks included)
against hamux 0.2.2's `activations` + `dEdact(return_energy=True)` compiled by `jax.jit` and
warmed up. Both sides get the same weights and states; calls alternate refham, hamux, refham, …
so that both see the same machine load, and the medians are reported, with the largest relative
difference of their results (a wrong benchmark is worse than a slow one).

    python examples/bench_ham.py                          # 1 and 2 threads, float32 and float64
    python examples/bench_ham.py --threads 1 --sizes 784:1024:1024 --repeats 50

Each (threads, dtype) pair runs in its own subprocess: XLA reads its thread settings once, at
jax's import, and NumPy's BLAS at NumPy's; the subprocess is also pinned to that many cores.
Needs the `bench` extra (hamux, jax, fastcore — hamux imports fastcore without declaring it).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy

import bench  # examples/bench.py: the CPU name and the BLAS kernel, reported the same way
from refham.backend import asarray, set_dtype, to_numpy
from refham.ham import HAM, Dense, Layer
from refham.lagrangians import LayerNorm, ReLU, Softmax


def refham_ham(sizes):
    """v (layernorm) — h1 (relu) — h2 (softmax), dense synapses W_1: (v, h1), W_2: (h1, h2)."""
    n_v, n_1, n_2 = sizes
    return HAM({"v": Layer((n_v,), LayerNorm()), "h1": Layer((n_1,), ReLU()),
                "h2": Layer((n_2,), Softmax())}, {"W1": Dense("v", "h1"), "W2": Dense("h1", "h2")})


def hamux_evaluation(sizes, weights):
    """The same HAM in hamux, and a jitted x ↦ (E, ∂E/∂g) on a batch."""
    import contextlib
    import io

    import hamux
    import jax
    import jax.numpy as jnp
    n_v, n_1, n_2 = sizes
    with contextlib.redirect_stdout(io.StringIO()):  # hamux's NeuronLayer prints "Post init"
        neurons = {"v": hamux.NeuronLayer(hamux.lagr_layernorm, (n_v,)),
                   "h1": hamux.NeuronLayer(hamux.lagr_relu, (n_1,)),
                   "h2": hamux.NeuronLayer(hamux.lagr_softmax, (n_2,))}
    synapses = {name: hamux.LinearSynapse(jnp.asarray(w)) for name, w in weights.items()}
    ham = hamux.HAM(neurons, synapses, [(("v", "h1"), "W1"), (("h1", "h2"), "W2")]).vectorize()

    @jax.jit
    def evaluate(xs):
        return ham.dEdact(ham.activations(xs), xs, return_energy=True)

    def run(xs):
        return jax.block_until_ready(evaluate(xs))
    return run


def _relative_difference(a, b):
    a, b = numpy.asarray(a, dtype=numpy.float64), numpy.asarray(b, dtype=numpy.float64)
    return float(numpy.max(numpy.abs(a - b)) / max(numpy.max(numpy.abs(b)), 1e-300))


def run_case(sizes, batch, dtype, warmup, repeats):
    """Interleaved timings (seconds) of both sides and the largest relative difference of E and
    of ∂E/∂g between them."""
    import jax.numpy as jnp
    generator = numpy.random.default_rng(0)
    ham = refham_ham(sizes)
    weights = {name: (0.02 * generator.standard_normal(shape)).astype(dtype)
               for name, shape in ham.weight_shapes().items()}
    states = {name: generator.standard_normal((batch,) + layer.shape).astype(dtype)
              for name, layer in ham.layers.items()}
    ours_w, ours_x = ({k: asarray(v) for k, v in d.items()} for d in (weights, states))
    theirs_x = {k: jnp.asarray(v) for k, v in states.items()}
    hamux_run = hamux_evaluation(sizes, weights)
    gemm_operands = [(ours_x[s.layers[1]], ours_w[name].T) for name, s in ham.synapses.items()]
    gemm_operands += [(ours_x[s.layers[0]], ours_w[name]) for name, s in ham.synapses.items()]
    sides = {"refham": lambda: ham.total_energy_and_dEdg(ours_x, ours_w),
             "hamux": lambda: hamux_run(theirs_x),
             # the floor: the four products M_W(g_q), M_Wᵀ(g_p) of the call, alone
             "gemms": lambda: [a @ b for a, b in gemm_operands]}
    times = {side: [] for side in sides}
    for index in range(warmup + repeats):
        for side, evaluate in sides.items():
            started = time.perf_counter()
            evaluate()
            if index >= warmup:
                times[side].append(time.perf_counter() - started)
    (energy, grads), (their_energy, their_grads) = sides["refham"](), sides["hamux"]()
    agreement = {"energy": _relative_difference(to_numpy(energy), their_energy),
                 "dEdg": max(_relative_difference(to_numpy(grads[n]), their_grads[n])
                             for n in ham.layers)}
    return {"sizes": list(sizes), "batch": batch, "dtype": dtype, "times": times,
            "median_ms": {side: 1e3 * statistics.median(t) for side, t in times.items()},
            "best_ms": {side: 1e3 * min(t) for side, t in times.items()},
            "agreement": agreement}


def _numpy_blas():
    """NumPy's BLAS pool (SciPy may load a second OpenBLAS): {internal_api, version, …}."""
    import threadpoolctl
    pools = [p for p in threadpoolctl.threadpool_info()
             if p.get("user_api") == "blas" and "numpy" in p.get("filepath", "")]
    return [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for p in pools]


def worker(args):
    """One (threads, dtype) pair, in a subprocess set up by `main`: prints one JSON line."""
    import jax
    jax.config.update("jax_enable_x64", args.dtype == "float64")
    set_dtype(args.dtype)
    results = [run_case(sizes, args.batch, args.dtype, args.warmup, args.repeats)
               for sizes in args.sizes]
    blas = _numpy_blas()
    print(json.dumps({"threads": args.threads[0], "dtype": args.dtype, "jax": jax.__version__,
                      "cpu": bench._cpu_name(), "blas": blas,
                      "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
                      "results": results}))


def _subprocess(args, threads, dtype):
    """Run `worker` for one pair with every library's threads set to `threads`, pinned to as
    many cores; returns its parsed JSON line."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads),
               MKL_NUM_THREADS=str(threads),
               XLA_FLAGS=f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} "
                         f"intra_op_parallelism_threads={threads}")
    if args.native_blas:
        for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
            env.pop(name, None)
    cores = sorted(os.sched_getaffinity(0))[:threads]
    command = [sys.executable, __file__, "--worker", "--threads", str(threads), "--dtypes", dtype,
               "--batch", str(args.batch), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats),
               "--sizes", *(":".join(map(str, s)) for s in args.sizes)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False,
                          preexec_fn=lambda: os.sched_setaffinity(0, cores))
    if done.returncode != 0:
        raise SystemExit(f"bench_ham: the {threads}-thread {dtype} run failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _ratio_spread(times):
    """The first and third quartiles of hamux/refham over the pairs of calls made together."""
    ratios = [h / o for h, o in zip(times["hamux"], times["refham"])]
    if len(ratios) < 2:
        return "–"
    low, _, high = statistics.quantiles(ratios, n=4)
    return f"{low:.2f}–{high:.2f}"


def _sizes(text):
    try:
        sizes = tuple(int(n) for n in text.split(":"))
    except ValueError:
        sizes = ()
    if len(sizes) != 3 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"a size is three positive integers v:h1:h2, got {text!r}")
    return sizes


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=_sizes, nargs="+",
                   default=[(64, 128, 128), (256, 512, 512), (784, 1024, 1024)],
                   help="layer sizes v:h1:h2 (64:128:128 256:512:512 784:1024:1024)")
    p.add_argument("--batch", type=int, default=256, help="batch (256)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], choices=[1, 2, 4, 8, 16],
                   help="thread counts, one subprocess each (1 2)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"],
                   choices=["float32", "float64"], help="(float32 float64)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls per side (5)")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per side (30)")
    p.add_argument("--native-blas", action="store_true",
                   help="unset OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE in the runs, so that "
                        "NumPy's OpenBLAS picks its kernels for this CPU (XLA always does)")
    p.add_argument("--json", help="also write every timing to this file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.batch < 1 or args.warmup < 0 or args.repeats < 1:
        p.error("--batch and --repeats must be >= 1, --warmup >= 0")
    if max(args.threads) > len(os.sched_getaffinity(0)):
        p.error(f"--threads {max(args.threads)} exceeds the {len(os.sched_getaffinity(0))} "
                f"cores this process may use")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        args.dtype = args.dtypes[0]
        return worker(args)
    try:
        import hamux  # noqa: F401  (checked here, used in the subprocesses)
    except ImportError as exc:
        raise SystemExit(f"bench_ham needs hamux, jax and fastcore ({exc}): "
                         f"pip install 'refham[bench]'") from None
    runs = [_subprocess(args, threads, dtype) for threads in args.threads for dtype in args.dtypes]
    blas = runs[0]["blas"][0] if runs[0]["blas"] else {}
    print(f"CPU: {runs[0]['cpu']} ({os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}); "
          f"NumPy BLAS: {blas.get('internal_api')} {blas.get('version')} "
          f"{blas.get('architecture')} kernels (OPENBLAS_CORETYPE={runs[0]['OPENBLAS_CORETYPE']})"
          f"; jax {runs[0]['jax']}; batch {args.batch}; medians of {args.repeats} interleaved "
          f"calls")
    print(f"{'threads':>7} {'dtype':>7} {'v:h1:h2':>15} {'refham ms':>10} {'hamux ms':>9} "
          f"{'speed':>6} {'spread':>11} {'best':>6} {'GEMMs ms':>9} {'÷GEMMs':>7} {'ΔE':>8} "
          f"{'Δ∂E/∂g':>8}")
    for run in runs:
        for r in run["results"]:
            ms, best = r["median_ms"], r["best_ms"]
            print(f"{run['threads']:>7} {run['dtype']:>7} {':'.join(map(str, r['sizes'])):>15} "
                  f"{ms['refham']:10.2f} {ms['hamux']:9.2f} {ms['hamux'] / ms['refham']:5.2f}× "
                  f"{_ratio_spread(r['times']):>11} {best['hamux'] / best['refham']:5.2f}× "
                  f"{ms['gemms']:9.2f} {ms['refham'] / ms['gemms']:6.2f}× "
                  f"{r['agreement']['energy']:8.1e} {r['agreement']['dEdg']:8.1e}")
    print("speed: hamux's median time / refham's (> 1: refham is faster); spread: the quartiles "
          "of that ratio over the interleaved pairs of calls; best: the same with each side's "
          "fastest call (on a loaded machine, preemption inflates the medians); GEMMs: the "
          "call's four matrix products alone, ÷GEMMs: refham's time over theirs")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(runs, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
