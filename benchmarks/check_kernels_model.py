"""Accelerator check: every Triton projection of a model configuration against the
plain-torch reference, one projection at a time and then a whole decode step.

    PYTHONPATH=src python benchmarks/check_kernels_model.py --preset default
"""

from __future__ import annotations

import argparse
import json

import torch

from teal.kernels import reference as ref
from teal.kernels import triton_gemv as tg
from teal.model.build import random_model
from teal.model.config import PRESETS
from teal.sparsity.stats import collect_stats


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6))


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="default")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    model = random_model(PRESETS[args.preset], dtype=dtype, device="cuda", seed=3)
    ids = torch.randint(0, model.config.vocab_size, (2048,), generator=torch.Generator())
    thr = collect_stats(model, ids.cuda(), seq_len=512, progress=False).thresholds(0.5)
    model.set_sparsity(thr, mode="decode")
    thr = model.thresholds  # views into the device table, as the model passes them
    rows = []
    blk = model.layers[1]
    a, m = blk.attention, blk.mlp
    for name, k in (
        ("attn_in", a.wqkv.shape[0]),
        ("attn_out", a.wo.shape[0]),
        ("mlp_in", m.w_gate_up.shape[0]),
        ("mlp_mid", m.w_down.shape[0]),
    ):
        x = torch.randn(1, k, device="cuda", dtype=dtype)
        if name == "attn_in":
            t = thr[1, 0:3]
            got = tg.sparse_gemv_fused(x, a.wqkv, t, a.splits)
            want = ref.sparse_linear_fused(x, a.wqkv, t, a.splits)
        elif name == "attn_out":
            t = thr[1, 3:4]
            got, want = tg.sparse_gemv(x, a.wo, t), ref.sparse_linear(x, a.wo, t[0])
        elif name == "mlp_in":
            t = thr[1, 4:6]
            got = tg.sparse_gate_up_act(x, m.w_gate_up, t, "silu")
            want = ref.sparse_gate_up_act(x, m.w_gate_up, t, "silu")
        else:
            t = thr[1, 6:7]
            got, want = tg.sparse_gemv(x, m.w_down, t), ref.sparse_linear(x, m.w_down, t[0])
        rows.append({"site": name, "rel_err": rel(got, want)})
        print(rows[-1], flush=True)
    model.setup_cache(1, 32)
    p = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator()).cuda()
    model(p, torch.arange(12, device="cuda"))
    tok, pos = torch.tensor([[7]], device="cuda"), torch.tensor([12], device="cuda")
    # Block outputs of both backends, to locate a disagreement.
    outs: dict[str, list[torch.Tensor]] = {"torch": [], "triton": []}
    hooks = []
    for blk in model.layers:
        for mod in (blk, blk.attention, blk.mlp):
            hooks.append(
                mod.register_forward_hook(
                    lambda _m, _i, o: outs[model.sparse_backend].append(o.detach().clone())
                )
            )
    logits_ref = model(tok, pos)
    model.set_backend("triton")
    logits_fast = model(tok, pos)
    for h in hooks:
        h.remove()
    errs = [round(rel(a, b), 5) for a, b in zip(outs["triton"], outs["torch"])]
    print("per (attention, mlp, block) output, layer by layer:", errs[:12], flush=True)
    rows.append({"site": "step_logits", "rel_err": rel(logits_fast, logits_ref)})
    print(json.dumps(rows), flush=True)


if __name__ == "__main__":
    main()
