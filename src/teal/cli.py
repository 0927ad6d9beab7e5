"""The ``teal`` command: a thin layer over the library.

Each subcommand lives in ``teal/commands/<name>.py`` with ``register(subparsers)``.
Errors print one line; ``--debug`` shows the traceback.  Exit status: 2 for bad input
(``TealError``, argument errors), 1 for anything else.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys

from teal.errors import TealError

COMMANDS = ("run", "generate", "calibrate", "eval", "bench", "report", "lm-eval")


class _OneLineHelp(argparse.HelpFormatter):
    """Every command and its help on one line: wide enough, and a help column past the
    longest command name (argparse measures subcommands two columns short)."""

    def __init__(self, prog: str) -> None:
        width = max(100, shutil.get_terminal_size().columns)
        super().__init__(prog, max_help_position=24, width=width)

    def add_arguments(self, actions) -> None:  # noqa: ANN001 (argparse's signature)
        super().add_arguments(actions)
        self._action_max_length = max(self._action_max_length, 15)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="teal",
        description="Training-free activation sparsity for faster LLM decoding.",
        epilog="`teal COMMAND --help` shows a command's options.",
        formatter_class=_OneLineHelp,
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = importlib.import_module(f"teal.commands.{name.replace('-', '_')}")
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Pass-through commands (lm-eval) take the arguments they do not know themselves.
    args, rest = parser.parse_known_args(argv)
    if getattr(args, "passthrough", False):
        args.rest = rest
    elif rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("teal: interrupted", file=sys.stderr)
        return 130
    except TealError as exc:
        if args.debug:
            raise
        print(f"teal: error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence
        if args.debug:
            raise
        print(
            f"teal: internal error: {type(exc).__name__}: {exc} (rerun with --debug)",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":
    sys.exit(main())
