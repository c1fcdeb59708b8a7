"""The package's layering: each module of refham imports only modules above it in the declared
order, the module table of docs/reading-guide.md (read top to bottom).

A flat package keeps every import path stable; this test keeps the architecture that subpackages
would show: HAM core below the models, the models below training, everything below the CLI.
"""
import ast
import importlib.util
import pathlib
import pkgutil

import refham

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _apipages():
    """docs/_ext/apipages.py, which reads the same table to order the API reference."""
    path = ROOT / "docs" / "_ext" / "apipages.py"
    spec = importlib.util.spec_from_file_location("apipages", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def declared_order():
    """Module names in the order of the reading guide's module table."""
    return _apipages().declared_order(ROOT / "docs")


def refham_imports(source, package_modules):
    """The refham modules a module's source imports (anywhere in it, deferred imports included):
    `import refham.x`, `from refham.x import …`, `from refham import x` (x a module). A name
    imported from the package itself (`from refham import __version__`) is not a module."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names
                      if alias.name.startswith("refham.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("refham."):
                found.add(node.module.split(".")[1])
            elif node.module == "refham":
                found |= {alias.name for alias in node.names if alias.name in package_modules}
    return found


def package_modules():
    return {info.name for info in pkgutil.iter_modules(refham.__path__)}


def test_the_import_parser_sees_every_form():
    source = ("import refham.ham\nfrom refham.mixer import Mixer\nfrom refham import data, "
              "__version__\ndef f():\n    from refham.train import train\nimport numpy\n")
    assert refham_imports(source, {"ham", "mixer", "data", "train"}) == {
        "ham", "mixer", "data", "train"}


def test_every_module_has_a_place_in_the_declared_order():
    order, modules = declared_order(), package_modules()
    assert len(order) == len(set(order)), f"a module is listed twice: {order}"
    assert set(order) == modules, (
        f"docs/reading-guide.md's module table must list every module of refham exactly: "
        f"missing {sorted(modules - set(order))}, not a module {sorted(set(order) - modules)}")


def test_each_module_imports_only_modules_above_it():
    order, modules = declared_order(), package_modules()
    rank = {name: i for i, name in enumerate(order)}
    upward = []
    for name in order:
        source = (ROOT / "refham" / f"{name}.py").read_text(encoding="utf-8")
        upward += [f"refham.{name} imports refham.{used}"
                   for used in sorted(refham_imports(source, modules))
                   if used != name and rank.get(used, len(order)) >= rank[name]]
    assert not upward, ("imports must point up the module table of docs/reading-guide.md: "
                        f"{upward}")


def test_the_package_init_imports_only_the_backend():
    source = (ROOT / "refham" / "__init__.py").read_text(encoding="utf-8")
    assert refham_imports(source, package_modules()) == {"backend"}
