"""``teal generate "PROMPT"``: stream text from a model, dense or sparse."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from teal.commands.common import (
    add_model_args,
    add_quant_args,
    check_sparsity,
    print_json,
    quantize,
)
from teal.errors import TealError

if TYPE_CHECKING:
    from teal.model.decoder import Transformer


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt")
    p.add_argument("prompt")
    add_model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object, no streaming")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads (default: all; on a busy machine 1 can be faster)",
    )
    p.add_argument(
        "--sparsity",
        default="0",
        help="activation sparsity of the decode steps, in [0, 1) (default 0: dense)",
    )
    p.add_argument(
        "--calibration",
        default=None,
        metavar="FILE",
        help="calibration file for --sparsity (default: the cached one for this"
        " model on the default text, made first if there is none)",
    )
    p.add_argument(
        "--method",
        default=None,
        help="sparsity method: uniform, greedy, greedy-layers, weight-informed, cats or auto"
        " (default auto: greedy or greedy-layers where held-out text says they are no worse"
        " than uniform in both protocols, else uniform)",
    )
    add_quant_args(
        p,
        "weight-only quantization of the projections and lm_head after loading (on the CPU"
        " int8, int4 and gguf run native kernels)",
    )
    p.set_defaults(func=main)


def _apply_sparsity(model: Transformer, args: argparse.Namespace) -> None:
    """Sparse decode steps (the prefill stays dense) at ``--sparsity``."""
    from teal.commands.eval import get_calibration
    from teal.eval.corpus import load_corpus
    from teal.sparsity.methods import setting_for

    part = None if args.calibration else load_corpus(None).part("calibration")
    cal = get_calibration(model, args.calibration, part, None, [args.method])
    setting = setting_for(cal, args.method, args.sparsity, model, mode="decode")
    if not setting.reachable:
        raise TealError(
            f"method {args.method} reaches at most {setting.max_sparsity:.0%} on this model,"
            f" not {args.sparsity:.0%}: lower --sparsity or pick another --method"
        )
    setting.apply(model, mode="decode")


def main(args: argparse.Namespace) -> int:
    import torch

    if args.threads is not None and args.threads < 1:
        raise TealError(f"--threads must be at least 1, got {args.threads}")
    old_threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _generate(args)
    finally:
        torch.set_num_threads(old_threads)


def _generate(args: argparse.Namespace) -> int:
    import teal
    from teal.sparsity.methods import DEFAULT_METHOD, check_method

    try:
        args.sparsity = check_sparsity(float(args.sparsity))
    except ValueError:
        raise TealError(f"--sparsity must be a number in [0, 1), got {args.sparsity!r}") from None
    args.method = check_method(args.method or DEFAULT_METHOD)
    model = teal.load(args.model, dtype=args.dtype, device=args.device)
    if args.sparsity > 0:
        _apply_sparsity(model, args)  # reads the float weights: before quantizing
    if args.quant:
        quantize(model, args)
    stream = None
    if not args.json:

        def stream(piece: str) -> None:
            sys.stdout.write(piece)
            sys.stdout.flush()

    result = model.generate(
        args.prompt,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        chat=args.chat,
        stream=stream,
    )
    if args.json:
        print_json(
            {
                "text": result.text,
                "prompt_tokens": result.prompt_tokens,
                "new_tokens": result.new_tokens,
                "sparsity": args.sparsity,
                "method": args.method if args.sparsity > 0 else "dense",
                "quant": model.quant.label() if model.quant else None,
                "tokens_per_second": round(result.tokens_per_second, 2),
            }
        )
    else:
        sys.stdout.write("\n")
        print(
            f"[{result.prompt_tokens} prompt tokens, {result.new_tokens} new,"
            f" {result.tokens_per_second:.1f} tok/s]",
            file=sys.stderr,
        )
    return 0
