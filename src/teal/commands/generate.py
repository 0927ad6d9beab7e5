"""``teal generate "PROMPT"``: stream text from a model, dense or sparse."""

from __future__ import annotations

import argparse
import sys

from teal.commands.common import add_model_args, print_json


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
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import teal

    model = teal.load(args.model, dtype=args.dtype, device=args.device)
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
