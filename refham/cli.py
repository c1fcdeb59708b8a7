"""`refham …` commands. Each command is a pair: `_add_<name>(parser)` declares its options and
`_run_<name>(args)` does the work; `COMMANDS` lists them. Heavy imports stay inside the run
functions so that `refham --help` is instant."""
import argparse
import sys


COMMANDS = {
    # name: (help, add_arguments, run)
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="refham", description="Reference hierarchical associative memories and MLP-Mixers.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (help_text, add_arguments, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(run=run)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
