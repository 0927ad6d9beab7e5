"""Per-call time of the native CPU projection kernels at the default model's shapes
(gate|up with its SiLU-multiply epilogue, as in decoding).

A tool for A/B runs of kernel changes on the CPU, where whole-model decode speed moves by
more than a kernel change between minutes of a shared machine: run it alternately on the
old and the new source (``PYTHONPATH=<tree>/src``) and compare the JSON files.  Random
weights and inputs; thresholds at the requested quantile of |x|; best of ``--rounds``
rounds of ``--calls`` calls (microseconds per call, including the ctypes call from
Python, about a microsecond).  The calls cycle over ``--copies`` weights of each shape
(30 by default, a layer's worth each as in the model) so that, as in decoding, they
stream from memory rather than from the last-level cache.

    python benchmarks/bench_cpu_kernels.py --formats bf16,fp16,int8,int4-g32-offset-fp16 \\
        --sparsity 0,0.5 --out /tmp/new.json
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import sys
import time
from pathlib import Path

import torch

import teal  # noqa: F401  (sets GOMP_SPINCOUNT before torch's threads start)
from teal.kernels import cpu
from teal.model.quant import quantize_int4, quantize_int8
from teal.report import atomic_write

# The default model (SmolLM2-135M): q|k|v, o, gate|up, down as [K, N].
SHAPES = {"qkv": (576, (576, 192, 192)), "o": (576, (576,)), "gate_up": (576, (1536, 1536)),
          "down": (1536, (576,))}  # fmt: skip
FLOATS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _weight(fmt: str, w: torch.Tensor, splits: tuple[int, ...]):
    """A float weight in its dtype, or a QuantWeight: int8, or int4-g<G>-<zero>[-fp16]."""
    if fmt in FLOATS:
        return w.to(FLOATS[fmt])
    if fmt == "int8":
        return quantize_int8(w, splits)
    parts = fmt.split("-")
    if len(parts) < 3 or parts[0] != "int4" or not parts[1].startswith("g"):
        raise SystemExit(f"unknown format {fmt!r}: fp32, bf16, fp16, int8, int4-g32-offset[-fp16]")
    sdt = torch.float16 if parts[-1] == "fp16" else torch.float32
    return quantize_int4(w, int(parts[1][1:]), splits, zero_point=parts[2], scale_dtype=sdt)


def _call(site: str, fmt: str, x, wt, t, splits):  # noqa: ANN001, ANN202
    """The kernel the model runs at ``site``: gate|up with its SiLU-multiply epilogue."""
    if site == "gate_up":
        if fmt in FLOATS:
            return functools.partial(cpu.sparse_gate_up, x, wt, t, "silu")
        return functools.partial(cpu.quant_project, x, wt, t, splits, None, "silu")
    kernel = cpu.sparse_project if fmt in FLOATS else cpu.quant_project
    return functools.partial(kernel, x, wt, t, splits)


def _time(fns: list, calls: int, rounds: int) -> float:
    """Best of ``rounds`` rounds of ``calls`` calls, cycling over ``fns``: us per call."""
    for fn in fns:
        fn()
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for i in range(calls):
            fns[i % len(fns)]()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best * 1e6


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--formats", default="bf16,int8,int4-g32-offset-fp16,int4-g128-code")
    ap.add_argument("--sparsity", default="0,0.5")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--copies", type=int, default=30, help="weights of each shape cycled")
    ap.add_argument("--out")
    args = ap.parse_args(argv)
    if cpu.implementation() != "native":
        raise SystemExit("the native CPU kernel did not build: nothing to time")
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    rows = []
    for site, (k, splits) in SHAPES.items():
        ws = [torch.randn(k, sum(splits), generator=g) / k**0.5 for _ in range(args.copies)]
        x32 = torch.randn(1, k, generator=g)
        for fmt in args.formats.split(","):
            wts = [_weight(fmt, w, splits) for w in ws]
            x = x32.to(FLOATS.get(fmt, torch.bfloat16))
            for p in (float(s) for s in args.sparsity.split(",")):
                t = torch.full((len(splits),), float(x32.abs().quantile(p)) if p > 0 else -1.0)
                fns = [_call(site, fmt, x, wt, t, splits) for wt in wts]
                us = _time(fns, args.calls, args.rounds)
                rows.append({"site": site, "shape": [k, sum(splits)], "format": fmt,
                             "sparsity": p, "time_us": round(us, 2)})  # fmt: skip
                print(f"{site:8s} {fmt:22s} p={p:<5} {us:8.2f} us", flush=True)
    out = {"command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
           "date": datetime.date.today().isoformat(), "isa": cpu.isa(),
           "threads": args.threads, "torch": torch.__version__, "results": rows}  # fmt: skip
    if args.out:
        atomic_write(Path(args.out), (json.dumps(out, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
