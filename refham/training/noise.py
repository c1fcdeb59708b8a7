"""Training's input noise drawn on the device from a counter: no host draw, no upload, and each
rank computes only its own rows.

    noise = counter_normal((seed, step), n_global=512, rows=slice(0, 256), sample_shape=(3, 32, 32),
                           dtype=numpy.float32)

The default scheme (`noise_rng="host"`) draws σ·N(0, 1) for the whole global batch on the host
with the step's NumPy Generator and uploads it: ~50 ms per 32×32 batch of 512 on one core, longer
than a GPU step. `noise_rng="counter"` makes every value a pure function of (seed, step, its
index in the global batch), computed with `xp` where the batch lives:

    c        = i·2 + j, j ∈ {0, 1}, i the element's flat index in the global (n, C, H, W) batch
    h_j      = SplitMix64(c + key·2⁶⁴/φ)                 (64-bit integer arithmetic, wrapping)
    u₁       = (⌊h₀/2¹¹⌋ + 1)·2⁻⁵³ ∈ (0, 1],   u₂ = ⌊h₁/2¹¹⌋·2⁻⁵³ ∈ [0, 1)
    ε_i      = √(−2 ln u₁)·cos(2π u₂)                     (Box–Muller, float64, then `dtype`)

What stays bit-identical: the integers h_j and the uniforms u₁, u₂ on every backend, any number
of ranks, and a resumed run (exact integer and power-of-two arithmetic); ε itself is bit-identical
across ranks and resumes on one backend, and across NumPy and CuPy up to the last bits of ln,
cos and √ (CUDA's float64 libm is within 1–2 ulp of glibc's; after rounding to float32 the values
almost always agree exactly). The host scheme's stream is not reproduced: a run chooses one.
"""
import numpy

from refham.backend import xp

NOISE_RNGS = ("host", "counter")
_GOLDEN = 0x9E3779B97F4A7C15          # 2⁶⁴/φ, SplitMix64's increment
_MIX = (0xBF58476D1CE4E5B9, 0x94D049BB133111EB)


def splitmix64(counter):
    """SplitMix64's output function on uint64 `counter` (any backend): a bijection of 64-bit
    integers whose outputs for consecutive inputs pass BigCrush (Steele, Lea & Flood 2014)."""
    z = counter
    z = (z ^ (z >> 30)) * xp.uint64(_MIX[0])
    z = (z ^ (z >> 27)) * xp.uint64(_MIX[1])
    return z ^ (z >> 31)


def _stream_offset(key):
    """The 64-bit offset of stream `key` (a tuple of integers ≥ 0), by folding it with SplitMix64
    on the host (exact Python integers)."""
    state = 0
    for part in key:
        state = (state + int(part) + 1) * _GOLDEN % 2 ** 64
        state ^= state >> 31
    return state


def counter_normal(key, n_global, rows, sample_shape, dtype):
    """N(0, 1) values of rows `rows` (a slice of the n_global samples) of the global batch of
    samples shaped `sample_shape`, stream `key`, as an array of the active backend in `dtype`
    (see the module's equations)."""
    per_sample = int(numpy.prod(sample_shape))
    start, stop = rows.start * per_sample, min(rows.stop, n_global) * per_sample
    index = xp.arange(2 * start, 2 * stop, dtype=xp.uint64)          # c = 2i + j
    hashed = splitmix64(index + xp.uint64(_stream_offset(key)))
    pairs = (hashed >> xp.uint64(11)).reshape(-1, 2)                 # (values, 2): 53-bit integers
    u1 = (pairs[:, 0] + xp.uint64(1)).astype(xp.float64) * 2.0 ** -53
    u2 = pairs[:, 1].astype(xp.float64) * 2.0 ** -53
    values = xp.sqrt(-2.0 * xp.log(u1)) * xp.cos((2.0 * numpy.pi) * u2)
    return values.astype(dtype).reshape((stop // per_sample - start // per_sample,)
                                        + tuple(sample_shape))


class CounterNoise(numpy.random.Generator):
    """A training step's generator under noise_rng="counter": `standard_normal` gives the counter
    noise of this rank's rows on the active backend; every other draw (crop offsets, flips,
    drop-path masks: a number or two per sample) comes from `gen`, the step's host generator
    (a ShardedGenerator under several ranks), as before."""

    def __init__(self, gen, key, n_global, rows):
        super().__init__(gen.bit_generator)
        self.gen, self.key, self.n_global, self.rows = gen, key, n_global, rows

    def standard_normal(self, size=None, dtype=numpy.float64, out=None):
        size = (size,) if numpy.ndim(size) == 0 else tuple(size)
        if size[0] != self.rows.stop - self.rows.start:
            raise ValueError(f"counter noise is drawn per sample of the batch: size {size} does "
                             f"not start with this rank's {self.rows.stop - self.rows.start} rows")
        return counter_normal(self.key, self.n_global, self.rows, size[1:], dtype)

    def random(self, size=None, dtype=numpy.float64, out=None):
        return self.gen.random(size, dtype)

    def integers(self, low, high=None, size=None, dtype=numpy.int64, endpoint=False):
        return self.gen.integers(low, high, size, dtype, endpoint)


def step_generator(gen, scheme, key, n_global, rows):
    """The generator a training step draws from: `gen` itself for the host scheme, else a
    CounterNoise for stream `key` (the run's seed and step) over this rank's `rows`."""
    if scheme not in NOISE_RNGS:
        raise ValueError(f"unknown noise_rng {scheme!r}: choose one of {', '.join(NOISE_RNGS)}")
    return gen if scheme == "host" else CounterNoise(gen, key, n_global, rows)
