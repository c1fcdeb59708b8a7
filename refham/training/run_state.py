"""The state of a Mixer training run — what its checkpoints hold and a resume restores: the
parameters, the optimiser state, the step, and the progress (best validation accuracy, wall
time, the running sums of an unfinished epoch).

    state = RunState.start(folder, cfg, model, optimizer)            # fresh, config.json written
    state = RunState.resume(folder, cfg, model, optimizer, steps_per_epoch)    # from last.npz
    state.save(folder, "last.npz", cfg, model, steps_per_epoch, world_size)

The random state is not stored as a generator: step t draws from rng((seed, 2, t)), so a
checkpoint records the counter scheme's inputs (seed, step) and the step restores the stream.
"""
import dataclasses
import json
import os

from refham.asym_init import initial_params
from refham.backend import asarray
from refham.files.checkpoint import load_checkpoint, save_checkpoint
from refham.training.resume import (
    ResumeError, check_resumable, check_same_run, checked_progress, finished_records,
    last_checkpoint)

RNG_SCHEME = "counter-v1"


def rng_state(seed, step):
    """What a checkpoint records of the RNG at `step`: the counter scheme's inputs."""
    return {"scheme": RNG_SCHEME, "seed": seed, "step": step}


def run_record(cfg, model_config):
    """What config.json and checkpoints record of the run: its settings and its model."""
    return {"train": cfg.to_dict(), "model": dataclasses.asdict(model_config)}


@dataclasses.dataclass
class Progress:
    """What a checkpoint restores besides parameters and optimiser state (its `metrics`)."""
    best_val_acc: float = -1.0
    best_epoch: int = 0
    wall_time: float = 0.0          # seconds of training and evaluation, over all sessions
    epoch_loss_sum: float = 0.0     # running sums of the current epoch, for mid-epoch resumes
    epoch_correct: int = 0
    epoch_seen: int = 0
    epoch_train_time: float = 0.0


@dataclasses.dataclass
class RunState:
    """Parameters θ, optimiser state, step (optimiser steps done), progress, and the metrics
    record of the last finished epoch (None before the first)."""
    params: dict
    opt_state: dict
    step: int
    progress: Progress
    last_record: dict = None

    @classmethod
    def start(cls, folder, cfg, model, optimizer):
        """The initial state of a new run in `folder` (a RunFolder): θ by cfg.asym_init from
        cfg.seed, zero moments; writes config.json and an empty metrics log. ResumeError if the
        folder already holds a run."""
        if os.path.exists(folder.path("last.npz")):
            raise ResumeError(f"{cfg.out} already holds a run (last.npz): pass --resume to "
                              f"continue it, or choose another --out")
        params = initial_params(model.config, cfg.seed, cfg.asym_init)
        folder.write("config.json", json.dumps(run_record(cfg, model.config), indent=2))
        folder.write("metrics.jsonl", "")
        return cls(params, optimizer.init(params), 0, Progress())

    @classmethod
    def resume(cls, folder, cfg, model, optimizer, steps_per_epoch):
        """The state in `folder`'s last.npz, once refham.training.resume has checked that it
        continues this run (settings, model, arrays, step, RNG, folder); the metrics log is cut
        back to the epochs the checkpoint has finished."""
        path = last_checkpoint(cfg.out)
        ck = load_checkpoint(path)
        check_resumable(ck, path, cfg, model.config, optimizer, steps_per_epoch,
                        lambda step: rng_state(cfg.seed, step))
        if folder.writer:     # it may write config.json again; a mismatch on rank 0 ends all
            check_same_run(ck, path, folder.path("config.json"))
        progress = checked_progress(ck, path, Progress)
        params = {k: asarray(v, dtype=v.dtype) for k, v in ck.params.items()}
        opt_state = {k: asarray(v, dtype=v.dtype) if hasattr(v, "shape") else v
                     for k, v in ck.optim_state.items()}
        # a crash between a metrics line and its checkpoint must not leave that epoch twice
        records = finished_records(folder.path("metrics.jsonl"), ck.epoch)
        folder.write("metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        return cls(params, opt_state, ck.step, progress, records[-1] if records else None)

    def save(self, folder, name, cfg, model, steps_per_epoch, world_size):
        """Write checkpoint `name` (last.npz or best.npz) of this state into `folder`,
        atomically (rank 0 only)."""
        if folder.writer:
            save_checkpoint(folder.path(name), self.params, self.opt_state, step=self.step,
                            epoch=self.step // steps_per_epoch,
                            rng_state=rng_state(cfg.seed, self.step),
                            config={**run_record(cfg, model.config), "world_size": world_size},
                            metrics=dataclasses.asdict(self.progress))
