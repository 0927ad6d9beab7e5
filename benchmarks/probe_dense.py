"""Probe (accelerator): dense decode engine on Llama-3-8B shapes, and cuBLAS GEMV speed
with our input-major weights (x @ wt) against the row-major layout (F.linear)."""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from teal.engine.cuda import benchmark
from teal.model.build import random_model
from teal.model.config import PRESETS

out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "gemv": []}
for n, k in [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]:
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    wt = w.t().contiguous()
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    t_row = do_bench(lambda x=x, w=w: F.linear(x, w), return_mode="median") * 1e3
    t_in = do_bench(lambda x=x, wt=wt: x @ wt, return_mode="median") * 1e3
    out["gemv"].append({"shape": [n, k], "row_major_us": t_row, "input_major_us": t_in})
    print(out["gemv"][-1], flush=True)
preset = sys.argv[1] if len(sys.argv) > 1 else "llama-3-8b"
t0 = time.time()
model = random_model(PRESETS[preset], dtype=torch.bfloat16, device="cuda")
print("built", time.time() - t0, flush=True)
for compile_ in ("blocks", "step"):
    rows = benchmark(model, {0.0: None}, new_tokens=256, compile=compile_)
    for r in rows:
        r.pop("tokens"), r.pop("prompt")
        r["compile"] = compile_
        print(r, flush=True)
        out.setdefault("decode", []).append(r)
with open(os.path.join(os.environ.get("OUT", "."), "probe_dense.json"), "w") as f:
    json.dump(out, f, indent=1)
