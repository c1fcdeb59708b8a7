"""Every expected error of refham derives from `RefhamError` and from a built-in class that says
what kind of mistake it is, so that a caller (the `refham` command among them) catches one class;
the shared argument checks of `refham.checks` raise the class their caller names."""
import builtins
import importlib
import inspect
import math
import pkgutil

import pytest

import refham
from refham import checks
from refham.cli import commands as cli
from refham.errors import RefhamError


def _refham_modules():
    return [importlib.import_module(info.name)
            for info in pkgutil.walk_packages(refham.__path__, "refham.")
            if not info.name.endswith("__main__")]


def _exception_classes():
    """Every exception class defined in refham — warnings aside: they report, they do not stop."""
    found = {}
    for module in _refham_modules():
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(cls, BaseException) \
                    and not issubclass(cls, Warning):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


def test_the_walk_finds_the_error_classes():
    names = set(_exception_classes())
    assert {"refham.mixer_config.ConfigError", "refham.files.runlock.RunLocked",
            "refham.training.train.TrainingDiverged", "refham.errors.RefhamError"} <= names
    assert len(names) >= 24


def test_every_error_class_derives_from_refham_error_and_a_builtin_one():
    builtin = tuple(cls for cls in vars(builtins).values() if isinstance(cls, type)
                    and issubclass(cls, Exception) and cls is not Exception)
    for name, cls in _exception_classes().items():
        assert issubclass(cls, RefhamError), f"{name} does not derive from RefhamError"
        assert cls is RefhamError or issubclass(cls, builtin), \
            f"{name} derives from no built-in error class (ValueError, OSError, …)"


def test_every_error_class_is_one_line_from_the_cli(monkeypatch, capsys):
    for name, cls in _exception_classes().items():
        def fail(args, cls=cls):
            raise cls("what went wrong")
        monkeypatch.setitem(cli.COMMANDS, "eval", (*cli.COMMANDS["eval"][:2], fail))
        assert cli.main(["eval", "--checkpoint", "x"]) in (1, 2), name
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "what went wrong" in err, name


class _Mistake(RefhamError, ValueError):
    pass


@pytest.mark.parametrize("value", [3, 2**70])
def test_integer_at_least_accepts_integers_from_the_minimum(value):
    assert checks.integer_at_least("n", value, 3, _Mistake) == value


@pytest.mark.parametrize("value", [2, -1, 3.0, True, "4", None, math.nan])
def test_integer_at_least_refuses_with_the_callers_class(value):
    with pytest.raises(_Mistake, match=r"n must be an integer ≥ 3, got"):
        checks.integer_at_least("n", value, 3, _Mistake)


@pytest.mark.parametrize("value, zero", [(0.5, False), (7, False), (0, True), (0.0, True)])
def test_finite_real_accepts_finite_numbers_above_zero(value, zero):
    assert checks.finite_real("x", value, _Mistake, allow_zero=zero) == value


@pytest.mark.parametrize("value", [0, -1e-300, math.inf, math.nan, True, "1", None, 1j])
def test_finite_real_refuses_with_the_callers_class(value):
    with pytest.raises(_Mistake, match=r"x must be a finite real number > 0, got"):
        checks.finite_real("x", value, _Mistake)
    if not (isinstance(value, (int, float)) and value == 0):
        with pytest.raises(_Mistake, match=r"x must be a finite real number ≥ 0, got"):
            checks.finite_real("x", value, _Mistake, allow_zero=True)
