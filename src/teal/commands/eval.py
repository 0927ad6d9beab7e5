"""``teal eval``: perplexity at several sparsities, both protocols, measured sparsity."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from teal.commands.calibrate import add_text_arg, positive_int
from teal.commands.common import add_model_args, parse_float_list, print_json
from teal.errors import TealError
from teal.sparsity.methods import DEFAULT_METHOD, METHODS

DEFAULT_SPARSITIES = "0,0.25,0.4,0.5"
DEFAULT_MAX_TOKENS = 16384
# The sparse mode each perplexity protocol measures (decode-like: dense prefill, sparse
# one-token steps; full: every position).
PROTOCOL_MODE = {"decode-like": "decode", "full": "all"}


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
    p.add_argument(
        "--method",
        default=DEFAULT_METHOD,
        help=f"sparsity method, or a comma list to compare: {', '.join(METHODS)}"
        f" (default {DEFAULT_METHOD})",
    )
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
        help="perplexity (both protocols) or task accuracy against sparsity, per method",
        description="Perplexity on the evaluation part of the text at each sparsity, with the"
        " weight-weighted sparsity actually applied reported next to the requested one.",
    )
    add_model_args(p)
    add_text_arg(p)
    add_eval_args(p, max_tokens=DEFAULT_MAX_TOKENS, sparsity=DEFAULT_SPARSITIES)
    p.add_argument(
        "--tasks",
        default=None,
        help="multiple-choice tasks instead of perplexity: BIG-bench task names or paths"
        " (task.json, or JSONL of {question, choices, answer}), comma separated",
    )
    p.add_argument("--limit", default=None, help="examples per task (default: all)")
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
    from teal.sparsity.methods import parse_methods

    sparsities = parse_float_list(args.sparsity, "--sparsity")
    if not sparsities:
        raise TealError("--sparsity needs at least one level, e.g. --sparsity 0,0.5")
    args.methods = parse_methods(args.method)
    protocols_of(args.protocol)
    for flag in ("max_tokens", "window", "stride", "batch_size", "tokens", "limit"):
        if not hasattr(args, flag):
            continue
        setattr(args, flag, positive_int(getattr(args, flag), "--" + flag.replace("_", "-")))
    return sparsities


def get_calibration(
    model: Any,
    path: str | None,
    part: Any,
    tokens: int | None,
    methods: list[str] | tuple[str, ...] = (),
) -> Any:
    """The calibration file given, else the cached one for this model and text (made
    first if missing); says which on stderr.  If ``methods`` need the method tables
    and the file lacks them, they are made from the calibration text and saved (to the
    cache; a file given by the user is left as it is)."""
    from teal.sparsity.artifact import Calibration
    from teal.sparsity.calibrate import DEFAULT_TOKENS, cached_or_new
    from teal.sparsity.tables import add_tables_from_text, has_tables, kinds_for

    if path is not None:
        cal = Calibration.load(path, model)
        log(f"teal: using calibration {path} ({cal.tokens} tokens)")
        save_to = None
    else:
        cal, save_to = cached_or_new(model, part, tokens=tokens or DEFAULT_TOKENS, log=log)
    kinds = kinds_for(methods)
    if kinds and not has_tables(cal, kinds):
        if part is None:
            from teal.eval.corpus import load_corpus

            part = load_corpus(None).part("calibration")
        log(f"teal: making the method tables (greedy search, score statistics) on {part.label}")
        add_tables_from_text(model, cal, part, kinds=kinds)
        if save_to is not None:
            cal.save(save_to)
            log(f"teal: saved them in {save_to}")
        else:
            log("teal: (not written to the file given; `teal calibrate` makes files with them)")
    return cal


def evaluate_methods(
    model: Any,
    cal: Any,
    tokens: Any,
    methods: list[str],
    sparsities: list[float],
    protocols: tuple[str, ...],
    **kwargs: Any,
) -> tuple[list[Any], list[dict[str, Any]]]:
    """Perplexity of every method at every level; dense runs once and is reported under
    each method.  Returns the rows and the (method, level) pairs a method cannot reach."""
    from dataclasses import replace

    from teal.eval.perplexity import evaluate
    from teal.sparsity.methods import setting_for

    results: list[Any] = []
    unreachable: list[dict[str, Any]] = []
    dense: list[Any] = []
    if 0 in sparsities:
        dense = evaluate(model, tokens, {0.0: None}, protocols, method="dense", **kwargs)
    for method in methods:
        results += [replace(r, method=method) for r in dense]
        # Each protocol measures one sparse mode; ``auto`` chooses by the mode it runs in.
        for proto in protocols:
            mode = PROTOCOL_MODE[proto]
            settings = [setting_for(cal, method, p, model, mode=mode) for p in sparsities if p > 0]
            for s in settings:
                if not s.reachable and proto == protocols[0]:
                    unreachable.append(
                        {"method": method, "sparsity": s.sparsity, "max_sparsity": s.max_sparsity}
                    )
                    log(
                        f"teal: {method} cannot reach {s.sparsity:.0%}"
                        f" (at most {s.max_sparsity:.1%})"
                    )
                if s.chosen is not None:
                    log(f"teal: {method} at {s.sparsity:.0%} ({proto}) runs {s.chosen}")
            group = [s for s in settings if s.reachable]
            if not group:
                continue
            group[0].apply(model)  # evaluate() keeps the model's scales (one set per method)
            try:
                results += evaluate(
                    model,
                    tokens,
                    {s.sparsity: s.thresholds for s in group},
                    (proto,),
                    method=method,
                    **kwargs,
                )
            finally:
                model.clear_sparsity()
    order = {proto: i for i, proto in enumerate(protocols)}
    results.sort(key=lambda r: (methods.index(r.method), order[r.protocol], r.sparsity))
    return results, unreachable


def evaluate_tasks(
    model: Any,
    cal: Any,
    task_names: list[str],
    methods: list[str],
    sparsities: list[float],
    limit: int | None,
) -> list[Any]:
    """Multiple-choice accuracy of every method at every level on every task."""
    from dataclasses import replace

    from teal.eval.choice import load_task, score_task
    from teal.sparsity.methods import setting_for

    out: list[Any] = []
    for name in task_names:
        task = load_task(name)
        dense = None
        if 0 in sparsities:
            model.clear_sparsity()
            dense = score_task(model, task, limit=limit, method="dense")
        for method in methods:
            if dense is not None:
                out.append(replace(dense, method=method))
            for p in sparsities:
                if p == 0:
                    continue
                s = setting_for(cal, method, p, model, mode="all")  # every position sparse
                if not s.reachable:
                    continue
                s.apply(model)
                try:
                    out.append(score_task(model, task, limit=limit, method=method, sparsity=p))
                finally:
                    model.clear_sparsity()
    return out


def results_json(
    model: Any,
    text_label: str,
    results: list[Any],
    unreachable: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """The one object ``teal eval --json`` prints (and ``teal run`` saves)."""
    obj = {
        "model": model.source,
        "text": text_label,
        "results": [r.to_json() for r in results],
    }
    if unreachable:
        obj["unreachable"] = unreachable
    return obj


def print_table(obj: dict[str, Any]) -> None:
    print(f"model: {obj['model']}\ntext:  {obj['text']}")
    rows = obj["results"]
    if rows and "task" in rows[0]:
        head = f"{'sparsity':>8} {'measured':>8} {'acc':>6} {'acc_n':>6}"
        print(f"{'method':<16} {'task':<22} {head}")
        for r in rows:
            print(
                f"{r['method']:<16} {r['task']:<22} {r['sparsity']:>8.0%}"
                f" {r['measured_sparsity']:>8.1%} {r['accuracy']:>6.3f} {r['accuracy_norm']:>6.3f}"
            )
    else:
        print(
            f"{'method':<16} {'protocol':<12} {'sparsity':>8} {'measured':>8}"
            f" {'perplexity':>11} {'tokens':>7}"
        )
        for r in rows:
            print(
                f"{r['method']:<16} {r['protocol']:<12} {r['sparsity']:>8.0%}"
                f" {r['measured_sparsity']:>8.1%} {r['perplexity']:>11.3f} {r['tokens']:>7}"
            )
    for u in obj.get("unreachable", []):
        print(f"{u['method']} cannot reach {u['sparsity']:.0%} (at most {u['max_sparsity']:.1%})")


def main(args: argparse.Namespace) -> int:
    import teal
    from teal.eval.corpus import bos_token, load_corpus
    from teal.eval.perplexity import resolve_window

    sparsities = check_eval_args(args)
    model = teal.load(args.model, dtype=args.dtype, device=args.device)
    window = resolve_window(model, args.window)  # before any calibration work
    parts = load_corpus(args.text).split()
    cal = None
    if any(p > 0 for p in sparsities):
        cal = get_calibration(
            model, args.calibration, parts["calibration"], args.tokens, args.methods
        )
    if args.tasks:
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        rows = evaluate_tasks(model, cal, tasks, args.methods, sparsities, args.limit)
        obj = results_json(model, ", ".join(tasks), rows)
    else:
        tokens = parts["evaluation"].tokens(model.tokenizer, args.max_tokens)
        results, unreachable = evaluate_methods(
            model,
            cal,
            tokens,
            args.methods,
            sparsities,
            protocols_of(args.protocol),
            window=window,
            stride=args.stride,
            batch_size=args.batch_size,
            bos=bos_token(model.tokenizer),
        )
        obj = results_json(model, parts["evaluation"].label, results, unreachable)
    if args.json:
        print_json(obj)
    else:
        print_table(obj)
    return 0
