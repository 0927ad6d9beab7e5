"""``teal eval``: perplexity at several sparsities, both protocols, measured sparsity."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from teal.commands.calibrate import add_text_arg, positive_int
from teal.commands.common import add_model_args, parse_float_list, print_json
from teal.errors import TealError

DEFAULT_SPARSITIES = "0,0.25,0.4,0.5"
DEFAULT_MAX_TOKENS = 16384


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def add_eval_args(p: argparse.ArgumentParser, *, max_tokens: int, sparsity: str) -> None:
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="calibration file (default: the cached one for this model and text,"
        " made first if there is none)",
    )
    p.add_argument(
        "--sparsity", default=sparsity, help=f"comma list of levels in [0, 1) (default {sparsity})"
    )
    p.add_argument("--method", default="uniform", help="sparsity method (default uniform)")
    p.add_argument(
        "--protocol",
        default="both",
        metavar="{decode-like,full,both}",
        help="decode-like: dense first half, sparse second half of each window;"
        " full: every position sparse (default both)",
    )
    p.add_argument(
        "--max-tokens",
        default=max_tokens,
        help=f"evaluation tokens read from the text (default {max_tokens})",
    )
    p.add_argument(
        "--window",
        default=None,
        help="tokens per window (default 2048, capped at the model's context)",
    )
    p.add_argument(
        "--stride",
        default=None,
        help="tokens between window starts (default: the window, no overlap)",
    )
    p.add_argument("--batch-size", default=1, help="windows per forward pass")
    p.add_argument(
        "--tokens",
        default=None,
        help="calibration tokens when a calibration has to be made (default 16384)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="perplexity against sparsity (decode-like and full protocols)",
        description="Perplexity on the evaluation part of the text at each sparsity, with the"
        " weight-weighted sparsity actually applied reported next to the requested one.",
    )
    add_model_args(p)
    add_text_arg(p)
    add_eval_args(p, max_tokens=DEFAULT_MAX_TOKENS, sparsity=DEFAULT_SPARSITIES)
    p.add_argument("--json", action="store_true", help="print exactly one JSON object on stdout")
    p.set_defaults(func=main)


def protocols_of(choice: str) -> tuple[str, ...]:
    from teal.eval.perplexity import PROTOCOLS

    if choice == "both":
        return PROTOCOLS
    if choice not in PROTOCOLS:
        raise TealError(f"--protocol must be decode-like, full or both, not {choice!r}")
    return (choice,)


def check_eval_args(args: argparse.Namespace) -> list[float]:
    """Validate the evaluation options before any model is loaded; returns the levels."""
    from teal.sparsity.methods import METHODS

    sparsities = parse_float_list(args.sparsity, "--sparsity")
    if not sparsities:
        raise TealError("--sparsity needs at least one level, e.g. --sparsity 0,0.5")
    if args.method not in METHODS:
        raise TealError(f"unknown --method {args.method!r}: available are {', '.join(METHODS)}")
    protocols_of(args.protocol)
    for flag in ("max_tokens", "window", "stride", "batch_size", "tokens"):
        setattr(args, flag, positive_int(getattr(args, flag), "--" + flag.replace("_", "-")))
    return sparsities


def get_calibration(model: Any, path: str | None, part: Any, tokens: int | None) -> Any:
    """The calibration file given, else the cached one for this model and text (made
    first if missing); says which on stderr."""
    from teal.sparsity.artifact import Calibration
    from teal.sparsity.calibrate import DEFAULT_TOKENS, cached_or_new

    if path is not None:
        cal = Calibration.load(path, model)
        log(f"teal: using calibration {path} ({cal.tokens} tokens)")
        return cal
    cal, _ = cached_or_new(model, part, tokens=tokens or DEFAULT_TOKENS, log=log)
    return cal


def thresholds_table(cal: Any, method: str, sparsities: list[float]) -> dict[float, Any]:
    from teal.sparsity.methods import thresholds_for

    return {p: (None if p == 0 else thresholds_for(cal, method, p)) for p in sparsities}


def results_json(model: Any, text_label: str, results: list[Any]) -> dict[str, Any]:
    """The one object ``teal eval --json`` prints (and ``teal run`` saves)."""
    return {
        "model": model.source,
        "text": text_label,
        "results": [r.to_json() for r in results],
    }


def print_table(obj: dict[str, Any]) -> None:
    print(f"model: {obj['model']}\ntext:  {obj['text']}")
    print(f"{'protocol':<12} {'sparsity':>8} {'measured':>8} {'perplexity':>11} {'tokens':>7}")
    for r in obj["results"]:
        print(
            f"{r['protocol']:<12} {r['sparsity']:>8.0%} {r['measured_sparsity']:>8.1%}"
            f" {r['perplexity']:>11.3f} {r['tokens']:>7}"
        )


def main(args: argparse.Namespace) -> int:
    import teal
    from teal.eval.corpus import bos_token, load_corpus
    from teal.eval.perplexity import evaluate, resolve_window

    sparsities = check_eval_args(args)
    model = teal.load(args.model, dtype=args.dtype, device=args.device)
    window = resolve_window(model, args.window)  # before any calibration work
    parts = load_corpus(args.text).split()
    cal = None
    if any(p > 0 for p in sparsities):
        cal = get_calibration(model, args.calibration, parts["calibration"], args.tokens)
    tokens = parts["evaluation"].tokens(model.tokenizer, args.max_tokens)
    results = evaluate(
        model,
        tokens,
        thresholds_table(cal, args.method, sparsities),
        protocols_of(args.protocol),
        window=window,
        stride=args.stride,
        batch_size=args.batch_size,
        bos=bos_token(model.tokenizer),
        method=args.method,
    )
    obj = results_json(model, parts["evaluation"].label, results)
    if args.json:
        print_json(obj)
    else:
        print_table(obj)
    return 0
