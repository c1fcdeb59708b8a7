"""RefhamError, the base of every error that means bad input, files or settings, or a machine
without the resources asked for — never a bug in refham — and `short_list`, which keeps the
messages of such errors one line long.

Every expected error class of refham derives from RefhamError (and from the built-in class that
says what kind of mistake it is: ValueError, OSError, …), so a caller catches one class; the
`refham` command turns each into one line and a non-zero exit status. This module imports
nothing: the specification and every subpackage may use it.
"""


class RefhamError(Exception):
    """The base of refham's expected errors: the message says what is wrong and what to do."""


def short_list(items, limit=8):
    """'a, b, c' — or the first `limit` items and 'and N more': error messages stay one line
    whatever a hostile file lists."""
    items = [str(i) for i in items]
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", … and {len(items) - limit} more"
