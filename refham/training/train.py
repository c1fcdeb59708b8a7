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

Under `mpiexec -n N` (refham.training.distributed) each rank draws step t's randomness for the
whole global batch as above, keeps its 1/N shard, and one allreduce per step combines the
gradients: the numbers do not depend on N (up to rounding), and a run resumes under any N. Only
rank 0 writes.

The output folder holds `config.json` (written at start), `metrics.jsonl` (one line per epoch),
`last.npz` (end of every epoch, every `checkpoint_every` steps, and on SIGINT/SIGTERM) and
`best.npz` (best validation accuracy so far; the validation split is `val_fraction` of the
training images, held out before training), all written atomically. A NaN/inf loss or gradient,
or an update that makes a parameter or an optimiser moment NaN/inf, stops the run before that
step becomes its state, so no checkpoint ever holds a diverged state (and none could be written).

The pieces, one concept each: the step (refham.training.step, shared with the Energy
MetaFormer's loop; one device→host transfer), the folder a run owns (refham.training.run_folder),
the state its checkpoints hold (refham.training.run_state), a GPU run's TF32 mode and warm-up
step (refham.training.gpu), and here the data, the schedule and the epoch loop.
"""
import dataclasses
import json
import math
import os
import time

from tqdm import tqdm

from refham.backend import active_backend, asarray, rng, to_numpy, xp
from refham.errors import RefhamError
from refham.files.checkpoint import load_checkpoint
from refham.mixer import Mixer
from refham.optim import cosine_lr, make_optimizer
from refham.training.data import (
    add_gaussian_noise, batches, check_every_class, hold_out, horizontal_flip, load_dataset,
    normalise, random_crop)
from refham.training.distributed import (
    ShardedGenerator, broadcast_state, get_communicator, shard)
from refham.training.evaluation import evaluate
from refham.training.launch import check_same_settings
from refham.training.gpu import tf32_mode, warm_up
from refham.training.noise import step_generator
from refham.training.resume import last_checkpoint, saved_settings
from refham.training.run_folder import RunFolder
from refham.training.run_state import RunState
from refham.training.step import optimiser_step
from refham.training.stopping import StopRequest, stop_requests
from refham.training.train_config import CROP_PAD, TrainConfig, TrainConfigError, model_config

ORDER_STREAM, STEP_STREAM = 1, 2      # rng((seed, stream, epoch or step)): see the module docstring
VALIDATION_STREAM = 3                 # rng((data_seed, 3)) holds the validation split out
WARM_UP_STREAM = 4                    # rng((seed, 4)): the GPU warm-up's throwaway draws


class TrainingDiverged(RefhamError, RuntimeError):
    """The loss, the gradient or the updated parameters/optimiser state of a step became NaN/inf;
    the run's state and checkpoints stay those of the step before."""


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


def run_datasets(cfg):
    """(train, validation or None, test) datasets of `cfg`: the validation split is held out of
    the training images with rng((data_seed, 3)), so it stays the same across seeds."""
    train_set, test_set = load_dataset(cfg.data, cfg.data_path, train_fraction=cfg.train_fraction,
                                       seed=cfg.data_seed)
    if not cfg.val_fraction:
        return train_set, None, test_set
    train_set, val_set = hold_out(train_set, cfg.val_fraction,
                                  rng((cfg.data_seed, VALIDATION_STREAM)))
    check_every_class(train_set, "training split", "raise --train-fraction or lower "
                                                   "--val-fraction")
    return train_set, val_set, test_set


@dataclasses.dataclass(frozen=True)
class Schedule:
    """The run's steps: `steps_per_epoch` × epochs, the first `warmup_steps` warming up."""
    steps_per_epoch: int
    total_steps: int
    warmup_steps: int

    @classmethod
    def of(cls, cfg, n_train):
        """The schedule of `cfg` on `n_train` training images; TrainConfigError if it holds no
        step or nothing but warm-up."""
        steps_per_epoch = (n_train // cfg.batch_size if cfg.drop_last
                           else math.ceil(n_train / cfg.batch_size))
        if steps_per_epoch == 0:
            raise TrainConfigError(f"batch_size {cfg.batch_size} exceeds the {n_train} "
                                   f"training images, and drop_last drops that one partial "
                                   f"batch: lower --batch-size or pass --no-drop-last")
        total_steps = cfg.epochs * steps_per_epoch
        warmup_steps = round(cfg.warmup * total_steps)
        if warmup_steps >= total_steps:
            raise TrainConfigError(f"warm-up of {warmup_steps} steps leaves no training in "
                                   f"{total_steps} steps: lower warmup or add epochs")
        return cls(steps_per_epoch, total_steps, warmup_steps)

    def lr(self, cfg, step):
        """The learning rate of optimiser step `step` (0-based), :eq:`T-cosine`."""
        return cosine_lr(step, self.total_steps, cfg.lr, self.warmup_steps, cfg.min_lr)


class _EpochLoop:
    """The epochs of one run, from its state's step to the last epoch: the steps with their
    progress bar and running sums, the evaluations, the checkpoints, the metrics log."""

    def __init__(self, cfg, comm, folder, datasets, model, optimizer, schedule, state):
        self.cfg, self.comm, self.folder, self.model = cfg, comm, folder, model
        self.train_set, self.val_set, self.test_set = datasets
        self.optimizer, self.schedule, self.state = optimizer, schedule, state
        self.stop_agreed, self.stop, self._clock = False, StopRequest(), time.perf_counter()

    def run(self, stop, echo):
        """Train to the last epoch → summary. `stop` is the StopRequest
        (refham.training.stopping): when a signal sets it, save last.npz at the next step
        boundary and return."""
        self._clock, self.stop = time.perf_counter(), stop
        for epoch in range(self.state.step // self.schedule.steps_per_epoch, self.cfg.epochs):
            if not self._train_epoch(epoch):
                self._save("last.npz")
                return self._summary("interrupted", stop.signal or "a signal to another rank")
            record = self._end_epoch(epoch)
            self.folder.append_line("metrics.jsonl",    # before the
                                    json.dumps({**record, "run": self.state.run_id}))
            self._save("last.npz")          # checkpoint: RunState.resume cuts what it has not
            if echo and self.folder.writer:
                tqdm.write(_epoch_line(record, self.cfg.epochs))
        return self._summary("finished", None, self._best_on_test())

    def _train_step(self, images, labels):
        """One optimiser step (refham.training.step) on a raw global batch → (loss, number
        correct). Under N ranks each takes its shard of the batch and of its random draws; the
        step's one allreduce also carries the ranks' stop requests."""
        step = self.state.step
        params, opt_state, scalars = self._step(images, labels, (STEP_STREAM, step),
                                                (step,), bool(self.stop.signal))
        self.state.params, self.state.opt_state = params, opt_state
        self.state.step += 1
        self.stop_agreed = scalars.stop
        return scalars.loss, scalars.correct

    def warm_up_step(self, images, labels):
        """A step on a raw global batch whose result is discarded (refham.training.gpu.warm_up),
        with draws of its own stream: the run's state does not change."""
        self._step(images, labels, (WARM_UP_STREAM,), (WARM_UP_STREAM, 0), False)

    def _step(self, images, labels, stream, noise_key, stop):
        """The optimiser step of the current state on a raw global batch, its random draws from
        rng((seed, *stream)) (`noise_key`: the counter noise's stream) → (θ', s', StepScalars),
        not committed."""
        cfg, comm, n, step = self.cfg, self.comm, len(labels), self.state.step
        gen, rows = rng((cfg.seed, *stream)), shard(n, comm)
        if comm.size > 1:
            gen, images, labels = ShardedGenerator(gen, n, rows), images[rows], labels[rows]
        images, labels = asarray(images), xp.asarray(labels, dtype=xp.int64)   # the shard only
        gen = step_generator(gen, cfg.noise_rng, (cfg.seed, *noise_key), n, rows)

        def loss_and_grads(params):
            # the unchecked core: the dataset's images and labels were checked when it was made
            x = prepare_batch(images, self.train_set, cfg, gen).astype(cfg.dtype, copy=False)
            loss, logits, grads = self.model._loss_and_grads(
                params, x, labels, cfg.lam, cfg.label_smoothing, gen)
            return loss, (logits.argmax(axis=-1) == labels).sum(), grads

        lr = self.schedule.lr(cfg, step)
        return optimiser_step(
            self.state.params, self.state.opt_state, loss_and_grads, self.optimizer, lr,
            lambda what: self._diverged(lr, what), clip=cfg.clip_grad, comm=comm,
            n_local=len(labels), n_global=n, stop=stop)

    def _diverged(self, lr, what):
        """The TrainingDiverged of the current step: what went non-finite, which checkpoint
        stays, and what to change."""
        step, path = self.state.step, self.folder.path("last.npz")
        last = (f"the last checkpoint, {path}, is kept (all its values are finite)"
                if os.path.exists(path) else "no checkpoint was written yet")
        return TrainingDiverged(
            f"training diverged at step {step} (epoch "
            f"{step // self.schedule.steps_per_epoch + 1}, lr {lr:.3g}): {what}; {last}. Lower "
            f"--lr, set --clip-grad, or use --dtype float64")

    def _tick(self):
        """Add the time since the last tick to the run's wall time."""
        now = time.perf_counter()
        self.state.progress.wall_time += now - self._clock
        self._clock = now

    def _save(self, name):
        """Write checkpoint `name` (last.npz or best.npz) of the current state, atomically."""
        self._tick()
        self.state.save(self.folder, name, self.cfg, self.model, self.schedule.steps_per_epoch,
                        self.comm.size)

    def _train_epoch(self, epoch):
        """The remaining steps of `epoch` (all, or those after a mid-epoch checkpoint), with a
        progress bar and the running sums. False if a stop was requested, True when done."""
        cfg, p, steps_per_epoch = self.cfg, self.state.progress, self.schedule.steps_per_epoch
        skip = self.state.step - epoch * steps_per_epoch
        order = batches(self.train_set, cfg.batch_size, rng((cfg.seed, ORDER_STREAM, epoch)),
                        drop_last=cfg.drop_last, on_device=False)   # each rank uploads its shard
        with tqdm(total=steps_per_epoch, initial=skip, leave=False, dynamic_ncols=True,
                  disable=not (cfg.progress and self.folder.writer),
                  desc=f"epoch {epoch + 1}/{cfg.epochs}") as bar:
            for index, (images, labels) in enumerate(order):
                if index < skip:
                    continue
                # one process stops at its own signal; ranks stop after the step whose allreduce
                # carried one, all at the same step boundary
                if self.stop_agreed if self.comm.size > 1 else self.stop.signal:
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
                step = self.state.step
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 \
                        and step % steps_per_epoch:   # epoch ends save after evaluating
                    self._save("last.npz")
        return True

    def _end_epoch(self, epoch):
        """Validate, test (when due), update best.npz (on validation accuracy), reset the
        running sums → the metrics record."""
        cfg, p, step = self.cfg, self.state.progress, self.state.step
        record = {"epoch": epoch + 1, "step": step, "lr": self.schedule.lr(cfg, step - 1),
                  "train_loss": p.epoch_loss_sum / max(p.epoch_seen, 1),
                  "train_acc": p.epoch_correct / max(p.epoch_seen, 1),
                  "img_per_s": p.epoch_seen / max(p.epoch_train_time, 1e-9),
                  "val_loss": None, "val_acc": None, "test_loss": None, "test_acc": None}
        params = self.state.params
        if self.val_set is not None:
            result = evaluate(self.model, params, self.val_set, cfg.batch_size)
            record.update(val_loss=result["loss"], val_acc=result["acc"])
            if result["acc"] > p.best_val_acc:
                p.best_val_acc, p.best_epoch = result["acc"], epoch + 1
                self._save("best.npz")
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            result = evaluate(self.model, params, self.test_set, cfg.batch_size, self.comm)
            record.update(test_loss=result["loss"], test_acc=result["acc"])
        record["symmetry"] = symmetry_log(self.model.config, params)
        p.epoch_loss_sum, p.epoch_correct, p.epoch_seen, p.epoch_train_time = 0.0, 0, 0, 0.0
        self._tick()
        record["wall_time"] = p.wall_time
        self.state.last_record = record
        return record

    def _best_on_test(self):
        """Test loss and accuracy of best.npz's parameters ({} without a validation split)."""
        progress, last = self.state.progress, self.state.last_record or {}
        if not progress.best_epoch:
            return {}
        if last.get("epoch") == progress.best_epoch and last.get("test_acc") is not None:
            return {"best_test_loss": last["test_loss"], "best_test_acc": last["test_acc"]}
        params = {k: asarray(v, dtype=v.dtype)
                  for k, v in load_checkpoint(self.folder.path("best.npz")).params.items()}
        result = evaluate(self.model, params, self.test_set, self.cfg.batch_size)
        return {"best_test_loss": result["loss"], "best_test_acc": result["acc"]}

    def _summary(self, status, signal_name, best=None):
        """The dict `train` returns (see there)."""
        last, progress, step = self.state.last_record or {}, self.state.progress, self.state.step
        return {"status": status, "signal": signal_name, "out": self.cfg.out,
                "run_id": self.state.run_id, "step": step,
                "epochs_done": step // self.schedule.steps_per_epoch, "epochs": self.cfg.epochs,
                **{k: last.get(k) for k in ("train_loss", "train_acc", "val_loss", "val_acc",
                                             "test_loss", "test_acc", "img_per_s", "symmetry")},
                "best_val_acc": progress.best_val_acc if progress.best_epoch else None,
                "best_epoch": progress.best_epoch or None,
                "best_test_loss": None, "best_test_acc": None, **(best or {}),
                "wall_time": progress.wall_time}


def _epoch_line(record, epochs):
    """The one-line report of an epoch's metrics record."""
    evaluated = "".join(f"  {split} loss {record[split + '_loss']:.4f} acc "
                        f"{100 * record[split + '_acc']:.2f}%" for split in ("val", "test")
                        if record.get(split + "_acc") is not None)
    return (f"epoch {record['epoch']:>3}/{epochs}  train loss {record['train_loss']:.4f} "
            f"acc {100 * record['train_acc']:.2f}%{evaluated}  lr {record['lr']:.2e}  "
            f"{record['img_per_s']:.0f} img/s  {record['wall_time']:.1f} s")


def train(cfg, resume=False, echo=False, force=False):
    """Train (or with resume=True continue, exactly) the run described by `cfg` in `cfg.out`;
    `echo` prints one line per epoch (through tqdm, so that progress bars stay intact); `force`
    lets a new run replace the files of another run in cfg.out (refham.files.run_identity).

    Returns a summary dict: status ('finished' | 'interrupted'), step, epochs_done, the last
    epoch's train/val/test loss and accuracy, best_epoch and best_val_acc (best.npz, chosen on
    validation) with best_test_loss/best_test_acc (best.npz on the test split, once finished),
    wall_time, symmetry.
    Raises TrainConfigError / ResumeError for unusable settings and TrainingDiverged on NaN/inf.
    Under several ranks all start from rank 0's parameters and optimiser state."""
    if not isinstance(cfg, TrainConfig):
        raise TypeError(f"train needs a TrainConfig, got {type(cfg).__name__}")
    comm = get_communicator(cfg.comm, cfg.backend)  # first: MPI starts before the handlers
    check_same_settings(comm, {k: v for k, v in cfg.to_dict().items() if k != "progress"})
    with active_backend(cfg.backend, cfg.dtype, cfg.threads), tf32_mode(cfg.tf32), \
            stop_requests() as stop:
        datasets = run_datasets(cfg)
        model = Mixer(model_config(cfg, datasets[0]))
        optimizer = make_optimizer(cfg.optimizer, cfg.weight_decay, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov, decay_norms=cfg.decay_norms)
        schedule = Schedule.of(cfg, len(datasets[0]))
        with RunFolder(cfg.out, comm) as folder:      # locked until the run ends, however
            state = (RunState.resume(folder, cfg, model, optimizer, schedule.steps_per_epoch)
                     if resume else RunState.start(folder, cfg, model, optimizer, force))
            if comm.size > 1:
                state.params, state.opt_state = broadcast_state(comm, state.params,
                                                                state.opt_state)
            loop = _EpochLoop(cfg, comm, folder, datasets, model, optimizer, schedule, state)
            warm_up(loop.warm_up_step, datasets[0], cfg.batch_size)
            return loop.run(stop, echo)


def resume_settings(out):
    """The settings a run in folder `out` was started with (from its verified last.npz)."""
    path = last_checkpoint(out)
    return saved_settings(load_checkpoint(path), path)
