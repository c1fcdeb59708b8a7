"""The `refham` command line: `main` runs one command (refham.cli.commands), the file commands
`oracle`, `export` and `import` are declared in refham.cli.files."""
from refham.cli.commands import main

__all__ = ["main"]
