"""Perplexity of a model with quantized weights (int8, int4, gguf), dense and sparse, next to
the unquantized model: does quantization error add to sparsity error no worse than
independently?

    python benchmarks/eval_quant.py --quant none,int8,int4 --group-size 128 \\
        --method uniform,greedy-layers --sparsity 0,0.25,0.4,0.5 --max-tokens 8192 \\
        --out benchmarks/results/quant-ppl-default-2026-12-01.json

``--quant`` entries: none, int8, int4 (zero-point codes; ``--sym``: symmetric),
int4-offset (float offsets), gguf (the GGUF file's own Q4_0 / Q4_1 weights repacked);
``-gptq`` after int8 / int4 rounds with error feedback (``teal.model.gptq``, statistics
from ``--gptq-tokens`` of the calibration part); ``-gptqs``: the same with statistics that
also see the inputs as sparsified at the ``--gptq-sparsity`` levels (uniform thresholds).
Thresholds (and the greedy method tables) come from the unquantized model's calibration
on the calibration part of the text (the same file `teal eval` uses); the quantized
models reuse them.  Perplexity runs on the reference path (dequantize, then matmul), on
the evaluation part, in both protocols.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import platform
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument(
        "--quant",
        default="none,int8,int4",
        help="comma list of none, int8, int4, int4-offset, gguf; -gptq after int8/int4: GPTQ",
    )
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument(
        "--gptq-tokens",
        type=int,
        default=8192,
        help="calibration tokens for the GPTQ statistics (entries ending in -gptq)",
    )
    ap.add_argument(
        "--gptq-plain",
        action="store_true",
        help="GPTQ statistics without the per-token normalisation (collect_hessians)",
    )
    ap.add_argument(
        "--gptq-sparsity",
        default="0.25,0.4,0.5",
        help="levels whose sparsified inputs the -gptqs statistics also see",
    )
    ap.add_argument("--sym", action="store_true", help="int4 without zero points")
    ap.add_argument("--method", default="uniform,greedy-layers")
    ap.add_argument("--sparsity", default="0,0.25,0.4,0.5")
    ap.add_argument("--protocol", default="both")
    ap.add_argument("--max-tokens", type=int, default=8192)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import teal
    from teal.commands.eval import evaluate_methods, get_calibration, protocols_of
    from teal.eval.corpus import bos_token, load_corpus
    from teal.eval.perplexity import resolve_window
    from teal.sparsity.methods import parse_methods

    methods = parse_methods(args.method)
    sparsities = [float(s) for s in args.sparsity.split(",")]
    quants = [q.strip() for q in args.quant.split(",")]
    base = teal.load(args.model, dtype=args.dtype, device="cpu")
    parts = load_corpus(None).split()
    cal = get_calibration(base, None, parts["calibration"], None, methods)
    tokens = parts["evaluation"].tokens(base.tokenizer, args.max_tokens)
    window = resolve_window(base, None)
    rows = []
    t0 = time.time()
    hessians = {}
    for kind in dict.fromkeys(q.rpartition("-")[2] for q in quants):
        if kind not in ("gptq", "gptqs"):
            continue
        from teal.model.gptq import collect_hessians

        t1 = time.time()
        cal_tokens = parts["calibration"].tokens(base.tokenizer, args.gptq_tokens)
        levels = [float(p) for p in args.gptq_sparsity.split(",")] if kind == "gptqs" else []
        hessians[kind] = collect_hessians(
            base,
            cal_tokens,
            bos=bos_token(base.tokenizer),
            per_token=not args.gptq_plain,
            thresholds=[cal.thresholds(p) for p in levels],
        )
        print(f"GPTQ statistics ({kind}): {time.time() - t1:.0f} s", file=sys.stderr, flush=True)
    for q in quants:
        model = base
        if q != "none":
            model = copy.deepcopy(base)
            kind = q.rpartition("-")[2]
            spec = q.removesuffix("-" + kind) if kind in hessians else q
            fmt, _, zero = spec.partition("-")
            t1 = time.time()
            model.quantize(
                fmt,
                group_size=args.group_size,
                zero_point=zero or not args.sym,
                hessians=hessians.get(kind),
            )
            print(f"quantized {q}: {time.time() - t1:.0f} s", file=sys.stderr, flush=True)
        label = "none" if q == "none" else model.quant.label()
        if q.endswith("-gptqs"):
            label += f"-sparse-stats@{args.gptq_sparsity}"
        print(f"== {label}", file=sys.stderr, flush=True)
        results, _ = evaluate_methods(
            model,
            cal,
            tokens,
            methods,
            sparsities,
            protocols_of(args.protocol),
            window=window,
            bos=bos_token(base.tokenizer),
        )
        for r in results:
            rows.append({"quant": label, **r.to_json()})
        del model
        save(args, base, parts, tokens, rows, t0)
    return 0


def save(args, base, parts, tokens, rows, t0) -> None:
    """Print the table so far and write the JSON object (after each quantization)."""
    obj = {
        "model": base.source,
        "dtype": args.dtype,
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "text": parts["evaluation"].label,
        "eval_tokens": int(tokens.numel()),
        "seconds": round(time.time() - t0, 1),
        "results": rows,
    }
    print(table(obj), flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")


def table(obj: dict) -> str:
    """quant x method x protocol rows, sparsity columns: perplexity (measured sparsity)."""
    levels = sorted({r["sparsity"] for r in obj["results"]})
    head = "| quant | method | protocol | " + " | ".join(f"{p:.0%}" for p in levels) + " |"
    lines = [head, "|" + "---|" * (3 + len(levels))]
    keys = dict.fromkeys((r["quant"], r["method"], r["protocol"]) for r in obj["results"])
    for q, m, proto in keys:
        cells = []
        for p in levels:
            hit = [
                r
                for r in obj["results"]
                if (r["quant"], r["method"], r["protocol"], r["sparsity"]) == (q, m, proto, p)
            ]
            if not hit:
                cells.append("")
            elif p == 0:
                cells.append(f"{hit[0]['perplexity']:.2f}")
            else:
                cells.append(f"{hit[0]['perplexity']:.2f} ({hit[0]['measured_sparsity']:.1%})")
        lines.append(f"| {q} | {m} | {proto} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
