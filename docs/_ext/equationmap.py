"""The equation ↔ function map: which docstrings cite which labelled equation, and which one
function computes it.

docs/*.md label each equation with a MyST `{math}` directive (`:label: H5`) and each section with a
target (`(sec-ham)=`); docstrings cite them with :eq:`H5` and :ref:`sec-ham`. The docstring of the
ONE function that computes an equation says so with the words "Implements :eq:`H5`"; every other
docstring citing the label uses it. From this the site gets, under every labelled equation, an
"Implemented by" line, and the API reference its "Equation map" page; tests/test_docs_labels.py
checks both ways, and that each label has exactly one primary. Plain Python: importing it needs
neither Sphinx nor a build.
"""
import importlib
import inspect
import pathlib
import pkgutil
import re

EQ_LABEL = re.compile(r"^```\{math\}\s*\n(?::\w+:.*\n)*?:label:\s*(\S+)\s*$", re.M)
# A whole labelled math block, up to and including its closing fence.
EQ_BLOCK = re.compile(r"^```\{math\}\s*\n(?::\w+:.*\n)*?:label:\s*(\S+)\s*\n(?:.*\n)*?```[ \t]*$",
                      re.M)
SECTION_TARGET = re.compile(r"^\((sec-[\w-]+)\)=\s*$", re.M)
CITATION = re.compile(r":(eq|ref):`([^`<>]+)`")
# "Implements :eq:`H5`", "implements :eq:`A`, :eq:`B` and :eq:`C`", "Implements the three kinds,
# :eq:`A`, …": the labels right after the word (up to eight words between) are the ones it computes.
PRIMARY = re.compile(r"[Ii]mplements\b(?:\s+[\w-]+){0,8}?,?\s+((?::eq:`[^`<>]+`(?:,\s*|\s+and\s+)?)+)")
LABEL_IN_ROLE = re.compile(r":eq:`([^`<>]+)`")
TOCTREE_ENTRY = re.compile(r"^([a-z][a-z-]*)$", re.M)

# The paper's own equation numbers (arXiv 2406.12220v1), by label, where refham's design notes
# record them; every other label shows "—". Never filled in from memory.
PAPER_NUMBERS = {}


def equation_labels(text):
    """The equation labels of a MyST page, in order."""
    return EQ_LABEL.findall(text)


def section_targets(text):
    """The `(sec-…)=` targets of a MyST page, in order."""
    return SECTION_TARGET.findall(text)


def doc_pages(docs_dir):
    """docs_dir's Markdown pages: those in index.md's tables of contents first, in that order,
    then any other (sorted)."""
    docs_dir = pathlib.Path(docs_dir)
    listed = TOCTREE_ENTRY.findall((docs_dir / "index.md").read_text(encoding="utf-8"))
    pages = [docs_dir / f"{name}.md" for name in listed if (docs_dir / f"{name}.md").is_file()]
    return pages + sorted(set(docs_dir.glob("*.md")) - set(pages))


def public_docstrings(package="refham"):
    """{qualified name: docstring} of every module of `package` and of every public class,
    function and method defined in it (re-exports skipped)."""
    root = importlib.import_module(package)
    docs = {}
    for info in pkgutil.walk_packages(root.__path__, f"{package}."):
        if info.name.endswith(".__main__"):   # running it is the command line
            continue
        module = importlib.import_module(info.name)
        docs[module.__name__] = module.__doc__ or ""
        for name, obj in vars(module).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            if inspect.isfunction(obj) or inspect.isclass(obj):
                docs[f"{module.__name__}.{name}"] = obj.__doc__ or ""
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    member = getattr(member, "__func__", getattr(member, "fget", member))
                    if not attr.startswith("_") and callable(member):
                        docs[f"{module.__name__}.{name}.{attr}"] = member.__doc__ or ""
    return docs


def citations(docstrings):
    """{(role, label): [qualified names citing it]} for roles eq and ref."""
    cited = {}
    for owner, text in docstrings.items():
        for role, label in CITATION.findall(text):
            owners = cited.setdefault((role, label.strip()), [])
            if owner not in owners:
                owners.append(owner)
    return cited


def primaries(docstrings):
    """{label: [qualified names whose docstring says "Implements :eq:`label`"]} (one each, when
    the docstrings are right)."""
    found = {}
    for owner, text in docstrings.items():
        for run in PRIMARY.findall(text):
            for label in LABEL_IN_ROLE.findall(run):
                found.setdefault(label.strip(), []).append(owner)
    return found


class Implementations:
    """Who implements and who uses each labelled equation, read once from the docstrings."""

    def __init__(self, package="refham"):
        docstrings = public_docstrings(package)
        self.cited = citations(docstrings)
        self.primary = primaries(docstrings)

    def implemented_by(self, label):
        """The qualified name of the function computing `label` (None if there is none)."""
        owners = self.primary.get(label, [])
        return owners[0] if len(owners) == 1 else None

    def used_by(self, label):
        """The other qualified names whose docstrings cite `label`, modules last."""
        primary = self.implemented_by(label)
        owners = [o for o in self.cited.get(("eq", label), []) if o != primary]
        return sorted(owners, key=lambda owner: "." not in owner.removeprefix("refham."))


def code_link(qualified):
    """A MyST cross-reference to `qualified`, shown without the leading 'refham.'."""
    return f"{{py:obj}}`{qualified.removeprefix('refham.')} <{qualified}>`"


def implemented_by_line(label, impl):
    """The MyST block placed under the equation `label`: its primary function, then its users."""
    primary = impl.implemented_by(label)
    text = f"Implemented by {code_link(primary)}" if primary else "Implemented by: (none marked)"
    users = impl.used_by(label)
    if users:
        text += "; used by " + ", ".join(code_link(owner) for owner in users)
    return f":::{{container}} implemented-by\n{text}.\n:::\n"


def with_implemented_by(text, impl):
    """The MyST page `text` with an "Implemented by" block after every labelled equation."""
    return EQ_BLOCK.sub(lambda m: m.group(0) + "\n\n" + implemented_by_line(m.group(1), impl),
                        text)


def equation_map_page(docs_dir, impl):
    """The Markdown of the "Equation map" page: every labelled equation, page by page, with the
    paper's number, the function computing it and the others citing it."""
    lines = ["# Equation map", "",
             "Every labelled equation of these pages, the number it has in the paper (Karakida, Ota",
             "and Taki, arXiv 2406.12220v1; — where refham records none), the one function that",
             "computes it, and the functions, classes and modules whose docstrings use it",
             "(written from the docstrings when the site is built).", ""]
    for page in doc_pages(docs_dir):
        labels = equation_labels(page.read_text(encoding="utf-8"))
        if not labels:
            continue
        lines += [f"## {{doc}}`/{page.stem}`", "",
                  "| equation | paper | implemented by | used by |", "|---|---|---|---|"]
        for label in labels:
            primary = impl.implemented_by(label)
            users = ", ".join(code_link(owner) for owner in impl.used_by(label))
            lines.append(f"| {{eq}}`{label}` | {PAPER_NUMBERS.get(label, '—')} | "
                         f"{code_link(primary) if primary else '(none)'} | {users or '—'} |")
        lines.append("")
    return "\n".join(lines)
