"""refham's CuPy code path on the NumPy-backed stand-in (tests/cupy_standin.py, the `standin`
fixture): the stand-in's own rules, the install and NCCL probes answering a missing piece with one
line, `refham train` / `--resume` / `eval` / `metaformer train` / `sweep` / `oracle write` and a
2-rank MPI and NCCL-signature run with `--backend cupy`, the counter noise, TF32, the warm-up,
the GPU memory budget and one GPU per rank. What this proves and what not: docs/gpu.md."""
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from refham import backend as B
from refham.cli.commands import main
from refham.files.memory import MemoryLimitError, budget, require
from refham.training import noise
from refham.training.train import train
from refham.training.train_config import TrainConfig, TrainConfigError
from tests.test_distributed import MPIEXEC, ROOT, TIMEOUT, needs_mpi
from tests.test_train import _interrupt_at

TINY = ["--data", "synthetic", "--dim", "8", "--depth", "1", "--batch-size", "32",
        "--no-progress"]
NVRTC_MISSING = ("CuPy failed to load libnvrtc.so.12: OSError: libnvrtc.so.12: cannot open "
                 "shared object file: No such file or directory")


# ------------------------------------------------------------------ the stand-in's own rules
def test_standin_refuses_implicit_host_conversion_and_host_arguments(standin):
    x = B.xp.asarray(np.arange(6.0).reshape(2, 3))
    with pytest.raises(TypeError, match="Implicit conversion to a NumPy array is not allowed"):
        np.asarray(x)
    for mixed in (lambda: x + np.ones(3), lambda: np.ones(3) + x,
                  lambda: B.xp.maximum(x, np.ones(3)), lambda: B.xp.concatenate([x, np.ones((1, 3))])):
        with pytest.raises(TypeError, match="Unsupported type"):
            mixed()
    assert isinstance(x.sum(), standin.ndarray) and x.sum().ndim == 0   # 0-d, as CuPy's
    assert standin.syncs() == 0
    assert float(x.sum()) == 15.0 and int(x[1, 2]) == 5 and bool(x.max() > 4)
    np.testing.assert_array_equal(x.get(), np.arange(6.0).reshape(2, 3))
    assert B.to_numpy(x).shape == (2, 3) and standin.syncs() == 5


def test_standin_kernels_are_refhams_own_and_type_checked(standin):
    from refham.fast.kernels import CUDA
    with pytest.raises(ValueError, match="runs only the kernels"):
        standin.ElementwiseKernel("T x", "T y", "y = x;", "other")
    kernel = standin.ElementwiseKernel(*CUDA["refham.layers.gelu_backward"], "k")
    with pytest.raises(TypeError, match="Unsupported type"):
        kernel(np.ones(3), B.xp.ones(3))
    with pytest.raises(TypeError, match="mismatched"):
        kernel(B.xp.ones(3, dtype=np.float32), B.xp.ones(3))
    assert kernel(B.xp.ones(3) * 2, B.xp.ones(3) * 3).get().tolist() == [6.0] * 3


# ------------------------------------------------------------------------------- probes
def _break(standin, monkeypatch, where, error):
    """Make the stand-in's kernel compile (`where` = 'kernel') or GEMM ('gemm') raise `error`."""
    if where == "kernel":
        def failing(*args, **kwargs):
            raise error
        monkeypatch.setattr(sys.modules["cupy"], "ElementwiseKernel", failing)
    else:
        def failing_matmul(self, other):
            raise error
        monkeypatch.setattr(standin.ndarray, "__matmul__", failing_matmul)


@pytest.mark.parametrize("where, error, piece, command", [
    ("kernel", RuntimeError(NVRTC_MISSING), "NVRTC", 'pip install "cupy-cuda12x[ctk]"'),
    ("gemm", ImportError("CuPy failed to load libcublas.so.13: OSError: libcublas.so.13: cannot "
                         "open shared object file"), "cuBLAS", 'pip install "cupy-cuda13x[ctk]"'),
])
def test_choosing_cupy_probes_a_kernel_and_a_gemm(standin, monkeypatch, where, error, piece,
                                                  command):
    B.set_backend("numpy")
    monkeypatch.setattr(B, "_probed", set())
    _break(standin, monkeypatch, where, error)
    with pytest.raises(B.BackendError) as info:
        B.set_backend("cupy")
    message = str(info.value)
    assert "\n" not in message and piece in message and command in message
    assert B.backend_name() == "numpy"


def test_refham_train_says_what_is_missing_in_one_line(standin, monkeypatch, tmp_path, capsys):
    B.set_backend("numpy")
    monkeypatch.setattr(B, "_probed", set())
    _break(standin, monkeypatch, "kernel", RuntimeError(NVRTC_MISSING))
    assert main(["train", *TINY, "--backend", "cupy", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "NVRTC" in err and "cupy-cuda12x[ctk]" in err


def test_missing_cupy_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)      # import cupy → ImportError
    with pytest.raises(B.BackendError, match=r'pip install "refham\[cuda12\]"'):
        B.set_backend("cupy")


# ------------------------------------------------------------- the CLI on the cupy code path
def test_train_resume_eval_sweep_on_the_cupy_path(standin, tmp_path, capsys):
    out = str(tmp_path / "run")
    cupy = ["--backend", "cupy"]
    assert main(["train", *TINY, *cupy, "--epochs", "1", "--out", out]) == 0
    assert main(["train", "--resume", "--out", out, *cupy, "--epochs", "2"]) == 2  # settings fixed
    assert main(["train", *TINY, *cupy, "--epochs", "1", "--out", str(tmp_path / "r2"),
                 "--checkpoint-every", "2", "--input-noise", "0.3", "--noise-rng", "counter",
                 "--tf32"]) == 0
    assert main(["eval", "--checkpoint", os.path.join(out, "last.npz"), *cupy]) == 0
    assert "test top-1" in capsys.readouterr().out
    sweep = ["sweep", *TINY, *cupy, "--epochs", "1", "--seeds", "0", "--models", "paramixer",
             "--out", str(tmp_path / "sweep")]
    assert main(sweep) == 0
    assert len(open(tmp_path / "sweep" / "results.jsonl").readlines()) == 1
    assert standin.syncs() > 0


def test_resume_on_the_cupy_path_continues_exactly(standin, tmp_path):
    settings = dict(data="synthetic", dim=8, depth=1, batch_size=32, epochs=2, progress=False,
                    backend="cupy", input_noise=0.2, noise_rng="counter", drop_path=0.1)
    whole = train(TrainConfig(**settings, out=str(tmp_path / "whole")))
    split = TrainConfig(**settings, out=str(tmp_path / "split"))
    with pytest.MonkeyPatch.context() as patch:
        _interrupt_at(patch, 10, lambda: os.kill(os.getpid(), signal.SIGINT))
        assert train(split)["status"] == "interrupted"
    resumed = train(split, resume=True)
    assert resumed["train_loss"] == whole["train_loss"] and resumed["test_acc"] == whole["test_acc"]


def test_metaformer_and_oracle_on_the_cupy_path(standin, tmp_path):
    assert main(["metaformer", "train", "--data", "synthetic", "--hidden", "8", "--steps", "2",
                 "--epochs", "1", "--batch-size", "64", "--no-progress",
                 "--out", str(tmp_path / "mf")]) == 0
    golden = str(tmp_path / "golden.npz")
    assert main(["oracle", "write", "--model", "paramixer", "--set", "depth=1", "dim=8",
                 "num_classes=4", "--out", golden]) == 0
    assert os.path.getsize(golden) > 0


# ---------------------------------------------------------------------- MPI with NCCL calls
def _standin_mpiexec(args, tmp_path, **env):
    return subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, os.path.join(ROOT, "tests", "cupy_standin.py"),
         *args], capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1", "REFHAM_BACKEND": "",
             "REFHAM_STANDIN_GPUS": "2", **env})


@needs_mpi
def test_two_ranks_with_nccl_signatures_match_one_process(standin, tmp_path):
    settings = ["--model", "asymmixer", "--lam", "0.01", "--data", "digits", "--train-fraction",
                "0.1", "--dim", "16", "--depth", "2", "--epochs", "1", "--batch-size", "32",
                "--no-drop-last", "--dtype", "float64", "--no-progress", "--backend", "cupy",
                "--input-noise", "0.3", "--noise-rng", "counter", "--drop-path", "0.2"]
    result = _standin_mpiexec(["train", *settings, "--out", "two"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert main(["train", *settings, "--comm", "none", "--out", str(tmp_path / "one")]) == 0
    two = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    one = [json.loads(line) for line in open(tmp_path / "one" / "metrics.jsonl")]
    np.testing.assert_allclose(two[-1]["train_loss"], one[-1]["train_loss"], rtol=1e-10)
    assert two[-1]["test_acc"] == one[-1]["test_acc"]


@needs_mpi
def test_missing_nccl_ends_every_rank_with_one_line(tmp_path):
    result = _standin_mpiexec(["train", *TINY, "--backend", "cupy", "--out", "run"], tmp_path,
                              REFHAM_STANDIN_NCCL="0")
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if "nvidia-nccl-cu13" in line]
    # every rank raises it; the first to exit aborts the job, which may cut the other's line
    assert 1 <= len(lines) <= 2 and "Traceback" not in result.stderr
    assert "rank(s) 0, 1" in lines[0]


@needs_mpi
def test_mpiexec_sweep_puts_each_rank_on_its_own_gpu(tmp_path):
    # each rank writes its GPU to a file of its own: two ranks' stdout may interleave mid-line
    code = ("import os, sys; sys.path.insert(0, os.environ['PYTHONPATH']);"
            "from tests import cupy_standin as s; s.install();"
            "from refham import backend as B; B.set_backend('cupy');"
            "rank = os.environ['PMI_RANK'];"
            "open(os.path.join(sys.argv[1], 'gpu' + rank), 'w').write(str(s._STATE['device']))")
    result = subprocess.run(
        [MPIEXEC, "-n", "2", sys.executable, "-c", code, str(tmp_path)], capture_output=True,
        text=True, timeout=TIMEOUT,
        env={**os.environ, "PYTHONPATH": ROOT, "REFHAM_STANDIN_GPUS": "2"})
    assert result.returncode == 0, result.stderr
    assert [(tmp_path / f"gpu{rank}").read_text() for rank in (0, 1)] == ["0", "1"]


# ------------------------------------------------------------ noise, TF32, warm-up, memory
def test_counter_noise_is_sharded_exactly_and_normal(standin):
    key, shape = (7, 3), (4, 5)
    whole = noise.counter_normal(key, 6, slice(0, 6), shape, np.float64).get()
    parts = [noise.counter_normal(key, 6, slice(a, b), shape, np.float64).get()
             for a, b in ((0, 3), (3, 6))]
    np.testing.assert_array_equal(np.concatenate(parts), whole)
    B.set_backend("numpy")
    np.testing.assert_array_equal(noise.counter_normal(key, 6, slice(0, 6), shape, np.float64),
                                  whole)   # the same arithmetic on NumPy (libm alike here)
    many = noise.counter_normal((1, 2), 20000, slice(0, 20000), (10,), np.float64)
    assert abs(many.mean()) < 0.005 and abs(many.std() - 1) < 0.005
    assert not np.array_equal(whole, noise.counter_normal((7, 4), 6, slice(0, 6), shape,
                                                          np.float64))


def test_tf32_is_a_cupy_float32_setting(standin, tmp_path, monkeypatch):
    with pytest.raises(TrainConfigError, match="float64"):
        TrainConfig(tf32=True, dtype="float64")
    settings = dict(data="synthetic", dim=8, depth=1, batch_size=32, epochs=1, progress=False)
    with pytest.raises(TrainConfigError, match="needs --backend cupy"):
        train(TrainConfig(**settings, backend="numpy", tf32=True, out=str(tmp_path / "cpu")))
    from refham.training import train as train_module
    seen, real_step = [], train_module._EpochLoop._train_step

    def step(self, images, labels):
        seen.append(B.tf32_enabled())
        return real_step(self, images, labels)
    monkeypatch.setattr(train_module._EpochLoop, "_train_step", step)
    train(TrainConfig(**settings, backend="cupy", tf32=True, out=str(tmp_path / "gpu")))
    assert seen and all(seen) and not B.tf32_enabled()     # on while training, restored after


def test_kernels_compile_in_the_warm_up_not_in_timed_steps(standin, tmp_path, monkeypatch):
    from refham.training import train as train_module
    compiled_at_steps = []
    real_step = train_module._EpochLoop._train_step

    def step(self, images, labels):
        before = len(standin.COMPILED)
        result = real_step(self, images, labels)
        compiled_at_steps.append(len(standin.COMPILED) - before)
        return result
    monkeypatch.setattr(train_module._EpochLoop, "_train_step", step)
    train(TrainConfig(data="synthetic", dim=8, depth=1, batch_size=32, epochs=1, progress=False,
                      backend="cupy", drop_path=0.1, out=str(tmp_path / "run")))
    assert standin.COMPILED and compiled_at_steps and not any(compiled_at_steps)


def test_memory_budget_counts_the_free_gpu_memory(standin, monkeypatch):
    from refham.training.data import make_synthetic
    from refham.training.train_config import model_config
    monkeypatch.setitem(standin.SETTINGS, "free", 1 << 20)
    assert budget() == (1 << 20, "free on this GPU")
    with pytest.raises(MemoryLimitError, match="free on this GPU"):
        model_config(TrainConfig(dim=64, depth=2), make_synthetic()[0])
    B.set_backend("numpy")
    require(2 << 20, "the same on the host")      # host memory is not the GPU's
