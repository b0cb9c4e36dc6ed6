"""The `xlaserve` console command. Each subcommand lives in its own module under xlaserve/commands/.

Exit codes: 0 success, 1 failure at run time, 2 bad usage or bad input (argparse's convention).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# (subcommand, module under xlaserve.commands, one-line help). Modules define
# `add_arguments(parser)` and `run(args) -> int`; they are imported only when their command runs.
COMMANDS: tuple[tuple[str, str, str], ...] = (
    ("version", "version", "print the xlaserve version"),
    ("info", "info", "jax version, devices and the attention implementations available here"),
    ("generate", "generate", "generate text for a prompt or a JSONL batch job"),
    ("convert", "convert", "convert a Hugging Face checkpoint to xlaserve's orbax form"),
    ("serve", "serve", "serve a model over gRPC (native xlaserve.v1 and KServe v2)"),
    ("client", "client", "send a prompt to a running xlaserve server"),
    ("profile", "profile", "show what XLA made of each compiled step and what it costs"),
)


class UsageError(Exception):
    """Bad user input: the CLI prints the message and exits with code 2."""


def build_parser() -> argparse.ArgumentParser:
    # __doc__ is None under python -OO (docstrings stripped)
    description = __doc__.splitlines()[0] if __doc__ else None
    parser = argparse.ArgumentParser(prog="xlaserve", description=description)
    parser.add_argument("--log-level", default="WARNING",
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module, help_text in COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            mod = importlib.import_module(f"xlaserve.commands.{module}")
        except ModuleNotFoundError as e:
            if e.name != f"xlaserve.commands.{module}":
                raise
            sub._name_parser_map.pop(name, None)  # not built yet: leave it out of --help
            sub._choices_actions = [a for a in sub._choices_actions if a.dest != name]
            continue
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"xlaserve {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
