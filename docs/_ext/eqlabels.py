"""Show an equation's label as its number: (H5) in the page and in every :eq:`H5` that cites it.

Sphinx numbers labelled equations 1, 2, … in reading order; refham's labels (H1–H6, M1–M4,
L-relu, …) are the stable names the code cites, so the label itself is what a reader should see.
"""
from sphinx.domains.math import MathDomain


class LabelNumberedMathDomain(MathDomain):
    """The math domain with each equation's "number" equal to its label."""

    def note_equation(self, docname, labelid, location=None):
        super().note_equation(docname, labelid, location)
        self.equations[labelid] = (docname, labelid)


def setup(app):
    app.add_domain(LabelNumberedMathDomain, override=True)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
