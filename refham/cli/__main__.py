"""`python -m refham.cli …` runs the `refham` command."""
import sys

from refham.cli.commands import main

sys.exit(main())
