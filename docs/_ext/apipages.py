"""Write the API reference's pages: one per refham module, in the declared module order.

The order is the module table of docs/reading-guide.md (each module imports only modules above
it; tests/test_layout.py enforces that). A module missing from the table still gets a page, at the
end, so the site builds while the layout test asks for its row. docs/api/ is generated, not
kept in git.
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


def write_api_pages(docs_dir, package_dir):
    """docs_dir/api/<module>.md for every module, docs_dir/api/equations.md (the equation map)
    and docs_dir/api/toctree.md listing them."""
    from equationmap import equation_map_page   # docs/_ext is on conf.py's path
    modules = package_modules(package_dir)
    order = [name for name in declared_order(docs_dir) if name in modules]
    order += sorted(modules - set(order))
    api = pathlib.Path(docs_dir) / "api"
    api.mkdir(exist_ok=True)
    pages = {f"{name}.md": PAGE.format(name=name) for name in order}
    pages["equations.md"] = equation_map_page(docs_dir)
    pages["toctree.md"] = "```{toctree}\n:maxdepth: 1\n\napi/equations\n" + "".join(
        f"api/{name}\n" for name in order) + "```\n"
    for stale in set(p.name for p in api.glob("*.md")) - set(pages):
        (api / stale).unlink()
    for filename, text in pages.items():
        path = api / filename
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")


def _on_config_inited(app, config):
    docs_dir = pathlib.Path(app.srcdir)
    write_api_pages(docs_dir, docs_dir.parent / "refham")


def setup(app):
    app.connect("config-inited", _on_config_inited)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
