"""`refham …` commands. Each command is a pair: `_add_<name>(parser)` declares its options and
`_run_<name>(args)` does the work; `COMMANDS` lists them. Heavy imports stay inside the run
functions so that `refham --help` is instant."""
import argparse
import sys

from refham.cli.files import (
    FORCE_HELP, add_export, add_import, add_oracle, run_export, run_import, run_oracle)


def _add_descend(p):
    p.add_argument("--visible", type=int, default=784, help="D, the visible layer's size (784)")
    p.add_argument("--hidden", type=int, default=900, help="N_h, units per hidden layer (900)")
    p.add_argument("--batch", type=int, default=1, help="independent states descended (1)")
    p.add_argument("--steps", type=int, default=28, help="steps of (H5) (28)")
    p.add_argument("--alpha", type=float, default=0.5, help="step size α (0.5)")
    p.add_argument("--state-scale", type=float, default=10.0, help="states start at s·N(0,1) (10)")
    p.add_argument("--weight-scale", type=float, default=0.02, help="W = s·N(0,1) (0.02)")
    p.add_argument("--seed", type=int, default=0, help="weights use seed, states seed + 1 (0)")
    p.add_argument("--out", default="energy_descent.png", help="PNG of E per step, if "
                   "matplotlib is installed (energy_descent.png); '' for none")
    p.add_argument("--force", action="store_true", help=FORCE_HELP)


def _run_descend(args):
    """Energy descent (:ref:`sec-metaformer`): the HAM s — v — c (relu — layernorm — relu, dense
    synapses) with random weights, all states from 10·N(0,1), 28 steps of α = 0.5; prints E per
    step."""
    from refham.backend import to_numpy
    from refham.checks import integer_at_least
    from refham.files.memory import require_three_layer_ham
    from refham.files.outputs import atomic_write, check_output_file
    from refham.ham import HAMError
    from refham.metaformer import three_layer_ham

    if args.out:
        check_output_file(args.out, args.force)
    for name, least in (("visible", 1), ("hidden", 1), ("batch", 1), ("steps", 0)):
        integer_at_least(f"--{name}", getattr(args, name), least, HAMError)
    require_three_layer_ham(args.visible, args.hidden, args.batch, args.steps)
    ham = three_layer_ham(args.visible, args.hidden)
    weights = ham.init_weights(args.seed, scale=args.weight_scale)
    states = ham.init_states(args.batch, seed=args.seed + 1, scale=args.state_scale)
    trajectory = ham.descend(states, weights, args.alpha, max_steps=args.steps)
    energies = to_numpy(trajectory.energies)  # (steps + 1, batch)
    print(f"HAM s—v—c, D={args.visible}, N_h={args.hidden}, alpha={args.alpha}, "
          f"batch={args.batch}: energy per step (mean over the batch; ΔE: largest over it)")
    print(f"{'step':>4} {'E':>14} {'ΔE':>12}")
    for step, e in enumerate(energies):
        rise = f"{(e - energies[step - 1]).max():12.4g}" if step else ""
        print(f"{step:>4} {e.mean():14.6g} {rise}")
    if not args.out:
        return 0
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(f"matplotlib is not installed: no plot written to {args.out} "
              f"(pip install matplotlib, or refham[plot], to get it)")
        return 0
    fig = Figure(figsize=(5, 3.5), layout="tight")
    ax = fig.add_subplot()
    ax.plot(energies, marker="o", markersize=3)
    ax.set(xlabel="step", ylabel="energy E", title=f"HAM energy descent (α = {args.alpha})")
    atomic_write(args.out, lambda f: fig.savefig(f, format="png", dpi=120))
    print(f"plot written to {args.out}")
    return 0


def _add_train(p):
    from refham.training.train_config import add_config_options

    add_config_options(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out exactly where its last.npz left it; its "
                        "settings are read from the checkpoint (options given must match)")
    p.add_argument("--force", action="store_true",
                   help="start a new run in --out even if it holds another run's files "
                        "(config.json, metrics.jsonl, last.npz, best.npz): they are removed")


def _run_train(args):
    """Train a Mixer (default: ParaMixer on the built-in digits) with checkpoints and a log."""
    from refham.training.distributed import launched_rank
    from refham.training.train import TrainingDiverged, resume_settings, train
    from refham.training.train_config import TrainConfig, given_settings

    say = print if launched_rank() == 0 else lambda *a, **k: None   # one report per job
    try:
        settings = given_settings(args)
        if args.resume:
            settings = {**resume_settings(settings.get("out", TrainConfig.out)), **settings}
        cfg = TrainConfig.from_dict(settings)
        say(f"{'resuming' if args.resume else 'training'} {cfg.model} on {cfg.data} "
            f"in {cfg.out}:\n{cfg}", flush=True)
        summary = train(cfg, resume=args.resume, echo=True, force=args.force)
    except TrainingDiverged as exc:
        print(f"refham train: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("refham train: aborted; the last checkpoint written stays valid", file=sys.stderr)
        return 130
    if summary["status"] == "interrupted":
        say(f"stopped by {summary['signal']} at step {summary['step']} (epoch "
            f"{summary['epochs_done'] + 1}); saved {cfg.out}/last.npz — continue with: "
            f"refham train --resume --out {cfg.out}")
        return 0
    best = ("" if summary["best_epoch"] is None else
            f"; best.npz (epoch {summary['best_epoch']}, validation top-1 "
            f"{100 * summary['best_val_acc']:.2f}%): test top-1 "
            f"{100 * summary['best_test_acc']:.2f}% (loss {summary['best_test_loss']:.4f})")
    say(f"finished {summary['epochs']} epochs in {summary['wall_time']:.1f} s: final test "
        f"top-1 {100 * summary['test_acc']:.2f}% (loss {summary['test_loss']:.4f}){best}; "
        f"checkpoints and metrics in {cfg.out}")
    return 0


def _add_eval(p):
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a last.npz or best.npz written by refham train")
    p.add_argument("--data-path", default=None,
                   help="where the CIFAR archive lives now (default: the path used in training)")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (256)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default=None,
                   help="array backend (the one REFHAM_BACKEND chooses, else numpy)")
    p.add_argument("--threads", type=int, default=1,
                   help="BLAS threads on the CPU, 0: the BLAS default (1)")


def _run_eval(args):
    """Test loss and top-1 accuracy of a checkpoint, on the split it was trained against."""
    from refham.training.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data_path, args.batch_size, args.backend,
                                 args.threads)
    print(f"{args.checkpoint}: {result['model']} on {result['data']}, epoch {result['epoch']} "
          f"(step {result['step']})\ntest loss {result['loss']:.4f}  top-1 "
          f"{100 * result['acc']:.2f}% ({result['n']} images)")
    return 0


def _add_sweep(p):
    from refham.asym_init import ASYM_INITS
    from refham.study.sweep import ARMS, PER_RUN, SWEEP_LAMS, SWEEP_SEEDS, SWEEP_SETTINGS
    from refham.training.train_config import add_config_options

    p.add_argument("--out", default="runs/sweep",
                   help="folder of the sweep: runs/, results.jsonl, results.md, the figures "
                        "(runs/sweep)")
    p.add_argument("--models", nargs="+", choices=tuple(ARMS), default=list(ARMS),
                   help=f"models to train (all: {' '.join(ARMS)}; symmixer-exact: one γ per "
                        f"block norm)")
    p.add_argument("--lams", nargs="+", type=float, default=list(SWEEP_LAMS),
                   help=f"AsymMixer λ values ({' '.join(f'{lam:g}' for lam in SWEEP_LAMS)})")
    p.add_argument("--seeds", nargs="+", type=int, default=list(SWEEP_SEEDS),
                   help=f"seeds per model and λ ({' '.join(map(str, SWEEP_SEEDS))})")
    p.add_argument("--epochs", nargs="+", type=int, default=None, metavar="EPOCHS",
                   help=f"training budgets, each reported ({SWEEP_SETTINGS['epochs']})")
    p.add_argument("--tune-lr", nargs="+", type=float, default=(), metavar="LR",
                   help="choose each row's lr from these by validation accuracy on the tune "
                        "seeds, then report the test accuracy at that lr over --seeds")
    p.add_argument("--tune-seeds", nargs="+", type=int, default=[0], metavar="SEED",
                   help="seeds the lr grid is trained on (0)")
    p.add_argument("--asym-init", nargs="+", choices=ASYM_INITS, default=["official"],
                   help="AsymMixer inits: official (the paper's), zero (W₂ = 0), para (starts "
                        "as the ParaMixer of its seed) (official)")
    p.add_argument("--study", action="store_true",
                   help="the full study (docs/symmetry-study.md): fixed budget, tuned lr, 120 "
                        "epochs and the AsymMixer inits")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the tables and figures of what has finished "
                        "(marked partial if runs are missing)")
    p.add_argument("--part", default=None, metavar="I/N",
                   help="train only part I of N (disjoint), e.g. 1/2 and 2/2 in two processes")
    add_config_options(p, SWEEP_SETTINGS, exclude=PER_RUN + ("epochs",))


def _part(text):
    """'I/N' → (I, N) with 1 ≤ I ≤ N, or SweepError."""
    from refham.study.sweep import SweepError

    numbers = text.split("/")
    if len(numbers) != 2 or not all(n.isdigit() for n in numbers) \
            or not 1 <= int(numbers[0]) <= int(numbers[1]):
        raise SweepError(f"--part {text!r} must read I/N with 1 ≤ I ≤ N, e.g. 1/2")
    return int(numbers[0]), int(numbers[1])


def _run_sweep(args):
    """The symmetry-breaking experiment (:ref:`sec-sweep`): models × λ × inits × budgets × seeds;
    tables, figures."""
    from refham.study.sweep import PER_RUN, run_study, run_sweep
    from refham.training.distributed import get_communicator
    from refham.training.stopping import stop_requests
    from refham.training.train_config import given_settings

    log = lambda line: print(line, flush=True)  # noqa: E731
    get_communicator("auto")         # MPI starts before the stop handlers are installed
    with stop_requests() as stop:    # the sweep's runs share it: no signal is lost between them
        try:
            part = None if args.part is None else _part(args.part)
            settings = given_settings(args, exclude=PER_RUN + ("epochs",))
            if args.study:
                run_study(args.out, settings, part, log, args.report_only)
            else:
                run_sweep(args.out, settings, args.models, args.lams, args.seeds, args.epochs,
                          args.tune_lr, args.tune_seeds, args.asym_init, part, log,
                          args.report_only)
        except KeyboardInterrupt:
            print("refham sweep: aborted; finished runs are kept, a re-run continues",
                  file=sys.stderr)
            return 130
    return stop.exit_status()   # 130/143 when a signal stopped it: a re-run continues


def _add_metaformer(p):
    from refham.training.distributed import COMMS
    from refham.metaformer import TARGETS
    from refham.training.metaformer_train import DATASETS, TrainSettings

    sub = p.add_subparsers(dest="action", metavar="ACTION")
    sub.required = True
    default = TrainSettings()
    t = sub.add_parser("train", help="train the denoiser (default: the built-in digits)",
                       description="Train the Energy MetaFormer (see the docs) as a denoiser by "
                                   "hand-written backprop through T steps of its dynamics.")
    t.add_argument("--paper", action="store_true",
                   help="the paper's MNIST settings: D = 784, N_h = 900, T = 10, lr 1e-4, batch "
                        "512, 100 epochs (needs --data-path); flags given too override them")
    t.add_argument("--data", choices=DATASETS, help=f"dataset ({default.data}; mnist needs "
                   f"--data-path)")
    t.add_argument("--data-path", metavar="DIR", help="folder with train-images-idx3-ubyte[.gz] "
                   "(and t10k-images-idx3-ubyte[.gz] for the test split)")
    for flag, kind, what in (("--hidden", int, "N_h, units per hidden layer"),
                             ("--steps", int, "T, unrolled steps of (H5)"),
                             ("--alpha", float, "step size α"), ("--lr", float, "Adam lr"),
                             ("--batch-size", int, "images per batch"),
                             ("--epochs", int, "passes over the training images"),
                             ("--seed", int, "weights, batch order and noise"),
                             ("--max-memory", float, "GiB the run may use; refused before "
                              "allocating when its estimate exceeds this or the memory "
                              "available")):
        name = flag[2:].replace("-", "_")
        t.add_argument(flag, type=kind, help=f"{what} ({getattr(default, name)})")
    t.add_argument("--target", choices=TARGETS, help="denoise towards the clean image (the "
                   "paper's loss) or towards LN(clean) (standardised) (clean)")
    t.add_argument("--out", metavar="DIR", help=f"run folder: metrics.jsonl, last.npz "
                   f"({default.out})")
    t.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="no progress bar")
    t.add_argument("--comm", choices=COMMS, help="data parallelism under mpiexec: auto (MPI with "
                   "more than one rank), none, mpi, nccl (auto)")
    f = sub.add_parser("figures", help="receptive fields and energy descent of a checkpoint",
                       description="Write receptive_fields.png and energy_descent.png (+ .json "
                                   "with E per step, and the start states) for a checkpoint.")
    f.add_argument("--checkpoint", required=True, metavar="PATH", help="a last.npz of `train`")
    f.add_argument("--out", metavar="DIR", help="where to write (the checkpoint's folder)")
    f.add_argument("--samples", type=int, default=8, help="descents drawn (8)")
    f.add_argument("--steps", type=int, default=28, help="steps of (H5) (28)")
    f.add_argument("--alpha", type=float, default=0.5, help="step size α (0.5)")
    f.add_argument("--state-scale", type=float, default=10.0, help="x⁰ = s·N(0,1) (10)")
    f.add_argument("--seed", type=int, default=0, help="seed of the start states (0)")
    f.add_argument("--force", action="store_true", help="replace the figures if they exist")


def _run_metaformer(args):
    """The Energy MetaFormer (:ref:`sec-metaformer`): `train` the denoiser; `figures` from its
    checkpoint."""
    import dataclasses
    import os
    from refham.training.distributed import launched_rank
    from refham.training.metaformer_figures import PlottingUnavailable, write_figures
    from refham.training.metaformer_train import PAPER_SETTINGS, TrainSettings, train

    say = print if launched_rank() == 0 else lambda *a, **k: None   # one report per job
    try:
        if args.action == "train":
            names = [f.name for f in dataclasses.fields(TrainSettings)]
            given = {n: getattr(args, n) for n in names if getattr(args, n) is not None}
            settings = TrainSettings(**{**(PAPER_SETTINGS if args.paper else {}), **given})
            say(f"Energy MetaFormer on {settings.data} in {settings.out}: {settings}", flush=True)
            summary = train(settings, echo=True)
            first, last = summary["history"][0], summary["history"][-1]
            say(f"finished {last['epoch']} epochs in {last['seconds']:.1f} s; test loss on "
                f"{summary['test_split']}:\n  paper's (y = clean)        "
                f"{first['test_loss_clean']:.5f} → {last['test_loss_clean']:.5f}  (bound "
                f"(1 − 1/√D)² = {summary['loss_floor']:.5f} for D = {summary['visible']})\n"
                f"  standardised (y = LN(clean)) {first['test_loss_standardised']:.5f} → "
                f"{last['test_loss_standardised']:.5f}\nnext: refham metaformer figures "
                f"--checkpoint {summary['checkpoint']}")
            return 0
        out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
        paths, energies = write_figures(args.checkpoint, out, args.samples, args.seed,
                                        args.steps, args.alpha, args.state_scale,
                                        force=args.force)
    except PlottingUnavailable as exc:
        print(f"refham metaformer {args.action}: {exc}", file=sys.stderr)
        return 1
    print(f"energy E (H1) per step of α = {args.alpha:g} from {args.state_scale:g}·N(0,1), one "
          f"column per sample (ΔE: the largest change over the samples)")
    print(f"{'step':>4} " + " ".join(f"{'E' + str(i):>12}" for i in range(energies.shape[1]))
          + f" {'ΔE':>11}")
    for step, row in enumerate(energies):
        rise = f"{(row - energies[step - 1]).max():11.4g}" if step else ""
        print(f"{step:>4} " + " ".join(f"{e:12.6g}" for e in row) + f" {rise}")
    print("wrote " + ", ".join(paths.values()))
    return 0


COMMANDS = {
    # name: (help, add_arguments, run)
    "descend": ("energy descent of the paper's three-layer HAM (see the docs): prints E per "
                "step, plots it", _add_descend, _run_descend),
    "train": ("train a Mixer (default: ParaMixer on the built-in digits), with checkpoints, "
              "a metrics log and --resume", _add_train, _run_train),
    "eval": ("test loss and accuracy of a checkpoint", _add_eval, _run_eval),
    "metaformer": ("the Energy MetaFormer (see the docs): `train` a three-layer HAM denoiser by "
                   "backprop through its dynamics; `figures` of a checkpoint", _add_metaformer,
                   _run_metaformer),
    "sweep": ("the symmetry-breaking experiment: every model, AsymMixer over λ, several seeds, "
              "budgets and learning rates; tables and figures", _add_sweep, _run_sweep),
    "oracle": ("golden files for testing other implementations: `write` one (float64, "
               "tensors by name), `check` a candidate against it", add_oracle, run_oracle),
    "export": ("Mixer weights → a timm state dict (safetensors or npz) for the paper's PyTorch "
               "models", add_export, run_export),
    "import": ("a timm state dict (safetensors or npz) → refham params or checkpoint",
               add_import, run_import),
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="refham", description="Reference hierarchical associative memories and MLP-Mixers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def expected_errors():
    """The exception classes that mean bad input, files or settings, or a machine without the
    resources asked for — never a bug in refham — as a tuple for `except`: refham's own
    (`RefhamError`, the base of every one of them) and the system's (no memory, a file or
    folder the system refuses)."""
    from refham.errors import RefhamError
    return RefhamError, MemoryError, OSError


def main(argv=None):
    """Run one command; an expected error (see `expected_errors`) becomes one line on stderr
    and exit status 2 (1 for a diverged run or a missing plotting library; 130 for Ctrl-C).
    Anything else is a bug and keeps its traceback. Under mpiexec every rank ends here
    (refham.training.launch): a failing rank ends the job, an error every rank shares is said
    once."""
    for stream in (sys.stdout, sys.stderr):   # a path that is not UTF-8 still prints
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:
        from refham.training.launch import end_job, under_launcher
        if exc.code and under_launcher():   # a usage error on one rank ends the whole job
            end_job(exc.code)
        raise
    import warnings
    import numpy
    from refham.backend import environment_error
    from refham.training.launch import end_job, job_output, report_crash, under_launcher

    if under_launcher():
        sys.excepthook = report_crash
    with job_output(), warnings.catch_warnings():
        warnings.showwarning = _warning_line
        try:
            if environment_error():
                raise environment_error()
            # overflow is reported by refham's own finiteness checks (the diverged dynamics, the
            # training guard, golden files), which say what to do; numpy's warnings add only
            # noise
            with numpy.errstate(over="ignore", invalid="ignore", divide="ignore"):
                code = args.run(args) or 0
        except KeyboardInterrupt:  # outputs are written atomically: nothing half-written remains
            print(f"refham {args.command}: interrupted", file=sys.stderr)
            code = 130
        except Exception as exc:
            if not isinstance(exc, expected_errors()):
                raise
            from refham.training.metaformer_figures import PlottingUnavailable
            from refham.training.train import TrainingDiverged
            code = 1 if isinstance(exc, (TrainingDiverged, PlottingUnavailable)) else 2
            if isinstance(exc, MemoryError):
                exc = f"out of memory ({exc or 'MemoryError'}): use a smaller model, batch or file"
            print(f"refham {args.command}: error: {exc}", file=sys.stderr)
    return end_job(code)


def _warning_line(message, category, filename, lineno, file=None, line=None):
    """Print a warning as one line for users (not the file, line and source of Python's
    format)."""
    print(f"refham: warning: {message}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
