"""Whose a run folder is: every artifact of a training run carries the run's identity, a random
id drawn when the run starts, so that files of two runs are never taken for one.

    run_id = new_run_id()                        # config.json, last.npz, best.npz: "run_id";
                                                 # each metrics.jsonl line: "run"
    check_fresh(out, force)                      # a new run: no other run's files there
    check_artifact(path, found_id, run_id)       # --resume: this file is the run's own

The run id lives in the `config` of config.json and of each checkpoint, and in every line of
metrics.jsonl. A fresh run refuses a folder that holds any run artifact (another run's, or the
remains of a failed start) unless `force`, which removes them first, so that nothing of the old
run is later reported as the new one's. A resume checks the id of best.npz and of every metrics
line against last.npz's and names the file that does not belong. Files written before run ids
existed have none: they are checked by their settings alone. Whether the folder itself is
still the one the run locked (not deleted and re-created under it) is `RunLock.verify`'s part.
"""
import os
import uuid

from refham.errors import RefhamError

ARTIFACTS = ("config.json", "metrics.jsonl", "last.npz", "best.npz")


class ForeignRunError(RefhamError, ValueError):
    """A run folder, or a file in it, that belongs to another run."""


def new_run_id():
    """A fresh run's identity: 16 random hex digits."""
    return uuid.uuid4().hex[:16]


def check_fresh(out, force=False):
    """Before a new run starts in the folder `out`: ForeignRunError naming the run artifacts
    already there, or — with `force` — remove them."""
    found = [name for name in ARTIFACTS if os.path.lexists(os.path.join(out, name))]
    if not found:
        return
    if not force:
        raise ForeignRunError(f"{out} already holds a run ({', '.join(found)}): pass --resume to "
                              f"continue it, --force to replace it, or choose another --out")
    for name in found:
        try:
            os.unlink(os.path.join(out, name))
        except OSError as exc:
            raise ForeignRunError(f"--force cannot remove {os.path.join(out, name)} "
                                  f"({exc.strerror}): remove it yourself, or choose another "
                                  f"--out") from exc


def check_artifact(path, found_id, run_id):
    """ForeignRunError unless the file at `path`, which records run id `found_id`, belongs to
    the run `run_id` (either id None: a file from before run ids, accepted)."""
    if found_id is not None and run_id is not None and found_id != run_id:
        raise ForeignRunError(f"{path} belongs to another run (id {found_id}) than "
                              f"{os.path.join(os.path.dirname(path), 'last.npz')} (id {run_id}): "
                              f"move it out of the folder, or resume with the other run's "
                              f"last.npz")


def check_metrics(path, records, run_id):
    """ForeignRunError if a record (a dict) of the metrics log at `path` carries another run's
    id than `run_id`: two runs' epochs would be interleaved in one log."""
    for number, record in enumerate(records, start=1):
        check_artifact(f"{path} (record {number})", record.get("run"), run_id)
