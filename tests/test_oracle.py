"""refham as a test oracle: golden files (refham.oracle.golden), the checker (refham.oracle.check), weight
export/import (refham.oracle.interop) and their commands. The golden gradients are checked against
autograd on refham's forward; where PyTorch is installed, the PyTorch peer (examples/
torch_mixer.py) loads the golden parameters by name and reproduces every golden output."""
import json
import pathlib
import re
import sys

import pytest
from tests.oracle import autograd  # (the module skips without autograd)
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from refham.oracle import check as oracle_check
from refham.backend import asarray
from refham.files.checkpoint import load_checkpoint
from refham.cli.commands import main
from refham.oracle.interop import InteropError, config_overrides, export_weights, import_weights
from refham.metaformer import three_layer_ham
from refham.mixer import Mixer, MixerConfig, ParamError, param_shapes
from refham.oracle.golden import (
    FORMAT, FORMAT_VERSION, GoldenError, ham_golden, load_npz, mixer_golden, read_golden,
    write_golden)
from refham.oracle.check import check, parse_tolerance, tolerance
from tests.oracle import TOL, autograd_numpy, rel_err

# S = 9 tokens, C = 6 channels, N_s = 3, N_c = 24, K = 5 classes: every axis distinguishable
SMALL = dict(image_size=6, patch=2, dim=6, depth=2, num_classes=5)
VARIANTS = [("vanilla", dict(bias=True)), ("paramixer", {}), ("symmixer", {}), ("asymmixer", {})]


def small_golden(model, norm="joint", steps=2, **extra):
    lam = 0.05 if model == "asymmixer" else 0.0
    return mixer_golden(model, n_iter=2, norm=norm, lam=lam, label_smoothing=0.1, batch=3,
                        steps=steps, **{**SMALL, **extra})


@pytest.fixture(scope="module")
def sym_file(tmp_path_factory):
    """A SymMixer golden file (it has every kind of key, block energies included)."""
    path = tmp_path_factory.mktemp("golden") / "sym.npz"
    write_golden(path, small_golden("symmixer"))
    return path


@pytest.fixture(scope="module")
def sym(sym_file):
    return read_golden(sym_file)[1]


# --------------------------------------------------------------------------------------------
# The golden file: keys, layouts, metadata
# --------------------------------------------------------------------------------------------
def test_golden_keys_shapes_and_metadata(sym):
    meta = json.loads(str(sym["meta/config"]))
    assert (meta["format"], meta["format_version"], meta["kind"]) == (FORMAT, FORMAT_VERSION,
                                                                      "mixer")
    assert meta["settings"]["n_iter"] == 2 and meta["settings"]["steps"] == 2
    config = MixerConfig(**meta["model"])
    shapes = param_shapes(config)
    S, C, B = config.num_tokens, config.dim, 3
    expected = {"input/images": (B, 1, 6, 6), "input/labels": (B,),
                **{f"param/{n}": s for n, s in shapes.items()},
                "output/logits": (B, 5), "output/loss": (),
                **{f"grad/{n}": s for n, s in shapes.items()},
                "block/0/out": (B, S, C), "block/0/energy": (B, 3),
                "block/1/out": (B, S, C), "block/1/energy": (B, 3),
                "train/losses": (2,), **{f"train/param/{n}": s for n, s in shapes.items()}}
    assert [(k, v.shape) for k, v in sym.items() if k != "meta/config"] == list(expected.items())
    assert sym["input/labels"].dtype == np.int64
    assert all(v.dtype == np.float64 for k, v in sym.items() if k not in ("meta/config",
                                                                          "input/labels"))
    assert sym["train/losses"][0] == sym["output/loss"]  # J before the first step
    assert sym["train/losses"][1] < sym["train/losses"][0]
    # the perturbed init: no structurally zero gradient, the head is not the init's zero
    assert all(np.abs(v).max() > 0 for k, v in sym.items() if k.startswith("grad/"))


def test_block_outputs_and_energies_are_the_models(sym):
    meta = json.loads(str(sym["meta/config"]))
    config = MixerConfig(**meta["model"])
    params = {k[len("param/"):]: v for k, v in sym.items() if k.startswith("param/")}
    last = sym[f"block/{config.depth - 1}/out"]
    y = last - last.mean(-1, keepdims=True)
    y = y / np.sqrt((y * y).mean(-1, keepdims=True) + config.ln_eps)
    pooled = (y * params["norm.weight"] + params["norm.bias"]).mean(1)
    assert rel_err(pooled @ params["head.weight"].T + params["head.bias"],
                   sym["output/logits"]) <= 1e-13
    # E₀ at the input of block 1 is E₀ at the output of block 0 seen by block 1's norm; at the
    # output of block 0 it is block 0's last energy: the records are of consecutive states
    from refham.mixer_energy import MixerBlock
    on_backend = {k: asarray(v) for k, v in params.items()}
    block0_out = asarray(sym["block/0/out"])
    block1 = MixerBlock(config, on_backend, 1)
    assert rel_err(block1.energy0(block0_out), sym["block/1/energy"][:, 0]) <= 1e-13
    block0 = MixerBlock(config, on_backend, 0)
    assert rel_err(block0.energy0(block0_out), sym["block/0/energy"][:, -1]) <= 1e-13


def test_ham_golden_is_consistent():
    golden = ham_golden(visible=7, hidden=5, batch=2, alpha=0.3)
    ham = three_layer_ham(7, 5)
    xs = {a: golden[f"input/state/{a}"] for a in "svc"}
    weights = {s: golden[f"param/{s}"] for s in ("sv", "vc")}
    assert golden["param/sv"].shape == (5, 7) and golden["param/vc"].shape == (7, 5)
    for a in "svc":
        assert rel_err(golden[f"output/step/{a}"],
                       xs[a] - 0.3 * golden[f"output/dEdg/{a}"]) <= 1e-14
    parts = [golden[f"output/energy/layers/{a}"] for a in "svc"] + \
        [golden[f"output/energy/synapses/{s}"] for s in ("sv", "vc")]
    assert rel_err(sum(parts), golden["output/energy/total"]) <= 1e-14
    # dE/dt = Σ_A ⟨∂E/∂x_A, ẋ_A⟩ with ∂E/∂x from autograd on the same energy code, ẋ = −∂E/∂g
    with autograd_numpy():
        dEdx = autograd.grad(lambda x: ham.total_energy(x, weights).sum())(xs)
    rate = sum((dEdx[a] * -golden[f"output/dEdg/{a}"]).sum(axis=1) for a in "svc")
    assert rel_err(golden["output/dEdt"], rate) <= TOL


@settings(max_examples=6)
@given(model=st.sampled_from(["vanilla", "paramixer", "symmixer", "asymmixer"]),
       norm=st.sampled_from(["joint", "channel"]), n_iter=st.integers(1, 2),
       dim=st.sampled_from([3, 5, 7]), grid=st.integers(2, 3), seed=st.integers(0, 2**16))
def test_golden_gradients_agree_with_autograd(model, norm, n_iter, dim, grid, seed):
    lam = 0.2 if model == "asymmixer" else 0.0
    golden = mixer_golden(model, n_iter=n_iter, norm=norm, lam=lam, label_smoothing=0.1, batch=2,
                          seed=seed, perturb=0.3, image_size=grid, patch=1, dim=dim, depth=2,
                          num_classes=3)
    config = MixerConfig(**json.loads(str(golden["meta/config"]))["model"])
    mixer = Mixer(config)
    params = {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}
    images, labels = golden["input/images"], golden["input/labels"]
    with autograd_numpy():
        def objective(p):
            return mixer.objective(p, images, labels, lam, 0.1)
        expected_loss = objective(params)
        expected = autograd.grad(objective)(params)
    assert abs(golden["output/loss"] - expected_loss) <= 1e-13 * abs(expected_loss)
    for name, value in expected.items():
        assert rel_err(golden[f"grad/{name}"], value) <= TOL, name


def test_golden_is_float64_and_reproducible_whatever_the_default_dtype():
    from refham.backend import get_dtype, set_dtype
    reference = small_golden("paramixer", steps=0)
    set_dtype("float32")
    try:
        again = small_golden("paramixer", steps=0)
        assert get_dtype() == np.float32  # restored after writing
    finally:
        set_dtype("float64")
    assert list(again) == list(reference)
    assert all(np.array_equal(again[k], reference[k]) for k in reference)


@pytest.mark.parametrize("call, match", [
    (lambda: mixer_golden("symmixer", batch=0), "batch must be an integer ≥ 1"),
    (lambda: mixer_golden("symmixer", steps=1.5), "steps must be an integer ≥ 0"),
    (lambda: mixer_golden("symmixer", lr=0.0), "lr must be a finite real number > 0"),
    (lambda: mixer_golden("symmixer", perturb=float("nan")), "perturb must be a finite"),
    (lambda: mixer_golden("symmixer", drop_path=0.1), "deterministic: drop_path must be 0"),
    (lambda: ham_golden("hopfield"), "unknown HAM 'hopfield'"),
    (lambda: ham_golden(alpha=-1.0), "alpha must be a finite real number > 0"),
    (lambda: write_golden("x.npz", {"a": np.array(["text"])}), "must be numeric arrays"),
])
def test_bad_settings_raise(call, match):
    with pytest.raises(GoldenError, match=match):
        call()


def test_unreadable_and_foreign_files_are_refused(tmp_path, sym_file):
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(sym_file.read_bytes()[:2000])
    with pytest.raises(GoldenError, match="truncated, corrupted or not an .npz"):
        read_golden(truncated)
    with pytest.raises(GoldenError, match="no file at"):
        read_golden(tmp_path / "absent.npz")
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, x=np.ones(2))
    with pytest.raises(GoldenError, match="no meta/config entry"):
        read_golden(no_meta)
    future = tmp_path / "future.npz"
    meta = json.loads(str(np.load(sym_file)["meta/config"]))
    np.savez(future, **{"meta/config": np.array(json.dumps({**meta, "format_version": 99}))})
    with pytest.raises(GoldenError, match="format version 99; this refham reads version 1"):
        read_golden(future)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(GoldenError, match="not an .npz of plain arrays"):
        load_npz(pickled)


# --------------------------------------------------------------------------------------------
# The checker
# --------------------------------------------------------------------------------------------
def nudge(name, factor, index=1):
    """Corrupt element `index` (flat) of `name` by `factor` times its tolerance there."""
    def corrupt(c):
        rtol, atol = tolerance(name)
        value = c[name].copy()
        value.flat[index] += factor * (atol + rtol * abs(value.flat[index]))
        c[name] = value
    return corrupt


def set_nan(c):
    c["block/1/out"] = c["block/1/out"].copy()
    c["block/1/out"][0, 2, 1] = np.nan


CORRUPTIONS = {  # name: (corrupt the candidate dict in place, failing tensors, message)
    "nudged gradient": (nudge("grad/blocks.0.mlp_tokens.fc2.weight", 3.0),
                        ["grad/blocks.0.mlp_tokens.fc2.weight"], r"^1 value\(s\) out of"),
    "nudged loss": (nudge("output/loss", 3.0, index=0), ["output/loss"], "out of"),
    "missing": (lambda c: c.pop("grad/head.bias"), ["grad/head.bias"], "missing from the cand"),
    "renamed": (lambda c: c.update({"output/logit": c.pop("output/logits")}),
                ["output/logits", "output/logit"], "missing|not in the golden file"),
    "transposed": (lambda c: c.update({"grad/blocks.1.mlp_channels.fc2.weight":
                                       c["grad/blocks.1.mlp_channels.fc2.weight"].T}),
                   ["grad/blocks.1.mlp_channels.fc2.weight"], r"\(transposed\?\)"),
    "NaN": (set_nan, ["block/1/out"], "1 NaN/inf value"),
    "extra": (lambda c: c.update({"grad/extra": np.zeros(3)}), ["grad/extra"], "not in the gold"),
    "part of the inputs": (lambda c: c.pop("param/norm.bias"), ["param/norm.bias"], "missing"),
    "changed input": (lambda c: c.update({"input/labels": (c["input/labels"] + 1) % 5}),
                      ["input/labels"], "out of"),
    "text": (lambda c: c.update({"train/losses": np.array(["1.0", "2.0"])}), ["train/losses"],
             "not a numeric array"),
    "shape () → (1,)": (lambda c: c.update({"output/loss": c["output/loss"].reshape(1)}),
                        ["output/loss"], r"shape \(1,\), golden \(\)"),
}


def test_golden_checked_against_itself_passes(sym_file, sym):
    report = check(sym_file, sym_file)
    assert report.ok and not report.failures
    assert [c.name for c in report.checks] == [k for k in sym if k != "meta/config"]
    assert all(c.max_abs == 0 for c in report.checks)
    assert str(report).splitlines()[-1] == f"{len(sym) - 1} tensors: {len(sym) - 1} OK, 0 NOT " \
                                           f"OK — PASS"


def test_a_report_of_many_tensors_prints_its_failures_first_and_counts_the_rest(sym):
    candidate = {**sym, **{f"extra/{i}": np.zeros(1) for i in range(3 * oracle_check.MAX_LINES)}}
    candidate["output/loss"] = sym["output/loss"] + 1.0
    lines = str(check(sym, candidate)).splitlines()
    assert len(lines) == oracle_check.MAX_LINES + 1
    failing = [line for line in lines if line.startswith("NOT OK")]
    assert len(failing) == oracle_check.MAX_LINES and any("output/loss" in f for f in failing)
    hidden = len(sym) - 1 + 3 * oracle_check.MAX_LINES - oracle_check.MAX_LINES
    assert lines[-1].endswith(f"({hidden} lines not shown) — FAIL")


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_each_corruption_is_caught(sym, kind):
    corrupt, failing, message = CORRUPTIONS[kind]
    candidate = dict(sym)
    corrupt(candidate)
    report = check(sym, candidate)
    assert not report.ok
    assert sorted(c.name for c in report.failures) == sorted(failing)
    assert all(re.search(message, c.detail) for c in report.failures)
    assert "NOT OK" in str(report) and str(report).endswith("FAIL")


def test_a_nudge_within_tolerance_passes_and_the_report_says_where_one_is_not(sym):
    candidate = dict(sym)
    nudge("grad/blocks.0.mlp_tokens.fc2.weight", 0.5)(candidate)
    assert check(sym, candidate).ok
    nudge("output/logits", 10.0)(candidate)
    (failure,) = check(sym, candidate).failures
    assert "worst at (0, 1)" in failure.detail and failure.max_abs > 0


def test_outputs_only_candidate_passes_with_inputs_skipped(sym):
    outputs = {k: v for k, v in sym.items() if not k.startswith(("input/", "param/", "meta/"))}
    report = check(sym, outputs)
    assert report.ok
    skipped = [c.name for c in report.checks if c.status == oracle_check.SKIPPED]
    assert skipped == [k for k in sym if k.startswith(("input/", "param/"))]
    assert not check(sym, {}).ok  # nothing compared is not a pass


def test_tolerances_by_kind_and_overrides():
    assert tolerance("param/head.weight") == (0.0, 0.0)
    assert tolerance("grad/head.weight") == (1e-9, 1e-13)
    assert tolerance("train/param/head.weight") == (1e-9, 1e-9)
    assert tolerance("output/logits") == tolerance("block/0/energy") == (1e-10, 1e-12)
    assert tolerance("output/logits", rtol=1e-3) == (1e-3, 1e-12)
    overrides = [parse_tolerance("grad/*=1e-4,1e-6"), parse_tolerance("grad/head.*=1,2")]
    assert tolerance("grad/norm.bias", 0.5, 0.5, overrides) == (1e-4, 1e-6)
    assert tolerance("grad/head.bias", None, None, overrides) == (1.0, 2.0)
    for bad in ("grad/*", "grad/*=1e-4", "=1,2", "x=a,b", "x=-1,0", "x=1,inf"):
        with pytest.raises(GoldenError, match="PATTERN=RTOL,ATOL|finite and >= 0"):
            parse_tolerance(bad)


def test_loose_tolerances_accept_what_default_ones_reject(sym):
    candidate = dict(sym)
    candidate["output/logits"] = sym["output/logits"] * (1 + 1e-6)
    assert not check(sym, candidate).ok
    assert check(sym, candidate, overrides=["output/*=1e-5,0"]).ok
    assert check(sym, candidate, rtol=1e-5).ok


def test_candidate_and_golden_swapped_is_refused(sym):
    outputs = {k: v for k, v in sym.items() if k.startswith("output/")}
    with pytest.raises(GoldenError, match="no meta/config entry"):
        check(outputs, sym)


# --------------------------------------------------------------------------------------------
# The PyTorch peer (skipped without torch)
# --------------------------------------------------------------------------------------------
def torch_peer():
    pytest.importorskip("torch")
    examples = str(pathlib.Path(__file__).resolve().parents[1] / "examples")
    if examples not in sys.path:
        sys.path.insert(0, examples)
    import torch_mixer
    return torch_mixer


STRICT = [("output/*", 1e-10, 1e-13), ("grad/*", 1e-10, 1e-13), ("block/*", 1e-10, 1e-12)]


@pytest.mark.parametrize("norm", ["joint", "channel"])
@pytest.mark.parametrize("model, extra", VARIANTS)
def test_pytorch_peer_reproduces_the_golden_file(model, extra, norm):
    peer = torch_peer()
    golden = small_golden(model, norm, **extra)
    config = MixerConfig(**json.loads(str(golden["meta/config"]))["model"])
    params = {k[len("param/"):]: v for k, v in golden.items() if k.startswith("param/")}
    torch_model = peer.from_refham(config, params)  # load_state_dict(..., strict=True)
    assert list(torch_model.state_dict()) == list(params)
    candidate = peer.golden_candidate(golden)
    report = check(golden, candidate, overrides=STRICT)  # logits, loss, grads to 1e-10
    assert report.ok, str(report)
    assert check(golden, {**golden, **candidate}).ok  # with the inputs copied: all compared
    assert len([c for c in report.checks if c.status == oracle_check.OK]) == \
        len([k for k in golden if k.startswith(("output/", "grad/", "block/", "train/"))])


def test_pytorch_candidate_script_and_check_command(tmp_path, sym_file, capsys):
    peer = torch_peer()
    candidate = tmp_path / "candidate.npz"
    assert peer.main(["--golden", str(sym_file), "--out", str(candidate)]) == 0
    assert main(["oracle", "check", str(sym_file), str(candidate)]) == 0
    assert capsys.readouterr().out.strip().endswith("PASS")


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------
def test_oracle_write_and_check_commands(tmp_path, capsys):
    golden, corrupted = tmp_path / "g.npz", tmp_path / "bad.npz"
    assert main(["oracle", "write", "--model", "asymmixer", "--n-iter", "2", "--lam", "0.1",
                 "--steps", "1", "--batch", "2", "--set", "depth=1", "dim=5", "image_size=4",
                 "--out", str(golden)]) == 0
    meta, tensors = read_golden(golden)
    assert meta["settings"]["lam"] == 0.1 and meta["model"]["dim"] == 5
    assert "train/param/blocks.0.mlp_tokens.fc2.weight" in tensors
    capsys.readouterr()
    assert main(["oracle", "check", str(golden), str(golden)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert all(line.startswith("OK ") for line in lines[:-1]) and lines[-1].endswith("PASS")
    bad = dict(tensors)
    bad["grad/head.weight"] = bad["grad/head.weight"] + 1e-6
    np.savez(corrupted, **bad)
    assert main(["oracle", "check", str(golden), str(corrupted)]) == 1
    out = capsys.readouterr().out
    assert "NOT OK  grad/head.weight" in out and out.rstrip().endswith("FAIL")
    assert main(["oracle", "check", str(golden), str(corrupted), "--tol",
                 "grad/head.*=1e-3,1e-5"]) == 0
    assert main(["oracle", "write", "--ham", "metaformer", "--visible", "5", "--hidden", "4",
                 "--out", str(tmp_path / "h.npz")]) == 0
    assert main(["oracle", "check", str(tmp_path / "h.npz"), str(tmp_path / "h.npz")]) == 0


@pytest.mark.parametrize("argv, message", [
    (["--model", "symmixer", "--alpha", "0.1"], "--alpha do not apply to a Mixer"),
    (["--ham", "metaformer", "--lr", "0.1"], "--lr do not apply to a HAM"),
    (["--model", "symmixer", "--n-iter", "2", "--set", "n_iter=3"], "or are given twice"),
    (["--model", "symmixer", "--set", "width=3"], "must read FIELD=VALUE with FIELD one of"),
    (["--model", "symmixer", "--set", "bias=maybe"], "bias takes true or false"),
    (["--model", "symmixer", "--lam", "0.1"], "model 'symmixer' has none"),
])
def test_oracle_write_errors_exit_2(tmp_path, capsys, argv, message):
    assert main(["oracle", "write", *argv, "--out", str(tmp_path / "x.npz")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()


def test_check_command_on_missing_file_exits_2(tmp_path, sym_file, capsys):
    assert main(["oracle", "check", str(sym_file), str(tmp_path / "none.npz")]) == 2
    assert "no file at" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Export and import
# --------------------------------------------------------------------------------------------
def test_export_import_round_trip_through_npz_and_checkpoint(tmp_path, sym_file, sym, capsys):
    state = tmp_path / "state.npz"
    assert main(["export", "--checkpoint", str(sym_file), "--format", "npz", "--out",
                 str(state)]) == 0
    exported = dict(np.load(state))
    params = {k[len("param/"):]: v for k, v in sym.items() if k.startswith("param/")}
    assert list(exported) == list(params)  # exactly the state dict: timm names, torch order
    assert all(np.array_equal(exported[k], params[k]) for k in params)
    # a plain state dict does not say which model it holds
    assert main(["import", str(state), "--out", str(tmp_path / "p.npz")]) == 2
    assert "--model NAME --size SIZE" in capsys.readouterr().err
    argv = ["import", str(state), "--model", "symmixer", "--set", "image_size=6", "patch=2",
            "dim=6", "depth=2", "num_classes=5", "n_iter=2"]
    assert main([*argv, "--out", str(tmp_path / "p.npz")]) == 0
    assert main([*argv, "--as", "checkpoint", "--out", str(tmp_path / "ck.npz")]) == 0
    ck = load_checkpoint(tmp_path / "ck.npz")
    assert all(np.array_equal(ck.params[k], params[k]) for k in params)
    for source in ("p.npz", "ck.npz"):  # both export again to the same state dict
        again = tmp_path / f"again_{source}"
        export_weights(tmp_path / source, again, "npz")
        assert all(np.array_equal(np.load(again)[k], params[k]) for k in params)
    wrong = ["import", str(state), "--model", "symmixer", "--out", str(tmp_path / "w.npz")]
    assert main(wrong) == 2  # digits-sized symmixer: other shapes
    assert "wrong shape" in capsys.readouterr().err


def test_exported_weights_load_into_pytorch_strictly(tmp_path, sym_file, sym):
    peer = torch_peer()
    export_weights(sym_file, tmp_path / "state.npz", "npz")
    config = MixerConfig(**json.loads(str(sym["meta/config"]))["model"])
    model = peer.TorchMixer(config).double()
    model.load_state_dict({k: peer.torch.from_numpy(v) for k, v in
                           np.load(tmp_path / "state.npz").items()}, strict=True)
    logits = model(peer.torch.from_numpy(sym["input/images"])).detach().numpy()
    assert rel_err(logits, sym["output/logits"]) <= 1e-12


def test_safetensors_round_trip_carries_the_config(tmp_path, sym_file, sym):
    pytest.importorskip("safetensors")
    path = tmp_path / "w.safetensors"
    config = export_weights(sym_file, path, "safetensors")
    import_weights(path, tmp_path / "p.npz")  # no model options: the metadata says it
    meta = json.loads(str(np.load(tmp_path / "p.npz")["meta/config"]))
    assert MixerConfig(**meta["model"]) == config
    assert all(np.array_equal(np.load(tmp_path / "p.npz")[k], sym[k]) for k in sym
               if k.startswith("param/"))


def test_without_safetensors_the_message_says_how_to_get_it(tmp_path, sym_file, monkeypatch,
                                                            capsys):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors → ImportError
    assert main(["export", "--checkpoint", str(sym_file), "--out", str(tmp_path / "w.st")]) == 2
    assert "pip install 'refham[safetensors]'" in capsys.readouterr().err
    (tmp_path / "junk.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InteropError, match="optional `safetensors` package"):
        import_weights(tmp_path / "junk.safetensors", tmp_path / "p.npz")


def test_import_refuses_bad_state_dicts(tmp_path, sym):
    params = {k[len("param/"):]: v for k, v in sym.items() if k.startswith("param/")}
    config = MixerConfig(**json.loads(str(sym["meta/config"]))["model"])
    broken = dict(params, **{"head.bias": np.full(5, np.nan)})
    np.savez(tmp_path / "nan.npz", **broken)
    with pytest.raises(ParamError, match="NaN or inf in head.bias"):
        import_weights(tmp_path / "nan.npz", tmp_path / "p.npz", config)
    with pytest.raises(InteropError, match="unknown output kind"):
        import_weights(tmp_path / "nan.npz", tmp_path / "p.npz", config, as_="pt")
    with pytest.raises(InteropError, match="unknown format 'pt'"):
        export_weights(tmp_path / "nan.npz", tmp_path / "x", "pt")
    with pytest.raises(InteropError, match="no Mixer config inside"):
        export_weights(tmp_path / "nan.npz", tmp_path / "x", "npz")
    assert not (tmp_path / "p.npz").exists()


def test_config_overrides_are_typed():
    assert config_overrides(["dim=6", "hidden_ratio=1.5", "bias=true", "norm=channel"]) == \
        {"dim": 6, "hidden_ratio": 1.5, "bias": True, "norm": "channel"}
    with pytest.raises(InteropError, match="dim takes int values"):
        config_overrides(["dim=six"])
