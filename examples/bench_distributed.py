"""Data-parallel scaling on the CPU: training throughput of the `small` ParaMixer (32×32×3 images,
patch 4, C = 256, depth 8), float32, for 1 process × 1 BLAS thread, 1 process × 2 threads and
2 MPI ranks × 1 thread each, plus the allreduce's share of a step. One command:

    python examples/bench_distributed.py                    # global batch 128, 8 timed steps
    python examples/bench_distributed.py --batch 256 --steps 12 --json scaling.json

A step is what `refham train` does per batch: forward + hand-written backward on this rank's
shard of the global batch, `distributed.combine_gradients` (one allreduce of one flat buffer),
AdamW. Reported per setting: images/s (global batch × timed steps / time), the speed-up over
1 × 1, and per step the time in the allreduce itself and the time spent waiting for the slower
rank (a barrier before the allreduce separates the two). The machine's CPU, BLAS and load
average are printed with the table, since other processes on the cores change the numbers.
Needs the `mpi` extra (mpi4py, MPICH) for the 2-rank line.
"""
import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

SETTINGS = (("1 process × 1 thread", 1, 1), ("1 process × 2 threads", 1, 2),
            ("2 ranks × 1 thread", 2, 1))


def worker(args):
    """One rank: time `args.steps` training steps after `args.warmup`; rank 0 prints JSON."""
    from threadpoolctl import threadpool_limits
    from refham.backend import asarray, rng, set_dtype
    from refham.training.distributed import combine_gradients, get_communicator, shard
    from refham.mixer import Mixer, make_config
    from refham.optim import AdamW

    comm = get_communicator("auto")
    set_dtype("float32")
    model = Mixer(make_config("paramixer", "small"))
    params, optimizer = model.init(0), AdamW(weight_decay=0.05)
    state, gen = optimizer.init(params), rng(0)
    rows = shard(args.batch, comm)
    images = asarray(gen.standard_normal((args.batch, 3, 32, 32))[rows])
    labels = asarray(gen.integers(0, 10, args.batch)[rows], dtype="int64")
    reduce_time = wait_time = 0.0
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                comm.barrier()
                started, reduce_time, wait_time = time.perf_counter(), 0.0, 0.0
            loss, _, grads = model.loss_and_grads(params, images, labels)
            if comm.size > 1:
                t0 = time.perf_counter()
                comm.barrier()
                t1 = time.perf_counter()
                grads, _ = combine_gradients(comm, grads, rows.stop - rows.start, args.batch,
                                             (loss,))
                wait_time += t1 - t0
                reduce_time += time.perf_counter() - t1
            params, state = optimizer.update(params, grads, state, 1e-3)
        comm.barrier()
        elapsed = time.perf_counter() - started
    if comm.rank == 0:
        print(json.dumps({"img_per_s": args.batch * args.steps / elapsed,
                          "step_s": elapsed / args.steps,
                          "allreduce_s": reduce_time / args.steps,
                          "wait_s": wait_time / args.steps}))


def _machine():
    """CPU model, BLAS kernel (threadpoolctl) and load average: the context of the numbers."""
    import numpy  # noqa: F401  (loads the BLAS that threadpoolctl then reports)
    from threadpoolctl import threadpool_info
    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    blas = ", ".join(f"{i.get('internal_api')} {i.get('version')} ({i.get('architecture')})"
                     for i in threadpool_info() if i.get("user_api") == "blas")
    return {"cpu": cpu, "cores": os.cpu_count(), "blas": blas,
            "load_average": os.getloadavg()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=128, help="global batch (128)")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (2)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or \
        shutil.which("mpiexec")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    machine, rows = _machine(), []
    for name, ranks, threads in SETTINGS:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "--threads",
                   str(threads), "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup)]
        if ranks > 1:
            if mpiexec is None:
                print(f"{name}: skipped, no mpiexec (pip install \"refham[mpi]\")")
                continue
            command = [mpiexec, "-n", str(ranks)] + command
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        rows.append({"setting": name, "ranks": ranks, "threads": threads,
                     **json.loads(done.stdout.strip().splitlines()[-1])})
    base = rows[0]["img_per_s"]
    print(f"small ParaMixer, float32, global batch {args.batch}, {args.steps} timed steps\n"
          f"CPU: {machine['cpu']} ({machine['cores']} cores); BLAS: {machine['blas']}\n"
          f"load average before: {' '.join(f'{x:.2f}' for x in machine['load_average'])}, "
          f"after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| setting | img/s | speed-up | step (s) | allreduce (s, share) | waiting (s) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        reduce = (f"{row['allreduce_s']:.4f} ({100 * row['allreduce_s'] / row['step_s']:.1f}%)"
                  if row["ranks"] > 1 else "—")
        wait = f"{row['wait_s']:.3f}" if row["ranks"] > 1 else "—"
        print(f"| {row['setting']} | {row['img_per_s']:.1f} | {row['img_per_s'] / base:.2f}× "
              f"| {row['step_s']:.3f} | {reduce} | {wait} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "batch": args.batch, "steps": args.steps,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
