"""Arguments shared by several subcommands, and JSON output."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from teal.errors import TealError


def add_model_args(p: argparse.ArgumentParser, *, device: bool = True) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face folder, .gguf file or cached model id (default: SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype", default=None, help="fp32, bf16 or fp16 (default: fp32 on CPU, bf16 on CUDA)"
    )
    if device:
        p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))


def parse_float_list(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise TealError(f"{name} must be a comma list of numbers, got {text!r}") from None
    for v in values:
        check_sparsity(v)
    return values


def check_sparsity(p: float) -> float:
    if not 0.0 <= p < 1.0:
        raise TealError(f"sparsity must be in [0, 1), got {p}: e.g. --sparsity 0.5 for 50 %")
    return p


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=None)
    sys.stdout.write("\n")
    sys.stdout.flush()


def add_quant_args(p: argparse.ArgumentParser, help_text: str) -> None:
    p.add_argument(
        "--quant",
        default=None,
        choices=("int8", "int4", "gguf"),
        help=help_text + "; gguf keeps a GGUF file's own Q4_0/Q4_1 weights as they are",
    )
    p.add_argument(
        "--group-size", type=int, default=128, help="int4 group size (default 128; gguf: 32)"
    )
    p.add_argument(
        "--zero-point",
        default="code",
        choices=("code", "offset", "none"),
        help="int4 zero points: code (uint8, default), offset (float, as GGUF's Q4_1) or"
        " none (symmetric)",
    )
    p.add_argument(
        "--gptq",
        nargs="?",
        const="wiki",
        default=None,
        metavar="TEXT",
        help="int8/int4: round with error feedback (GPTQ) fitted to the model's activations"
        f" on {GPTQ_TOKENS:,} tokens of TEXT's calibration part (default: the Wikipedia"
        " leads); about a minute on two CPU cores for the default model",
    )


GPTQ_TOKENS = 4096


def quantize(model: Any, args: argparse.Namespace) -> None:
    """``model.quantize`` as ``--quant``/``--group-size``/``--gptq`` ask, with one clear
    error."""
    hessians = None
    if getattr(args, "gptq", None):
        if args.quant not in ("int8", "int4"):
            raise TealError(f"--gptq rounds int8 or int4 weights, not --quant {args.quant}")
        if model.tokenizer is None:
            raise TealError("--gptq needs text the model can read: this model has no tokenizer")
        from teal.eval.corpus import bos_token, load_corpus
        from teal.model.gptq import collect_hessians

        part = load_corpus(args.gptq).part("calibration")
        tokens = part.tokens(model.tokenizer, GPTQ_TOKENS)
        hessians = collect_hessians(model, tokens, bos=bos_token(model.tokenizer))
    try:
        model.quantize(
            args.quant, group_size=args.group_size, zero_point=args.zero_point, hessians=hessians
        )
    except ValueError as exc:
        raise TealError(f"--quant {args.quant}: {exc}") from None
