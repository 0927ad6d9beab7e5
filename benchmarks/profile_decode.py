"""Where a decode step's time goes on the accelerator (issue 7): the CUDA kernels of
one captured step, grouped by what they do, dense against sparse, in one run.

    PYTHONPATH=src python benchmarks/profile_decode.py --preset llama-3-8b --dtype bf16 \\
        --sparsity 0,0.5 --out profile.json

Random weights with the real shapes, thresholds calibrated on random tokens (as
bench_decode.py).  The torch profiler records the kernels inside the replayed CUDA
graph; each group's time is per decode step (total over the profiled steps divided by
their number), next to the wall time of a step measured without the profiler.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from bench_decode import calibrate
from teal.engine.cuda import CudaEngine
from teal.model.build import parse_dtype, random_model
from teal.model.config import PRESETS

# Kernel name fragment -> group (first match wins).
GROUPS = (
    ("_sparse_gemv_kernel", "sparse projections"),
    ("_epilogue", "split-K epilogue"),
    ("gemv", "dense GEMV (cuBLAS)"),
    ("gemm", "dense GEMM (cuBLAS)"),
    ("nvjet", "dense GEMM (cuBLAS)"),
    ("flash", "attention"),
    ("attention", "attention"),
    ("sdpa", "attention"),
    ("triton_", "compiled glue (norms, rope, residual, cache)"),
    ("argmax", "sampling"),
    ("reduce", "reductions"),
)


def group_of(name: str) -> str:
    low = name.lower()
    for frag, group in GROUPS:
        if frag.lower() in low:
            return group
    return "other"


def profile_step(engine: CudaEngine, prompt: torch.Tensor, steps: int) -> dict:
    engine.capture()
    engine.prefill(prompt)
    for _ in range(5):
        engine._replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    engine.prefill(prompt)
    start.record()
    for _ in range(steps):
        engine._replay()
    end.record()
    torch.cuda.synchronize()
    step_us = start.elapsed_time(end) * 1000 / steps
    engine.prefill(prompt)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            engine._replay()
        torch.cuda.synchronize()
    groups: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    top: dict[str, float] = defaultdict(float)
    for ev in prof.events():
        if ev.device_type != torch.autograd.DeviceType.CUDA:
            continue
        g = group_of(ev.name)
        groups[g] += ev.device_time / steps
        counts[g] += 1
        top[ev.name[:90]] += ev.device_time / steps
    kernels_us = sum(groups.values())
    return {
        "step_us": round(step_us, 1),
        "kernels_us": round(kernels_us, 1),
        "gaps_us": round(step_us - kernels_us, 1),
        "launches_per_step": round(sum(counts.values()) / steps, 1),
        "groups_us": {k: round(v, 1) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "launches": {k: round(v / steps, 1) for k, v in counts.items()},
        "top_kernels_us": {
            k: round(v, 1) for k, v in sorted(top.items(), key=lambda kv: -kv[1])[:12]
        },
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--sparsity", default="0,0.5")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.manual_seed(0)
    dtype = parse_dtype(args.dtype, "cuda")
    model = random_model(PRESETS[args.preset], dtype=dtype, device="cuda")
    stats = calibrate(model)
    prompt = torch.randint(0, model.config.vocab_size, (1, 16), device="cuda")
    engine = CudaEngine(model, 16 + args.steps + 8)
    rows = []
    for p in (float(v) for v in args.sparsity.split(",")):
        if p == 0:
            model.clear_sparsity()
        else:
            model.set_sparsity(stats.thresholds(p), mode="decode")
            model.set_backend("triton")
        row = {"sparsity": p, **profile_step(engine, prompt, args.steps)}
        rows.append(row)
        print(json.dumps(row, indent=1), flush=True)
    result = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "preset": args.preset,
        "dtype": args.dtype,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "results": rows,
    }
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
