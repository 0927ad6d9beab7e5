"""``teal bench``: decode tokens/s, dense against sparse, in one run (teal.bench)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from teal.commands.common import add_quant_args, parse_float_list, print_json, quantize
from teal.errors import TealError

PRESET_NAMES = ("default", "llama-3-8b", "llama-2-7b", "mistral-7b")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="decode speed, dense against sparse",
        description="Decode tokens per second of one model at several sparsities, in one run"
        " with the same prompt and threads (batch 1, greedy, prefill excluded).",
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="Hugging Face folder or .gguf file")
    src.add_argument(
        "--preset",
        choices=PRESET_NAMES,
        default=None,
        help="default: the real default model (its shapes with random weights if it cannot"
        " be fetched); the others: real shapes with random weights",
    )
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default fp32 on CPU)")
    p.add_argument("--sparsity", default="0,0.4,0.5", help="comma list (default 0,0.4,0.5)")
    p.add_argument("--method", default="uniform", help="sparsity method (default uniform)")
    add_quant_args(
        p,
        "weight-only quantization of the projections and lm_head (thresholds are"
        " calibrated before quantizing)",
    )
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3, help="timed runs per level (median)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--out", default=None, help="also save the JSON object to this file")
    p.set_defaults(func=main)


def load_for_bench(args: argparse.Namespace):  # noqa: ANN201 (Transformer, label)
    """The model named by ``--model``/``--preset`` and a label saying what it is."""
    import torch

    import teal
    from teal.model.build import parse_dtype, random_model
    from teal.model.config import PRESETS

    dtype = parse_dtype(args.dtype, args.device)
    if args.model is not None:
        model = teal.load(args.model, dtype=dtype, device=args.device)
        return model, str(args.model)
    preset = args.preset or "default"
    if preset == "default":
        from teal.errors import NetworkError

        try:
            model = teal.load(None, dtype=dtype, device=args.device)
            return model, "SmolLM2-135M-Instruct (default model)"
        except NetworkError as exc:
            print(
                f"teal: the default model cannot be fetched ({exc}); benchmarking its"
                " configuration with random weights instead",
                file=sys.stderr,
            )
            return random_model(PRESETS["default"], dtype=dtype, device=args.device), (
                "default configuration, random weights"
            )
    cfg = PRESETS[preset]
    need = (cfg.num_params * torch.empty((), dtype=dtype).element_size()) / 2**30
    if args.device == "cpu":
        free = _available_gib()
        if free is not None and need > 0.8 * free:
            raise TealError(
                f"--preset {preset} in {args.dtype or 'fp32'} needs {need:.1f} GiB of weights"
                f" but this machine has {free:.1f} GiB available: pick a smaller preset or"
                " --dtype bf16"
            )
    model = random_model(cfg, dtype=dtype, device=args.device)
    return model, f"{preset} shapes, random weights"


def _available_gib() -> float | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return None


def main(args: argparse.Namespace) -> int:
    from teal.bench import bench_decode, format_table, require_engine
    from teal.sparsity.methods import METHODS

    require_engine(args.device)  # before loading anything
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TealError("--device cuda was asked for but no CUDA GPU is visible: use cpu")
    if args.method not in METHODS:
        raise TealError(f"unknown --method {args.method!r}: available are {', '.join(METHODS)}")
    if args.threads is not None and args.threads < 1:
        raise TealError(f"--threads must be at least 1, got {args.threads}")
    if args.new_tokens < 2:
        raise TealError("--new-tokens must be at least 2")
    sparsities = parse_float_list(args.sparsity, "--sparsity")
    if not sparsities:
        raise TealError("--sparsity needs at least one level, e.g. 0,0.5")
    model, label = load_for_bench(args)
    thresholds = None
    if args.quant:
        from teal.bench import calibration_thresholds

        # Thresholds come from the unquantized model, as for evaluation.
        levels = [p for p in sparsities if p > 0]
        thresholds = calibration_thresholds(model, levels, args.method, progress=True)
        quantize(model, args)
    result = bench_decode(
        model,
        thresholds=thresholds,
        device=args.device,
        sparsities=sparsities,
        new_tokens=args.new_tokens,
        threads=args.threads,
        method=args.method,
        repeats=args.repeats,
        progress=True,
        model_name=label,
    )
    result["command"] = " ".join(["teal", *sys.argv[1:]]) if sys.argv else "teal bench"
    if args.out:
        from teal.report import atomic_write

        atomic_write(Path(args.out), (json.dumps(result, indent=1) + "\n").encode())
    if args.json:
        print_json(result)
    else:
        print(format_table(result))
    return 0
