"""The docs extensions: docs/_ext/plaindocstrings.py makes refham's plain-Unicode docstrings valid
reST that shows them as written (no Sphinx needed: the rewriting is plain text), and
docs/_ext/apipages.py writes the generated API pages outside the source tree."""
import importlib.util
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load(name):
    """docs/_ext/<name>.py, a plain-Python part of the docs extensions."""
    path = ROOT / "docs" / "_ext" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


plain_docstring = _load("plaindocstrings").plain_docstring


def test_math_characters_are_escaped_outside_code_and_roles():
    out = plain_docstring(["‖x‖ = |x|, x* and clip_grad_norm_ here; `a|b*` :eq:`H5` stay."])
    assert out == ["‖x‖ = \\|x\\|, x\\* and clip_grad_norm\\_ here; `a|b*` :eq:`H5` stay."]


def test_code_touching_a_word_gets_an_invisible_separator():
    assert plain_docstring(["the `Regime`s of an x`y`"]) == ["the `Regime`\\ s of an x\\ `y`"]


def test_indented_lines_and_pipe_tables_are_shown_verbatim():
    lines = ["Keys:", "    input/x   (B,)   the input", "", "    output/y  (B,)", "after",
             "| a | b |", "|---|---|"]
    assert plain_docstring(lines) == [
        "Keys:", "", "::", "", "        input/x   (B,)   the input", "    ", "        output/y  (B,)",
        "", "after", "", "::", "", "    | a | b |", "    |---|---|", ""]


def test_rest_tables_are_left_as_they_are_and_numpydoc_sections_keep_their_indentation():
    table = ["=====  =====", "name   shape", "=====  =====", "W|x    (h,", "       in)",
             "=====  ====="]
    assert plain_docstring(["Intro."] + table) == ["Intro.", ""] + table + [""]
    section = ["Summary.", "", "Parameters", "----------", "x : array", "    the state x*"]
    assert plain_docstring(section) == section[:-1] + ["    the state x\\*"]


def test_the_api_pages_are_written_outside_the_source_tree(tmp_path):
    """docs/_ext/apipages.py writes the generated pages where it is told (the build's doctree
    folder), one per module in the module table's order, and nothing under docs/."""
    apipages = _load("apipages")
    before = sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*"))
    pages = apipages.api_pages(ROOT / "docs", ROOT / "refham", "# Equation map\n")
    paths = apipages.write_pages(pages, tmp_path)
    assert sorted(p.relative_to(ROOT) for p in (ROOT / "docs").rglob("*")) == before
    assert all(tmp_path.resolve() in path.parents and path.read_text(encoding="utf-8") == pages[name]
               for name, path in paths.items())
    modules = [name for name in paths if name != "api/equations"]
    assert modules[:4] == ["api/errors", "api/checks", "api/backend", "api/special"]
    assert len(modules) == len(apipages.package_modules(ROOT / "refham"))
