"""What the compiler makes of our sparse GEMV kernels, without a GPU.

Compiles a decode launch of ``triton_gemv._sparse_gemv_kernel`` (fp16/bf16 and int8
weights) or ``triton_quant._q4_kernel`` (int4) for sm_90 with Triton's bundled ptxas (no
driver needed), then reports registers and stack per thread (cuobjdump) and the
instruction mix of every long loop body (nvdisasm): the walks over kept rows, with the
instructions per weight (each weight takes one FFMA).  Registers decide how many CTAs
share an SM; instructions per weight decide whether the walk keeps up with the memory.

    python benchmarks/sass_report.py --format int4 --site gate_up      # the table's config
    python benchmarks/sass_report.py --format int8 --site down --scalar-rows 1 --block-n 1024

Sites are Llama-3-8B's (q|k|v with the norm, o with the residual, gate|up with the norm
and SiLU, down with the residual, lm_head); the table's entry for the site is the
starting config and any of --block-n/--rows/--split/--warps/--prefetch/--peel/
--row-sum/--scalar-rows overrides it.  Quantized sites take no norm or residual, as in
decoding.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import subprocess
import tempfile

import torch
import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from teal.kernels import triton_gemv as tg
from teal.kernels import triton_quant as tq

TOOLS = os.path.join(os.path.dirname(nvidia.__file__), "bin")
OP = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)")
# name -> (K, output segments, pair, norm, residual)
SITES = {
    "qkv": (4096, (4096, 1024, 1024), False, True, False),
    "o": (4096, (4096,), False, False, True),
    "gate_up": (4096, (14336, 14336), True, True, False),
    "down": (14336, (4096,), False, False, True),
    "lm_head": (4096, (128256,), False, False, False),
}
# Integer arguments the launcher's values make multiples of 16 (Triton specializes on it).
ALIGNED = {
    "stride_xb", "stride_wk", "stride_qk", "stride_s", "stride_yb", "stride_rb", "K", "N_PART",
    "k_chunk", "n_grp", "W0", "W1", "W2", "W3", "H0", "H1", "H2", "H3",
}  # fmt: skip


def _compile(fn, ptr_types, const, warps):
    names = fn.arg_names
    sig = {a: "constexpr" if a in const else ptr_types.get(a, "i32") for a in names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(names)
        if sig[a].startswith("*") or a in ALIGNED
    }
    src = ASTSource(fn, sig, const, attrs)
    opts = {"num_warps": warps, "num_stages": 1, "launch_pdl": True}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


def compile_gemv(site, cfg, fmt):
    """fp16/bf16 (``fmt`` "bf16") or int8 weights through the fp16 kernel, batch 1."""
    k, splits, pair, norm, res = SITES[site]
    quant = fmt == "int8"
    norm, res = norm and not quant, res and not quant
    k_chunk = triton.cdiv(k, cfg.split_k)
    kc = max(16, triton.next_power_of_2(k_chunk))
    nb = max(16, min(triton.next_power_of_2(k), 4096))
    peel = cfg.peel and not cfg.prefetch
    ptr = {"x_ptr": "*bf16", "w_ptr": "*i8" if quant else "*bf16", "t_ptr": "*fp32",
           "s_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*bf16", "part_ptr": "*fp32",
           "lock_ptr": "*i32", "y_ptr": "*bf16", "qs_ptr": "*bf16", "nw_ptr": "*bf16",
           "res_ptr": "*bf16", "eps": "fp32"}  # fmt: skip
    const = {
        "stride_xk": 1, "B": 1, "NSEG": len(splits), "PAIR": pair, "ACT": 1 if pair else 0,
        "HAS_SCALE": False, "HAS_QS": quant, "BB": 1, "KC": kc, "BLOCK_N": cfg.block_n,
        "ROWS": cfg.rows, "SPLIT_K": triton.cdiv(k, k_chunk), "USE_DOT": False,
        "PREFETCH": cfg.prefetch, "F32_DOT": False, "INTERPRET": False, "ROW_SUM": cfg.row_sum,
        "PEEL": peel, "EVEN_N": all(w % cfg.block_n == 0 for w in splits), "OFF32": True,
        "PAIR_WALK": pair and (peel or cfg.scalar_rows), "NORM": norm, "NB": nb,
        "NSTEPS": triton.cdiv(k, nb), "RES": res, "PDL": True, "SCALAR": cfg.scalar_rows,
    }  # fmt: skip
    return _compile(tg._sparse_gemv_kernel, ptr, const, cfg.num_warps)


def compile_q4(site, cfg, g=128):
    """int4 (code zero points), batch 1."""
    k, splits, pair, _, _ = SITES[site]
    k_chunk = triton.cdiv(triton.cdiv(k, cfg.split_k), g) * g
    kc = max(16, triton.next_power_of_2(k_chunk))
    ptr = {"x_ptr": "*bf16", "q_ptr": "*u8", "sc_ptr": "*bf16", "z_ptr": "*u8",
           "t_ptr": "*fp32", "s_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*bf16",
           "part_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*bf16"}  # fmt: skip
    const = {
        "stride_xk": 1, "B": 1, "NSEG": len(splits), "PAIR": pair, "ACT": 1 if pair else 0,
        "HAS_SCALE": False, "HAS_ZERO": True, "ZERO_F": False, "BB": 1, "KC": kc, "G": g,
        "NG": max(1, kc // g), "BLOCK_H": max(16, cfg.block_n // 2), "ROWS": cfg.rows,
        "SPLIT_K": triton.cdiv(k, k_chunk), "USE_DOT": False, "F32_DOT": False,
        "PREFETCH": cfg.prefetch, "INTERPRET": False, "SCALAR": cfg.scalar_rows, "PDL": True,
    }  # fmt: skip
    return _compile(tq._q4_kernel, ptr, const, cfg.num_warps)


def report(kernel) -> dict:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        res = subprocess.run(
            [os.path.join(TOOLS, "cuobjdump"), "-res-usage", path], capture_output=True, text=True
        ).stdout
        sass = subprocess.run(
            [os.path.join(TOOLS, "nvdisasm"), "-c", path], capture_output=True, text=True
        ).stdout
    regs = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    lines = sass.splitlines()
    labels = {m.group(1): i for i, s in enumerate(lines) if (m := re.match(r"(\.L_x_\d+):", s))}
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if m and labels.get(m.group(1), i) < i:
            ops = collections.Counter(
                mm.group(1) for b in lines[labels[m.group(1)] : i + 1] if (mm := OP.match(b))
            )
            if sum(ops.values()) > 50:  # the walks, not the split-K or compaction loops
                loops.append({"instructions": sum(ops.values()), "ops": dict(ops.most_common(10))})
    return {
        "registers": int(regs.group(1)) if regs else None,
        "stack_bytes": int(stack.group(1)) if stack else None,
        "loops": loops,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--format", choices=["bf16", "int8", "int4"], default="int4")
    ap.add_argument("--site", choices=list(SITES), default="gate_up")
    for name in ("block-n", "rows", "split", "warps", "prefetch", "peel", "row-sum", "scalar-rows"):
        ap.add_argument(f"--{name}", type=int, default=None)
    args = ap.parse_args()
    k, splits, pair, _, _ = SITES[args.site]
    n = sum(splits)
    key = torch.bfloat16 if args.format == "bf16" else args.format
    cfg = tg.get_config(k, n, key, 1, pair, torch.device("cpu"))
    over = {"block_n": args.block_n, "rows": args.rows, "split_k": args.split,
            "num_warps": args.warps, "prefetch": args.prefetch, "peel": args.peel,
            "row_sum": args.row_sum, "scalar_rows": args.scalar_rows}  # fmt: skip
    fields = {f.name: f.type for f in dataclasses.fields(cfg)}
    cfg = dataclasses.replace(
        cfg,
        **{
            f: (bool(v) if fields[f] in (bool, "bool") else v)
            for f, v in over.items()
            if v is not None
        },  # fmt: skip
    )
    kernel = compile_q4(args.site, cfg) if args.format == "int4" else compile_gemv(
        args.site, cfg, args.format
    )  # fmt: skip
    r = report(kernel)
    print(f"triton {triton.__version__}, sm_90, {args.format} {args.site}: {cfg}")
    print(f"{r['registers']} registers, {r['stack_bytes']} bytes of stack a thread")
    for lp in r["loops"]:
        # Every weight of a walk takes exactly one FFMA, so that count is the step's weights.
        w = lp["ops"].get("FFMA", 0)
        per = f"{lp['instructions'] / w:.1f} a weight" if w else "no FFMA"
        print(f"loop of {lp['instructions']} instructions, {w} FFMA ({per}): {lp['ops']}")


if __name__ == "__main__":
    main()
