"""The API reference's pages: one per refham module, in the declared module order, plus the
equation map. Plain Python (tests/test_layout.py reads the same module table through it); the
Sphinx side, which writes them outside the source tree at every build, is docs/_ext/apisite.py.

The order is the module table of docs/reading-guide.md (each module imports only modules above
it; tests/test_layout.py enforces that). A module missing from the table still gets a page, at the
end, so the site builds while the layout test asks for its row.
"""
import pathlib
import re

TABLE_ROW = re.compile(r"^\|\s*`refham/([\w/]+)\.py`\s*\|", re.M)
PAGE = """# refham.{name}

```{{eval-rst}}
.. automodule:: refham.{name}
   :members:
   :show-inheritance:
   :member-order: bysource
```
"""


def declared_order(docs_dir):
    """Module names below refham ('ham', 'files.memory', …) in the order of the module table of
    `docs_dir`/reading-guide.md."""
    guide = pathlib.Path(docs_dir) / "reading-guide.md"
    return [path.replace("/", ".") for path in TABLE_ROW.findall(guide.read_text(encoding="utf-8"))]


def package_modules(package_dir):
    """Every module below `package_dir` as 'ham', 'files.memory', …: the subpackages' own
    modules, not their __init__ (nor cli/__main__, which is the command line)."""
    found = set()
    for path in pathlib.Path(package_dir).rglob("*.py"):
        relative = path.relative_to(package_dir).with_suffix("")
        if relative.name not in ("__init__", "__main__"):
            found.add(".".join(relative.parts))
    return found


def api_modules(docs_dir, package_dir):
    """The modules with an API page, in the declared order, undeclared ones last (sorted)."""
    modules = package_modules(package_dir)
    order = [name for name in declared_order(docs_dir) if name in modules]
    return order + sorted(modules - set(order))


def api_pages(docs_dir, package_dir, equation_map):
    """{docname: Markdown} of the generated pages: the equation map (its text given), then one
    per module."""
    pages = {"api/equations": equation_map}
    pages.update({f"api/{name}": PAGE.format(name=name)
                  for name in api_modules(docs_dir, package_dir)})
    return pages


def write_pages(pages, folder):
    """Write {docname: text} as folder/<docname>.md (only files whose text changed, so that an
    incremental build rereads only those) and return {docname: absolute path}."""
    paths = {}
    for docname, text in pages.items():
        path = (pathlib.Path(folder) / f"{docname}.md").resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
        paths[docname] = path
    return paths
