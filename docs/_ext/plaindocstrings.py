"""Render refham's docstrings as the plain Unicode text they are written in.

The docstrings state equations in Unicode (‖x‖, |βx|, x*, tables drawn with '|', aligned key
lists), which reStructuredText would read as substitutions, emphasis, line blocks and block
quotes. Before napoleon turns numpydoc sections into fields, this hook
- shows every indented run of lines, and every run of lines that starts with '|', verbatim (a
  literal block), so tables and aligned lists keep their layout;
- escapes '*', '|' and a word's trailing '_' elsewhere, outside `inline code` and roles such as
  :eq:`H5` (which stay links), and lets code touch a word (`Regime`s) with an escaped space;
- leaves reST simple tables (rows between '=== ===' borders) as they are.
Section bodies (after a numpydoc header underlined with '---') keep their indentation for napoleon.
"""
import re

_SPAN = re.compile(r"(:[a-z]+:`[^`]*`|``[^`]*``|`[^`]*`)")   # roles and code: left alone
_SPECIAL = re.compile(r"([*|])|(?<=\w)_(?=\W|$)")
_TABLE_BORDER = re.compile(r"=+( +=+)+\s*")


def escape_text(line):
    """`line` with '*', '|' and reference-making trailing '_' escaped outside code and roles, and
    an escaped space (invisible in the output) between a code span and a letter it touches."""
    parts = _SPAN.split(line)
    for i in range(0, len(parts), 2):        # even parts lie outside the spans
        parts[i] = _SPECIAL.sub(lambda m: "\\" + m.group(0), parts[i])
    for i in range(1, len(parts), 2):
        if re.match(r"\w", parts[i + 1]):
            parts[i] += "\\ "
        if re.search(r"\w$", parts[i - 1]):
            parts[i] = "\\ " + parts[i]
    return "".join(parts)


def _is_verbatim(line):
    return line.startswith((" ", "\t", "|")) and line.strip() != ""


def _blank_inside(lines, j):
    """A blank line with more verbatim lines after it: part of the same verbatim block."""
    return lines[j].strip() == "" and j + 1 < len(lines) and _is_verbatim(lines[j + 1])


def _table_end(lines, i):
    """The index after the reST simple table whose top border is lines[i] (None if none is):
    the table ends at a border followed by a blank line or the end of the docstring."""
    if not _TABLE_BORDER.fullmatch(lines[i]):
        return None
    for j in range(i + 1, len(lines)):
        if _TABLE_BORDER.fullmatch(lines[j]) and (j + 1 == len(lines) or not lines[j + 1].strip()):
            return j + 1
    return None


def _is_section_underline(lines, i):
    return i > 0 and lines[i - 1].strip() != "" and re.fullmatch(r"\s*-{3,}\s*", lines[i])


def plain_docstring(lines):
    """The docstring `lines` (dedented) rewritten as described in the module docstring."""
    out, i = [], 0
    while i < len(lines):
        if i + 1 < len(lines) and _is_section_underline(lines, i + 1):
            return out + [escape_text(line) for line in lines[i:]]
        end = _table_end(lines, i)
        if end is not None:
            out += [""] + lines[i:end] + [""]
            i = end
        elif _is_verbatim(lines[i]):
            j = i
            while j < len(lines) and (_is_verbatim(lines[j]) or _blank_inside(lines, j)):
                j += 1
            out += ["", "::", ""] + ["    " + line for line in lines[i:j]] + [""]
            i = j
        else:
            out.append(escape_text(lines[i]))
            i += 1
    return out


def _process(app, what, name, obj, options, lines):
    lines[:] = plain_docstring(lines)


def setup(app):
    app.connect("autodoc-process-docstring", _process, priority=400)   # before napoleon (500)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
