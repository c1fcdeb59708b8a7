"""Training-step benchmark: refham against its PyTorch peer (examples/torch_mixer.py), same process.

One training step = forward + backward + AdamW on a fixed batch, the same model (refham's initial
weights loaded into the peer by timm name), dtype, batch, loss and optimiser on both sides. Steps
alternate refham, torch, refham, torch, … so that both see the same machine load; warm-up steps
are excluded. Reported per variant and config: images/s (batch / median step time), the speed
ratio refham/torch, and the peak memory a step adds on top of what was in use before it
(activations, caches, gradients, temporaries), measured on one extra, untimed step.

    python examples/bench.py                                   # tiny and small, all four variants
    python examples/bench.py --config small --batch 64 128 256 # a batch sweep
    python examples/bench.py --config tiny --depth 2 4 8 --dim 128 256 --json out.json
    python examples/bench.py --backend cupy --config tiny --batch 512 --depth 8 --dim 256  # GPU

CPU: torch runs with as many threads as NumPy's BLAS (threadpoolctl), or both with --threads.
GPU: refham on CuPy against torch on CUDA, TF32 off on both unless --tf32. The JSON output holds
every step time and the environment (versions, BLAS kernel, OPENBLAS_CORETYPE, load average);
the table is printed last.
"""
import argparse
import contextlib
import ctypes
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time

import numpy

import refham
from refham.backend import (
    asarray, backend_name, set_backend, set_dtype, set_tf32, to_numpy, xp)
from refham.fast.settings import keep_glibc_malloc, retain_freed_memory, use_compiled
from refham.mixer import MODELS, SIZES, Mixer, make_config
from refham.optim import AdamW

LEARNING_RATE, WEIGHT_DECAY = 1e-3, 0.05


# ---------------------------------------------------------------------------------------------
# Memory: heap in use on the CPU (glibc, both libraries allocate through malloc), pools on a GPU
# ---------------------------------------------------------------------------------------------
class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def _heap_in_use():
    """Bytes handed out by malloc now (small blocks + mmapped ones), or None off glibc."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    return info.uordblks + info.hblkhd


def _cpu_peak_bytes(step):
    """Peak heap in use during step() minus the heap in use before it, sampled every ~0.2 ms
    from a second thread (NumPy and torch release the GIL inside their kernels)."""
    before = _heap_in_use()
    if before is None:
        return None
    peak, done = [before], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _heap_in_use())
            time.sleep(2e-4)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        step()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _heap_in_use()) - before


def _refham_gpu_peak_bytes(step):
    """CuPy: the pool is emptied of cached blocks, so after the step it holds the most that was
    in use at once (up to block rounding); minus what was in use before."""
    import cupy
    pool = cupy.get_default_memory_pool()
    pool.free_all_blocks()
    before = pool.used_bytes()
    step()
    cupy.cuda.Device().synchronize()
    return pool.total_bytes() - before


def _torch_gpu_peak_bytes(step):
    import torch
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


# ---------------------------------------------------------------------------------------------
# The two training steps
# ---------------------------------------------------------------------------------------------
def refham_step(config, params, images, labels, lam, compiled=True):
    """A closure running one refham training step (loss and gradients + AdamW) on the fixed
    batch, as the training loop runs it: the unchecked core `Mixer._loss_and_grads`, without
    the input checks' device→host transfers (this batch is made here, finite and in range), its
    elementwise chains compiled (refham.fast.compiled, where numba is installed) or not."""
    model, optimizer = Mixer(config), AdamW(weight_decay=WEIGHT_DECAY)
    images, labels = asarray(images), xp.asarray(labels)
    state = {"params": params, "opt": optimizer.init(params)}

    def step():
        use_compiled(compiled)
        try:
            _, _, grads = model._loss_and_grads(state["params"], images, labels, lam)
            state["params"], state["opt"] = optimizer.update(state["params"], grads,
                                                             state["opt"], LEARNING_RATE)
        finally:
            use_compiled(True)
        if backend_name() == "cupy":
            xp.cuda.Device().synchronize()

    return step


def torch_step(config, params, images, labels, lam, device, dtype):
    """The same step in PyTorch eager: the peer model holding refham's initial weights,
    torch.optim.AdamW with timm's decay grouping (torch_mixer.adamw)."""
    import torch
    import torch_mixer
    model = torch_mixer.from_refham(config, {k: to_numpy(v) for k, v in params.items()},
                                    getattr(torch, dtype)).to(device)
    optimizer = torch_mixer.adamw(model, LEARNING_RATE, WEIGHT_DECAY)
    images = torch.from_numpy(images).to(device)
    labels = torch.from_numpy(labels).to(device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        torch_mixer.objective(model, model(images), labels, lam).backward()
        optimizer.step()
        if device == "cuda":
            torch.cuda.synchronize()

    return step


def _timed(step):
    """(wall seconds, CPU seconds of the process: all its threads) of one step."""
    started, cpu_started = time.perf_counter(), time.process_time()
    step()
    return time.perf_counter() - started, time.process_time() - cpu_started


def run_case(config, batch, args, with_torch):
    """Warm-up, then args.steps interleaved timed steps, then one untimed step each for memory."""
    generator = numpy.random.default_rng(0)
    images = generator.standard_normal(
        (batch, config.in_chans, config.image_size, config.image_size)).astype(args.dtype)
    labels = generator.integers(0, config.num_classes, batch)
    params = Mixer(config).init(seed=0)
    steps = {"refham": refham_step(config, params, images, labels, args.lam)}
    if args.plain_chains:
        steps["refham_plain"] = refham_step(config, params, images, labels, args.lam, False)
    if with_torch:
        device = "cuda" if args.backend == "cupy" else "cpu"
        steps["torch"] = torch_step(config, params, images, labels, args.lam, device, args.dtype)
    times = {side: [] for side in steps}
    cpu_times = {side: [] for side in steps}
    for index in range(args.warmup + args.steps):
        for side, step in steps.items():
            seconds, cpu_seconds = _timed(step)
            if index >= args.warmup:
                times[side].append(seconds)
                cpu_times[side].append(cpu_seconds)
    refham_peak = _refham_gpu_peak_bytes if args.backend == "cupy" else _cpu_peak_bytes
    peak = {"refham": refham_peak, "refham_plain": refham_peak,
            "torch": (_torch_gpu_peak_bytes if args.backend == "cupy" else _cpu_peak_bytes)}
    result = {"model": config.model, "batch": batch, "image_size": config.image_size,
              "patch": config.patch, "tokens": config.num_tokens, "dim": config.dim,
              "depth": config.depth}
    for side, step in steps.items():
        peak_bytes = peak[side](step)
        result[side] = {"img_per_s": batch / statistics.median(times[side]),
                        "step_s": times[side], "cpu_s": cpu_times[side],
                        "peak_mb": None if peak_bytes is None else peak_bytes / 2 ** 20}
    if with_torch:
        result["ratio"] = result["refham"]["img_per_s"] / result["torch"]["img_per_s"]
        result["ratio_cpu"] = statistics.median(cpu_times["torch"]) / \
            statistics.median(cpu_times["refham"])
        result["ratio_paired_median"] = statistics.median(
            t / r for r, t in zip(times["refham"], times["torch"]))
        if args.plain_chains:
            result["ratio_plain"] = result["refham_plain"]["img_per_s"] / \
                result["torch"]["img_per_s"]
    return result


# ---------------------------------------------------------------------------------------------
# Environment, table, command line
# ---------------------------------------------------------------------------------------------
def _blas_info():
    """threadpoolctl's view of every BLAS in the process, NumPy's first."""
    try:
        import threadpoolctl
    except ImportError:
        return []
    pools = sorted((pool for pool in threadpoolctl.threadpool_info()
                    if pool.get("user_api") == "blas"),
                   key=lambda pool: "numpy" not in pool.get("filepath", ""))
    return [{k: pool.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
            for pool in pools]


def _cpu_name():
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def environment(args, torch_module):
    env = {"refham": refham.__file__, "numpy": numpy.__version__, "python": sys.version.split()[0],
           "backend": args.backend, "dtype": args.dtype, "cpu": _cpu_name(),
           "cores": os.cpu_count(), "blas": _blas_info(),
           "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
           "load_average_start": os.getloadavg(), "tf32": args.tf32, "malloc": args.malloc}
    if torch_module is not None:
        env.update(torch=torch_module.__version__, torch_threads=torch_module.get_num_threads(),
                   torch_blas="MKL" if torch_module.backends.mkl.is_available() else "no MKL")
        if args.backend == "cupy":
            env["gpu"] = torch_module.cuda.get_device_name()
    return env


def describe(env):
    """One line: the machine (CPU model, cores), NumPy's BLAS and its kernel, torch, the load."""
    blas = ", ".join(f"{b['internal_api']} {b['version']} {b['architecture']} kernels, "
                     f"{b['num_threads']} threads" for b in env["blas"][:1]) or "unknown"
    coretype = env["OPENBLAS_CORETYPE"] or "unset"
    return (f"{env['cpu']}, {env['cores']} cores | NumPy BLAS: {blas} (OPENBLAS_CORETYPE "
            f"{coretype}) | {env['backend']}/{env['dtype']} | torch {env.get('torch', '-')} "
            f"({env.get('torch_threads', '-')} threads, {env.get('torch_blas', '-')}) | load "
            f"{env['load_average_start'][0]:.1f}")


def table(results):
    """The results as a fixed-width text table."""
    head = (f"{'model':<10} {'batch':>5} {'S':>4} {'C':>5} {'depth':>5} {'refham img/s':>13} "
            f"{'torch img/s':>12} {'ratio':>6} {'by CPU':>6} {'plain':>6} {'refham MB':>10} "
            f"{'torch MB':>9}")
    lines = [head, "-" * len(head)]

    def number(value, spec):
        return format(value, spec) if value is not None else "-"

    for r in results:
        torch_side = r.get("torch", {})
        lines.append(
            f"{r['model']:<10} {r['batch']:>5} {r['tokens']:>4} {r['dim']:>5} {r['depth']:>5} "
            f"{r['refham']['img_per_s']:>13.1f} {number(torch_side.get('img_per_s'), '12.1f'):>12} "
            f"{number(r.get('ratio'), '6.2f'):>6} {number(r.get('ratio_cpu'), '6.2f'):>6} "
            f"{number(r.get('ratio_plain'), '6.2f'):>6} {number(r['refham']['peak_mb'], '10.0f'):>10} "
            f"{number(torch_side.get('peak_mb'), '9.0f'):>9}")
    return "\n".join(lines)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", nargs="+", default=["tiny", "small"], choices=list(SIZES),
                   help="model sizes (mixer.SIZES; tiny, small)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--batch", nargs="+", type=int, default=[128])
    p.add_argument("--depth", nargs="+", type=int, help="override the size's depth")
    p.add_argument("--dim", nargs="+", type=int, help="override the size's C")
    p.add_argument("--image-size", nargs="+", type=int, help="override (tokens = (size/patch)²)")
    p.add_argument("--patch", type=int, help="override the size's patch")
    p.add_argument("--steps", type=int, default=8, help="timed steps per side (8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    p.add_argument("--lam", type=float, default=0.0, help="AsymMixer penalty λ (0)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    p.add_argument("--threads", type=int, help="BLAS and torch threads (default: BLAS's own)")
    p.add_argument("--tf32", action="store_true", help="TF32 matmuls on the GPU, both sides")
    p.add_argument("--malloc", choices=("retain", "glibc"), default="retain",
                   help="retain (refham's default, for both sides): glibc keeps freed memory "
                        "(fast.settings.retain_freed_memory); glibc: the allocator as configured")
    p.add_argument("--no-torch", action="store_true", help="time refham alone")
    p.add_argument("--plain-chains", action="store_true",
                   help="also time refham with its elementwise chains as NumPy code (column "
                        "'plain': that side's ratio to torch), interleaved with the others")
    p.add_argument("--json", help="write all results and the environment here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be ≥ 1 and --warmup ≥ 0")
    return args


def _cases(args):
    for size in args.config:
        overrides = {"depth": args.depth, "dim": args.dim, "image_size": args.image_size}
        axes = {k: v for k, v in overrides.items() if v}
        for values in itertools.product(*axes.values()):
            fields = dict(zip(axes, values), **({"patch": args.patch} if args.patch else {}))
            for batch, model in itertools.product(args.batch, args.models):
                yield make_config(model, size, **fields), batch


def _import_torch(args):
    if args.no_torch:
        return None
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed (pip install refham[bench]): timing refham alone",
              file=sys.stderr)
        return None
    return torch


def main(argv=None):
    args = parse_args(argv)
    set_backend(args.backend)
    set_dtype(args.dtype)
    if args.malloc == "glibc":
        keep_glibc_malloc()
    elif not retain_freed_memory():   # now, before torch's first allocation, not at refham's
        print("--malloc retain: not glibc, allocator left as it is", file=sys.stderr)
    torch = _import_torch(args)
    blas_limit = contextlib.nullcontext()
    if args.threads:
        import threadpoolctl
        blas_limit = threadpoolctl.threadpool_limits(args.threads, user_api="blas")
    with blas_limit:
        if torch is not None:
            threads = args.threads or max([b["num_threads"] for b in _blas_info()] or [1])
            torch.set_num_threads(threads)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32
        if args.backend == "cupy":
            set_tf32(args.tf32)
        env = environment(args, torch)
        print(describe(env), flush=True)
        results = []
        for config, batch in _cases(args):
            results.append(run_case(config, batch, args, torch is not None))
            print(table(results[-1:]).splitlines()[-1], flush=True)
        env["load_average_end"] = os.getloadavg()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"environment": env, "results": results}, f, indent=1)
    print(f"\n{describe(env)}, load at the end {env['load_average_end'][0]:.1f}")
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
