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


def quantize(model: Any, args: argparse.Namespace) -> None:
    """``model.quantize`` as ``--quant``/``--group-size`` ask, with one clear error."""
    try:
        model.quantize(args.quant, group_size=args.group_size, zero_point=args.zero_point)
    except ValueError as exc:
        raise TealError(f"--quant {args.quant}: {exc}") from None
