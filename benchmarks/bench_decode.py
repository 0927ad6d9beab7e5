"""End-to-end decode speed on the accelerator (issue 7), plus the engine's correctness
check against the plain-torch sparse reference.

    PYTHONPATH=src python benchmarks/bench_decode.py --preset llama-3-8b --dtype bf16 \\
        --sparsity 0,0.4,0.5 --new-tokens 256 --out benchmarks/results/decode.json

Random weights with the real shapes (speed does not depend on weight values);
thresholds are calibrated on the device on random tokens, and the measured sparsity
of the generated tokens is reported next to the requested one.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time

import torch

from teal.engine.cuda import CudaEngine, benchmark
from teal.generate import generate
from teal.model.build import parse_dtype, random_model
from teal.model.config import PRESETS
from teal.model.lowrank import set_lowrank
from teal.sparsity.stats import collect_stats


def calibrate(model, n_tokens: int = 2048, seq_len: int = 512):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (n_tokens,), generator=gen)
    return collect_stats(model, ids.to(model.device), seq_len=seq_len, progress=False)


def random_split(cfg, rank: int, seed: int = 0) -> torch.Tensor:
    """Random orthonormal bases ``[layers, dim, rank]`` for a low-rank split of the MLP
    input (``teal.model.lowrank``) of a random-weight model: its cost, not its quality."""
    a = torch.randn(cfg.n_layers, cfg.dim, rank, generator=torch.Generator().manual_seed(seed))
    return torch.linalg.qr(a).Q.contiguous()


@torch.no_grad()
def measured_sparsity(model, thresholds, tokens: list[int]) -> float:
    """Weight-weighted share of projection inputs zeroed over ``tokens`` (all positions
    sparse), counted with the model's observer."""
    cfg = model.config
    shapes = list(cfg.projection_shapes.values())
    site_of = [0, 0, 0, 1, 2, 2, 3]
    sites = ("attn_in", "attn_out", "mlp_in", "mlp_mid")
    zero = torch.zeros(cfg.n_layers, 7, device=model.device, dtype=torch.float64)
    seen = [0]

    def observe(layer, site, x, pos_mask):
        s = sites.index(site)
        for j in range(7):
            if site_of[j] == s:
                zero[layer, j] += (x.abs() <= thresholds[layer, j]).double().mean()
        if layer == 0 and s == 0:
            seen[0] += 1

    model.set_sparsity(thresholds, mode="all")
    model.set_backend("torch")
    model.observer = observe
    try:
        model(torch.tensor([tokens], device=model.device))
    finally:
        model.observer = None
        model.clear_sparsity()
    weights = torch.tensor([k * n for k, n in shapes], dtype=torch.float64, device=zero.device)
    frac = zero / seen[0]
    return float((frac * weights).sum() / (weights.sum() * cfg.n_layers))


def check_engine(dtype: torch.dtype, steps: int = 64, lowrank: int = 0) -> dict:
    """Sparse engine (Triton kernels, compiled, CUDA graph) against the eager plain-torch
    sparse reference on a random model of the default model's configuration; with
    ``lowrank``, both run a low-rank split of the MLP input (random orthonormal bases)."""
    model = random_model(PRESETS["default"], dtype=dtype, device="cuda", seed=3)
    if lowrank:
        set_lowrank(model, random_split(model.config, lowrank, seed=4))
    thr = calibrate(model).thresholds(0.5)
    prompt = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator())
    model.set_sparsity(thr, mode="decode")
    model.set_backend("torch")
    ref = generate(model, prompt[0].tolist(), max_new_tokens=steps, stop_at_eos=False)
    # One decode step's logits, reference vs kernels, from the same cache state.
    model.setup_cache(1, 32)
    p = prompt.cuda()
    model(p, torch.arange(12, device="cuda"))
    tok, pos = torch.tensor([[ref.token_ids[0]]], device="cuda"), torch.tensor([12], device="cuda")
    logits_ref = model(tok, pos).float()
    model.set_backend("triton")
    logits_fast = model(tok, pos).float()
    engine = CudaEngine(model, 12 + steps)
    out = engine.generate(p, steps).tokens.tolist()
    # Teacher-forced: feed the engine's own tokens to the reference (dense prompt, sparse
    # decode positions, one parallel pass) and ask whether each engine token is the
    # reference's argmax up to a rounding-sized margin.  Once two greedy runs differ by
    # one near-tie token they continue from different texts, so comparing the two token
    # lists alone says little after the first near-tie.
    model.set_backend("torch")
    seq = torch.tensor([prompt[0].tolist() + out[:-1]], device="cuda")
    mask = torch.arange(seq.shape[1], device="cuda")[None, :] >= 12
    forced = model(seq, sparse_mask=mask)[0, 11:].float()
    picked = forced.gather(1, torch.tensor(out, device="cuda")[:, None])[:, 0]
    gap = forced.max(dim=1).values - picked
    tol = 1e-3 if dtype == torch.float32 else 0.05 * float(forced.abs().max())
    model.clear_sparsity()
    same = sum(a == b for a, b in zip(out, ref.token_ids))
    return {
        "teacher_forced_agreeing_steps": int((gap <= tol).sum()),
        "teacher_forced_max_gap": float(gap.max()),
        "teacher_forced_tolerance": tol,
        "dtype": str(dtype).removeprefix("torch."),
        "lowrank": lowrank,
        "steps": steps,
        "identical_tokens": same,
        "tokens_equal": out == ref.token_ids,
        "max_abs_logit_diff": float((logits_ref - logits_fast).abs().max()),
        "logit_scale": float(logits_ref.abs().max()),
    }


def header(preset: str, dtype: str) -> dict:
    """The first keys of a result object: where, with what, by which command, when."""
    return {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "command": " ".join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "model": preset,
        "dtype": dtype,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--sparsity", default="0,0.4,0.5")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--compile", default="blocks", choices=("blocks", "step", "none"))
    ap.add_argument("--check", action="store_true", help="also run the engine correctness check")
    ap.add_argument(
        "--check-lowrank", type=int, default=0, metavar="R",
        help="run the check with a low-rank split of rank R too",
    )  # fmt: skip
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    result = {
        **header(args.preset, args.dtype),
        "quant": None,
        "method": "uniform",
        "compile": args.compile,
    }
    if args.check:
        # Every check compiles Block.forward for a fresh model, dtype and split: more
        # variants of one code object than dynamo's default limit allows.
        torch._dynamo.config.recompile_limit = 64
        result["checks"] = [
            check_engine(dt, lowrank=r)
            for r in sorted({0, args.check_lowrank})
            for dt in (torch.float32, torch.bfloat16, torch.float16)
        ]
        print(json.dumps(result["checks"]), flush=True)
    t0 = time.time()
    model = random_model(PRESETS[args.preset], dtype=parse_dtype(args.dtype, "cuda"), device="cuda")
    stats = calibrate(model)
    levels = [float(p) for p in args.sparsity.split(",")]
    thresholds = {p: (None if p == 0 else stats.thresholds(p)) for p in levels}
    print(f"model + calibration {time.time() - t0:.1f}s", flush=True)
    rows = benchmark(
        model, thresholds, new_tokens=args.new_tokens, repeats=args.repeats, compile=args.compile
    )
    dense = next((r["tokens_per_second"] for r in rows if r["sparsity"] == 0), None)
    for r in rows:
        thr = thresholds[r["sparsity"]]
        seq = r.pop("prompt") + r.pop("tokens")
        r["measured_sparsity"] = (
            0.0 if thr is None else round(measured_sparsity(model, thr, seq), 4)
        )
        r["dense_projections"] = []
        if dense:
            r["speedup_vs_dense"] = round(r["tokens_per_second"] / dense, 3)
        print(r, flush=True)
    result["results"] = rows
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"decode-{args.preset}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
