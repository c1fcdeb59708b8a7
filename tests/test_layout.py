"""The package's layout: the specification at the top of refham/, the wings in subpackages.

- the specification (the top-level modules) imports nothing of refham but the foundation
  (`refham.backend`, the array switch, `refham.errors`, the error base, and `refham.checks`,
  the shared argument checks);
- `refham.fast` imports nothing of refham outside itself: the switch hands it the definitions;
- every module imports only modules above it in the module table of docs/reading-guide.md;
- the wheel built from pyproject.toml holds every subpackage.
"""
import ast
import importlib.util
import pathlib
import subprocess
import sys
import zipfile

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "refham"
FOUNDATION = {"backend", "errors", "checks"}
SUBPACKAGES = ("fast", "files", "training", "study", "oracle", "cli")


def _apipages():
    """docs/_ext/apipages.py, which reads the same table to order the API reference."""
    path = ROOT / "docs" / "_ext" / "apipages.py"
    spec = importlib.util.spec_from_file_location("apipages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared_order():
    """Module names below refham ('ham', 'files.memory', …) in the reading guide's order."""
    return _apipages().declared_order(ROOT / "docs")


def package_modules():
    return _apipages().package_modules(PACKAGE)


def refham_imports(source, modules, deferred=True):
    """The refham modules ('ham', 'files.memory', or a subpackage 'fast') that a module's source
    imports — anywhere in it when `deferred`, else at module level only: `import refham.x`,
    `from refham.x import …`, `from refham[.pkg] import x` (x a module). A name imported from a
    package itself (`from refham import __version__`) is not a module."""
    found = set()
    nodes = ast.walk(ast.parse(source)) if deferred else ast.parse(source).body
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name[len("refham."):] for alias in node.names
                      if alias.name.startswith("refham.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "refham" or node.module.startswith("refham."):
                base = node.module[len("refham."):] if node.module != "refham" else ""
                for alias in node.names:
                    child = f"{base}.{alias.name}" if base else alias.name
                    if child in modules or child in SUBPACKAGES:
                        found.add(child)
                    elif base:
                        found.add(base)
    return found


def _source(name):
    path = PACKAGE.joinpath(*name.split("."))
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    return path.read_text(encoding="utf-8")


def _is_spec(name):
    return "." not in name and name not in FOUNDATION


def test_the_import_parser_sees_every_form():
    source = ("import refham.ham\nfrom refham.mixer import Mixer\nfrom refham import data, "
              "__version__\nfrom refham.files import memory\ndef f():\n"
              "    from refham.training.train import train\nimport numpy\n")
    modules = {"ham", "mixer", "data", "files.memory", "training.train"}
    assert refham_imports(source, modules) == {"ham", "mixer", "data", "files.memory",
                                               "training.train"}
    assert refham_imports(source, modules, deferred=False) == {"ham", "mixer", "data",
                                                               "files.memory"}


def test_every_module_has_a_place_in_the_declared_order():
    order, modules = declared_order(), package_modules()
    assert len(order) == len(set(order)), f"a module is listed twice: {order}"
    assert set(order) == modules, (
        f"docs/reading-guide.md's module table must list every module of refham exactly: "
        f"missing {sorted(modules - set(order))}, not a module {sorted(set(order) - modules)}")


def test_the_specification_imports_only_the_foundation():
    modules = package_modules()
    wings = [f"refham.{name} imports refham.{used}" for name in sorted(modules)
             if _is_spec(name)
             for used in sorted(refham_imports(_source(name), modules))
             if not (_is_spec(used) or used in FOUNDATION)]
    assert not wings, f"the specification may import only the foundation: {wings}"


def test_the_foundation_imports_nothing_but_the_error_base_and_the_fast_variants():
    modules = package_modules()
    assert refham_imports(_source("errors"), modules) == set()
    assert refham_imports(_source("checks"), modules) == set()
    assert refham_imports(_source("backend"), modules, deferred=False) == {"errors"}
    assert refham_imports(_source("backend"), modules) == {"errors", "fast"}   # fast: in
    # Accelerated.__call__


def test_the_fast_variants_import_nothing_of_refham_outside_fast():
    modules = package_modules()
    outside = [f"refham.{name} imports refham.{used}" for name in sorted(modules | {"fast"})
               if name == "fast" or name.startswith("fast.")
               for used in sorted(refham_imports(_source(name), modules))
               if not used.startswith("fast")]
    assert not outside, outside


def test_each_module_imports_only_modules_above_it():
    order, modules = declared_order(), package_modules()
    rank = {name: i for i, name in enumerate(order)}
    upward = []
    for name in order:
        for used in sorted(refham_imports(_source(name), modules)):
            if used == "fast" and name == "backend":
                continue   # the switch runs the fast variants (see the test above)
            if used in SUBPACKAGES:   # `from refham import fast`: the package's first module
                used = next(m for m in order if m.startswith(used + "."))
            if used != name and rank.get(used, len(order)) >= rank[name]:
                upward.append(f"refham.{name} imports refham.{used}")
    assert not upward, ("imports must point up the module table of docs/reading-guide.md: "
                        f"{upward}")


def test_the_package_inits_import_little():
    modules = package_modules()
    assert refham_imports(_source("__init__"), modules) == {"backend"}
    for package in SUBPACKAGES:
        imported = refham_imports(_source(package), modules)
        assert all(m.startswith(package + ".") for m in imported), (package, imported)


def test_the_wheel_holds_every_subpackage(tmp_path):
    """Build the wheel from pyproject.toml (setuptools, no network) and look inside."""
    pytest.importorskip("setuptools")
    wheel_dir = tmp_path / "wheel"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    wheel, = wheel_dir.glob("refham-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"refham/{m.replace('.', '/')}.py" for m in package_modules()}
    expected |= {f"refham/{p}/__init__.py" for p in SUBPACKAGES}
    assert expected <= names, f"missing from the wheel: {sorted(expected - names)}"
