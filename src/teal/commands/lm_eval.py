"""``teal lm-eval``: lm-eval's command line with the ``teal`` model type registered
(``teal.harness``); every argument goes to lm-eval unchanged."""

from __future__ import annotations

import argparse

from teal.errors import TealError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lm-eval",
        help="lm-evaluation-harness on a sparsified model (--model teal; the eval extra)",
        description="Runs lm-eval's command line with the model type 'teal' registered:"
        " teal lm-eval --model teal --model_args pretrained=PATH,calibration=FILE,"
        "sparsity=0.5,method=greedy-layers --tasks TASKS [--include_path DIR] ..."
        " Every argument is lm-eval's (see `teal lm-eval --help` once it is installed).",
        add_help=False,  # --help goes to lm-eval
    )
    p.set_defaults(func=main, passthrough=True)


def main(args: argparse.Namespace) -> int:
    try:
        from teal.harness import main as harness_main
    except ImportError as exc:
        raise TealError(
            f"lm-eval is not installed ({exc}): pip install -e '.[eval]'"
            " (or pip install 'teal-sparsity[eval]')"
        ) from None
    return harness_main(list(args.rest))
