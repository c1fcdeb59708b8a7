"""The equation ↔ function map of docs/ is complete and consistent (no Sphinx needed).

docs/*.md label each equation with a MyST `{math}` directive (`:label: H5`) and each section
with a target (`(sec-ham)=`); docstrings cite them with :eq:`H5` and :ref:`sec-ham` (parsed by
docs/_ext/equationmap.py, which also writes the site's equation map). Checked: every label a
docstring cites exists in docs/, every labelled equation is cited by at least one public
docstring of refham, the README's links to docs pages exist, and no reference to the old DESIGN
notes' section numbers is left in the code, tests, examples or README.
"""
import importlib.util
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
OLD_REFERENCE = "DESIGN" + " §"   # spelled in two parts so that this file does not match itself


def _equationmap():
    """docs/_ext/equationmap.py, which also writes the site's equation map from the same parse."""
    path = DOCS / "_ext" / "equationmap.py"
    spec = importlib.util.spec_from_file_location("equationmap", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


eqmap = _equationmap()
equation_labels, section_targets, citations = (
    eqmap.equation_labels, eqmap.section_targets, eqmap.citations)


def public_docstrings():
    return eqmap.public_docstrings("refham")


def all_labels():
    eqs, targets = [], []
    for page in eqmap.doc_pages(DOCS):
        text = page.read_text(encoding="utf-8")
        eqs += equation_labels(text)
        targets += section_targets(text)
    return eqs, targets


def test_label_parsers_read_the_myst_syntax():
    text = ("(sec-x)=\n# X\n\n```{math}\n:label: H5\nx \\leftarrow x\n```\n\n"
            "```{math}\n:nowrap:\n:label: L-relu\ny\n```\n\n```{math}\nz\n```\n")
    assert equation_labels(text) == ["H5", "L-relu"]
    assert section_targets(text) == ["sec-x"]
    assert citations({"f": "x ← x − α ∂E/∂g, :eq:`H5`; see :ref:`sec-x`."}) == {
        ("eq", "H5"): ["f"], ("ref", "sec-x"): ["f"]}


def test_docs_define_each_label_once():
    eqs, targets = all_labels()
    assert eqs, "no labelled equation found in docs/*.md"
    for labels in (eqs, targets):
        duplicates = sorted({label for label in labels if labels.count(label) > 1})
        assert not duplicates, f"labels defined more than once in docs/: {duplicates}"


def test_every_label_a_docstring_cites_exists_in_docs():
    eqs, targets = all_labels()
    known = {"eq": set(eqs), "ref": set(targets)}
    missing = {f":{role}:`{label}`": owners
               for (role, label), owners in citations(public_docstrings()).items()
               if label not in known[role]}
    assert not missing, f"cited in docstrings but not defined in docs/*.md: {missing}"


def test_every_labelled_equation_is_cited_by_a_docstring():
    eqs, _ = all_labels()
    cited = {label for role, label in citations(public_docstrings()) if role == "eq"}
    uncited = sorted(set(eqs) - cited)
    assert not uncited, (f"equations in docs/ that no refham docstring cites with :eq:`…`: "
                         f"{uncited}; cite each in the docstring of the function computing it")


def test_no_reference_to_the_old_design_notes_remains():
    files = [ROOT / "README.md"] + sorted(
        p for folder in ("refham", "tests", "examples") for p in (ROOT / folder).rglob("*.py"))
    stale = [f"{p.relative_to(ROOT)}:{n}" for p in files
             for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
             if OLD_REFERENCE in line]
    assert not stale, f"replace these with the docs' labels (:eq:`…`) or pages: {stale}"


def test_the_readme_links_to_docs_pages_that_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#]+)", readme)
    assert links, "the README should link to the documentation pages"
    missing = sorted({link for link in links if not (ROOT / link).is_file()})
    assert not missing, f"README links to missing docs pages: {missing}"


def test_the_primary_marker_is_read_as_documented():
    assert eqmap.primaries({
        "f": "x ← x − α ∂E/∂g. Implements :eq:`H5`; see :eq:`H3`.",
        "g": "Implements the three kinds, :eq:`A`, :eq:`B` and :eq:`C`.",
        "h": "A step of :eq:`H5` (implements :eq:`F-dynamics`).",
        "k": "Uses :eq:`H5` only."}) == {
        "H5": ["f"], "A": ["g"], "B": ["g"], "C": ["g"], "F-dynamics": ["h"]}


def test_every_labelled_equation_has_exactly_one_implementing_function():
    """The "Implemented by" line under each equation links ONE function: the docstring that says
    "Implements :eq:`LABEL`". Zero or two such docstrings for a label is an error."""
    eqs, _ = all_labels()
    primaries = eqmap.primaries(public_docstrings())
    wrong = {label: primaries.get(label, []) for label in eqs if len(primaries.get(label, [])) != 1}
    assert not wrong, (f"labels without exactly one docstring saying 'Implements :eq:`LABEL`' "
                       f"(label: the docstrings that say so): {wrong}")
    unknown = sorted(set(primaries) - set(eqs))
    assert not unknown, f"'Implements :eq:`…`' names labels that docs/ does not define: {unknown}"


def test_the_implemented_by_line_follows_each_labelled_equation():
    impl = eqmap.Implementations("refham")
    page = "text\n\n```{math}\n:label: H5\nx \\leftarrow x\n```\n\nmore\n"
    out = eqmap.with_implemented_by(page, impl)
    line = out.split("```\n\n", 1)[1]
    assert line.startswith(":::{container} implemented-by\nImplemented by "
                           "{py:obj}`ham.HAM.step <refham.ham.HAM.step>`; used by ")
    assert "refham.metaformer.forward" in line and out.endswith("more\n")
