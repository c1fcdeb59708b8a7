"""Every code name in docs/*.md names something that exists (no Sphinx needed: names are imported).

The extraction rule, kept simple so that a page's author can predict it:
1. every MyST Python cross-reference, {py:func}`refham.ham.HAM.step` (any py role: func, class,
   mod, meth, obj, attr, data, exc), with its target written as a full dotted path; the forms
   `~refham.x.y` and `title <refham.x.y>` are read as the target refham.x.y;
2. every inline code span that is a dotted name starting with `refham.` (`refham.ham.HAM`);
3. every inline code span that is a path of the repository ending in .py or .sh
   (`refham/ham.py`, `tests/test_layout.py`, `examples/step_sizes.py`).
The changelog is exempt: it records names that were renamed or removed. A name resolves when
importing its longest importable module prefix and then taking the
attributes that follow succeeds. The docs build (nitpicky, -W) checks rule 1 again as links.
"""
import importlib
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PY_ROLE = re.compile(r"\{py:(?:func|class|mod|meth|obj|attr|data|exc)\}`([^`]+)`")
CODE_SPAN = re.compile(r"(?<![`}])`([^`\n]+)`(?!`)")
DOTTED = re.compile(r"refham(?:\.\w+)+")
REPO_PATH = re.compile(r"[\w./-]+\.(?:py|sh)")
FENCE = re.compile(r"^(```|:::).*?^\1\s*$", re.M | re.S)


def role_target(text):
    """The target of a role's text: 'title <a.b>' → 'a.b', '~a.b' → 'a.b'."""
    match = re.fullmatch(r"(?s).*<([^<>]+)>\s*", text)
    return (match.group(1) if match else text).strip().lstrip("~")


def code_names(text):
    """(python names, repository paths) that a MyST page names, by the rule above."""
    prose = FENCE.sub("", text)          # fenced blocks (math, directives) are not prose
    names = [role_target(target) for target in PY_ROLE.findall(prose)]
    paths = []
    for span in CODE_SPAN.findall(PY_ROLE.sub("", prose)):
        span = span.strip()
        if DOTTED.fullmatch(span):
            names.append(span)
        elif REPO_PATH.fullmatch(span) and "/" in span:
            paths.append(span)
    return names, paths


def resolves(name):
    """Whether `name` (a.b.C.d) is importable: a module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def test_the_rule_reads_roles_code_spans_and_paths():
    page = ("Use {py:func}`refham.ham.HAM.step`, {py:meth}`~refham.ham.HAM.dEdg`, "
            "{py:obj}`step <refham.ham.HAM.step>`, `refham.lagrangians`, `refham/ham.py`, "
            "`n_iter`, `make_config(\"vanilla\")`.\n\n```{math}\n`refham.not.here`\n```\n")
    assert code_names(page) == (
        ["refham.ham.HAM.step", "refham.ham.HAM.dEdg", "refham.ham.HAM.step",
         "refham.lagrangians"], ["refham/ham.py"])
    assert resolves("refham.ham.HAM.step") and resolves("refham.lagrangians.GELU")
    assert not resolves("refham.ham.HAM.energy") and not resolves("refham.no_such_module")


PAGES = sorted(page for page in DOCS.glob("*.md") if page.name != "changelog.md")


@pytest.mark.parametrize("page", PAGES, ids=[page.name for page in PAGES])
def test_every_code_name_in_the_docs_resolves(page):
    names, paths = code_names(page.read_text(encoding="utf-8"))
    missing = sorted({name for name in names if not resolves(name)})
    assert not missing, f"{page.name} names code that does not exist: {missing}"
    absent = sorted({path for path in paths if not (ROOT / path).exists()})
    assert not absent, f"{page.name} names files that do not exist: {absent}"
