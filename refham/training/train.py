"""The training loop: mini-batch AdamW/SGD on a Mixer with hand-written gradients, checkpoints
that resume exactly, and a metrics log.

    summary = train(TrainConfig(model="paramixer", data="digits", epochs=20, out="runs/para"))

Each optimiser step t (0-based) of epoch e:
    batch   ← the next slice of the epoch's permutation, drawn from rng((seed, 1, e))
    x       ← [crop, flip] → normalise → + σ·N(0, 1)         (augmentation: docs, training)
    J, ∇J   ← Mixer.loss_and_grads(x, y, λ, label smoothing, drop path)
    ∇J      ← clip by global norm (optional)
    θ       ← optimiser step at lr(t) = warm-up + cosine (optim.cosine_lr)
Every random draw of step t (noise, crop, flip, drop-path masks) comes from rng((seed, 2, t)), so
the RNG state of a run IS its step counter: restoring the step restores the exact random stream
and a resumed run reproduces an uninterrupted one bit for bit (on NumPy).

Under `mpiexec -n N` (refham.training.distributed) each rank draws step t's randomness for the whole global
batch as above, keeps its 1/N shard, and one allreduce per step combines the gradients: the
numbers do not depend on N (up to rounding), and a run resumes under any N. Only rank 0 writes.

The output folder holds `config.json` (written at start), `metrics.jsonl` (one line per epoch),
`last.npz` (end of every epoch, every `checkpoint_every` steps, and on SIGINT/SIGTERM) and
`best.npz` (best validation accuracy so far; the validation split is `val_fraction` of the
training images, held out before training), all written atomically. A NaN/inf loss or gradient,
or an update that makes a parameter or an optimiser moment NaN/inf, stops the run before that
step becomes its state, so no checkpoint ever holds a diverged state (and none could be written).
"""
import contextlib
import dataclasses
import json
import math
import os
import signal
import threading
import time

from tqdm import tqdm

from refham.backend import BackendError, asarray, rng, to_numpy, xp
from refham.asym_init import initial_params
from refham.files.checkpoint import (
    CheckpointError, atomic_write, describe_names, load_checkpoint, nonfinite_entries,
    save_checkpoint)
from refham.training.data import (
    DataError, add_gaussian_noise, batches, hold_out, horizontal_flip, load_dataset, normalise,
    random_crop)
from refham.training.distributed import (
    CommError, ShardedGenerator, broadcast_state, combine_gradients,
    get_communicator, shard)
from refham.training.evaluation import active_backend, evaluate
from refham.training.gpu import tf32_mode, warm_up
from refham.training.noise import step_generator
from refham.layers import InputError
from refham.mixer import ConfigError, Mixer, ParamError
from refham.files.outputs import prepare_folder
from refham.optim import OptimizerError, clip_by_global_norm, cosine_lr, make_optimizer
from refham.training.resume import (
    ResumeError, check_resumable, check_same_run, checked_progress,
    finished_records, last_checkpoint, saved_settings)
from refham.files.runlock import RunLock, RunLocked
from refham.training.train_config import (
    CROP_PAD, TrainConfig, TrainConfigError, model_config)

ORDER_STREAM, STEP_STREAM = 1, 2      # rng((seed, stream, epoch or step)): see the module docstring
VALIDATION_STREAM = 3                 # rng((data_seed, 3)) holds the validation split out
RNG_SCHEME = "counter-v1"


class TrainingDiverged(RuntimeError):
    """The loss, the gradient or the updated parameters/optimiser state of a step became NaN/inf;
    the run's state and checkpoints stay those of the step before."""


# what bad settings, data or files raise: the CLI reports these as errors, not as crashes
USER_ERRORS = (TrainConfigError, ResumeError, CheckpointError, DataError, ConfigError,
               OptimizerError, BackendError, InputError, ParamError, RunLocked, CommError)


def prepare_batch(images, dataset, cfg, gen):
    """Training inputs: [random crop, flip] → (x − mean_c)/std_c → + σ·N(0, 1), drawn from `gen`.
    With gen=None only the normalisation is applied (evaluation)."""
    if gen is not None and cfg.augment:
        images = horizontal_flip(random_crop(images, CROP_PAD, gen), gen)
    images = normalise(images, dataset.mean, dataset.std)
    if gen is not None and cfg.input_noise:
        images = add_gaussian_noise(images, cfg.input_noise, gen)
    return images


def symmetry_log(config, params):
    """Per-block symmetry measures for the metrics log, :eq:`M-symmetry`: cos(W₂, W₁ᵀ),
    ‖W₂‖/‖W₁‖."""
    from refham.mixer_energy import symmetry_measures
    return _json_floats(symmetry_measures(config, params))


def _json_floats(value):
    """Nested dicts/lists of (backend) scalars → plain Python floats for JSON."""
    if isinstance(value, dict):
        return {str(k): _json_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_floats(v) for v in value]
    return value if isinstance(value, (str, bool, int, type(None))) else float(to_numpy(value))


@contextlib.contextmanager
def _stop_requests():
    """A dict whose 'signal' entry is set by SIGINT/SIGTERM (checked between steps). A second
    signal while one is pending raises KeyboardInterrupt (checkpoints are atomic: nothing tears).
    Outside the main thread no handlers can be installed and the dict never changes."""
    stop = {"signal": None}

    def request_stop(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signal.Signals(signum).name

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclasses.dataclass
class _Progress:
    """What a checkpoint restores besides parameters and optimiser state (its `metrics`)."""
    best_val_acc: float = -1.0
    best_epoch: int = 0
    wall_time: float = 0.0          # seconds of training and evaluation, over all sessions
    epoch_loss_sum: float = 0.0     # running sums of the current epoch, for mid-epoch resumes
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_train_time: float = 0.0


class _Run:
    """One training run in its output folder: data, model, optimiser and the loop."""

    def __init__(self, cfg, resume, comm):
        """Load the data, build model and optimiser, lock cfg.out (rank 0: `self.lock`, which
        the caller releases), then start fresh or resume there; under several ranks (`comm`),
        all start from rank 0's parameters and optimiser state."""
        if cfg.batch_size % comm.size:
            raise TrainConfigError(f"batch_size {cfg.batch_size} is the global batch, split evenly "
                                   f"over the {comm.size} ranks: choose a multiple of {comm.size}")
        self.cfg, self.comm, self.stop_agreed = cfg, comm, False
        self.writer = comm.rank == 0    # the one gate of every write into the run folder
        self.paths = {name: os.path.join(cfg.out, name)
                      for name in ("config.json", "metrics.jsonl", "last.npz", "best.npz")}
        self.train_set, self.test_set = load_dataset(
            cfg.data, cfg.data_path, train_fraction=cfg.train_fraction, seed=cfg.data_seed)
        self.val_set = None
        if cfg.val_fraction:
            self.train_set, self.val_set = hold_out(self.train_set, cfg.val_fraction,
                                                    rng((cfg.data_seed, VALIDATION_STREAM)))
        self.model = Mixer(model_config(cfg, self.train_set))
        self.optimizer = make_optimizer(cfg.optimizer, cfg.weight_decay, momentum=cfg.momentum,
                                        nesterov=cfg.nesterov, decay_norms=cfg.decay_norms)
        self.steps_per_epoch = (len(self.train_set) // cfg.batch_size if cfg.drop_last
                                else math.ceil(len(self.train_set) / cfg.batch_size))
        if self.steps_per_epoch == 0:
            raise TrainConfigError(f"batch_size {cfg.batch_size} exceeds the {len(self.train_set)} "
                                   f"training images, and drop_last drops that one partial "
                                   f"batch: lower --batch-size or pass --no-drop-last")
        self.total_steps = cfg.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.warmup * self.total_steps)
        if self.warmup_steps >= self.total_steps:
            raise TrainConfigError(f"warm-up of {self.warmup_steps} steps leaves no training in "
                                   f"{self.total_steps} steps: lower warmup or add epochs")
        self.lock = None
        if self.writer:
            prepare_folder(cfg.out)
            self.lock = RunLock(cfg.out).acquire()      # held until train() ends, however it ends
        try:
            if resume:
                self._resume()
            else:
                self._start_fresh()
            if comm.size > 1:
                self.params, self.opt_state = broadcast_state(comm, self.params, self.opt_state)
        except BaseException:
            if self.lock:
                self.lock.release()
            raise

    # ------------------------------------------------------------------ start, resume, save
    def _start_fresh(self):
        """Initial parameters and optimiser state; config.json and an empty metrics log."""
        if os.path.exists(self.paths["last.npz"]):
            raise ResumeError(f"{self.cfg.out} already holds a run (last.npz): pass --resume to "
                              f"continue it, or choose another --out")
        self.params = initial_params(self.model.config, self.cfg.seed, self.cfg.asym_init)
        self.opt_state = self.optimizer.init(self.params)
        self.step, self.progress, self.last_record = 0, _Progress(), None
        if self.writer:
            atomic_write(self.paths["config.json"],
                         lambda f: f.write(json.dumps(self._config(), indent=2).encode()))
            atomic_write(self.paths["metrics.jsonl"], lambda f: None)

    def _config(self):
        """What config.json and checkpoints record of the run: its settings and model."""
        return {"train": self.cfg.to_dict(), "model": dataclasses.asdict(self.model.config)}

    def _resume(self):
        """Parameters, optimiser state, step and progress from last.npz, once refham.training.resume has
        checked that it continues this run (settings, model, arrays, step, RNG, folder)."""
        path = last_checkpoint(self.cfg.out)
        ck = load_checkpoint(path)
        check_resumable(ck, path, self.cfg, self.model.config, self.optimizer,
                        self.steps_per_epoch, self._rng_state)
        if self.writer:     # it may write config.json again; a mismatch on rank 0 ends all
            check_same_run(ck, path, self.paths["config.json"])
        self.progress = checked_progress(ck, path, _Progress)
        self.params = {k: asarray(v, dtype=v.dtype) for k, v in ck.params.items()}
        self.opt_state = {k: asarray(v, dtype=v.dtype) if hasattr(v, "shape") else v
                          for k, v in ck.optim_state.items()}
        self.step = ck.step
        self._truncate_metrics(ck.epoch)

    def _truncate_metrics(self, epochs_done):
        """Keep the readable metrics lines of the epochs the checkpoint has finished (a crash
        between a line and its checkpoint must not leave that epoch twice in the log); the last
        of them is the run's latest record."""
        records = finished_records(self.paths["metrics.jsonl"], epochs_done)
        text = "".join(json.dumps(r) + "\n" for r in records)
        if self.writer:
            atomic_write(self.paths["metrics.jsonl"], lambda f: f.write(text.encode()))
        self.last_record = records[-1] if records else None

    def _rng_state(self, step):
        """What a checkpoint records of the RNG: the counter scheme's inputs (seed, step)."""
        return {"scheme": RNG_SCHEME, "seed": self.cfg.seed, "step": step}

    def _save(self, name):
        """Write checkpoint `name` (last.npz or best.npz) of the current state, atomically."""
        self._tick()
        if self.writer:
            save_checkpoint(self.paths[name], self.params, self.opt_state, step=self.step,
                            epoch=self.step // self.steps_per_epoch,
                            rng_state=self._rng_state(self.step),
                            config={**self._config(), "world_size": self.comm.size},
                            metrics=dataclasses.asdict(self.progress))

    # ------------------------------------------------------------------------------ the loop
    def _train_step(self, images, labels):
        """One optimiser step on a raw global batch → (loss, number correct). Raises
        TrainingDiverged, leaving parameters and optimiser state as they were, if the loss, the
        gradient or the updated parameters/optimiser state are not finite. Under N ranks each
        takes its shard of the batch and of its random draws; one allreduce combines the
        gradients, loss, correct and the ranks' stop requests."""
        cfg, comm, n = self.cfg, self.comm, len(labels)
        gen, rows = rng((cfg.seed, STEP_STREAM, self.step)), shard(n, comm)
        if comm.size > 1:
            gen, images, labels = ShardedGenerator(gen, n, rows), images[rows], labels[rows]
        gen = step_generator(gen, cfg.noise_rng, (cfg.seed, self.step), n, rows)
        if len(labels):
            x = prepare_batch(images, self.train_set, cfg, gen)
            loss, logits, grads = self.model.loss_and_grads(
                self.params, x, labels, label_smoothing=cfg.label_smoothing, drop_rng=gen)
            correct = int(to_numpy((logits.argmax(axis=-1) == labels).sum()))
        else:   # a last batch smaller than the number of ranks leaves this rank no sample
            loss, correct, grads = 0.0, 0, {k: xp.zeros_like(p) for k, p in self.params.items()}
        if comm.size > 1:
            grads, (loss_sum, correct, stops) = combine_gradients(
                comm, grads, len(labels), n, (loss * len(labels), correct, bool(self.stop["signal"])))
            loss, correct, self.stop_agreed = float(loss_sum) / n, int(correct), stops > 0
        grads = self.model.add_penalty_grad(self.params, grads, cfg.lam)
        loss += self.model.penalty(self.params, cfg.lam)
        grads, grad_norm = clip_by_global_norm(grads, cfg.clip_grad)
        lr = cosine_lr(self.step, self.total_steps, cfg.lr, self.warmup_steps, cfg.min_lr)
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            raise self._diverged(lr, f"loss {loss}, gradient norm {grad_norm}")
        params, opt_state = self.optimizer.update(self.params, grads, self.opt_state, lr)
        overflowed = nonfinite_entries({**params, **opt_state}, xp)
        if overflowed:
            raise self._diverged(lr, f"loss {loss} and gradient norm {grad_norm:.3g} were finite, "
                                     f"but the update made {describe_names(overflowed)} NaN/inf")
        self.params, self.opt_state = params, opt_state
        self.step += 1
        return loss, correct

    def _diverged(self, lr, what):
        """The TrainingDiverged of the current step: what went non-finite, which checkpoint
        stays, and what to change."""
        last = (f"the last checkpoint, {self.paths['last.npz']}, is kept (all its values are "
                f"finite)"
                if os.path.exists(self.paths["last.npz"]) else "no checkpoint was written yet")
        return TrainingDiverged(
            f"training diverged at step {self.step} (epoch {self.step // self.steps_per_epoch + 1}"
            f", lr {lr:.3g}): {what}; {last}. Lower --lr, set --clip-grad, or use --dtype float64")

    def run(self, stop, echo):
        """Train from the current step to the last epoch → summary. `stop` is _stop_requests'
        dict: when a signal sets it, save last.npz at the next step boundary and return."""
        self._clock, self.stop = time.perf_counter(), stop
        for epoch in range(self.step // self.steps_per_epoch, self.cfg.epochs):
            if not self._train_epoch(epoch, stop):
                self._save("last.npz")
                return self._summary("interrupted", stop["signal"] or "a signal to another rank")
            record = self._end_epoch(epoch)
            if self.writer:
                with open(self.paths["metrics.jsonl"], "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")   # before the checkpoint: _truncate_metrics
            self._save("last.npz")
            if echo and self.writer:
                tqdm.write(_epoch_line(record, self.cfg.epochs))
        return self._summary("finished", None, self._best_on_test())

    def _tick(self):
        """Add the time since the last tick to the run's wall time."""
        now = time.perf_counter()
        self.progress.wall_time += now - self._clock
        self._clock = now

    def _train_epoch(self, epoch, stop):
        """The remaining steps of `epoch` (all, or those after a mid-epoch checkpoint), with a
        progress bar and the running sums. False if a stop was requested, True when done."""
        cfg, p = self.cfg, self.progress
        skip = self.step - epoch * self.steps_per_epoch
        order = batches(self.train_set, cfg.batch_size, rng((cfg.seed, ORDER_STREAM, epoch)),
                        drop_last=cfg.drop_last)
        with tqdm(total=self.steps_per_epoch, initial=skip, disable=not (cfg.progress and
                                                                         self.writer), leave=False,
                  desc=f"epoch {epoch + 1}/{cfg.epochs}", dynamic_ncols=True) as bar:
            for index, (images, labels) in enumerate(order):
                if index < skip:
                    continue
                # one process stops at its own signal; ranks stop after the step whose allreduce
                # carried one, all at the same step boundary
                if self.stop_agreed if self.comm.size > 1 else stop["signal"]:
                    return False
                started = time.perf_counter()
                loss, correct = self._train_step(images, labels)
                p.epoch_train_time += time.perf_counter() - started
                p.epoch_loss_sum += loss * len(labels)
                p.epoch_correct += correct
                p.epoch_seen += len(labels)
                bar.update(1)
                bar.set_postfix(loss=f"{p.epoch_loss_sum / p.epoch_seen:.4f}",
                                acc=f"{p.epoch_correct / p.epoch_seen:.3f}",
                                img_s=f"{p.epoch_seen / max(p.epoch_train_time, 1e-9):.0f}")
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                        and self.step % self.steps_per_epoch:   # epoch ends save after evaluating
                    self._save("last.npz")
        return True

    def _end_epoch(self, epoch):
        """Validate, test (when due), update best.npz (on validation accuracy), reset the
        running sums → the metrics record."""
        cfg, p = self.cfg, self.progress
        lr = cosine_lr(self.step - 1, self.total_steps, cfg.lr, self.warmup_steps, cfg.min_lr)
        record = {"epoch": epoch + 1, "step": self.step, "lr": lr,
                  "train_loss": p.epoch_loss_sum / max(p.epoch_seen, 1),
                  "train_acc": p.epoch_correct / max(p.epoch_seen, 1),
                  "img_per_s": p.epoch_seen / max(p.epoch_train_time, 1e-9),
                  "val_loss": None, "val_acc": None, "test_loss": None, "test_acc": None}
        if self.val_set is not None:
            result = evaluate(self.model, self.params, self.val_set, cfg.batch_size)
            record.update(val_loss=result["loss"], val_acc=result["acc"])
            if result["acc"] > p.best_val_acc:
                p.best_val_acc, p.best_epoch = result["acc"], epoch + 1
                self._save("best.npz")
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            result = evaluate(self.model, self.params, self.test_set, cfg.batch_size, self.comm)
            record.update(test_loss=result["loss"], test_acc=result["acc"])
        record["symmetry"] = symmetry_log(self.model.config, self.params)
        p.epoch_loss_sum, p.epoch_correct, p.epoch_seen, p.epoch_train_time = 0.0, 0, 0, 0.0
        self._tick()
        record["wall_time"] = p.wall_time
        self.last_record = record
        return record

    def _best_on_test(self):
        """Test loss and accuracy of best.npz's parameters ({} without a validation split)."""
        if not self.progress.best_epoch:
            return {}
        last = self.last_record or {}
        if last.get("epoch") == self.progress.best_epoch and last.get("test_acc") is not None:
            return {"best_test_loss": last["test_loss"], "best_test_acc": last["test_acc"]}
        params = {k: asarray(v, dtype=v.dtype)
                  for k, v in load_checkpoint(self.paths["best.npz"]).params.items()}
        result = evaluate(self.model, params, self.test_set, self.cfg.batch_size)
        return {"best_test_loss": result["loss"], "best_test_acc": result["acc"]}

    def _summary(self, status, signal_name, best=None):
        """The dict `train` returns (see there)."""
        last = self.last_record or {}
        return {"status": status, "signal": signal_name, "out": self.cfg.out, "step": self.step,
                "epochs_done": self.step // self.steps_per_epoch, "epochs": self.cfg.epochs,
                **{k: last.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc",
                                             "test_loss", "test_acc", "img_per_s", "symmetry")},
                "best_val_acc": self.progress.best_val_acc if self.progress.best_epoch else None,
                "best_epoch": self.progress.best_epoch or None,
                "best_test_loss": None, "best_test_acc": None, **(best or {}),
                "wall_time": self.progress.wall_time}


def _epoch_line(record, epochs):
    """The one-line report of an epoch's metrics record."""
    evaluated = "".join(f"  {split} loss {record[split + '_loss']:.4f} acc "
                        f"{100 * record[split + '_acc']:.2f}%" for split in ("val", "test")
                        if record.get(split + "_acc") is not None)
    return (f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_acc']:.2f}%{evaluated}  lr {record['lr']:.2e}  "
            f"{record['img_per_s']:.0f} img/s  {record['wall_time']:.1f} s")


def train(cfg, resume=False, echo=False):
    """Train (or with resume=True continue, exactly) the run described by `cfg` in `cfg.out`;
    `echo` prints one line per epoch (through tqdm, so that progress bars stay intact).

    Returns a summary dict: status ('finished' | 'interrupted'), step, epochs_done, the last
    epoch's train/val/test loss and accuracy, best_epoch and best_val_acc (best.npz, chosen on
    validation) with best_test_loss/best_test_acc (best.npz on the test split, once finished),
    wall_time, symmetry.
    Raises TrainConfigError / ResumeError for unusable settings and TrainingDiverged on NaN/inf."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(cfg).__name__}")
    with active_backend(cfg.backend, cfg.dtype, cfg.threads), tf32_mode(cfg.tf32), \
            _stop_requests() as stop:
        run = _Run(cfg, resume, get_communicator(cfg.comm, cfg.backend))
        try:
            warm_up(run, prepare_batch)
            return run.run(stop, echo)
        finally:
            if run.lock:
                run.lock.release()


def resume_settings(out):
    """The settings a run in folder `out` was started with (from its verified last.npz)."""
    path = last_checkpoint(out)
    return saved_settings(load_checkpoint(path), path)
