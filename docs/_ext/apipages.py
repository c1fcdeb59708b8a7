"""The API reference's pages: one per refham module, in the declared module order, plus the
equation map; generated at every build OUTSIDE the source tree.

The order is the module table of docs/reading-guide.md (each module imports only modules above
it; tests/test_layout.py enforces that). A module missing from the table still gets a page, at the
end, so the site builds while the layout test asks for its row.

The pages are written under the build's doctree folder (never under docs/) and added to Sphinx's
list of documents as `api/<module>`, so `git status` stays clean after a build. docs/api.md lists
them with the `refham-api-toctree` directive. Under every labelled equation of the pages an
"Implemented by" line is added as the page is read (the file itself is not changed).
"""
import pathlib
import re

from docutils.statemachine import StringList
from sphinx.directives.other import TocTree
from sphinx.project import Project

from equationmap import Implementations, equation_map_page, with_implemented_by

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


def api_pages(docs_dir, package_dir, impl):
    """{docname: Markdown} of the generated pages: the equation map, then one per module."""
    pages = {"api/equations": equation_map_page(docs_dir, impl)}
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


class ProjectWithGenerated(Project):
    """Sphinx's list of documents, plus the generated pages {docname: absolute path}."""

    generated = {}

    def discover(self, *args, **kwargs):
        docnames = super().discover(*args, **kwargs)
        for docname, path in self.generated.items():   # absolute: srcdir / path is path
            docnames.add(docname)
            self._path_to_docname[path] = docname
            self._docname_to_path[docname] = path
        return docnames


class ApiToctree(TocTree):
    """`refham-api-toctree`: a toctree of the generated API pages, in the declared order."""

    has_content = False
    option_spec = {}

    def run(self):
        names = self.env.app.refham_api_docnames
        self.content = StringList([f"/{docname}" for docname in names], source="api")
        self.options = {"maxdepth": 1}
        return super().run()


def implementations(app):
    """The docstrings' equation citations, read once per build."""
    if getattr(app, "refham_implementations", None) is None:
        app.refham_implementations = Implementations("refham")
    return app.refham_implementations


def _on_builder_inited(app):
    docs_dir = pathlib.Path(app.srcdir)
    pages = api_pages(docs_dir, docs_dir.parent / "refham", implementations(app))
    paths = write_pages(pages, pathlib.Path(app.doctreedir) / "refham-generated")
    app.refham_api_docnames = list(paths)
    app.project.__class__ = ProjectWithGenerated
    app.project.generated = paths


def _on_source_read(app, docname, source):
    if "```{math}" in source[0]:
        source[0] = with_implemented_by(source[0], implementations(app))


def setup(app):
    app.add_directive("refham-api-toctree", ApiToctree)
    app.connect("builder-inited", _on_builder_inited)
    app.connect("source-read", _on_source_read)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
