"""Sparse GEMV kernels against cuBLAS, dense and on the compacted matrix (accelerator only).

    PYTHONPATH=src python benchmarks/bench_kernels.py --out results/kernels-h100-DATE.json
    PYTHONPATH=src python benchmarks/bench_kernels.py --tune --out ...  # search configs first
    # where decoding runs them: each launch 32 times over distinct weights in one CUDA
    # graph, against cuBLAS dense and compacted; --graph-tune adds the 4-launch layer
    PYTHONPATH=src python benchmarks/bench_kernels.py --site-tune ST.json --graph-tune L.json
    PYTHONPATH=src python benchmarks/bench_kernels.py --floors F.json  # fixed cost per launch

Kernel names in the result rows:
  sparse               sparse_gemv, one weight (q, k, v, o, gate, up or down alone)
  sparse_qkv           sparse_gemv_fused over q|k|v (one launch)
  sparse_qkv_separate  three sparse_gemv launches (q, k, v) timed together
  sparse_gate_up       sparse_gemv_fused over gate|up (one launch, both outputs)
  sparse_gate_up_act   sparse_gate_up_act: act(gate) * up in the epilogue (silu)
Columns: time_us is our kernel; cublas_time_us is torch.matmul on the dense matrix
(the faster of the two weight layouts, [K, N] and [N, K]); compact_time_us is cuBLAS on
the compacted matrix, a dense GEMV over only the kept rows, which reads exactly what a
perfect sparse kernel reads (also the faster layout). For sparse_gate_up_act the
cuBLAS figures are the gate|up matmul alone (no activation). Every call is captured in
a CUDA graph and timed by replaying it with triton.testing.do_bench (median, L2 flushed
by a 256 MB write before each replay), so launch overhead is what decoding sees.
effective_gbps counts the kept weight rows, the input and the output.
"""

import argparse
import dataclasses
import datetime
import json
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time

import torch
import triton
import triton.language as tl

from teal.kernels import reference as ref
from teal.kernels import triton_gemv as tg

D, FFN3, FFN2, KV = 4096, 14336, 11008, 1024
P_LIST = [0.0, 0.25, 0.4, 0.5, 0.65, 0.8, 0.9]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# name -> (kernel, K, splits, pair). N is sum(splits).
CASES = {
    "l3.qkv": ("sparse_qkv", D, (D, KV, KV), False),
    "l3.qkv_separate": ("sparse_qkv_separate", D, (D, KV, KV), False),
    "l3.q_o": ("sparse", D, (D,), False),
    "l3.k_v": ("sparse", D, (KV,), False),
    "l3.gate_up": ("sparse_gate_up", D, (FFN3, FFN3), False),
    "l3.gate_up_act": ("sparse_gate_up_act", D, (FFN3, FFN3), True),
    "l3.up": ("sparse", D, (FFN3,), False),
    "l3.down": ("sparse", FFN3, (D,), False),
    "l2.qkv": ("sparse_qkv", D, (D, D, D), False),
    "l2.gate_up": ("sparse_gate_up", D, (FFN2, FFN2), False),
    "l2.gate_up_act": ("sparse_gate_up_act", D, (FFN2, FFN2), True),
    "l2.up": ("sparse", D, (FFN2,), False),
    "l2.down": ("sparse", FFN2, (D,), False),
}
# One tuning target per distinct launch (k_v and q_o also cover qkv_separate).
TUNE_CASES = [
    "l3.qkv",
    "l3.q_o",
    "l3.k_v",
    "l3.gate_up",
    "l3.gate_up_act",
    "l3.up",
    "l3.down",
    "l2.gate_up",
    "l2.gate_up_act",
    "l2.up",
    "l2.down",
]
BATCH_CASES = ["l3.qkv", "l3.gate_up_act", "l3.down"]
TUNE_BATCH = 4  # batches 2..16 share one kernel (the dot tile is padded to 16 rows)


def bench_graph(fn, rep_ms):
    """Median microseconds of one replay of ``fn`` captured in a CUDA graph, L2 flushed.

    rep_ms=0 captures without timing. Returns (us, graph, the graph's output).
    """
    from triton.testing import do_bench

    fn()  # compile, allocate ticket counters, warm cuBLAS
    torch.cuda.synchronize()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    torch.cuda.synchronize()
    if not rep_ms:
        return float("nan"), g, out
    ms = do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median")
    return ms * 1e3, g, out


def threshold_for(x, p):
    if p <= 0.0:
        return -1.0
    return float(torch.quantile(x.float().abs().flatten(), p))


def make_case(name, dtype, b=1, seed=0):
    kernel, k, splits, pair = CASES[name]
    n = sum(splits)
    g = torch.Generator(device="cuda").manual_seed(seed)
    wt = torch.randn(k, n, device="cuda", generator=g, dtype=torch.float32) / math.sqrt(k)
    wt = wt.to(dtype)
    x = torch.randn(b, k, device="cuda", generator=g, dtype=torch.float32).to(dtype)
    return kernel, k, splits, pair, x, wt


def our_fn(kernel, x, wt, t, splits, cfg=None):
    if kernel == "sparse_gate_up_act":
        return lambda: tg.sparse_gate_up_act(x, wt, t, "silu", config=cfg)
    if kernel == "sparse_qkv_separate":
        views = []
        start = 0
        for w in splits:
            views.append(wt[:, start : start + w].contiguous())
            start += w
        t1 = t[:1]
        return lambda: [tg.sparse_gemv(x, v, t1) for v in views]
    if len(splits) == 1:
        return lambda: tg.sparse_gemv(x, wt, t[:1], config=cfg)
    return lambda: tg.sparse_gemv_fused(x, wt, t, splits, config=cfg)


def ref_out(kernel, x, wt, t, splits):
    if kernel == "sparse_gate_up_act":
        return ref.sparse_gate_up_act(x, wt, t, "silu")
    if kernel == "sparse_qkv_separate":
        return ref.sparse_linear_fused(x, wt, t, splits)
    return ref.sparse_linear_fused(x, wt, t, splits)


def cublas_fns(x, wt, splits, separate):
    """matmul on [K, N] (x @ wt) and on [N, K] (F.linear), per segment when separate."""
    if separate:
        parts, start = [], 0
        for w in splits:
            parts.append(wt[:, start : start + w].contiguous())
            start += w
    else:
        parts = [wt]
    wn = [p.t().contiguous() for p in parts]
    f_kn = lambda: [x @ p for p in parts]  # noqa: E731
    f_nk = lambda: [torch.nn.functional.linear(x, w) for w in wn]  # noqa: E731
    return f_kn, f_nk


def rel_err(y, r):
    y, r = y.float(), r.float()
    return float((y - r).norm() / r.norm().clamp_min(1e-12))


# --------------------------------------------------------------------------- compile


def _compile_jobs(work):
    """Worker: run each (case, dtype, b, cfg) once so its kernel lands in Triton's cache."""
    pins, jobs = work
    for k, n, dt, cfg, b, pair in pins:
        tg.set_config(k, n, DTYPES[dt], cfg, b, pair)
    torch.cuda.set_device(0)
    done = 0
    for name, dt, b, cfg in jobs:
        try:
            kernel, k, splits, pair, x, wt = make_case(name, DTYPES[dt], b)
            t = torch.full((len(splits),), 0.5, device="cuda")
            our_fn(kernel, x, wt, t, splits, cfg)()
            torch.cuda.synchronize()
            done += 1
        except Exception as e:  # noqa: BLE001 - report and go on
            print(f"compile failed {name} {cfg}: {e}", file=sys.stderr)
    return done


def parallel_compile(jobs, workers, pins=()):
    if not jobs:
        return 0
    shards = [jobs[i::workers] for i in range(workers)]
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers) as pool:
        return sum(pool.map(_compile_jobs, [(list(pins), s) for s in shards if s]))


# --------------------------------------------------------------------------- phases


def tune_phase(dtype_name, rep_ms, workers, log):
    """Time every candidate at p = 0, 0.5, 0.8 (batch cases at 0.5, 0.9); pin the winners."""
    from triton.testing import do_bench

    dtype = DTYPES[dtype_name]
    plan = {}
    for name in TUNE_CASES:
        _, k, splits, pair = CASES[name]
        plan[(name, 1)] = tg.candidate_configs(k, sum(splits), pair)
    for name in BATCH_CASES:
        _, k, splits, pair = CASES[name]
        plan[(name, TUNE_BATCH)] = tg.candidate_configs(k, sum(splits), pair, TUNE_BATCH)
    t0 = time.time()
    jobs = [(nm, dtype_name, b, c) for (nm, b), cs in plan.items() for c in cs]
    n = parallel_compile(jobs, workers)
    log(f"compiled {n} of {len(jobs)} tuning variants in {time.time() - t0:.0f}s")
    rows, best = [], {}
    for (name, b), cands in plan.items():
        kernel, k, splits, pair, x, wt = make_case(name, dtype, b)
        t = torch.zeros(len(splits), device="cuda")
        ps = [0.0, 0.5, 0.8] if b == 1 else [0.5, 0.9]
        ths = [threshold_for(x, p) for p in ps]
        times = {}
        for cfg in cands:
            try:
                fn = our_fn(kernel, x, wt, t, splits, cfg)
                _, g, _ = bench_graph(fn, 0)
                per_p = []
                for th in ths:
                    t.fill_(th)
                    per_p.append(
                        do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median") * 1e3
                    )
                times[cfg] = per_p
                del g, fn
            except Exception as e:  # noqa: BLE001
                log(f"  {name} b{b} {cfg} failed: {e}")
        if not times:
            continue
        mins = [min(v[i] for v in times.values()) for i in range(len(ps))]
        # Geometric mean of time / best time at each sparsity: good everywhere.
        score = {
            c: math.exp(sum(math.log(v[i] / mins[i]) for i in range(len(ps))) / len(ps))
            for c, v in times.items()
        }
        win = min(score, key=score.get)
        best[(name, b)] = win
        for dt in DTYPES.values():  # same bytes in fp16: the winner holds for both
            tg.set_config(k, sum(splits), dt, win, b, pair)
        for c, v in times.items():
            rows.append(
                {
                    "case": name,
                    "batch": b,
                    "config": vars_cfg(c),
                    "score": score[c],
                    "us": dict(zip(map(str, ps), v)),
                }
            )
        log(
            f"tune {name:16s} b{b} best {win} score {score[win]:.3f} us "
            + " ".join(f"{u:.1f}" for u in times[win])
            + f" (per-p best {' '.join(f'{m:.1f}' for m in mins)})"
        )
        del x, wt
        torch.cuda.empty_cache()
    return rows, best


def vars_cfg(c):
    return dataclasses.asdict(c)


def bench_case(name, dtype_name, b, p_list, rep_ms, log):
    dtype = DTYPES[dtype_name]
    kernel, k, splits, pair, x, wt = make_case(name, dtype, b, seed=1)
    n = sum(splits)
    esize = wt.element_size()
    separate = kernel == "sparse_qkv_separate"
    t = torch.zeros(len(splits), device="cuda")
    us_dense = min(bench_graph(f, rep_ms)[0] for f in cublas_fns(x, wt, splits, separate))
    # Hold fn: its closure owns tensors the graph reads (the per-weight copies of
    # qkv_separate); dropped, their memory would be reused under the graph.
    fn = our_fn(kernel, x, wt, t, splits)
    _, g, out = bench_graph(fn, 0)
    rows = []
    from triton.testing import do_bench

    for p in p_list:
        t.fill_(threshold_for(x, p))
        keep = ref.keep_mask(x, t[0]).any(dim=0)
        kept = int(keep.sum())
        # Correctness of this very graph against the reference.
        g.replay()
        torch.cuda.synchronize()
        y = torch.cat(out, dim=-1) if isinstance(out, list) else out
        err = rel_err(y, ref_out(kernel, x, wt, t, splits))
        us = do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median") * 1e3
        if kept > 0:
            xc = x[:, keep].contiguous()
            wc = wt[keep].contiguous()
            us_c = min(bench_graph(f, rep_ms)[0] for f in cublas_fns(xc, wc, splits, separate))
            del xc, wc
        else:
            us_c = float("nan")
        n_out = n // 2 if pair else n
        nbytes = kept * n * esize + x.numel() * esize + b * n_out * esize
        row = {
            "kernel": kernel,
            "case": name,
            "shape": [n, k],
            "dtype": dtype_name,
            "batch": b,
            "sparsity": p,
            "measured_sparsity": 1.0 - kept / k,
            "time_us": round(us, 2),
            "cublas_time_us": round(us_dense, 2),
            "compact_time_us": round(us_c, 2),
            "ratio_to_compact": round(us / us_c, 3) if kept else None,
            "ratio_to_dense": round(us / us_dense, 3),
            "effective_gbps": round(nbytes / us / 1e3, 1),
            "rel_err": err,
            "ok": err < (2e-2 if dtype == torch.bfloat16 else 5e-3),
            "config": vars_cfg(tg.get_config(k, n, dtype, b, pair)) if not separate else None,
        }
        rows.append(row)
        log(
            f"{name:18s} {dtype_name} b{b} p={p:.2f} (meas {row['measured_sparsity']:.3f}) "
            f"ours {us:7.1f} dense {us_dense:7.1f} compact {us_c:7.1f} "
            f"r_c {row['ratio_to_compact']} r_d {row['ratio_to_dense']} "
            f"{row['effective_gbps']:.0f} GB/s err {err:.1e}"
        )
    # Fixed cost: every input dropped (launch, compaction, split-K reduction, epilogue).
    t.fill_(1e4)
    floor = do_bench(g.replay, warmup=5, rep=rep_ms, return_mode="median") * 1e3
    for row in rows:
        row["floor_us"] = round(floor, 2)
    locks = tg._LOCKS.get(("cuda", 0))
    if locks is not None and int((locks != 0).sum()):
        log(f"WARNING: {int((locks != 0).sum())} split-K tickets left nonzero after {name}")
    log(f"{name:18s} {dtype_name} b{b} floor (all inputs dropped) {floor:.1f} us")
    del g, x, wt, out, fn
    torch.cuda.empty_cache()
    return rows


def print_table(rows):
    cases = []
    for r in rows:
        key = (r["case"], r["dtype"], r["batch"])
        if key not in cases:
            cases.append(key)
    print("\nratio ours / cuBLAS-on-compacted (ours us / compacted us); p=0 vs dense")
    for key in cases:
        rs = [r for r in rows if (r["case"], r["dtype"], r["batch"]) == key]
        cells = []
        for r in rs:
            if r["sparsity"] == 0.0:
                cells.append(f"p0 {r['time_us']:.1f}/{r['cublas_time_us']:.1f}")
            else:
                cells.append(f"{r['sparsity']:.2f}:{r['time_us']:.1f}/{r['compact_time_us']:.1f}")
        bad = [r for r in rs if not r["ok"]]
        print(f"{key[0]:18s} {key[1]} b{key[2]} " + "  ".join(cells) + ("  WRONG" if bad else ""))


# --------------------------------------------------------------------------- in-graph tuning

# The four launches of a Llama-3-8B decoder layer, in decode order.
GRAPH_SITES = ["l3.qkv", "l3.q_o", "l3.gate_up_act", "l3.down"]
GRAPH_P = [0.4, 0.5]  # scored sparsities; 0.25, 0.65 and "all dropped" are reported too


def _variants(base):
    from dataclasses import replace

    out = [base]
    for sk in (max(1, round(base.split_k * 0.5)), round(base.split_k * 1.5)):
        out.append(replace(base, split_k=sk))
    if base.block_n == 512:
        out.append(replace(base, block_n=256))
        out.append(replace(base, block_n=256, split_k=max(1, base.split_k // 2)))
    out.append(replace(base, prefetch=not base.prefetch))
    out.append(replace(base, rows=32))
    out.append(replace(base, num_warps=8))
    return list(dict.fromkeys(out))  # in order, each config once


def graph_tune(dtype_name, workers, log, n_layers=32, pyt=None, only_final=False):
    """Tune the batch-1 configurations where they run: a CUDA graph replaying the four
    projections of ``n_layers`` layers back to back (distinct weights per layer, so
    nothing stays in L2 but the inputs, as in decoding), timed per replay with CUDA
    events. Scores the sum over GRAPH_P of the per-layer time: each site's candidates in
    turn with the other sites at their best (a switch needs a 1 % gain), then the table
    against the winners at every reported sparsity. Returns a JSON-able dict.

    H100, 2026-11-23 (results/kernels-graph-tune-h100-2026-11-23.json): no neighbour of
    the table beat it in the graph, so the table stands; programmatic dependent launch
    (tl.extra.cuda.gdc_wait + launch_pdl, tried then) gained nothing and was removed."""
    dtype = DTYPES[dtype_name]
    base, pinned = {}, {}
    for name in GRAPH_SITES:
        _, k, splits, pair = CASES[name]
        n = sum(splits)
        dev = torch.device("cuda")
        base[name] = tg._TABLE.get((k, n, pair, 1)) or tg._heuristic(k, n, pair, 1, dev)
        pinned[name] = tg.get_config(k, n, dtype, 1, pair)
    # only_final: the configurations pinned now (site_tune's winners) against the table.
    cands = {nm: [] if only_final else _variants(base[nm]) for nm in GRAPH_SITES}
    jobs = [(nm, dtype_name, 1, c) for nm in GRAPH_SITES for c in cands[nm]]
    t0 = time.time()
    parallel_compile(jobs, workers)
    log(f"graph-tune: compiled {len(jobs)} launches in {time.time() - t0:.0f}s")
    if pyt is not None:
        outp, _ = pyt.communicate()
        log("pytest (native):\n" + outp.decode()[-3000:])

    gen = torch.Generator(device="cuda").manual_seed(7)
    sites = {}
    for name in GRAPH_SITES:
        sites[name] = _chain(name, dtype, n_layers, gen)

    def set_p(p):
        for _kernel, _splits, _ws, x, t in sites.values():
            t.fill_(1e30 if p >= 1 else threshold_for(x, p))

    def run(cfgs):
        outs = []
        for layer in range(n_layers):
            for name in GRAPH_SITES:
                kernel, splits, ws, x, t = sites[name]
                outs.append(our_fn(kernel, x, ws[layer], t, splits, cfgs[name])())
        return outs

    def measure(cfgs, ps=GRAPH_P, reps=12):
        set_p(0.5)
        run(cfgs)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            run(cfgs)
        res = {}
        for p in ps:
            set_p(p)
            for _ in range(3):
                g.replay()
            res[p] = _replays(g, n_layers, reps)
        del g
        return res

    def score(r):
        return sum(r[p] for p in GRAPH_P)

    out = {"dtype": dtype_name, "layers": n_layers, "scored_p": GRAPH_P, "rows": []}
    best = dict(pinned if only_final else base)
    cur = score(measure(best))
    # 1. Coordinate descent over sites.
    for name in GRAPH_SITES:
        for c in cands[name]:
            if c == best[name]:
                continue
            trial = dict(best)
            trial[name] = c
            try:
                r = measure(trial)
            except Exception as e:  # noqa: BLE001 - report and go on
                log(f"graph-tune: {name} {c} failed: {e!r}")
                continue
            sc = score(r)
            out["rows"].append({"site": name, **vars_cfg(c), "us_per_layer": r, "score": sc})
            log(f"graph-tune: {name} {vars_cfg(c)} {sc:.2f} (best {cur:.2f})")
            if sc < 0.99 * cur:
                best[name], cur = c, sc
    # 2. Base against the winners, alternated, at every reported sparsity.
    ps = [0.25, 0.4, 0.5, 0.65, 1.0]
    fin = {"base": [], "best": []}
    for _ in range(2):
        fin["base"].append(measure(base, ps))
        fin["best"].append(measure(best, ps))
    out["final_us_per_layer"] = fin
    if only_final:
        out["cublas_us_per_layer"] = cublas_layer(sites, set_p, ps, n_layers)
        log(f"graph-tune: cuBLAS per layer {out['cublas_us_per_layer']}")
    out["base"] = {nm: vars_cfg(c) for nm, c in base.items()}
    out["best"] = {nm: vars_cfg(c) for nm, c in best.items()}
    log(f"graph-tune: base {fin['base']}\n best {fin['best']}\n configs {out['best']}")
    return out


# --------------------------------------------------------------------------- per-site graph tuning


@triton.jit
def _noop_kernel(y_ptr):
    if tl.program_id(0) + tl.program_id(1) == 0:
        tl.store(y_ptr, 1.0)


def _floor(name, dtype, n_layers, gen):
    kernel, splits, ws, x, t = _chain(name, dtype, n_layers, gen)
    _, k, _, pair = CASES[name]
    cfg = tg.get_config(k, sum(splits), dtype, 1, pair)
    t.fill_(1e30)
    ours = _time_graph(lambda: [our_fn(kernel, x, w, t, splits, cfg)() for w in ws], n_layers)
    grid_n = sum(-(-w // cfg.block_n) for w in (splits[:1] if pair else splits))
    grid = (grid_n, -(-k // -(-k // cfg.split_k)))
    y = torch.empty(1, device="cuda")
    empty = _time_graph(lambda: [_noop_kernel[grid](y) for _ in ws], n_layers)
    x16 = x[:, :16].contiguous()
    w16 = [w[:16].contiguous() for w in ws]
    cub = _time_graph(lambda: [x16 @ w for w in w16], n_layers)
    return {
        "config": vars_cfg(cfg),
        "grid": list(grid),
        "ours_all_dropped_us": ours[0],
        "empty_kernel_us": empty[0],
        "cublas_16_rows_us": cub[0],
    }


def floors(dtype_name, log, n_layers=32, cases=None):
    """Per launch, in a CUDA graph of ``n_layers`` launches over distinct weights: our
    kernel (the table's configuration) with every input dropped; an empty Triton kernel
    on the same grid (what launching alone costs); cuBLAS on 16 kept rows (its floor)."""
    gen = torch.Generator(device="cuda").manual_seed(5)
    out = {}
    for name in cases or GRAPH_SITES:
        out[name] = _floor(name, DTYPES[dtype_name], n_layers, gen)
        log(f"floor {name:15s} {out[name]}")
        torch.cuda.empty_cache()
    return out


SITE_CASES = [
    "l3.qkv",
    "l3.q_o",
    "l3.gate_up_act",
    "l3.down",
    "l2.qkv",
    "l2.gate_up_act",
    "l2.down",
]
SITE_P = [0.0, 0.25, 0.4, 0.5, 0.65]  # what teal bench runs; the score sums them


def site_candidates(name, sms, family="all"):
    """A small search over six loop structures, each at the split-K counts that make
    one to four CTAs per SM (rounded down, so a launch never spills into a partial
    second wave where it fits: a few leftover CTAs cost a whole extra pass):
    the table's 2-D accumulator over 512-wide row runs (peeled, or double-buffered),
    and the row-sum walk (8 columns per thread, warps along N) at 1024 (4 warps;
    16 rows a step peeled or double-buffered, 32 peeled) and 512 (2 warps) columns;
    the walk over kept rows as scalars at 512, 1024 and 2048 columns, with and without
    the next step loaded ahead. Plus the table's entry. ``family="scalar"``: only the
    table's entry and the scalar-row walks (a shorter A/B)."""
    _, k, splits, pair = CASES[name]
    n = sum(splits)
    base = tg.get_config(k, n, torch.bfloat16, 1, pair)
    out = [base]

    def blocks(block_n):
        return sum(-(-w // block_n) for w in (splits[:1] if pair else splits))

    shapes = [
        # block_n, rows, warps, prefetch, row_sum, peel
        (512, 16, 4, False, False, True),
        (512, 16, 4, True, False, False),
        (1024, 16, 4, False, True, True),
        (1024, 16, 4, True, True, False),
        (1024, 32, 4, False, True, True),
        (512, 16, 2, False, True, True),
    ]
    if pair:
        # The gate|up walk over one shared list loads two runs a step: narrower blocks
        # keep its two accumulators in registers.
        shapes += [(256, 16, 4, False, False, True), (256, 32, 4, False, False, True)]
    for block_n, rows, warps, pre, rs, peel in shapes if family == "all" else ():
        nb = blocks(block_n)
        for per_sm in (1, 2, 3, 4):
            sk = max(1, min(per_sm * sms // nb, k // 64))
            out.append(tg.GemvConfig(block_n, rows, sk, warps, 1, False, pre, rs, peel))
    # Kept rows as scalars (2026-12-07; won every int4 shape, not yet timed here).
    for block_n, rows in ((512, 16), (1024, 16), (2048, 8)):
        nb = blocks(block_n)
        for per_sm in (2, 4):
            sk = max(1, min(per_sm * sms // nb, k // 64))
            for pre in (False, True):
                out.append(tg.GemvConfig(block_n, rows, sk, 4, prefetch=pre, scalar_rows=True))
    return list(dict.fromkeys(out))  # in order, each config once


def _chain(name, dtype, n_layers, gen):
    kernel, k, splits, pair = CASES[name]
    n = sum(splits)
    ws = [
        torch.empty(k, n, device="cuda", dtype=dtype).normal_(0, k**-0.5, generator=gen)
        for _ in range(n_layers)
    ]
    x = torch.randn(1, k, device="cuda", generator=gen, dtype=torch.float32).to(dtype)
    t = torch.zeros(2 if pair else len(splits), device="cuda")
    return kernel, splits, ws, x, t


def _time_graph(run, n_calls, reps=15):
    """Median microseconds per call of a CUDA graph of ``n_calls`` launches."""
    run()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = run()
    for _ in range(3):
        g.replay()
    return _replays(g, n_calls, reps), g, out


def _replays(g, n_calls, reps=15):
    """Median microseconds per call over ``reps`` replays of graph ``g``."""
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) * 1e3 / n_calls)
    return sorted(ts)[len(ts) // 2]


def _cublas_chain(x, mats):
    """cuBLAS over a list of weights, both layouts ([K, N]: x @ w; [N, K]: F.linear);
    the faster median microseconds per call."""
    n = len(mats)
    us = _time_graph(lambda: [x @ m for m in mats], n)[0]
    nk = [m.t().contiguous() for m in mats]
    us_nk = _time_graph(lambda: [torch.nn.functional.linear(x, m) for m in nk], n)[0]
    return min(us, us_nk)


def _site_row(kernel, x, ws, t, splits, cfg, ths, tol):
    row = {**vars_cfg(cfg), "us": {}}
    t.fill_(ths[SITE_P.index(0.5)])
    _, g, outs = _time_graph(lambda: [our_fn(kernel, x, w, t, splits, cfg)() for w in ws], 1, 1)
    g.replay()
    torch.cuda.synchronize()
    o0 = torch.cat(outs[0], -1) if isinstance(outs[0], list) else outs[0]
    row["rel_err_p0.5"] = rel_err(o0, ref_out(kernel, x, ws[0], t, splits))
    row["ok"] = row["rel_err_p0.5"] < tol
    for p, th in zip(SITE_P, ths):
        t.fill_(th)
        for _ in range(3):
            g.replay()
        row["us"][str(p)] = _replays(g, len(ws))
    row["score"] = sum(row["us"].values())
    return row


def site_tune(dtype_name, workers, log, n_layers=32, cases=None, family="all"):
    """Each site's candidates timed where they run: a CUDA graph of ``n_layers`` launches
    of that site over distinct weights (only the input stays in L2, as in decoding), at
    each of SITE_P; cuBLAS on the dense and on the compacted matrices (same kept rows)
    the same way. Pins and returns the candidate with the least summed time per site."""
    dtype = DTYPES[dtype_name]
    tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    cases = cases or SITE_CASES
    cands = {nm: site_candidates(nm, sms, family) for nm in cases}
    jobs = [(nm, dtype_name, 1, c) for nm in cases for c in cands[nm]]
    t0 = time.time()
    parallel_compile(jobs, workers)
    log(f"site-tune: compiled {len(jobs)} launches in {time.time() - t0:.0f}s")
    gen = torch.Generator(device="cuda").manual_seed(3)
    res = {"dtype": dtype_name, "layers": n_layers, "p": SITE_P, "sites": {}}
    for name in cases:
        kernel, splits, ws, x, t = _chain(name, dtype, n_layers, gen)
        _, k, _, pair = CASES[name]
        n = sum(splits)
        ths = [threshold_for(x, p) for p in SITE_P]
        site = {"shape": [n, k], "cublas": _cublas_chain(x, ws), "compact": {}, "kept": {}}
        for p, th in zip(SITE_P, ths):
            keep = ref.keep_mask(x, torch.tensor(th, device="cuda")).any(dim=0)
            site["kept"][str(p)] = int(keep.sum())
            site["compact"][str(p)] = _cublas_chain(
                x[:, keep].contiguous(), [w[keep].contiguous() for w in ws]
            )
            torch.cuda.empty_cache()
        site["configs"] = []
        for cfg in cands[name]:
            try:
                row = _site_row(kernel, x, ws, t, splits, cfg, ths, tol)
                msg = " ".join(f"{row['us'][str(p)]:6.1f}" for p in SITE_P)
                msg += f" err {row['rel_err_p0.5']:.1e}"
            except Exception as e:  # noqa: BLE001 - report and go on
                row = {**vars_cfg(cfg), "error": repr(e)[:300]}
                msg = row["error"]
            site["configs"].append(row)
            log(f"{name:15s} {tuple(vars_cfg(cfg).values())} {msg}")
        win = min((r for r in site["configs"] if r.get("ok")), key=lambda r: r["score"])
        site["best"] = {kk: win[kk] for kk in tg.GemvConfig.__dataclass_fields__}
        base = site["configs"][0]["us"]
        for dt in DTYPES.values():
            tg.set_config(k, n, dt, tg.GemvConfig(**site["best"]), 1, pair)
        log(f"{name:15s} cuBLAS dense {site['cublas']:.1f} us/launch; best {site['best']}")
        esize = ws[0].element_size()
        for p in SITE_P:
            us, uc = win["us"][str(p)], site["compact"][str(p)]
            kb = site["kept"][str(p)] * n * esize
            log(
                f"   p={p:.2f} ours {us:6.1f} (table {base[str(p)]:6.1f}) compacted cuBLAS"
                f" {uc:6.1f}: {us / uc:.3f}; {kb / us / 1e3:.0f} vs {kb / uc / 1e3:.0f} GB/s"
            )
        res["sites"][name] = site
        del ws, x
        torch.cuda.empty_cache()
    log("_TABLE entries (paste into src/teal/kernels/triton_gemv.py):")
    for name in cases:
        _, k, splits, pair = CASES[name]
        c = tg.GemvConfig(**res["sites"][name]["best"])
        log(f"    ({k}, {sum(splits)}, {pair}, 1): {c!r},")
    return res


def cublas_layer(sites, set_p, ps, n_layers):
    """cuBLAS per layer (x @ wt, the dense model's layout) in the same chain: dense, and
    on the compacted matrices (each site's kept rows at each sparsity)."""

    def chain(mats):
        def run():
            outs = []
            for layer in range(n_layers):
                for name in GRAPH_SITES:
                    xx, m = mats[name]
                    outs.append(xx @ m[layer])
            return outs

        return _time_graph(run, n_layers)[0]

    res = {"dense": chain({nm: (s[3], s[2]) for nm, s in sites.items()})}
    for p in ps:
        if p >= 1:
            continue
        set_p(p)
        mats = {}
        for nm, (_kernel, _splits, ws, x, t) in sites.items():
            keep = ref.keep_mask(x, t[0]).any(dim=0)
            mats[nm] = (x[:, keep].contiguous(), [w[keep].contiguous() for w in ws])
        res[str(p)] = chain(mats)
        del mats
        torch.cuda.empty_cache()
    return res


def config_from(d):
    """A ``GemvConfig`` from a result file's dict (keys that are not its fields ignored)."""
    return tg.GemvConfig(**{k: v for k, v in d.items() if k in tg.GemvConfig.__dataclass_fields__})


def apply_site_best(res):
    for name, site in res["sites"].items():
        cfg = config_from(site["best"])
        _, k, splits, pair = CASES[name]
        for dt in DTYPES.values():
            tg.set_config(k, sum(splits), dt, cfg, 1, pair)


def apply_graph_tune(path):
    """Pin a graph-tune result's winners (both half dtypes) before a decode benchmark."""
    with open(path) as f:
        res = json.load(f)
    for name, c in res["best"].items():
        cfg = config_from(c)
        _, k, splits, pair = CASES[name]
        for dt in DTYPES.values():
            tg.set_config(k, sum(splits), dt, cfg, 1, pair)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="result JSON path")
    ap.add_argument("--tune", action="store_true", help="search configs before the benchmark")
    ap.add_argument("--tune-out", default=None, help="where to write the tuning JSON")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated case names")
    ap.add_argument("--dtypes", default="bf16,fp16")
    ap.add_argument("--batches", default="2,4,8")
    ap.add_argument("--rep-ms", type=int, default=30)
    ap.add_argument(
        "--graph-tune",
        default=None,
        metavar="JSON",
        help="only tune the Llama-3-8B batch-1 launches inside a 32-layer CUDA graph "
        "(see graph_tune) and write the result here",
    )
    ap.add_argument(
        "--floors",
        default=None,
        metavar="JSON",
        help="only time each decode launch's fixed cost in a 32-launch CUDA graph (see floors)",
    )
    ap.add_argument(
        "--site-tune",
        default=None,
        metavar="JSON",
        help="only tune each batch-1 site in a CUDA graph of 32 launches against cuBLAS "
        "(dense and compacted) and write the result here (see site_tune)",
    )
    ap.add_argument(
        "--site-family",
        default="all",
        choices=("all", "scalar"),
        help="--site-tune's candidates: all, or the table's entry and the scalar-row walks",
    )
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument(
        "--pytest",
        action="store_true",
        help="run tests/test_kernels_triton.py natively alongside the compiles",
    )
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_kernels.py needs a CUDA GPU (the CPU tests cover correctness)")

    logpath = os.path.join(os.path.dirname(args.out), "bench.log") if args.out else None

    def log(msg):
        print(msg, flush=True)
        if logpath:
            with open(logpath, "a") as f:
                f.write(msg + "\n")

    import triton

    meta = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "date": datetime.date.today().isoformat(),
        "sms": torch.cuda.get_device_properties(0).multi_processor_count,
    }
    log(json.dumps(meta))
    pyt = None
    if args.pytest:
        pyt = subprocess.Popen(
            [
                "timeout",
                "120",
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-x",
                "-p",
                "no:cacheprovider",
                "tests/test_kernels_triton.py",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )

    if args.floors:
        res = floors(args.dtypes.split(",")[0], log)
        with open(args.floors, "w") as f:
            json.dump({**meta, "floors": res}, f, indent=1)
        return

    if args.site_tune:
        cases = [c for c in args.cases.split(",") if c in SITE_CASES]
        res = site_tune(
            args.dtypes.split(",")[0], args.workers, log, cases=cases or None,
            family=args.site_family,
        )  # fmt: skip
        with open(args.site_tune, "w") as f:
            json.dump({**meta, **res}, f, indent=1)
        if args.graph_tune:
            apply_site_best(res)
            res = graph_tune(args.dtypes.split(",")[0], args.workers, log, pyt=pyt, only_final=True)
            with open(args.graph_tune, "w") as f:
                json.dump({**meta, **res}, f, indent=1)
        return

    if args.graph_tune:
        res = graph_tune(args.dtypes.split(",")[0], args.workers, log, pyt=pyt)
        with open(args.graph_tune, "w") as f:
            json.dump({**meta, **res}, f, indent=1)
        return

    cases = [c for c in args.cases.split(",") if c]
    dtypes = [d for d in args.dtypes.split(",") if d]
    batches = [int(b) for b in args.batches.split(",") if b]
    # Compile every launch the benchmark makes, in parallel, before timing anything.
    jobs = []
    for dt in dtypes:
        for c in cases:
            jobs.append((c, dt, 1, None))
            if c in BATCH_CASES:
                jobs += [(c, dt, b, None) for b in batches]
    tune_rows, best = [], {}
    if args.tune:
        tune_rows, best = tune_phase(dtypes[0], max(10, args.rep_ms // 2), args.workers, log)
        if args.tune_out:
            with open(args.tune_out, "w") as f:
                best_json = [{"case": nm, "batch": b, **vars_cfg(v)} for (nm, b), v in best.items()]
                json.dump({**meta, "tuning": tune_rows, "best": best_json}, f, indent=1)
        log("_TABLE = {  # paste into src/teal/kernels/triton_gemv.py")
        for (name, b), c in best.items():
            _, k, splits, pair = CASES[name]
            log(
                f"    ({k}, {sum(splits)}, {pair}, {tg._bucket(b)}): GemvConfig({c.block_n}, "
                f"{c.rows}, {c.split_k}, {c.num_warps}, {c.num_stages}, {c.dot}, {c.prefetch}),"
            )
        log("}")
    # Workers compile with the winners pinned (tune_phase pinned them here already).
    pins = []
    for (name, b), cfg in best.items():
        _, k, splits, pair = CASES[name]
        pins += [(k, sum(splits), dt, cfg, b, pair) for dt in DTYPES]
    t0 = time.time()
    parallel_compile(jobs, args.workers, pins)
    log(f"compiled benchmark kernels in {time.time() - t0:.0f}s")
    if pyt is not None:
        outp, _ = pyt.communicate()
        log("pytest (native):\n" + outp.decode()[-3000:])

    results = []
    for dt in dtypes:
        for c in cases:
            try:
                results += bench_case(c, dt, 1, P_LIST, args.rep_ms, log)
            except Exception as e:  # noqa: BLE001 - keep the other cases
                log(f"case {c} {dt} failed: {e!r}")
        for c in BATCH_CASES:
            if c not in cases:
                continue
            for b in batches:
                try:
                    results += bench_case(c, dt, b, [0.5, 0.9], args.rep_ms, log)
                except Exception as e:  # noqa: BLE001
                    log(f"case {c} {dt} b{b} failed: {e!r}")
        if args.out:
            with open(args.out, "w") as f:
                json.dump({**meta, "results": results}, f, indent=1)
    print_table(results)


if __name__ == "__main__":
    main()
