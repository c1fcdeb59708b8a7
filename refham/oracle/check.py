"""The golden-file checker: compare a candidate's tensors with a refham golden file, by name.

    report = check("golden.npz", "candidate.npz")            # paths or {name: array} dicts
    print(report)                                           # one line per tensor, then a summary
    report.ok                                               # True only if every tensor passed

A tensor passes when it is a finite numeric array of the golden shape and, element by element,

    |candidate − golden| ≤ atol + rtol·|golden|

(NumPy's `allclose` rule). Names, never positions, pair the tensors. A failure is: a golden tensor
missing from the candidate, a candidate tensor the golden file lacks (e.g. a renamed one), a shape
mismatch (a transposed matrix), a NaN or inf, a non-numeric array, or a value out of tolerance.
`meta/…` entries are metadata, not compared. The golden inputs (`input/…`, `param/…`) may be
left out of a candidate as a group: a candidate holds either all of them (compared, exactly by
default) or none (an outputs-only candidate); part of them is a failure.

Default tolerances (float64 candidates; first matching pattern wins; measured worst differences
of the PyTorch peer examples/torch_mixer.py against refham are 100× or more below):

    input/*, param/*   rtol 0,     atol 0       the inputs, copied: must be identical
    grad/*             rtol 1e-9,  atol 1e-13   gradients (|Δ| ≤ 3e-16 measured)
    train/param/*      rtol 1e-9,  atol 1e-9    after AdamW: Adam turns rounding-level gradients
                                                (exact zeros in exact arithmetic) into ±lr·1e-9
    *                  rtol 1e-10, atol 1e-12   logits, loss, block outputs and energies,
                                                train/losses, HAM outputs

`overrides` (the CLI's --rtol/--atol and --tol PATTERN=RTOL,ATOL) replace them.
"""
import dataclasses
import fnmatch
import math
import numbers

import numpy

from refham.oracle.golden import GoldenError, load_npz, read_meta

INPUT_PREFIXES = ("input/", "param/")
META_PREFIX = "meta/"
DEFAULT_TOLERANCES = (  # (name pattern, rtol, atol), first match wins
    ("input/*", 0.0, 0.0),
    ("param/*", 0.0, 0.0),
    ("grad/*", 1e-9, 1e-13),
    ("train/param/*", 1e-9, 1e-9),
    ("*", 1e-10, 1e-12),
)
OK, NOT_OK, SKIPPED = "OK", "NOT OK", "SKIPPED"


@dataclasses.dataclass(frozen=True)
class TensorCheck:
    """The verdict on one tensor: status OK / NOT OK / SKIPPED, why, and the errors measured."""
    name: str
    status: str
    detail: str = ""
    max_abs: float = math.nan
    max_rel: float = math.nan

    def line(self, width):
        errors = "" if math.isnan(self.max_abs) else \
            f"max abs {self.max_abs:9.2e}  max rel {self.max_rel:9.2e}  "
        return f"{self.status:<7} {self.name:<{width}}  {errors}{self.detail}".rstrip()


MAX_LINES = 200      # tensor lines a report prints at most


@dataclasses.dataclass(frozen=True)
class Report:
    """All tensor verdicts of one comparison, in the golden file's order (extras last)."""
    checks: tuple

    @property
    def ok(self):
        """True when no tensor failed and at least one was compared."""
        return any(c.status == OK for c in self.checks) and not self.failures

    @property
    def failures(self):
        return [c for c in self.checks if c.status == NOT_OK]

    def __str__(self):
        """One line per tensor and a summary; past MAX_LINES tensors (a hostile candidate can
        hold millions) the failures come first and the rest is counted, not printed."""
        shown = self.checks
        if len(shown) > MAX_LINES:
            shown = sorted(shown, key=lambda c: c.status != NOT_OK)[:MAX_LINES]
        width = max((len(c.name) for c in shown), default=0)
        counts = {status: sum(c.status == status for c in self.checks)
                  for status in (OK, NOT_OK, SKIPPED)}
        hidden = len(self.checks) - len(shown)
        summary = (f"{len(self.checks)} tensors: {counts[OK]} OK, {counts[NOT_OK]} NOT OK"
                   + (f", {counts[SKIPPED]} skipped" if counts[SKIPPED] else "")
                   + (f" ({hidden} lines not shown)" if hidden else "")
                   + f" — {'PASS' if self.ok else 'FAIL'}")
        return "\n".join([c.line(width) for c in shown] + [summary])


def parse_tolerance(spec):
    """'PATTERN=RTOL,ATOL' (e.g. 'grad/*=1e-6,1e-9') → (pattern, rtol, atol)."""
    pattern, sep, numbers = spec.partition("=")
    parts = numbers.split(",")
    try:
        if not sep or not pattern or len(parts) != 2:
            raise ValueError
        rtol, atol = (float(p) for p in parts)
    except ValueError:
        raise GoldenError(f"tolerance {spec!r} must read PATTERN=RTOL,ATOL, e.g. "
                          f"'grad/*=1e-6,1e-9'") from None
    return pattern, *_checked_tolerances(rtol, atol, f"tolerance {spec!r}")


def _checked_tolerances(rtol, atol, what):
    """(rtol, atol) after checking each is None (the default) or a finite number >= 0."""
    for value in (rtol, atol):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)
                                  or not 0 <= value < math.inf):
            raise GoldenError(f"{what}: rtol and atol must be finite and >= 0, got rtol "
                              f"{rtol!r}, atol {atol!r}")
    return rtol, atol


def tolerance(name, rtol=None, atol=None, overrides=()):
    """(rtol, atol) for tensor `name`: the default of its kind, then the global rtol/atol, then
    the last of `overrides` [(pattern, rtol, atol), …] whose pattern matches."""
    default_rtol, default_atol = next((r, a) for pattern, r, a in DEFAULT_TOLERANCES
                                      if fnmatch.fnmatchcase(name, pattern))
    result = (default_rtol if rtol is None else rtol, default_atol if atol is None else atol)
    for pattern, pattern_rtol, pattern_atol in overrides:
        if fnmatch.fnmatchcase(name, pattern):
            result = (pattern_rtol, pattern_atol)
    return result


def compare(name, golden, candidate, rtol, atol):
    """The verdict on one tensor pair (see the module docstring for the rule). `atol` may be an
    array broadcasting to the golden shape (refham.testing's per-element tolerances); the
    report then names the tolerance that applied at the worst element."""
    candidate = numpy.asarray(candidate)
    if candidate.dtype.kind not in "iuf":
        return TensorCheck(name, NOT_OK, f"not a numeric array (dtype {candidate.dtype})")
    if candidate.shape != golden.shape:
        hint = " (transposed?)" if candidate.shape == golden.shape[::-1] else ""
        return TensorCheck(name, NOT_OK, f"shape {candidate.shape}, golden {golden.shape}{hint}")
    bad = int(numpy.size(candidate) - numpy.count_nonzero(numpy.isfinite(candidate)))
    if bad:
        return TensorCheck(name, NOT_OK, f"{bad} NaN/inf value(s)")
    expected = golden.astype(numpy.float64)
    diff = numpy.abs(candidate.astype(numpy.float64) - expected)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        rel = numpy.where(diff == 0, 0.0, diff / numpy.abs(expected))
    max_abs, max_rel = float(diff.max(initial=0.0)), float(rel.max(initial=0.0))
    allowed = numpy.broadcast_to(atol + rtol * numpy.abs(expected), expected.shape)
    excess = diff - allowed
    if numpy.ndim(atol) == 0:
        tol = f"(rtol {rtol:g}, atol {float(atol):g})"
    else:
        tol = f"(rtol {rtol:g}, atol per element {numpy.min(atol):.3g} … {numpy.max(atol):.3g})"
    if excess.size == 0 or excess.max() <= 0:
        return TensorCheck(name, OK, tol, max_abs, max_rel)
    worst = numpy.unravel_index(numpy.argmax(excess), excess.shape)
    count = int(numpy.count_nonzero(excess > 0))
    return TensorCheck(name, NOT_OK, f"{count} value(s) out of {tol}; worst at "
                       f"{tuple(int(i) for i in worst)}: {float(candidate[worst]):.17g} vs "
                       f"golden {float(golden[worst]):.17g}, |Δ| {float(diff[worst]):.3g} > "
                       f"tolerance {float(allowed[worst]):.3g}", max_abs, max_rel)


def _tensors(source, what):
    """{name: array} from a path or a mapping."""
    if isinstance(source, dict):
        return {name: numpy.asarray(value) for name, value in source.items()}
    tensors = load_npz(source)
    if not tensors:
        raise GoldenError(f"{what} {source} holds no tensors")
    return tensors


def check(golden, candidate, rtol=None, atol=None, overrides=()):
    """Compare `candidate` with `golden` (paths to .npz files or {name: array}) tensor by tensor
    → Report. rtol/atol, if given, replace every default tolerance; `overrides` is a sequence
    of (pattern, rtol, atol) or 'PATTERN=RTOL,ATOL' strings applied after them."""
    rtol, atol = _checked_tolerances(rtol, atol, "--rtol/--atol")
    golden = _tensors(golden, "golden file")
    read_meta(golden, "the golden file (first argument)")
    candidate = _tensors(candidate, "candidate")
    overrides = [parse_tolerance(o) if isinstance(o, str) else tuple(o) for o in overrides]
    return compare_by_name(golden, candidate,
                           lambda name: tolerance(name, rtol, atol, overrides))


def compare_by_name(golden, candidate, tolerance_of):
    """The pairing rules of the module docstring: `golden` and `candidate` are {name: host
    array}, `tolerance_of(name)` gives (rtol, atol) of a golden tensor (atol may be an array)
    → Report, in the golden order with the candidate's extras last."""
    inputs = [n for n in golden if n.startswith(INPUT_PREFIXES)]
    inputs_present = any(n in candidate for n in inputs)
    checks = []
    for name, expected in golden.items():
        if name.startswith(META_PREFIX):
            continue
        if name not in candidate:
            if name in inputs and not inputs_present:
                checks.append(TensorCheck(name, SKIPPED, "input not in the candidate (it holds "
                                          "no inputs): not compared"))
            else:
                checks.append(TensorCheck(name, NOT_OK, "missing from the candidate"))
            continue
        if expected.dtype.kind not in "iuf" or not numpy.all(numpy.isfinite(expected)):
            raise GoldenError(f"golden tensor {name} is not a finite numeric array: the golden "
                              f"file is corrupt")
        checks.append(compare(name, expected, candidate[name], *tolerance_of(name)))
    checks += [TensorCheck(name, NOT_OK, "not in the golden file (renamed? unexpected)")
               for name in candidate if name not in golden and not name.startswith(META_PREFIX)]
    return Report(tuple(checks))
