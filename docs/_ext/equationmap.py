"""The equation ↔ function map: which docstrings cite which labelled equation.

docs/*.md label each equation with a MyST `{math}` directive (`:label: H5`) and each section with a
target (`(sec-ham)=`); docstrings cite them with :eq:`H5` and :ref:`sec-ham`. The API reference's
"Equation map" page is written from this, and tests/test_docs_labels.py checks it both ways.
Plain Python: importing it needs neither Sphinx nor a build.
"""
import importlib
import inspect
import pathlib
import pkgutil
import re

EQ_LABEL = re.compile(r"^```\{math\}\s*\n(?::\w+:.*\n)*?:label:\s*(\S+)\s*$", re.M)
SECTION_TARGET = re.compile(r"^\((sec-[\w-]+)\)=\s*$", re.M)
CITATION = re.compile(r":(eq|ref):`([^`<>]+)`")
TOCTREE_ENTRY = re.compile(r"^([a-z][a-z-]*)$", re.M)


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
            cited.setdefault((role, label.strip()), []).append(owner)
    return cited


def equation_map_page(docs_dir, package="refham"):
    """The Markdown of the "Equation map" page: every labelled equation, page by page, with the
    functions whose docstrings cite it."""
    cited = citations(public_docstrings(package))
    lines = ["# Equation map", "",
             "Every labelled equation and the functions, classes and modules whose docstrings cite",
             "it (written from the docstrings when the site is built).", ""]
    for page in doc_pages(docs_dir):
        labels = equation_labels(page.read_text(encoding="utf-8"))
        if not labels:
            continue
        title = page.read_text(encoding="utf-8").split("\n# ", 1)[-1].split("\n", 1)[0]
        lines += [f"## [{title}](../{page.name})", "", "| equation | cited by |", "|---|---|"]
        for label in labels:
            owners = ", ".join(f"{{py:obj}}`{owner}`" for owner in cited.get(("eq", label), []))
            lines.append(f"| {{eq}}`{label}` | {owners or '(none)'} |")
        lines.append("")
    return "\n".join(lines)
