"""Hostile and careless files (issue 11 §4-§6): every size a file declares is checked against its
real size, the compression ratio and the memory budget before anything that large is allocated;
error lists stay short; the memory estimates track what a Mixer really allocates."""
import gzip
import io
import json
import pickle
import struct
import tarfile
import tracemalloc
import zipfile

import numpy as np
import pytest

from refham.files import memory

from refham.files import safefiles
from refham.files.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from refham.files.datafiles import DataError, load_idx, load_mnist, read_cifar
from refham.mixer import Mixer, ParamError, check_params, make_config, param_shapes
from refham.optim import AdamW


@pytest.fixture
def small_machine(monkeypatch):
    """A machine with 64 MiB available: budgets no longer depend on where the tests run."""
    monkeypatch.setattr(memory, "available_bytes", lambda: 64 << 20)


def _npy(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def _zip(path, members, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as archive:
        for name, raw in members.items():
            archive.writestr(name, raw)
    return path


def test_npz_zip_bomb_is_refused_before_decompressing(tmp_path):
    bomb = _zip(tmp_path / "bomb.npz", {"param/w.npy": _npy(np.zeros(1 << 22))},
                zipfile.ZIP_DEFLATED)                           # 32 MiB of zeros in ~32 KiB
    assert bomb.stat().st_size < 100_000
    tracemalloc.start()
    with pytest.raises(CheckpointError, match="decompression bomb"):
        load_checkpoint(bomb)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 4 << 20


def test_npy_header_claiming_800_gb_is_refused(tmp_path):
    header = _npy(np.zeros((0, 1000, 1000, 1000)))                    # a valid 1.0 header
    forged = header.replace(b"(0, 1000, 1000, 1000)", b"(100, 1000, 1000, 1000)")
    path = _zip(tmp_path / "forged.npz", {"param/w.npy": forged + b"\0" * 64})
    with pytest.raises(CheckpointError, match="declares shape .* but the member holds"):
        load_checkpoint(path)


def test_npz_larger_than_the_memory_budget_is_refused(tmp_path, small_machine):
    path = _zip(tmp_path / "big.npz", {"w.npy": _npy(np.ones(10 << 20, np.uint8))} | {
        f"v{i}.npy": _npy(np.ones(10 << 20, np.uint8)) for i in range(6)})
    with pytest.raises(CheckpointError, match="more than the 64.0 MiB available"):
        safefiles.read_npz(path, CheckpointError)


def test_npz_with_non_npy_members_is_refused_with_a_short_list(tmp_path):
    path = _zip(tmp_path / "odd.npz", {f"junk{i}.txt": b"x" for i in range(1000)})
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "and 992 more" in str(info.value) and len(str(info.value)) < 300


def test_a_real_checkpoint_still_round_trips(tmp_path):
    params = {"w": np.arange(6.0).reshape(2, 3)}
    save_checkpoint(tmp_path / "c.npz", params, {}, step=1, epoch=1, rng_state={}, config={})
    assert np.array_equal(load_checkpoint(tmp_path / "c.npz").params["w"], params["w"])


def _idx(shape, fill=0):
    return bytes([0, 0, 0x08, len(shape)]) + struct.pack(f">{len(shape)}I", *shape) + \
        bytes([fill]) * int(np.prod(shape))


def test_gzip_idx_bomb_is_refused(tmp_path):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(_idx((40_000, 28, 28))))         # 31 MB of zeros
    assert path.stat().st_size < 100_000
    with pytest.raises(DataError, match="decompression bomb"):
        load_idx(path)


def test_plain_idx_header_larger_than_the_file_is_truncated(tmp_path):
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(_idx((60_000, 28, 28))[:5000])
    with pytest.raises(DataError, match="truncated: 4984 of the 47040000"):
        load_idx(path)


def test_mnist_with_zero_images_is_a_data_error(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx((0, 28, 28)))
    with pytest.raises(DataError, match="none of them 0"):
        load_mnist(tmp_path)


def _cifar10_folder(tmp_path, labels):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {"data": np.zeros((len(labels), 3072), np.uint8), "labels": labels}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return folder


def test_cifar_label_of_ten_to_the_thirty_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match=r"integers in \[0, 10\)"):
        read_cifar(_cifar10_folder(tmp_path, [1, 10 ** 30]))


def test_oversized_file_in_an_extracted_cifar_folder_is_refused_unread(tmp_path):
    folder = _cifar10_folder(tmp_path, [1, 2])
    with open(folder / "data_batch_3", "r+b") as f:
        f.truncate(1 << 33)                                        # a sparse 8 GiB file
    with pytest.raises(DataError, match="more than any official CIFAR file"):
        read_cifar(folder)


def _safetensors(header, data=b""):
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("raw, message", [
    (struct.pack("<Q", 1 << 40) + b"{}", "header length"),
    (_safetensors({"w": {"dtype": "F32", "shape": [1000, 1000], "data_offsets": [0, 4e6]}}),
     "invalid or inconsistent"),
    (_safetensors({"w": {"dtype": "F32", "shape": [10 ** 9], "data_offsets": [0, 8]}}, b"\0" * 8),
     "invalid or inconsistent"),
    (_safetensors({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 4),
     "invalid or inconsistent"),
    (_safetensors({"w": {"dtype": "X9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
     "invalid or inconsistent"),
    (_safetensors([1, 2]), "not a JSON object"),
    (struct.pack("<Q", 4) + b"{{{{", "not valid JSON"),
])
def test_safetensors_headers_are_checked_before_reading(tmp_path, raw, message):
    path = tmp_path / "w.safetensors"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=message):
        safefiles.check_safetensors_header(path, ValueError)


def test_parameter_error_lists_are_capped():
    shapes = param_shapes(make_config("paramixer", "digits", depth=2000))
    with pytest.raises(ParamError) as info:
        check_params(shapes, {})
    assert "more" in str(info.value) and len(str(info.value)) < 1000


def test_memory_budget_is_the_smaller_of_available_and_the_limit(small_machine):
    assert memory.budget()[0] == 64 << 20
    assert memory.budget(0.01)[0] == int(0.01 * memory.GIB)
    with pytest.raises(memory.MemoryLimitError, match="about 1.0 GiB .* than the 64.0 MiB"):
        memory.require(memory.GIB, "this")
    memory.require(1 << 20, "this")
    for bad in (0, -1, float("inf"), float("nan"), True, "8"):
        with pytest.raises(memory.MemoryLimitError, match=r"max_memory \(GiB\) must be a finite"):
            memory.budget(bad)


@pytest.mark.parametrize("model, overrides, batch", [("paramixer", {"depth": 1, "dim": 512}, 4),
    ("paramixer", {}, 64), ("vanilla", {"depth": 2, "dim": 32}, 16),
    ("symmixer", {"n_iter": 2}, 32), ("asymmixer", {"hidden_ratio": 4}, 8)])
def test_mixer_estimate_is_within_a_small_factor_of_the_measured_peak(model, overrides, batch):
    config = make_config(model, "digits", **overrides)
    mixer, optimizer = Mixer(config), AdamW()
    images = np.random.default_rng(0).standard_normal((batch, 1, 8, 8))
    labels = np.arange(batch) % config.num_classes
    tracemalloc.start()
    params = mixer.init(0)
    state = optimizer.init(params)
    _, _, grads = mixer.loss_and_grads(params, images, labels)
    optimizer.update(params, grads, state, 1e-3)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    estimate = memory.mixer_bytes(config, batch, 8)
    assert peak / 1.5 < estimate < 1.5 * peak, (estimate, peak)


def test_cifar_archive_expanding_beyond_the_ratio_is_refused(tmp_path):
    archive = tmp_path / "cifar-10-python.tar.gz"
    zeros = b"\0" * (100 << 20)                                    # 100 MB → ~100 KB
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("cifar-10-batches-py/data_batch_1")
        info.size = len(zeros)
        tar.addfile(info, io.BytesIO(zeros))
    assert archive.stat().st_size < 500_000
    with pytest.raises(DataError, match="decompression bomb"):
        read_cifar(archive)


def test_checkpoint_with_thousands_of_unexpected_entries_is_a_short_error(tmp_path):
    path = tmp_path / "c.npz"
    save_checkpoint(path, {"w": np.zeros(2)}, {}, step=1, epoch=1, rng_state={}, config={})
    with zipfile.ZipFile(path, "a") as archive:
        for i in range(3000):
            archive.writestr(f"junk/{i}.npy", _npy(np.zeros(1)))
    with pytest.raises(CheckpointError, match="and 2992 more") as info:
        load_checkpoint(path)
    assert len(str(info.value)) < 500
