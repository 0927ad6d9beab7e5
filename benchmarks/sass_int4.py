"""What the compiler makes of the int4 sparse GEMV, without a GPU.

Compiles ``teal.kernels.triton_quant._q4_kernel`` for sm_90 with Triton's bundled ptxas
(no driver needed), then reports registers and stack per thread (cuobjdump) and the
instruction mix of every long loop body (nvdisasm): the walks over kept rows (gate's and
up's), with the instructions per weight.  Registers decide how many CTAs share an SM.

    python benchmarks/sass_int4.py                      # the gate|up table config
    python benchmarks/sass_int4.py --block-n 512 --rows 16 --split 8 --no-scalar-rows --prefetch

Shapes are Llama-3-8B gate|up (K = 4096, 2 x 14336 outputs, g128); the report does not
depend much on them.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import tempfile

import triton
import triton.backends.nvidia as nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from teal.kernels import triton_quant as tq

TOOLS = os.path.join(os.path.dirname(nvidia.__file__), "bin")
OP = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]+)")


def compile_q4(block_n, rows, split, warps, scalar, prefetch, k=4096, g=128):
    """The kernel for gate|up (pair, SiLU, code zero points, batch 1, PDL on)."""
    k_chunk = triton.cdiv(triton.cdiv(k, split), g) * g
    kc = max(16, triton.next_power_of_2(k_chunk))
    ptr = {"x_ptr": "*bf16", "q_ptr": "*u8", "sc_ptr": "*bf16", "z_ptr": "*u8",
           "t_ptr": "*fp32", "s_ptr": "*fp32", "idx_ptr": "*i32", "val_ptr": "*bf16",
           "part_ptr": "*fp32", "lock_ptr": "*i32", "y_ptr": "*bf16"}  # fmt: skip
    const = {
        "stride_xk": 1, "B": 1, "NSEG": 2, "PAIR": True, "ACT": 1, "HAS_SCALE": False,
        "HAS_ZERO": True, "ZERO_F": False, "BB": 1, "KC": kc, "G": g, "NG": max(1, kc // g),
        "BLOCK_H": block_n // 2, "ROWS": rows, "SPLIT_K": triton.cdiv(k, k_chunk),
        "USE_DOT": False, "F32_DOT": False, "PREFETCH": prefetch, "INTERPRET": False,
        "SCALAR": scalar, "PDL": True,
    }  # fmt: skip
    names = tq._q4_kernel.arg_names
    sig = {a: "constexpr" if a in const else ptr.get(a, "i32") for a in names}
    # Pointers and the shape integers are multiples of 16, as the launcher's arguments are.
    aligned = {"stride_xb", "stride_qk", "stride_s", "stride_yb", "K", "N_PART", "k_chunk",
               "n_grp", "H0", "H1", "H2", "H3"}  # fmt: skip
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(names)
        if sig[a].startswith("*") or a in aligned
    }
    src = ASTSource(tq._q4_kernel, sig, const, attrs)
    opts = {"num_warps": warps, "num_stages": 1, "launch_pdl": True}
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)


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
    ap.add_argument("--block-n", type=int, default=1024)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--split", type=int, default=32)
    ap.add_argument("--warps", type=int, default=4)
    ap.add_argument("--no-scalar-rows", dest="scalar", action="store_false")
    ap.add_argument("--prefetch", action="store_true")
    args = ap.parse_args()
    k = compile_q4(args.block_n, args.rows, args.split, args.warps, args.scalar, args.prefetch)
    r = report(k)
    print(f"triton {triton.__version__}, sm_90: {r['registers']} registers, "
          f"{r['stack_bytes']} bytes of stack a thread")  # fmt: skip
    # A step covers ``rows`` kept rows of ``block_n / 2`` bytes, two weights a byte.
    weights = args.block_n * args.rows / (32 * args.warps)
    for lp in r["loops"]:
        print(f"loop of {lp['instructions']} instructions, {weights:g} weights a thread a step"
              f" ({lp['instructions'] / weights:.1f} a weight): {lp['ops']}")  # fmt: skip


if __name__ == "__main__":
    main()
