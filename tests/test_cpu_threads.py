"""Chunked, threaded elementwise chains (refham/fast/threads.py) against one call of the chain:
the same numbers bit for bit, for any thread count, shape, layout and broadcasting."""
import os
import signal

import numpy as np
import pytest
import threadpoolctl
from hypothesis import given, settings, strategies as st

from refham.fast import threads as T
from refham.backend import backend_name, set_backend, use_module
from refham.fast import numpy_variant
from refham.fast.settings import use_compiled
from refham.special import gelu_and_deriv
from refham.lagrangians import quotient_and_product, relu_and_half_square
from refham.layers import _layernorm_dx, _normalise_affine, gelu_backward
from refham.normalisers import scaled_normalised


@pytest.fixture(autouse=True)
def _on_numpy():
    """These tests are about the NumPy thread pool: they run on the numpy backend, whatever
    REFHAM_BACKEND chose for the rest of the suite."""
    before = backend_name()
    set_backend("numpy")
    yield
    set_backend(before)


def _chain(x, scale, shift):
    """An elementwise chain with broadcasting and two outputs of different dtypes."""
    y = np.exp(-0.5 * x * x) * scale + shift
    return y, (x > shift).astype(np.int8)


def _equal(got, expected):
    got = got if isinstance(got, tuple) else (got,)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == e.shape and g.dtype == e.dtype
        np.testing.assert_array_equal(g, e)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 3), st.integers(1, 70), st.sampled_from(["full", "row", "column", "scalar"]),
       st.booleans(), st.sampled_from([np.float32, np.float64]), st.integers(0, 2 ** 31 - 1))
def test_chunked_chain_equals_one_call_for_any_thread_count(threads, rows, broadcast, transposed,
                                                           dtype, seed):
    gen = np.random.default_rng(seed)
    shape = (rows * 997 % 211 + 2, T.CHUNK // 50 + rows)  # from 1 chunk to many, last partial
    x = gen.standard_normal(shape).astype(dtype)
    if transposed:
        x = np.ascontiguousarray(x.T).T  # a non-contiguous view of the same shape
    scale = {"full": gen.standard_normal(shape), "row": gen.standard_normal(shape[1:]),
             "column": gen.standard_normal((shape[0], 1)),
             "scalar": dtype(gen.standard_normal())}[broadcast]
    scale = np.asarray(scale, dtype=dtype) if broadcast != "scalar" else scale
    with threadpoolctl.threadpool_limits(threads, user_api="blas"):
        got = T.chunked_elementwise(_chain, (x, scale, dtype(0.25)))
    _equal(got, _chain(x, scale, dtype(0.25)))


def test_thread_count_follows_the_blas_limit():
    for threads in (1, 2, 3):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            assert T.blas_threads() == threads


def test_the_same_numbers_with_one_and_with_several_threads():
    x = np.random.default_rng(3).standard_normal((37, 5 * T.CHUNK // 37)).astype(np.float32)
    results = []
    for threads in (1, 2, 4):
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            results.append(gelu_and_deriv(x))
    for other in results[1:]:
        _equal(other, results[0])


def test_a_single_output_stays_a_single_array_and_a_one_tuple_a_tuple():
    x = np.arange(3 * T.CHUNK, dtype=np.float64)
    _equal(T.chunked_elementwise(lambda a: a * 2.0, (x,)), x * 2.0)
    got = T.chunked_elementwise(lambda a: (a + 1.0,), (x,))
    assert isinstance(got, tuple) and len(got) == 1
    _equal(got, (x + 1.0,))


def test_small_and_non_numpy_inputs_go_to_the_chain_directly():
    calls = []

    def chain(a):
        calls.append(type(a))
        return a

    small = np.ones(T.CHUNK)   # one chunk's worth: no split
    assert T.chunked_elementwise(chain, (small,)) is small
    listed = [1.0] * (3 * T.CHUNK)  # not an array: passed through untouched
    assert T.chunked_elementwise(chain, (listed,)) is listed
    assert calls == [np.ndarray, list]


def _training_step_chains():
    """Each fused chain of the training step and the HAM with float32 arguments large enough
    to split."""
    gen = np.random.default_rng(11)
    batch, tokens, chans = 64, 64, 48  # (B, S, C): several chunks, NumPy's and compiled

    def arr(*shape):
        return gen.standard_normal(shape).astype(np.float32)

    return [(gelu_and_deriv, (arr(batch * tokens, 4 * chans),)),
            (gelu_backward, (arr(batch, tokens, chans), arr(batch, tokens, chans))),
            (_normalise_affine, (arr(batch, tokens, chans), np.abs(arr(batch, 1, 1)),
                                 arr(tokens, chans), arr(tokens, chans))),
            (_layernorm_dx, (arr(batch, tokens, chans), arr(batch, tokens, chans),
                             arr(batch, 1, 1), arr(batch, 1, 1), arr(batch, 1, 1))),
            # the HAM's Lagrangians (layernorm, relu, softmax over a (B, N) layer)
            (scaled_normalised, (arr(batch, 4 * chans), np.abs(arr(batch, 1)), 1.5,
                                 arr(4 * chans))),
            (relu_and_half_square, (arr(batch * tokens, chans),)),
            (quotient_and_product, (np.abs(arr(batch * tokens, chans)),
                                    arr(batch * tokens, chans), np.abs(arr(batch * tokens, 1))))]


@pytest.mark.parametrize("threads", [1, 2])
def test_the_numpy_chains_of_the_training_step_equal_their_plain_definitions(threads):
    """The chains as NumPy code (compiled variants off), split into chunks, against one
    unchunked call of what runs on NumPy (its plain xp definition, or its NumPy variant:
    tests/test_fast_paths.py holds the variant to the definition)."""
    use_compiled(False)
    try:
        with threadpoolctl.threadpool_limits(threads, user_api="blas"):
            for fused, args in _training_step_chains():
                _equal(fused(*args), numpy_variant(fused.plain)(*args))
    finally:
        use_compiled(True)


def test_the_compiled_chains_give_the_same_numbers_for_any_thread_count():
    pytest.importorskip("numba", reason="the compiled chains need numba (refham[fast])")
    for fused, args in _training_step_chains():
        with threadpoolctl.threadpool_limits(1, user_api="blas"):
            expected = fused(*args)
        for threads in (2, 3):
            with threadpoolctl.threadpool_limits(threads, user_api="blas"):
                _equal(fused(*args), expected)


def test_autograd_runs_the_plain_chain():
    """Under autograd the fused chain is the plain xp code (traceable), not the thread pool."""
    autograd = pytest.importorskip("autograd")
    import autograd.numpy as anp
    import autograd.scipy.special as asp

    x = np.linspace(-3.0, 3.0, 3 * T.CHUNK)
    with use_module(anp, asp.erf, name="autograd"):
        slope = autograd.grad(lambda v: gelu_backward(v, np.ones_like(x)).sum())(x)
    np.testing.assert_array_equal(slope, np.ones_like(x))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_gets_its_own_pool():
    """A fork keeps the pool object but none of its threads: the child must still get its
    numbers, without waiting for threads that do not exist (an alarm ends a hung child)."""
    x = np.random.default_rng(5).standard_normal(4 * T.CHUNK)
    with threadpoolctl.threadpool_limits(2, user_api="blas"):
        expected = T.chunked_elementwise(np.exp, (x,))  # the parent's pool now exists
        pid = os.fork()
        if pid == 0:  # the child: exit status 0 when the numbers are right
            signal.alarm(60)
            os._exit(0 if np.array_equal(T.chunked_elementwise(np.exp, (x,)), expected) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_the_first_chain_on_numpy_sets_glibc_to_retain_freed_memory_once(monkeypatch):
    """No page-fault tax by default: fast.run applies `retain_freed_memory` once per process,
    unless `keep_glibc_malloc` came first."""
    from refham.fast import settings
    calls = []
    monkeypatch.setattr(settings, "retain_freed_memory", lambda: calls.append(1) or True)
    for retain, expected in ((True, [1]), (False, [])):
        calls.clear()
        monkeypatch.setattr(settings._Malloc, "retain", retain)
        monkeypatch.setattr(settings._Malloc, "applied", False)
        for _ in range(2):
            gelu_backward(np.ones(3), np.ones(3))
        assert calls == expected
    settings.keep_glibc_malloc()
    assert settings._Malloc.retain is False
