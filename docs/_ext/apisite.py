"""The API reference in the site, generated at every build OUTSIDE the source tree.

The pages of docs/_ext/apipages.py are written under the build's doctree folder (never under
docs/) and added to Sphinx's list of documents as `api/<module>` and `api/equations`, so a build
leaves `git status` clean. docs/api.md lists them with the `refham-api-toctree` directive. Under
every labelled equation of the pages an "Implemented by" line is added as the page is read
(docs/_ext/equationmap.py; the file itself is not changed).
"""
import pathlib

from docutils.statemachine import StringList
from sphinx.directives.other import TocTree
from sphinx.project import Project

from apipages import api_pages, write_pages
from equationmap import Implementations, equation_map_page, with_implemented_by


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
    pages = api_pages(docs_dir, docs_dir.parent / "refham",
                      equation_map_page(docs_dir, implementations(app)))
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
