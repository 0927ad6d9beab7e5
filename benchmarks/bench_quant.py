"""Quantized sparse GEMV (int8, int4) on the accelerator: correctness at real shapes, a
small config search, the kernel benchmark against our dense kernels of the same format
and cuBLAS bf16, and end-to-end decode, in one process.

    PYTHONPATH=src python benchmarks/bench_quant.py --out-dir $OUT --tag h200-2026-12-01

Writes ``quant-check-TAG.json`` (kernels vs the dequantize-then-matmul reference),
``quant-kernels-TAG.json`` (per-kernel times; the winning configs under "configs") and
``quant-decode-TAG.json`` (``teal.bench.bench_decode`` objects, one per format, with
``"quant"`` set).  Kernel times: each call captured in a CUDA graph, replayed under
``triton.testing.do_bench`` (median, L2 flushed before each replay).  ``cublas_us``: bf16
``x @ W`` on the unquantized matrix (faster of [K, N] and [N, K]); ``cublas_compact_us``:
bf16 on only the kept rows, what a perfect bf16 sparse kernel would read.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

from bench_kernels import bench_graph, config_from
from teal.kernels import reference as ref
from teal.kernels import triton_gemv as tg
from teal.kernels import triton_quant as tq
from teal.model.quant import quantize_int4, quantize_int8

D, FFN, KV, VOCAB = 4096, 14336, 1024, 128256
# name -> (K, splits, pair)
CASES = {
    "qkv": (D, (D, KV, KV), False),
    "o": (D, (D,), False),
    "gate_up_act": (D, (FFN, FFN), True),
    "down": (FFN, (D,), False),
    "lm_head": (D, (VOCAB,), False),
}
P_LIST = [0.0, 0.25, 0.5, 0.65, 0.8]
FORMATS = ("int8", "int4")
CHECKS: list[dict] = []  # every tuning candidate against the reference (p = 0.5)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def time_graph(fn, rep_ms=60):
    """Median microseconds of one CUDA-graph replay of ``fn`` (bench_kernels.bench_graph)."""
    return bench_graph(fn, rep_ms)[0]


def make(name, fmt, group, seed=0):
    k, splits, pair = CASES[name]
    n = sum(splits)
    g = torch.Generator(device="cuda").manual_seed(seed)
    w = (torch.randn(k, n, device="cuda", generator=g) / math.sqrt(k)).to(torch.bfloat16)
    if fmt == "int8":
        qw = quantize_int8(w, splits)
    else:
        qw = quantize_int4(w, group, splits, zero_point=True)
    x = torch.randn(1, k, device="cuda", generator=g).to(torch.bfloat16)
    return qw, w, x, splits, pair


def thresholds(x, p, nseg):
    if p <= 0:
        return None
    t = float(torch.quantile(x.float().abs().flatten(), p))
    return torch.full((nseg,), t, device="cuda")


def call(qw, x, t, splits, pair, cfg=None):
    if pair:
        return lambda: tq.quant_gate_up_act(
            x, qw.qweight, qw.scales, qw.zeros, t, "silu", qw.group_size, None, cfg
        )
    return lambda: tq.quant_gemv(
        x, qw.qweight, qw.scales, qw.zeros, t, splits, qw.group_size, None, cfg
    )


def reference(qw, x, t, splits, pair):
    w = qw.dequantize(torch.float32)
    if t is None:
        t = torch.full((len(splits),), float("-inf"), device="cuda")
    if pair:
        return ref.sparse_gate_up_act(x, w, t, "silu")
    return ref.sparse_linear_fused(x, w, t, splits)


def check(group):
    rows = []
    for fmt in FORMATS:
        for name in CASES:
            qw, _, x, splits, pair = make(name, fmt, group)
            for p in (0.0, 0.5):
                for b in (1, 4) if name in ("qkv", "down") else (1,):
                    xb = x if b == 1 else torch.randn(b, x.shape[1], device="cuda").bfloat16()
                    t = thresholds(xb, p, len(splits))
                    y = call(qw, xb, t, splits, pair)().float()
                    r = reference(qw, xb, t, splits, pair).float()
                    err = float((y - r).norm() / r.norm().clamp_min(1e-12))
                    rows.append(
                        {"format": fmt, "case": name, "sparsity": p, "batch": b,
                         "rel_err": err, "ok": err < 2e-2}
                    )  # fmt: skip
                    log(f"check {fmt} {name} p={p} b={b}: rel err {err:.2e}")
            del qw
    return rows


def candidates(fmt, k, n, pair, family="all"):
    """The table's entry and a small search; ``family="scalar"``: the entry and the
    walks over kept rows as scalars only (a shorter A/B)."""
    n_eff = n // 2 if pair else n
    out = [tg.get_config(k, n, fmt, 1, pair)]

    def split_for(block_n, waves, min_rows):
        blocks = -(-n_eff // block_n)
        return max(1, min(-(-waves * 132 // blocks), -(-k // min_rows)))

    table_walks = (
        (512, 16, 2, 4, True),
        (512, 16, 4, 4, True),
        (512, 16, 4, 4, False),
        (512, 32, 4, 8, False),
        (256, 32, 4, 4, True),
        (256, 32, 8, 4, False),
        (128, 64, 8, 4, False),
    )
    for block_n, rows, waves, warps, pre in table_walks if family == "all" else ():
        if block_n > max(32, 2 * n_eff):
            continue
        split = split_for(block_n, waves, 128 if fmt == "int4" else 64)
        out.append(tg.GemvConfig(block_n, rows, split, warps, 1, False, pre))
    if fmt == "int8":
        # The peeled walk, and the row-sum walk (16 int8 columns per thread, warps along
        # N: 512 columns a warp), as in the bf16 search of bench_kernels.py --site-tune.
        peeled = ((512, 4, 2, False), (512, 4, 4, False), (1024, 2, 2, True), (2048, 4, 2, True))
        for block_n, warps, waves, rs in peeled if family == "all" else ():
            if block_n > max(32, 2 * n_eff):
                continue
            split = split_for(block_n, waves, 64)
            out.append(tg.GemvConfig(block_n, 16, split, warps, 1, False, False, rs, True))
        # Kept rows as scalars (won q|k|v, gate|up and lm_head on an H100, 2026-12-07), with
        # and without the next step's channels loaded ahead; since 2026-12-08 also 512
        # columns with 32 rows a step (twice the bytes in flight a thread) or two waves
        # (longer chunks of K, fewer split-K partials).
        int8_walks = ((512, 16, 4), (512, 32, 4), (512, 16, 2), (512, 32, 2), (1024, 16, 4),
                      (1024, 8, 4), (2048, 8, 2))  # fmt: skip
        for block_n, rows, waves in int8_walks:
            if block_n > max(32, 2 * n_eff):
                continue
            split = split_for(block_n, waves, 64)
            for pre in (False, True):
                out.append(tg.GemvConfig(block_n, rows, split, 4, prefetch=pre, scalar_rows=True))
    else:
        # Rows as scalars (scalar_rows): block_n / 2 bytes of each kept row per program, a
        # few bytes a thread, 1-D accumulators; with and without the next step's channels
        # loaded ahead. The shapes that won or came within 10 % on the H100 (2026-12-07;
        # 512-column runs, one wave, or two warps lost by 1.5-4x).
        for block_n, rows, waves in ((1024, 16, 2), (1024, 16, 4), (1024, 32, 2), (1024, 32, 4),
                                     (2048, 8, 4)):  # fmt: skip
            if block_n > max(32, 2 * n_eff):
                continue
            split = split_for(block_n, waves, 128)
            for pre in (False, True):
                out.append(tg.GemvConfig(block_n, rows, split, 4, prefetch=pre, scalar_rows=True))
    return list(dict.fromkeys(out))


def tune(group, formats=FORMATS, family="all"):
    """Pick, per (format, case), the config with the least time at p = 0 plus p = 0.5."""
    winners = {}
    for fmt in formats:
        for name in CASES:
            k, splits, pair = CASES[name]
            n = sum(splits)
            qw, _, x, _, _ = make(name, fmt, group)
            t_half = thresholds(x, 0.5, len(splits))
            want = reference(qw, x, t_half, splits, pair).float()
            res = []
            for cfg in candidates(fmt, k, n, pair, family):
                try:
                    # Every candidate must match the reference before it is timed.
                    got = call(qw, x, t_half, splits, pair, cfg)().float()
                    err = float((got - want).norm() / want.norm().clamp_min(1e-12))
                    CHECKS.append({"format": fmt, "case": name, **cfg.__dict__, "rel_err": err})
                    if not err < 2e-2:
                        log(f"tune {fmt} {name} {cfg}: wrong (rel err {err:.2e}), skipped")
                        continue
                    us = 0.0
                    for p in (0.0, 0.5):
                        t = thresholds(x, p, len(splits))
                        us += time_graph(call(qw, x, t, splits, pair, cfg), 30)
                except Exception as e:  # noqa: BLE001 - report and go on
                    log(f"tune {fmt} {name} {cfg}: failed {e}")
                    continue
                CHECKS[-1]["us_p0_plus_p50"] = round(us, 2)
                res.append((us, cfg))
                log(f"tune {fmt} {name} {cfg}: {us:.1f} us (p=0 + p=0.5)")
            best = min(res, key=lambda r: r[0])[1]
            tg.set_config(k, n, fmt, best, 1, pair)
            winners[f"{fmt}:{name}"] = {"K": k, "N": n, "pair": pair, **best.__dict__}
            del qw
    return winners


def bench_kernels(group):
    rows = []
    for name in CASES:
        k, splits, pair = CASES[name]
        n = sum(splits)
        by_fmt = {fmt: make(name, fmt, group) for fmt in FORMATS}
        w = by_fmt["int8"][1]
        x = by_fmt["int8"][2]
        wn = w.t().contiguous()
        cublas = min(
            time_graph(lambda x=x, w=w: x @ w),
            time_graph(lambda x=x, wn=wn: torch.nn.functional.linear(x, wn)),
        )
        for p in P_LIST:
            t = thresholds(x, p, len(splits))
            keep = (x.float().abs() > (t[0] if t is not None else -1)).flatten()
            kept = int(keep.sum())
            idx = keep.nonzero().flatten()
            wc, xc = w[idx].contiguous(), x[:, idx].contiguous()
            compact = time_graph(lambda xc=xc, wc=wc: xc @ wc) if kept else 0.0
            row = {
                "case": name,
                "K": k,
                "N": n,
                "sparsity": p,
                "kept_fraction": kept / k,
                "cublas_us": round(cublas, 2),
                "cublas_compact_us": round(compact, 2),
            }
            for fmt in FORMATS:
                qw = by_fmt[fmt][0]
                us = time_graph(call(qw, x, t, splits, pair))
                wbytes = qw.nbytes * kept / k
                row[f"{fmt}_us"] = round(us, 2)
                row[f"{fmt}_gbps"] = round(wbytes / us / 1e3, 1)
            rows.append(row)
            times = [f"{kk}={v}" for kk, v in row.items() if kk.endswith("_us")]
            log(f"kernels {name} p={p}: " + ", ".join(times))
        del by_fmt
    # Speed-ups against our own dense kernel of the same format.
    for r in rows:
        d = next(q for q in rows if q["case"] == r["case"] and q["sparsity"] == 0)
        for fmt in FORMATS:
            r[f"{fmt}_speedup_vs_dense"] = round(d[f"{fmt}_us"] / r[f"{fmt}_us"], 3)
    return rows


def decode(group, new_tokens, repeats, sparsities, formats, on_result):
    from teal.bench import bench_decode, calibration_thresholds
    from teal.model.build import random_model
    from teal.model.config import PRESETS

    out = []
    for fmt in formats:
        model = random_model(PRESETS["llama-3-8b"], dtype=torch.bfloat16, device="cuda")
        model.source = "random llama-3-8b"
        # Thresholds from the unquantized model (random tokens), as for text models.
        table = calibration_thresholds(model, [p for p in sparsities if p > 0], progress=False)
        if fmt != "none":
            model.quantize(fmt, group_size=group)
        torch.cuda.empty_cache()
        t0 = time.time()
        obj = bench_decode(
            model,
            device="cuda",
            sparsities=sparsities,
            new_tokens=new_tokens,
            thresholds=table,
            repeats=repeats,
            progress=False,
            model_name="llama-3-8b shapes, random weights",
        )
        obj["quant"] = None if fmt == "none" else model.quant.label()
        obj["lm_head_quantized"] = fmt != "none"
        obj["seconds"] = round(time.time() - t0, 1)
        speeds = [
            f"{r['path']} p={r['sparsity']}: {r['tokens_per_second']}" for r in obj["results"]
        ]
        log(f"decode {fmt}: " + ", ".join(speeds))
        out.append(obj)
        on_result(out)
        del model
        torch.cuda.empty_cache()
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--tag", default="h200")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument(
        "--phases",
        default="check,tune,kernels,decode",
        help="run in this order (check, tune, pin, kernels, decode); decode may appear twice "
        "(before and after tune or pin: an A/B)",
    )
    ap.add_argument("--pin", default=None, help="configs JSON for the pin phase")
    ap.add_argument("--tune-formats", default="int8,int4")
    ap.add_argument("--tune-family", default="all", choices=("all", "scalar"))
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--decode-sparsity", default="0,0.5")
    ap.add_argument("--decode-formats", default="int4,int8", help="none (bf16), int8, int4")
    args = ap.parse_args()
    phases = args.phases.split(",")
    import triton

    head = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "dtype": "bf16",
        "group_size": args.group_size,
    }

    def save(kind, obj):
        path = os.path.join(args.out_dir, f"quant-{kind}-{args.tag}.json")
        with open(path, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")

    winners = {}
    decodes = 0
    for phase in phases:
        if phase == "check":
            rows = check(args.group_size)
            save("check", {**head, "all_ok": all(r["ok"] for r in rows), "results": rows})
        elif phase == "tune":
            formats = tuple(args.tune_formats.split(","))
            winners = tune(args.group_size, formats, args.tune_family)
            save("configs", {**head, "configs": winners, "candidate_checks": CHECKS})
        elif phase == "pin":
            # Configs from a file ({"configs": {"int8:qkv": {"K", "N", "pair", fields...}}},
            # what the tune phase saves), so that decode,pin,decode is an A/B in one process.
            with open(args.pin) as f:
                pinned = json.load(f)["configs"]
            for key, c in pinned.items():
                tg.set_config(c["K"], c["N"], key.split(":")[0], config_from(c), 1, c["pair"])
            winners = pinned
            log(f"pinned {len(pinned)} configs from {args.pin}")
        elif phase == "kernels":
            rows = bench_kernels(args.group_size)
            obj = {**head, "configs": winners, "candidate_checks": CHECKS, "results": rows}
            save("kernels", obj)
        elif phase == "decode":
            levels = [float(p) for p in args.decode_sparsity.split(",")]
            formats = args.decode_formats.split(",")
            kind = "decode" if decodes == 0 else f"decode{decodes + 1}"
            top = {**head, "configs": winners or "built-in tables"}
            decodes += 1
            decode(args.group_size, args.new_tokens, args.repeats, levels, formats,
                   lambda objs, kind=kind, top=top: save(kind, {**top, "runs": objs}))  # fmt: skip
        else:
            raise SystemExit(f"unknown phase {phase!r}")


if __name__ == "__main__":
    main()
