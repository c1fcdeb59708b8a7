"""Checkpoints: exact round trip, atomic writes, and a clear CheckpointError for every kind of bad
file (truncated, flipped byte, missing entry, tampered array, wrong version, not a checkpoint,
non-finite tensors, metadata of the wrong types)."""
import json
import os
import zipfile

import numpy as np
import pytest

from refham.backend import asarray, rng, to_numpy
from refham.files.checkpoint import CheckpointError, _digest, load_checkpoint, save_checkpoint
from refham.files.outputs import atomic_write, is_temporary


def _example():
    gen = rng(0)
    params = {"blocks.0.norm.weight": asarray(gen.standard_normal((3, 2))),
              "head.bias": asarray(gen.standard_normal(4), dtype=np.float32)}
    optim_state = {"step": 7, "m/blocks.0.norm.weight": asarray(gen.standard_normal((3, 2))),
                   "m/head.bias": asarray(gen.standard_normal(4), dtype=np.float32)}
    gen.standard_normal(5)                                   # advance: a non-initial state
    meta = dict(step=7, epoch=2, rng_state={"noise": gen.bit_generator.state},
                config={"model": "paramixer", "lr": 2e-3, "clip_grad": None},
                metrics={"best_test_acc": 0.5})
    return params, optim_state, meta, gen


def _save(path):
    params, optim_state, meta, _ = _example()
    save_checkpoint(path, params, optim_state, **meta)
    return path


def _rewrite(path, arrays):
    """Write `arrays` as a new .npz at `path` (a hand-made, internally consistent zip)."""
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def _entries(path):
    with np.load(path, allow_pickle=False) as archive:
        return {k: archive[k] for k in archive.files}


def test_round_trip_is_exact(tmp_path):
    params, optim_state, meta, gen = _example()
    save_checkpoint(tmp_path / "c.npz", params, optim_state, **meta)
    ck = load_checkpoint(tmp_path / "c.npz")
    assert set(ck.params) == set(params)
    for name, a in params.items():
        assert ck.params[name].dtype == a.dtype and np.array_equal(ck.params[name], to_numpy(a))
    assert ck.optim_state["step"] == 7 and isinstance(ck.optim_state["step"], int)
    for key in ("m/blocks.0.norm.weight", "m/head.bias"):
        assert np.array_equal(ck.optim_state[key], to_numpy(optim_state[key]))
    assert (ck.step, ck.epoch, ck.config, ck.metrics) == (7, 2, meta["config"], meta["metrics"])
    restored = np.random.default_rng()
    restored.bit_generator.state = ck.rng_state["noise"]
    assert np.array_equal(restored.standard_normal(8), gen.standard_normal(8))
    assert os.listdir(tmp_path) == ["c.npz"]                # no temporary file left behind


def test_written_files_get_umask_permissions_not_private_ones(tmp_path):
    params, optim_state, meta, _ = _example()
    old = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "c.npz", params, optim_state, **meta)
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "c.npz").st_mode & 0o777 == 0o644


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    path = _save(tmp_path / "c.npz")
    before = path.read_bytes()
    params, optim_state, meta, _ = _example()
    with pytest.raises(CheckpointError, match="JSON"):
        save_checkpoint(path, params, optim_state, **{**meta, "metrics": {"loss": float("nan")}})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt                              # e.g. Ctrl-C in the middle of a write
    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, params, optim_state, **meta)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["c.npz"]


@pytest.mark.parametrize("keep", [0, 1, 100, 0.5, -1])
def test_truncated_file(tmp_path, keep):
    path = _save(tmp_path / "c.npz")
    data = path.read_bytes()
    path.write_bytes(data[:keep if isinstance(keep, int) else int(keep * len(data))])
    with pytest.raises(CheckpointError, match="truncated, corrupted or not an .npz of plain"):
        load_checkpoint(path)


def test_every_flipped_byte_is_detected_or_harmless(tmp_path):
    """A flip inside array data must raise; a flip in zip bookkeeping (timestamps, attributes) may
    load, but then the content must be exactly the original."""
    path = _save(tmp_path / "c.npz")
    data = path.read_bytes()
    params, _, _, _ = _example()
    payload = to_numpy(params["blocks.0.norm.weight"]).tobytes()
    payload_at = data.index(payload)
    outcomes = set()
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        path.write_bytes(bytes(flipped))
        try:
            ck = load_checkpoint(path)
        except CheckpointError:
            outcomes.add("error")
            continue
        assert payload_at + len(payload) <= i or i < payload_at, f"flip in the data at {i} loaded"
        assert all(np.array_equal(ck.params[k], to_numpy(v)) for k, v in params.items())
        outcomes.add("harmless")
    assert "error" in outcomes


def test_missing_entry(tmp_path):
    path = _save(tmp_path / "c.npz")
    arrays = _entries(path)
    del arrays["param/head.bias"]
    _rewrite(path, arrays)
    with pytest.raises(CheckpointError, match="SHA-256 .* does not match"):
        load_checkpoint(path)
    del arrays["meta/json"]
    _rewrite(path, arrays)
    with pytest.raises(CheckpointError, match="no meta/json"):
        load_checkpoint(path)


def test_tampered_array_with_a_consistent_zip(tmp_path):
    path = _save(tmp_path / "c.npz")
    arrays = _entries(path)
    arrays["optim/m/head.bias"] = arrays["optim/m/head.bias"] + np.float32(1e-3)
    _rewrite(path, arrays)
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def _with_meta(path, **changes):
    arrays = _entries(path)
    meta = json.loads(arrays["meta/json"].tobytes())
    meta.update(changes)
    arrays["meta/json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _rewrite(path, arrays)


def test_wrong_format_version_or_tag(tmp_path):
    path = _save(tmp_path / "c.npz")
    _with_meta(path, version=2)
    with pytest.raises(CheckpointError, match="version 2; this refham reads version 1"):
        load_checkpoint(path)
    _with_meta(path, version=1, format="something-else")
    with pytest.raises(CheckpointError, match="format tag"):
        load_checkpoint(path)


def test_files_that_are_not_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="no file at"):
        load_checkpoint(tmp_path / "absent.npz")
    text = tmp_path / "notes.npz"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="not an .npz of plain arrays"):
        load_checkpoint(text)
    single = tmp_path / "single.npy"
    np.save(single, np.zeros(3))
    with pytest.raises(CheckpointError, match="single .npy array, not an .npz"):
        load_checkpoint(single)
    plain = tmp_path / "plain.npz"
    _rewrite(plain, {"weights": np.zeros(3)})
    with pytest.raises(CheckpointError, match="no meta/json"):
        load_checkpoint(plain)
    pickled = tmp_path / "pickled.npz"
    _rewrite(pickled, {"meta/json": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(CheckpointError, match="not an .npz of plain arrays"):
        load_checkpoint(pickled)
    assert zipfile.is_zipfile(pickled)


def test_temporary_files_are_named_after_their_target_and_recognisable(tmp_path):
    seen = []
    atomic_write(tmp_path / "c.npz", lambda f: seen.extend(os.listdir(tmp_path)))
    assert len(seen) == 1 and seen[0].startswith(".c.npz.") and is_temporary(seen[0])
    assert not any(map(is_temporary, ["c.npz", ".c.npz", "c.refham-tmp", ".refham.lock"]))


@pytest.mark.parametrize("where", ["param/head.bias", "optim/m/blocks.0.norm.weight"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_tensors_are_never_written(tmp_path, where, bad):
    path = _save(tmp_path / "c.npz")
    before = path.read_bytes()
    params, optim_state, meta, _ = _example()
    group, name = where.split("/", 1)
    target = params if group == "param" else optim_state
    target[name] = target[name] * 1.0
    target[name][0] = bad
    with pytest.raises(CheckpointError, match=f"refusing to write .*NaN/inf in {where} "):
        save_checkpoint(path, params, optim_state, **meta)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["c.npz"]


def _rewrite_consistently(path, change):
    """Apply `change(arrays, meta)` to the checkpoint at `path` and re-seal it with a matching
    digest: what a hand-made file or an older writer can hold."""
    arrays = _entries(path)
    meta = json.loads(arrays.pop("meta/json").tobytes())
    change(arrays, meta)
    meta["sha256"] = _digest(arrays)
    arrays["meta/json"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    _rewrite(path, arrays)


def test_a_non_finite_checkpoint_with_a_valid_digest_is_refused(tmp_path):
    path = _save(tmp_path / "c.npz")

    def poison(arrays, meta):
        arrays["optim/m/head.bias"] = np.full(4, np.nan, dtype=np.float32)
    _rewrite_consistently(path, poison)
    with pytest.raises(CheckpointError, match="NaN/inf in optim/m/head.bias: .* diverged state"):
        load_checkpoint(path)


@pytest.mark.parametrize("changes, message", [
    (dict(step=-1), "step -1 "), (dict(step="3"), "step '3' "), (dict(step=True), "step True"),
    (dict(epoch=1.5), "epoch 1.5 "), (dict(config=[1, 2]), "config of type list"),
    (dict(rng_state="x"), "rng_state of type str"), (dict(metrics=[]), "metrics of type list"),
    (dict(optim_scalars=[1]), "optim_scalars of type list"),
    (dict(optim_scalars={"step": "junk"}), "optimiser scalar step = 'junk'"),
    (dict(optim_scalars={"step": float("nan")}), "optimiser scalar step = nan"),
    (dict(optim_scalars={"step": None}), "optimiser scalar step = None"),
    (dict(optim_scalars={"step": 7, "m/head.bias": 1}), r"\['m/head.bias'\] are both"),
])
def test_metadata_of_the_wrong_types_is_refused_though_the_digest_matches(tmp_path, changes,
                                                                          message):
    path = _save(tmp_path / "c.npz")
    _rewrite_consistently(path, lambda arrays, meta: meta.update(changes))
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
