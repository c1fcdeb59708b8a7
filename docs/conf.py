"""Sphinx configuration of refham's documentation:

    sphinx-build -W --keep-going -b html docs docs/_build/html

Sphinx with the pydata theme and MyST Markdown is the NumPy/SciPy/CuPy convention, and its math
domain gives every equation a label that docstrings cite with :eq:`LABEL`. MathJax is served from
the sphinx-mathjax-offline package's copy, so the site renders its math with no network.
"""
import os
import sys

sys.dont_write_bytecode = True     # a build writes nothing under docs/ (no _ext/__pycache__)
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))          # the refham package of this checkout
sys.path.insert(0, os.path.join(HERE, "_ext"))

project = "refham"
author = "the refham authors"
copyright = "the refham authors, MIT licence"

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "sphinx.ext.viewcode",         # [source] links: the code's pages are built with the site
    "sphinx-mathjax-offline",      # a module whose name has hyphens: MathJax 3 bundled, no CDN
    "eqlabels",
    "plaindocstrings",
    "apisite",
]

source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "README.md"]

myst_enable_extensions = ["dollarmath", "colon_fence", "deflist"]
myst_heading_anchors = 3

autodoc_typehints = "none"            # the docstrings state shapes and meanings
napoleon_numpy_docstring = True
napoleon_google_docstring = False

html_theme = "pydata_sphinx_theme"
html_title = "refham"
html_theme_options = {
    "navigation_with_keys": False,
    "header_links_before_dropdown": 4,    # with the search icon: one header row at 1400 px
    "navbar_persistent": ["search-button"],
    "show_toc_level": 2,
    "secondary_sidebar_items": ["page-toc"],
    "footer_start": ["copyright"],
    "footer_end": [],
}
html_show_sourcelink = False
html_static_path = ["_static"]
html_css_files = ["refham.css"]
# The mathematics pages are reached from the top bar; only the API pages need the side list.
html_sidebars = {page: [] for page in (
    "index", "reading-guide", "lagrangians", "ham", "mixer", "mixer-energy", "metaformer",
    "training", "symmetry-study", "paper-defects", "oracle", "cli", "data", "safety",
    "distributed", "gpu", "performance", "changelog")}
default_role = "literal"          # `name` in a docstring is code, as in MyST

# A cross-reference to a refham name that does not exist is an error (with -W): the pages name
# code with {py:func}`refham.ham.HAM.step`-style roles. Names outside refham (numpydoc types such
# as `int`, NumPy's arrays) are not documented here and stay unlinked, and so are refham's
# private bases, named by "Bases:" lines.
nitpicky = True
nitpick_ignore_regex = [(r"py:.*", r"(?!refham\.).*"), (r"py:class", r"refham\..*\._\w+")]
