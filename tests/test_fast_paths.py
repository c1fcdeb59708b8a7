"""The fast paths of the training step against their plain definitions.

- float32 GELU on NumPy (a rational tail instead of scipy's erf) against the float64 exact form
  on a dense grid, at chunk boundaries and for extreme inputs;
- the accelerated elementwise chains (`backend.accelerated`): each has its CUDA kernel in
  refham.fast.kernels; on NumPy each is its plain xp definition; on a GPU the CuPy kernel must
  give the plain definition's numbers (skipped without a GPU);
- the single-GEMM layouts of the linear maps and MLPs against per-vector references;
- TF32 is a GPU-only, explicit switch.
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.special
from hypothesis import given, settings, strategies as st

from oracle import rel_err
from refham import backend as B
from refham import fast
from refham import lagrangians
from refham import layers as L
from refham import normalisers
from refham import special
from refham.fast.settings import use_compiled
from refham.fast.threads import CHUNK
from refham.optim import AdamW, adamw_step

EPS32 = 2.0 ** -23  # float32 spacing at 1


def _exact_gelu(x):
    """(GELU, GELU′) in float64 with scipy's normal cdf: the reference."""
    x = np.asarray(x, dtype=np.float64)
    cdf = scipy.special.ndtr(x)
    return x * cdf, cdf + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _ulps(actual, expected):
    """|actual − expected| in units of the float32 spacing at expected."""
    spacing = np.spacing(np.abs(expected).astype(np.float32)).astype(np.float64)
    return np.abs(actual.astype(np.float64) - expected) / spacing


def _fast_gelu(x, compiled=True):
    """The float32 NumPy path (whatever the active backend), as host arrays: compiled (numba,
    where installed) or the NumPy variant."""
    use_compiled(compiled)
    try:
        with B.use_module(np, scipy.special.erf, name="numpy"):
            gelu, deriv = special.gelu_and_deriv(np.asarray(x, dtype=np.float32))
    finally:
        use_compiled(True)
    return gelu, deriv


def _numba_or_skip(compiled):
    if compiled:
        pytest.importorskip("numba", reason="the compiled chains need numba (refham[fast])")


BOTH_PATHS = pytest.mark.parametrize("compiled", [False, True], ids=["numpy", "compiled"])


# ------------------------------------------------------------------------- float32 GELU on NumPy
@BOTH_PATHS
def test_float32_gelu_is_within_a_few_ulp_of_the_exact_form_on_a_dense_grid(compiled):
    _numba_or_skip(compiled)
    x = np.linspace(-20.0, 20.0, 800_001, dtype=np.float32)
    gelu, deriv = _fast_gelu(x, compiled)
    assert gelu.dtype == deriv.dtype == np.float32
    expected_gelu, expected_deriv = _exact_gelu(x)
    # Φ_N within ~1 ulp of 1 absolute, as with a correctly rounded float32 erf: GELU's error is
    # then at most ~|x|·eps (the lower tail cancels in ½ + sign(x)(½ − t), as erf's form does)
    assert np.all(np.abs(gelu - expected_gelu) <= 1.5 * EPS32 * np.abs(x.astype(np.float64)))
    assert np.all(np.abs(deriv - expected_deriv) <= 1.5 * EPS32)
    moderate = (x >= -1.0) & (expected_gelu != 0.0)  # where GELU keeps its relative accuracy
    assert np.max(_ulps(gelu[moderate], expected_gelu[moderate])) <= 6.0


@pytest.mark.parametrize("value", [0.0, -0.0, 1e-30, -1e-30, 7.0, -7.0, 15.0, -15.0, 1e6, -1e6,
                                   3e38, -3e38])
@BOTH_PATHS
def test_float32_gelu_extreme_inputs_stay_finite_and_right(value, compiled):
    _numba_or_skip(compiled)
    gelu, deriv = _fast_gelu(np.array([value], dtype=np.float32), compiled)
    expected_gelu, expected_deriv = _exact_gelu(np.array([value]))
    assert np.isfinite(gelu).all() and np.isfinite(deriv).all()
    assert abs(float(gelu[0]) - expected_gelu[0]) <= 1.5 * EPS32 * abs(value) + 1e-45
    assert abs(float(deriv[0]) - expected_deriv[0]) <= 1.5 * EPS32


@BOTH_PATHS
def test_float32_gelu_propagates_nan(compiled):
    _numba_or_skip(compiled)
    gelu, deriv = _fast_gelu(np.array([np.nan, 1.0], dtype=np.float32), compiled)
    assert np.isnan(gelu[0]) and np.isnan(deriv[0]) and np.isfinite(gelu[1])


@given(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.integers(0, 2 ** 31 - 1),
       st.booleans())
def test_float32_gelu_is_elementwise_across_chunks_and_layouts(dims, seed, transposed):
    """Chunked evaluation gives each element the value it has alone, whatever the shape,
    the size relative to the chunk and the memory layout."""
    shape = tuple(dims) + (CHUNK // 7 + 3,)  # several chunks, the last one partial
    x = (3.0 * B.rng(seed).standard_normal(shape)).astype(np.float32)
    if transposed:
        x = x.T
    gelu, deriv = _fast_gelu(x)
    assert gelu.shape == deriv.shape == x.shape
    flat = x.reshape(-1)
    picks = B.rng(seed + 1).integers(0, flat.size, 64)
    alone = _fast_gelu(flat[picks])
    np.testing.assert_array_equal(gelu.reshape(-1)[picks], alone[0])
    np.testing.assert_array_equal(deriv.reshape(-1)[picks], alone[1])


EPS64 = 2.0 ** -52


@BOTH_PATHS
def test_float64_gelu_is_within_a_few_ulp_of_the_exact_form_on_a_dense_grid(compiled):
    """The compiled float64 GELU (Cody's erfc and an exp of its own) against the exact form,
    with the bounds the definition (SciPy's erf) meets: Φ_N within ~2 ulp of 1 absolute."""
    _numba_or_skip(compiled)
    x = np.concatenate([np.linspace(-40.0, 40.0, 400_001), [-0.0, 1e-300, -1e-300, 1e150,
                                                             -1e150]])
    use_compiled(compiled)
    try:
        with _on_numpy():   # the compiled chains are NumPy's, whatever REFHAM_BACKEND chose
            gelu, deriv = special.gelu_and_deriv(np.asarray(x, dtype=np.float64))
    finally:
        use_compiled(True)
    expected_gelu, expected_deriv = _exact_gelu(x)
    finite = np.abs(x) < 1e150   # x·Φ_N(x) at ±1e150: ±1e150 and 0, checked below
    assert np.all(np.abs(gelu - expected_gelu)[finite] <= 2.0 * EPS64 * np.abs(x[finite]))
    assert np.all(np.abs(deriv - expected_deriv)[finite] <= 2.5 * EPS64)
    moderate = finite & (x >= -1.0) & (expected_gelu != 0.0)
    assert np.max(np.abs(gelu - expected_gelu)[moderate]
                  / np.spacing(np.abs(expected_gelu[moderate]))) <= 8.0
    assert (gelu[-2], deriv[-2], gelu[-1], deriv[-1]) == (1e150, 1.0, 0.0, 0.0)


def test_float64_and_autograd_keep_the_exact_erf_form():
    x = np.linspace(-9.0, 9.0, 2001)
    gelu, deriv = special.gelu_and_deriv(B.asarray(x, dtype=np.float64))
    expected_gelu, expected_deriv = _exact_gelu(x)
    assert rel_err(gelu, expected_gelu) <= 1e-15
    assert rel_err(deriv, expected_deriv) <= 1e-15


def test_gelu_layer_uses_the_fast_path_in_float32():
    x = B.asarray(np.linspace(-4.0, 4.0, 1001), dtype=np.float32)
    y, cache = L.gelu_forward(x)
    assert y.dtype == cache.dtype == np.float32
    expected_gelu, expected_deriv = _exact_gelu(B.to_numpy(x))
    assert np.max(np.abs(B.to_numpy(y) - expected_gelu)) <= 8 * EPS32
    assert np.max(np.abs(B.to_numpy(cache) - expected_deriv)) <= 2 * EPS32


# ------------------------------------------------------------ single-GEMM layouts of the layers
@given(st.integers(1, 4), st.integers(1, 5), st.integers(2, 6), st.integers(2, 7),
       st.integers(0, 2 ** 31 - 1))
def test_linear_maps_every_vector_like_a_per_vector_matmul(batch, rows, n_in, n_out, seed):
    gen = B.rng(seed)
    x = gen.standard_normal((batch, rows, n_in))
    weight, bias = gen.standard_normal((n_out, n_in)), gen.standard_normal(n_out)
    y, _ = L.linear_forward(B.asarray(x), B.asarray(weight), B.asarray(bias))
    expected = np.stack([[weight @ x[b, r] + bias for r in range(rows)] for b in range(batch)])
    assert rel_err(y, expected) <= 1e-13


@given(st.sampled_from(L.MLP_KINDS), st.integers(1, 3), st.integers(2, 5), st.integers(3, 6),
       st.integers(2, 6), st.integers(0, 2 ** 31 - 1))
def test_token_mlp_maps_every_column_like_a_per_column_mlp(kind, batch, tokens, channels,
                                                           hidden, seed):
    """The token MLP runs on one (S, B·C) matrix; each column must get MLP(column)."""
    gen = B.rng(seed)
    shapes = L.mlp_param_shapes(kind, tokens, hidden)
    weights = {name: gen.standard_normal(shape) for name, shape in shapes.items()}
    z = gen.standard_normal((batch, tokens, channels))
    out, _ = L.mlp_forward(kind, {k: B.asarray(v) for k, v in weights.items()}, B.asarray(z),
                           axis=L.TOKEN_AXIS)
    columns = [L.mlp_forward(kind, {k: B.asarray(v) for k, v in weights.items()},
                             B.asarray(z[b, :, c]), axis=L.CHANNEL_AXIS)[0]
               for b in range(batch) for c in range(channels)]
    expected = np.stack([B.to_numpy(col) for col in columns]).reshape(batch, channels, tokens)
    assert rel_err(out, expected.transpose(0, 2, 1)) <= 1e-12


# -------------------------------------------------------------------- fused elementwise chains
def _fused_cases(dtype):
    """(fused function, its arguments) for every fused chain of the training step."""
    gen = B.rng(7)

    def arr(*shape):
        return B.asarray(gen.standard_normal(shape), dtype=dtype)

    scalars = AdamW().beta1, AdamW().beta2
    positive_v = B.asarray(np.abs(gen.standard_normal((5, 3))), dtype=dtype)
    return [
        (special.gelu_and_deriv, (arr(4, 3, 33),)),
        (L.gelu_backward, (arr(4, 3, 33), arr(4, 3, 33))),
        (L._normalise_affine, (arr(4, 6, 5), B.asarray(np.abs(gen.standard_normal((4, 1, 1))),
                                                       dtype=dtype), arr(6, 5), arr(6, 5))),
        (L._layernorm_dx, (arr(4, 6, 5), arr(4, 6, 5), arr(4, 1, 1), arr(4, 1, 1),
                           arr(4, 1, 1))),
        (adamw_step, (arr(5, 3), arr(5, 3), arr(5, 3), positive_v,
                      *(np.dtype(dtype).type(s) for s in (0.99, 1e-3, *scalars, 0.5, 1e-8)))),
        (normalisers.scaled_normalised, (arr(4, 6, 5), B.asarray(1.0 + np.abs(
            gen.standard_normal((4, 1, 1))), dtype=dtype), 1.5, arr(6, 5))),
        (lagrangians.relu_and_half_square, (arr(4, 3, 33),)),
        (lagrangians.quotient_and_product, (positive_v, arr(5, 3), B.asarray(1.0 + np.abs(
            gen.standard_normal((5, 1))), dtype=dtype))),
    ]


def test_every_accelerated_chain_has_its_cuda_kernel_and_no_kernel_is_orphaned():
    chains = {fast.key_of(fused.plain) for fused, _ in _fused_cases(np.float64)}
    assert chains == set(fast.kernels.CUDA)
    assert set(fast.kernels.NUMPY) <= chains
    assert set(fast.compiled.COMPILED) <= chains


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=1, max_size=2),
       st.lists(st.integers(1, 40), min_size=1, max_size=2), st.booleans(),
       st.sampled_from([np.float32, np.float64]), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_compiled_chains_equal_their_definitions_bit_for_bit(lead, trail, scalar_affine, dtype,
                                                             transposed, seed):
    """Layer norm's pieces, GELU's backward, AdamW and the HAM Lagrangians' chains compiled
    (numba) do their definition's operations in its order and dtype: the same numbers (0 ulp),
    for any shape, affine and layout."""
    _numba_or_skip(True)
    gen = np.random.default_rng(seed)
    shape, ones = tuple(lead) + tuple(trail), (1,) * len(trail)

    def arr(*dims, positive=False):
        a = gen.standard_normal(dims).astype(dtype)
        return np.abs(a) if positive else a

    x = arr(*shape)
    x = np.ascontiguousarray(x.T).T if transposed else x   # a non-contiguous layout
    affine = () if scalar_affine else tuple(trail)
    scalars = (0.99, 1e-3, 0.9, 0.999, 0.5, 1e-8)
    cases = [
        (L._normalise_affine, (x, arr(*lead, *ones, positive=True), arr(*affine), arr(*affine))),
        (L._layernorm_dx, (x, arr(*shape), arr(*lead, *ones), arr(*lead, *ones),
                           arr(*lead, *ones))),
        (L.gelu_backward, (arr(*shape), x)),
        (adamw_step, (x, arr(*shape), arr(*shape), arr(*shape, positive=True),
                      *(np.dtype(dtype).type(s) for s in scalars))),
        # the HAM's Lagrangians; γ and β as the Python floats their Lagrangians pass
        (normalisers.scaled_normalised, (x, arr(*lead, *ones, positive=True), 1.5,
                                         arr(*affine))),
        (normalisers.scaled_normalised, (x, arr(*lead, *ones, positive=True), 1.0, 0.0)),
        (lagrangians.relu_and_half_square, (x,)),
        (lagrangians.quotient_and_product, (arr(*shape, positive=True), x,
                                            arr(*lead, *ones, positive=True))),
    ]
    for fused, args in cases:
        with _on_numpy():
            got, expected = fused(*args), fused.plain(*args)
        got = got if isinstance(got, tuple) else (got,)
        expected = expected if isinstance(expected, tuple) else (expected,)
        for g, e in zip(got, expected, strict=True):
            assert g.dtype == e.dtype and g.shape == e.shape, fused.__name__
            np.testing.assert_array_equal(g, e, err_msg=fused.__name__)


def _on_numpy():
    """NumPy as the array module: the compiled chains and the NumPy variants are NumPy's."""
    return B.use_module(np, scipy.special.erf, "numpy")


def test_without_numba_there_is_no_compiled_chain_and_the_numpy_chains_run():
    """An install without [fast]: numba hidden in a fresh process (None in sys.modules makes
    its import fail), refham has no compiled chain and runs the NumPy ones."""
    code = ("import sys; sys.modules['numba'] = None\n"
            "import numpy as np\n"
            "from refham import fast, special\n"
            "assert fast.compiled.numba is None and fast.compiled.COMPILED == {}\n"
            "x = np.linspace(-3, 3, 7)\n"
            "g, d = special.gelu_and_deriv(x)\n"
            "assert np.array_equal(g, special.gelu(x)) and np.allclose(d, special.gelu_deriv(x))\n"
            "print('ok')\n")
    env = {**os.environ, "REFHAM_BACKEND": "numpy"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_on_numpy_a_fused_chain_is_its_plain_definition():
    """As NumPy code (the compiled variants off; their own tests are above), in float64."""
    with B.use_module(np, scipy.special.erf, "numpy"):   # whatever REFHAM_BACKEND chose
        cases = _fused_cases(np.float64)
    for fused, args in cases:
        with B.use_module(np, scipy.special.erf, "numpy"):
            expected = fused.plain(*args)
            use_compiled(False)
            try:
                got = fused(*args)
            finally:
                use_compiled(True)
        for g, e in zip(got if isinstance(got, tuple) else (got,),
                        expected if isinstance(expected, tuple) else (expected,)):
            np.testing.assert_array_equal(B.to_numpy(g), B.to_numpy(e))


def _gpu_available():
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no CuPy, or no CUDA driver: cupy raises its own error types
        return False


@pytest.mark.skipif(not _gpu_available(), reason="needs CuPy and a GPU")
@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-13), (np.float32, 2e-6)])
def test_on_cupy_each_kernel_equals_its_plain_definition(dtype, tol):
    previous = B.backend_name()
    B.set_backend("cupy")
    try:
        for fused, args in _fused_cases(dtype):
            got, expected = fused(*args), fused.plain(*args)
            got = got if isinstance(got, tuple) else (got,)
            expected = expected if isinstance(expected, tuple) else (expected,)
            for g, e in zip(got, expected):
                assert g.dtype == e.dtype == dtype, fused.__name__
                assert rel_err(g, e) <= tol, fused.__name__
    finally:
        B.set_backend(previous)


@pytest.mark.skipif(not _gpu_available(), reason="needs CuPy and a GPU")
def test_tf32_switch_on_the_gpu():
    previous = B.backend_name()
    B.set_backend("cupy")
    try:
        assert not B.tf32_enabled()   # off by default
        B.set_tf32(True)
        assert B.tf32_enabled()
        B.set_tf32(False)
        assert not B.tf32_enabled()
    finally:
        B.set_backend(previous)


def test_tf32_is_refused_off_the_gpu():
    if B.backend_name() == "cupy":  # justified: the GPU case is tested by the CuPy test above
        pytest.skip("the cupy backend is active")
    assert not B.tf32_enabled()
    with pytest.raises(B.BackendError, match="set_backend\\('cupy'\\)"):
        B.set_tf32(True)


def test_without_a_writable_cache_folder_the_chains_compile_in_each_process(monkeypatch):
    """numba raises RuntimeError when it finds no folder to cache in (a read-only install,
    no home): the chains are then compiled without the cache, and still run."""
    numba = pytest.importorskip("numba", reason="the compiled chains need numba (refham[fast])")
    njit = numba.njit

    def njit_without_cache_folder(*args, cache=False, **kwargs):
        if cache:
            raise RuntimeError("cannot cache function: no locator available")
        return njit(*args, **kwargs)

    monkeypatch.setattr(numba, "njit", njit_without_cache_folder)
    loop = fast.compiled._jit(fast.compiled._gelu_backward_loop)
    out = np.zeros(3)
    loop(np.full(3, 2.0), np.arange(3.0), out)
    np.testing.assert_array_equal(out, [0.0, 2.0, 4.0])
