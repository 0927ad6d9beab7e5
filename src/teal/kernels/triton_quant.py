"""Triton sparse GEMV on quantized weights (layouts: ``teal.model.quant``).

Same structure as ``triton_gemv`` (read its docstring first): every program compacts the
kept channels of its chunk of ``K`` in-kernel, walks only their rows, and split-K
partials meet through an atomic ticket; q|k|v segments and gate|up with the activation
epilogue run in one launch; ``thresholds=None`` is the dense call (every channel kept).

* int8 (per-output-channel scales) is the fp16 kernel itself: the walk turns the int8
  codes into fp32 and the epilogue multiplies by the column's scale once, after the sum
  over ``K`` (``triton_gemv._sparse_gemv_kernel`` with ``HAS_QS``).
* int4 (group-wise along ``K``, two output columns per byte) has its own kernel below.
  Chunks of ``K`` are whole groups.  The compaction also writes, per group, where its
  kept rows end in the compacted list and the sum of its kept inputs.  The walk goes
  group by group: it loads the group's scale (and zero point) row for the program's
  columns once, accumulates ``x * q`` over the group's kept rows in raw codes, then adds
  ``s * acc - s * z * sum(x)`` (float offsets, GGUF's Q4_1: ``s * acc + m * sum(x)``).
  A group with no kept row costs its scale row.  Codes become floats through the
  mantissa of 2^23 (no I2F instruction).

  Batch 1 walks rows as scalars (``scalar_rows`` configs, every int4 entry of the table):
  each of the 128 threads keeps 4 bytes of a 512-byte run, a step loads the channels and
  inputs of ``ROWS`` kept rows, then all their runs at once, then multiplies, with two
  PRMT-based conversions a word (``_nibbles``).  The 2-D walk it replaced kept
  ``[ROWS, BLOCK_H]`` fp32 tiles (210 registers a thread, two CTAs an SM, 4 KB of
  weights in flight per CTA) and spent 6.3 instructions a weight; the scalar walk takes
  96-150 registers and about 5.  On an H100 (2026-12-07, same machine, bench_quant.py)
  Llama-3-8B int4 g128 decoding went from 196.6 to 254.8 tok/s dense and from 240.0 to
  328.1 at 50 % (benchmarks/results/quant-decode-int4-{before,rows}-h100-2026-12-07.json).
  SASS of either walk can be inspected without a GPU: benchmarks/sass_report.py.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from teal.kernels.triton_gemv import (
    ACTS,
    MAX_BATCH,
    MAX_SEGMENTS,
    GemvConfig,
    _act,  # noqa: F401  (used by _epilogue)
    _as_threshold,
    _compact,
    _epilogue,
    _interpreting,
    _launch,
    _locks,
    _round,
    _row_index,
    _scores,
    _segment,
    _sum_parts,
    gdc_launch_dependents,
    gdc_wait,
    get_config,
    pdl_mode,
    pdl_options,
)

__all__ = ["quant_gemv", "quant_gate_up_act"]


@triton.jit
def _i4f(q):
    """Small non-negative int32 codes (< 2^23) to fp32, exactly, with integer ops."""
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _compact_groups(
    xv,
    score,
    k,
    t,
    B,
    idx_ptr,
    val_ptr,
    BB: tl.constexpr,
    KC: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
):
    """``_compact``, plus per group of the chunk, in registers: the end of its kept rows
    in the compacted list (``ends[g]``) and the sum of each row's kept inputs
    (``gsum[b, g]``).  They stay in registers (the walk picks entry ``g`` with a masked
    sum over ``NG`` lanes), so a group's first weight load waits for one index load,
    not for a scratch round trip of its bounds first."""
    _compact(xv, score, k, t, B, idx_ptr, val_ptr, BB, KC)
    keep2 = score > t
    keep = tl.max(keep2.to(tl.int32), axis=0)
    ends = tl.cumsum(tl.sum(tl.reshape(keep, (NG, G)), axis=1), axis=0)
    xm = tl.where(keep2, xv.to(tl.float32), 0.0)
    gsum = tl.sum(tl.reshape(xm, (BB, NG, G)), axis=2)
    return ends, gsum


@triton.jit
def _pick(v, i, NG: tl.constexpr):
    """Entry ``i`` of the ``[NG]`` register vector ``v`` (0 where ``i`` is out of range)."""
    return tl.sum(tl.where(tl.arange(0, NG) == i, v, tl.zeros_like(v)), axis=0)


@triton.jit
def _q4_load(q_ptr, stride_qk, bcols, nmask, idx_ptr, r, rows, hi, ROWS: tl.constexpr):
    """The program's bytes of the kept rows at positions ``r`` of the compacted list
    (those below ``hi``; ``rows`` their channels, loaded a step ahead), and the channels
    of the step after: that index load (an L2 hit) then never sits in front of a weight
    load."""
    p = tl.load(
        q_ptr + rows.to(tl.int64)[:, None] * stride_qk + bcols[None, :],
        mask=(r < hi)[:, None] & nmask[None, :],
        other=0,
    )
    nxt = tl.load(idx_ptr + r + ROWS, mask=r + ROWS < hi, other=0)
    return p, nxt


@triton.jit
def _q4_math(
    p,
    val_ptr,
    r,
    hi,
    B,
    acc_lo,
    acc_hi,
    BB: tl.constexpr,
    KC: tl.constexpr,
    USE_DOT: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Both nibbles of the loaded bytes ``p`` times the inputs, into the accumulators."""
    rmask = r < hi
    p = p.to(tl.int32)
    w_lo = _i4f(p & 15)
    w_hi = _i4f(p >> 4)  # a zero-extended byte: no mask needed
    if USE_DOT:
        b = tl.arange(0, BB)
        v = tl.load(
            val_ptr + b[:, None] * KC + r[None, :],
            mask=(b < B)[:, None] & rmask[None, :],
            other=0.0,
        )
        if F32_DOT:
            acc_lo += tl.dot(v.to(tl.float32), w_lo, input_precision="ieee")
            acc_hi += tl.dot(v.to(tl.float32), w_hi, input_precision="ieee")
        else:
            # Codes 0..15 are exact in fp16 / bf16.
            acc_lo = tl.dot(v, w_lo.to(v.dtype), acc_lo)
            acc_hi = tl.dot(v, w_hi.to(v.dtype), acc_hi)
    else:
        v = tl.load(val_ptr + r, mask=rmask, other=0.0).to(tl.float32)
        acc_lo += v[:, None] * w_lo
        acc_hi += v[:, None] * w_hi
    return acc_lo, acc_hi


@triton.jit
def _nibbles(p, INTERPRET: tl.constexpr):
    """Low and high nibbles of the bytes ``p`` as exact fp32 codes.

    On the GPU, four bytes at a time: one AND (or shift and AND) isolates a nibble in
    each byte of the word, then one PRMT per byte places it under the exponent of 2^23
    (``0x4B0000qq``), and one FADD removes 2^23.  That is 2.75 integer instructions a
    byte before the FADDs, where the compiler's own byte extraction takes about 7."""
    if INTERPRET:
        q = p.to(tl.int32)
        return _i4f(q & 15), _i4f(q >> 4)
    lo = tl.inline_asm_elementwise(
        "{ .reg .b32 t, m; and.b32 t, $4, 0x0F0F0F0F; mov.b32 m, 0x4B000000; "
        "prmt.b32 $0, t, m, 0x7650; prmt.b32 $1, t, m, 0x7651; "
        "prmt.b32 $2, t, m, 0x7652; prmt.b32 $3, t, m, 0x7653; }",
        "=r,=r,=r,=r,r",
        [p],
        dtype=tl.int32,
        is_pure=True,
        pack=4,
    )
    hi = tl.inline_asm_elementwise(
        "{ .reg .b32 t, m; shr.b32 t, $4, 4; and.b32 t, t, 0x0F0F0F0F; mov.b32 m, 0x4B000000; "
        "prmt.b32 $0, t, m, 0x7650; prmt.b32 $1, t, m, 0x7651; "
        "prmt.b32 $2, t, m, 0x7652; prmt.b32 $3, t, m, 0x7653; }",
        "=r,=r,=r,=r,r",
        [p],
        dtype=tl.int32,
        is_pure=True,
        pack=4,
    )
    return (
        lo.to(tl.float32, bitcast=True) - 8388608.0,
        hi.to(tl.float32, bitcast=True) - 8388608.0,
    )


@triton.jit
def _group_scales(s_ptr, z_ptr, stride_s, g, cols_lo, cols_hi, smask, HAS_ZERO: tl.constexpr,
                  ZERO_F: tl.constexpr):  # fmt: skip
    """Group ``g``'s scales for the low- and high-nibble columns, and ``zs``: what
    multiplies ``-sum(x)`` of the group: ``z * s`` (zero point codes; ``8 * s`` without),
    or ``-m`` for float offsets (``w = q * s + m``)."""
    s_lo = tl.load(s_ptr + g * stride_s + cols_lo, mask=smask, other=0.0).to(tl.float32)
    s_hi = tl.load(s_ptr + g * stride_s + cols_hi, mask=smask, other=0.0).to(tl.float32)
    if ZERO_F:
        zs_lo = -tl.load(z_ptr + g * stride_s + cols_lo, mask=smask, other=0.0).to(tl.float32)
        zs_hi = -tl.load(z_ptr + g * stride_s + cols_hi, mask=smask, other=0.0).to(tl.float32)
    elif HAS_ZERO:
        z_lo = _i4f(tl.load(z_ptr + g * stride_s + cols_lo, mask=smask, other=0).to(tl.int32))
        z_hi = _i4f(tl.load(z_ptr + g * stride_s + cols_hi, mask=smask, other=0).to(tl.int32))
        zs_lo = z_lo * s_lo
        zs_hi = z_hi * s_hi
    else:
        zs_lo = 8.0 * s_lo
        zs_hi = 8.0 * s_hi
    return s_lo, s_hi, zs_lo, zs_hi


@triton.jit
def _q4_row_step(q_ptr, stride_qk, bcols, nmask, rows, vals, j, hi, g_lo, g_hi,
                 ROWS: tl.constexpr, INTERPRET: tl.constexpr):  # fmt: skip
    """Rows ``j .. j+ROWS`` of the compacted list (those below ``hi``; ``rows`` and ``vals``
    their channels and inputs, from ``triton_gemv._row_index``): every row's run of bytes
    first, then two FMAs a byte.  Written in that order so that all ``ROWS`` weight loads
    are in flight together; one loop body per row lets the compiler issue each load just
    before its use."""
    runs = ()
    for i in tl.static_range(ROWS):
        ptr = q_ptr + rows[i].to(tl.int64) * stride_qk + bcols
        runs = runs + (tl.load(ptr, mask=nmask & (j + i < hi), other=0),)
    for i in tl.static_range(ROWS):
        w_lo, w_hi = _nibbles(runs[i], INTERPRET)
        v = vals[i].to(tl.float32)
        g_lo += v * w_lo
        g_hi += v * w_hi
    return g_lo, g_hi


@triton.jit
def _walk_q4_rows(
    q_ptr,
    stride_qk,
    bcols,
    nmask,
    s_ptr,
    z_ptr,
    stride_s,
    cols_lo,
    cols_hi,
    idx_ptr,
    val_ptr,
    ends,
    gsum,
    g0,
    n_grp,
    G: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO_F: tl.constexpr,
    INTERPRET: tl.constexpr,
    PREFETCH: tl.constexpr,
):
    """Batch 1 with rows as scalars (``scalar_rows`` configs): each thread keeps a few bytes of
    every kept row, so the accumulators are 1-D (four fp32 a byte: group sum and total,
    both nibbles) whatever the step's depth, and a step of ``ROWS`` row loads is in
    flight at once without the ``[ROWS, BLOCK_H]`` fp32 tiles of the 2-D walk."""
    acc_lo = tl.zeros((BLOCK_H,), dtype=tl.float32)
    acc_hi = tl.zeros((BLOCK_H,), dtype=tl.float32)
    if INTERPRET:
        n_loop = NG
    else:
        n_loop = tl.minimum(n_grp - g0, NG)
    xsum = tl.sum(gsum, axis=0)
    for gi in range(0, n_loop):
        g = g0 + gi
        hi = _pick(ends, gi, NG)
        lo = _pick(ends, gi - 1, NG)
        smask = nmask & (g < n_grp)
        s_lo, s_hi, zs_lo, zs_hi = _group_scales(
            s_ptr, z_ptr, stride_s, g, cols_lo, cols_hi, smask, HAS_ZERO, ZERO_F
        )
        g_lo = tl.zeros((BLOCK_H,), dtype=tl.float32)
        g_hi = tl.zeros((BLOCK_H,), dtype=tl.float32)
        # The interpreter steps over the whole group under masks (no tensor loop bounds).
        if INTERPRET:
            j_lo = 0
            j_hi = G
        else:
            j_lo = lo
            j_hi = hi
        if PREFETCH:
            rows, vals = _row_index(idx_ptr, val_ptr, lo, hi, ROWS)
        for jj in range(j_lo, j_hi, ROWS):
            if INTERPRET:
                j = lo + jj
            else:
                j = jj
            if PREFETCH:
                # The next step's channels and inputs are in flight during this step.
                cur_rows, cur_vals = rows, vals
                rows, vals = _row_index(idx_ptr, val_ptr, j + ROWS, hi, ROWS)
            else:
                cur_rows, cur_vals = _row_index(idx_ptr, val_ptr, j, hi, ROWS)
            g_lo, g_hi = _q4_row_step(
                q_ptr, stride_qk, bcols, nmask, cur_rows, cur_vals, j, hi, g_lo, g_hi, ROWS,
                INTERPRET,
            )  # fmt: skip
        xs = _pick(xsum, gi, NG)
        acc_lo += g_lo * s_lo - xs * zs_lo
        acc_hi += g_hi * s_hi - xs * zs_hi
    return acc_lo[None, :], acc_hi[None, :]


@triton.jit
def _walk_q4(
    q_ptr,
    stride_qk,
    bcols,
    nmask,
    s_ptr,
    z_ptr,
    stride_s,
    cols_lo,
    cols_hi,
    idx_ptr,
    val_ptr,
    ends,
    gsum,
    g0,
    n_grp,
    B,
    BB: tl.constexpr,
    KC: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
    USE_DOT: tl.constexpr,
    F32_DOT: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO_F: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTERPRET: tl.constexpr,
    SCALAR: tl.constexpr,
):
    """The chunk's kept rows, group by group; returns the fp32 sums for the low-nibble
    and high-nibble columns, ``[BB, BLOCK_H]`` (dot path) or ``[1, BLOCK_H]``."""
    if SCALAR and not USE_DOT:
        return _walk_q4_rows(
            q_ptr, stride_qk, bcols, nmask, s_ptr, z_ptr, stride_s, cols_lo, cols_hi, idx_ptr,
            val_ptr, ends, gsum, g0, n_grp, G, NG, BLOCK_H, ROWS, HAS_ZERO, ZERO_F, INTERPRET,
            PREFETCH,
        )  # fmt: skip
    offs_r = tl.arange(0, ROWS)
    if USE_DOT:
        acc_lo = tl.zeros((BB, BLOCK_H), dtype=tl.float32)
    else:
        acc_lo = tl.zeros((ROWS, BLOCK_H), dtype=tl.float32)
    acc_hi = tl.zeros_like(acc_lo)
    # Zero-point terms of the FMA path (one row; the dot path folds them into acc).
    accz_lo = tl.zeros((BLOCK_H,), dtype=tl.float32)
    accz_hi = tl.zeros((BLOCK_H,), dtype=tl.float32)
    # The interpreter cannot take a tensor as a loop bound (see triton_gemv._walk): there
    # the loops run to their static maxima under masks.
    if INTERPRET:
        n_loop = NG
    else:
        n_loop = tl.minimum(n_grp - g0, NG)
    for gi in range(0, n_loop):
        g = g0 + gi
        hi = _pick(ends, gi, NG)
        lo = _pick(ends, gi - 1, NG)
        smask = nmask & (g < n_grp)
        s_lo, s_hi, zs_lo, zs_hi = _group_scales(
            s_ptr, z_ptr, stride_s, g, cols_lo, cols_hi, smask, HAS_ZERO, ZERO_F
        )
        g_lo = tl.zeros_like(acc_lo)
        g_hi = tl.zeros_like(acc_hi)
        rows = tl.load(idx_ptr + lo + offs_r, mask=lo + offs_r < hi, other=0)
        if PREFETCH:
            # Double buffering: the next step's bytes are in flight during this step's math.
            p, rows = _q4_load(q_ptr, stride_qk, bcols, nmask, idx_ptr, lo + offs_r, rows, hi, ROWS)
        if INTERPRET:
            for j in range(0, G, ROWS):
                r = lo + j + offs_r
                if PREFETCH:
                    p1, rows = _q4_load(
                        q_ptr, stride_qk, bcols, nmask, idx_ptr, r + ROWS, rows, hi, ROWS
                    )
                    g_lo, g_hi = _q4_math(
                        p, val_ptr, r, hi, B, g_lo, g_hi, BB, KC, USE_DOT, F32_DOT
                    )
                    p = p1
                else:
                    p, rows = _q4_load(q_ptr, stride_qk, bcols, nmask, idx_ptr, r, rows, hi, ROWS)
                    g_lo, g_hi = _q4_math(
                        p, val_ptr, r, hi, B, g_lo, g_hi, BB, KC, USE_DOT, F32_DOT
                    )
        else:
            for j in range(lo, hi, ROWS):
                r = j + offs_r
                if PREFETCH:
                    p1, rows = _q4_load(
                        q_ptr, stride_qk, bcols, nmask, idx_ptr, r + ROWS, rows, hi, ROWS
                    )
                    g_lo, g_hi = _q4_math(
                        p, val_ptr, r, hi, B, g_lo, g_hi, BB, KC, USE_DOT, F32_DOT
                    )
                    p = p1
                else:
                    p, rows = _q4_load(q_ptr, stride_qk, bcols, nmask, idx_ptr, r, rows, hi, ROWS)
                    g_lo, g_hi = _q4_math(
                        p, val_ptr, r, hi, B, g_lo, g_hi, BB, KC, USE_DOT, F32_DOT
                    )
        # (q - z) * s summed with x: s * sum(x q) - s * z * sum(x) (offsets: + m * sum(x)).
        if USE_DOT:
            xs = tl.sum(tl.where(tl.arange(0, NG)[None, :] == gi, gsum, 0.0), axis=1)
            acc_lo += g_lo * s_lo[None, :] - xs[:, None] * zs_lo[None, :]
            acc_hi += g_hi * s_hi[None, :] - xs[:, None] * zs_hi[None, :]
        else:
            xs = _pick(tl.sum(gsum, axis=0), gi, NG)  # BB == 1
            acc_lo += g_lo * s_lo[None, :]
            acc_hi += g_hi * s_hi[None, :]
            accz_lo -= xs * zs_lo
            accz_hi -= xs * zs_hi
    if USE_DOT:
        return acc_lo, acc_hi
    else:
        return (tl.sum(acc_lo, axis=0) + accz_lo)[None, :], (tl.sum(acc_hi, axis=0) + accz_hi)[
            None, :
        ]


@triton.jit
def _q4_kernel(
    x_ptr,
    stride_xb,
    stride_xk,
    q_ptr,
    stride_qk,
    sc_ptr,
    z_ptr,
    stride_s,
    t_ptr,
    s_ptr,
    idx_ptr,
    val_ptr,
    part_ptr,
    lock_ptr,
    y_ptr,
    stride_yb,
    B,
    K,
    N_PART,
    k_chunk,
    n_grp,
    H0,
    H1,
    H2,
    H3,
    NSEG: tl.constexpr,
    PAIR: tl.constexpr,
    ACT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_ZERO: tl.constexpr,
    ZERO_F: tl.constexpr,
    BB: tl.constexpr,
    KC: tl.constexpr,
    G: tl.constexpr,
    NG: tl.constexpr,
    BLOCK_H: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    F32_DOT: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTERPRET: tl.constexpr,
    SCALAR: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    """Grid ``(byte blocks, split_k)``.  ``H*`` are the segments' packed widths (half their
    output widths).  Block ``pid_n`` reads ``BLOCK_H`` bytes of each kept row of one
    segment and produces its columns ``o`` and ``H + o`` (PAIR: the same bytes of gate
    and of up, combined as ``act(gate) * up`` in the epilogue)."""
    if PDL:
        gdc_wait()  # first: see triton_gemv.pdl_mode
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * k_chunk
    k_len = tl.minimum(k_chunk, K - k_lo)
    g0 = k_lo // G
    offs = tl.arange(0, BLOCK_H)
    b = tl.arange(0, BB)
    if PAIR:
        o = pid_n * BLOCK_H + offs
        nmask = o < H0
        t0 = _round(tl.load(t_ptr).to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        t1 = _round(tl.load(t_ptr + 1).to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        slot0 = pid_k
        slot1 = SPLIT_K + pid_k
        xv, score, k = _scores(
            x_ptr, stride_xb, stride_xk, s_ptr, k_lo, k_len, B, BB, KC, HAS_SCALE, INTERPRET
        )
        ends0, gsum0 = _compact_groups(
            xv, score, k, t0, B, idx_ptr + slot0 * KC, val_ptr + slot0 * BB * KC, BB, KC, G, NG
        )
        ends1, gsum1 = _compact_groups(
            xv, score, k, t1, B, idx_ptr + slot1 * KC, val_ptr + slot1 * BB * KC, BB, KC, G, NG
        )
        tl.debug_barrier()
        # gate: bytes [0, H0), columns o and H0 + o; up: bytes H0 + o, columns 2 H0 + ...
        c_lo = o
        c_hi = H0 + o
        u_lo = 2 * H0 + o
        u_hi = 3 * H0 + o
        a_lo, a_hi = _walk_q4(
            q_ptr, stride_qk, o, nmask, sc_ptr, z_ptr, stride_s, c_lo, c_hi,
            idx_ptr + slot0 * KC, val_ptr + slot0 * BB * KC, ends0, gsum0, g0, n_grp, B,
            BB, KC, G, NG, BLOCK_H, ROWS, USE_DOT, F32_DOT, HAS_ZERO, ZERO_F, PREFETCH,
            INTERPRET, SCALAR,
        )  # fmt: skip
        b_lo, b_hi = _walk_q4(
            q_ptr, stride_qk, H0 + o, nmask, sc_ptr, z_ptr, stride_s, u_lo, u_hi,
            idx_ptr + slot1 * KC, val_ptr + slot1 * BB * KC, ends1, gsum1, g0, n_grp, B,
            BB, KC, G, NG, BLOCK_H, ROWS, USE_DOT, F32_DOT, HAS_ZERO, ZERO_F, PREFETCH,
            INTERPRET, SCALAR,
        )  # fmt: skip
    else:
        seg, blk, bcol0, half = _segment(pid_n, H0, H1, H2, H3, NSEG, BLOCK_H)
        o = blk * BLOCK_H + offs
        nmask = o < half
        c_lo = 2 * bcol0 + o
        c_hi = 2 * bcol0 + half + o
        t = _round(tl.load(t_ptr + seg).to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        slot = seg * SPLIT_K + pid_k
        xv, score, k = _scores(
            x_ptr, stride_xb, stride_xk, s_ptr, k_lo, k_len, B, BB, KC, HAS_SCALE, INTERPRET
        )
        ends, gsum = _compact_groups(
            xv, score, k, t, B, idx_ptr + slot * KC, val_ptr + slot * BB * KC, BB, KC, G, NG
        )
        tl.debug_barrier()
        a_lo, a_hi = _walk_q4(
            q_ptr, stride_qk, bcol0 + o, nmask, sc_ptr, z_ptr, stride_s, c_lo, c_hi,
            idx_ptr + slot * KC, val_ptr + slot * BB * KC, ends, gsum, g0, n_grp, B,
            BB, KC, G, NG, BLOCK_H, ROWS, USE_DOT, F32_DOT, HAS_ZERO, ZERO_F, PREFETCH,
            INTERPRET, SCALAR,
        )  # fmt: skip
        b_lo = a_lo  # unused
        b_hi = a_hi
        u_lo = c_lo
        u_hi = c_hi
    if PDL:
        gdc_launch_dependents()

    if USE_DOT:
        rb = b
        rmask = b < B
    else:
        rb = tl.arange(0, 1)
        rmask = rb < 1
    if PAIR:
        out_lo = o
        out_hi = H0 + o
    else:
        out_lo = c_lo
        out_hi = c_hi

    if SPLIT_K > 1:
        pmask = rmask[:, None] & nmask[None, :]
        pbase = part_ptr + pid_k * B * N_PART + rb[:, None] * N_PART
        tl.store(pbase + c_lo[None, :], a_lo, mask=pmask)
        tl.store(pbase + c_hi[None, :], a_hi, mask=pmask)
        if PAIR:
            tl.store(pbase + u_lo[None, :], b_lo, mask=pmask)
            tl.store(pbase + u_hi[None, :], b_hi, mask=pmask)
        tl.debug_barrier()
        ticket = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            a_lo = _sum_parts(part_ptr, B, N_PART, rb, c_lo, pmask, a_lo, SPLIT_K)
            a_hi = _sum_parts(part_ptr, B, N_PART, rb, c_hi, pmask, a_hi, SPLIT_K)
            if PAIR:
                b_lo = _sum_parts(part_ptr, B, N_PART, rb, u_lo, pmask, b_lo, SPLIT_K)
                b_hi = _sum_parts(part_ptr, B, N_PART, rb, u_hi, pmask, b_hi, SPLIT_K)
            tl.atomic_xchg(lock_ptr + pid_n, 0)
            _epilogue(
                y_ptr, stride_yb, rb, rmask, out_lo, c_lo, u_lo, nmask, a_lo, b_lo, t_ptr,
                PAIR, ACT, False, INTERPRET, y_ptr, 0, False,
            )  # fmt: skip
            _epilogue(
                y_ptr, stride_yb, rb, rmask, out_hi, c_hi, u_hi, nmask, a_hi, b_hi, t_ptr,
                PAIR, ACT, False, INTERPRET, y_ptr, 0, False,
            )  # fmt: skip
    else:
        _epilogue(
            y_ptr, stride_yb, rb, rmask, out_lo, c_lo, u_lo, nmask, a_lo, b_lo, t_ptr,
            PAIR, ACT, False, INTERPRET, y_ptr, 0, False,
        )  # fmt: skip
        _epilogue(
            y_ptr, stride_yb, rb, rmask, out_hi, c_hi, u_hi, nmask, a_hi, b_hi, t_ptr,
            PAIR, ACT, False, INTERPRET, y_ptr, 0, False,
        )  # fmt: skip


def _launch_q4(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    thresholds: Tensor | None,
    splits: tuple[int, ...],
    group_size: int,
    scale: Tensor | None,
    pair: bool,
    act: str,
    config: GemvConfig | None,
) -> Tensor:
    k = qweight.shape[0]
    n = scales.shape[-1]
    g = group_size
    n_grp = triton.cdiv(k, g)
    if qweight.dtype != torch.uint8 or qweight.shape[1] * 2 != n or qweight.stride(1) != 1:
        raise ValueError(
            f"int4 weights must be uint8 [K, N/2] with contiguous rows, got {qweight.dtype}"
            f" {tuple(qweight.shape)} for N={n}"
        )
    if tuple(scales.shape) != (n_grp, n) or scales.stride(1) != 1:
        raise ValueError(f"scales must be [{n_grp}, {n}], got {tuple(scales.shape)}")
    if zeros is not None and (zeros.shape != scales.shape or zeros.stride() != scales.stride()):
        raise ValueError("zeros must have the shape and strides of scales")
    if zeros is not None and zeros.dtype != torch.uint8 and not zeros.is_floating_point():
        raise ValueError(f"zeros must be uint8 codes or float offsets, got {zeros.dtype}")
    if g & (g - 1) or not 16 <= g <= 256:
        raise ValueError(f"group_size must be a power of two in 16..256, got {g}")
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} channels, the weight has {k} rows")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if sum(splits) != n or not 1 <= len(splits) <= MAX_SEGMENTS or any(s % 2 for s in splits):
        raise ValueError(f"splits {splits} must be 1..{MAX_SEGMENTS} even widths summing to {n}")
    if pair and (len(splits) != 2 or splits[0] != splits[1]):
        raise ValueError(f"gate|up needs two equal halves, got {splits}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    b = x2.shape[0]
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(f"sparse GEMV takes 1..{MAX_BATCH} rows, got {b}")
    dev = x.device
    t = _as_threshold(thresholds, len(splits), dev)
    if scale is not None:
        if scale.numel() != k:
            raise ValueError(f"scale must have {k} entries (one per input channel)")
        scale = scale.reshape(-1).contiguous()
    cfg = config or get_config(k, n, "int4", b, pair, dev)

    use_dot = cfg.dot or b > 1
    bb = max(16, triton.next_power_of_2(b)) if use_dot else 1
    # Chunks of K are whole groups.
    k_chunk = triton.cdiv(triton.cdiv(k, max(1, cfg.split_k)), g) * g
    split = triton.cdiv(k, k_chunk)
    kc = max(16, triton.next_power_of_2(k_chunk))
    ng = kc // g
    block_h = max(16, cfg.block_n // 2)
    rows = max(cfg.rows, 16) if use_dot else cfg.rows
    halves = [s // 2 for s in splits] + [0] * (MAX_SEGMENTS - len(splits))
    if pair:
        grid_n = triton.cdiv(halves[0], block_h)
        n_out = splits[0]
        slots = 2
    else:
        grid_n = sum(triton.cdiv(h, block_h) for h in halves)
        n_out = n
        slots = len(splits)
    y = torch.empty((b, n_out), dtype=x.dtype, device=dev)
    idx = torch.empty(slots * split * kc, dtype=torch.int32, device=dev)
    val = torch.empty(slots * split * bb * kc, dtype=x.dtype, device=dev)
    if split > 1:
        part = torch.empty((split, b, n), dtype=torch.float32, device=dev)
        locks = _locks(dev, grid_n)
    else:
        part = y
        locks = idx
    pdl = pdl_mode(dev)
    _q4_kernel[(grid_n, split)](
        x2,
        x2.stride(0),
        x2.stride(1),
        qweight,
        qweight.stride(0),
        scales,
        zeros if zeros is not None else scales,
        scales.stride(0),
        t,
        scale if scale is not None else t,
        idx,
        val,
        part,
        locks,
        y,
        y.stride(0),
        b,
        k,
        n,
        k_chunk,
        n_grp,
        halves[0],
        halves[1],
        halves[2],
        halves[3],
        NSEG=len(splits),
        PAIR=pair,
        ACT=ACTS[act] if pair else 0,
        HAS_SCALE=scale is not None,
        HAS_ZERO=zeros is not None,
        ZERO_F=zeros is not None and zeros.is_floating_point(),
        BB=bb,
        KC=kc,
        G=g,
        NG=ng,
        BLOCK_H=block_h,
        ROWS=rows,
        SPLIT_K=split,
        USE_DOT=use_dot,
        F32_DOT=_interpreting() or x.dtype == torch.float32,
        PREFETCH=cfg.prefetch and not use_dot,
        INTERPRET=_interpreting(),
        SCALAR=cfg.scalar_rows and not use_dot,
        PDL=pdl,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_options(pdl),
    )
    return y.reshape(*lead, n_out)


def quant_gemv(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None = None,
    thresholds: Tensor | None = None,
    splits: tuple[int, ...] | None = None,
    group_size: int = 0,
    scale: Tensor | None = None,
    config: GemvConfig | None = None,
) -> Tensor:
    """``sparsify(x) @ W`` for a quantized ``W`` ``[K, N]``, reading only kept rows.

    ``group_size == 0``: int8 (``qweight`` int8 ``[K, N]``, ``scales`` ``[N]``); else int4
    (``qweight`` uint8 ``[K, N/2]`` packed per segment, ``scales`` / ``zeros``
    ``[ceil(K/G), N]``).  ``thresholds``: one fp32 per segment on x's device, or None for
    the dense product.  Other arguments as ``triton_gemv.sparse_gemv_fused``.
    """
    n = scales.shape[-1]
    splits = (n,) if splits is None else tuple(int(s) for s in splits)
    if group_size == 0:
        return _launch(x, qweight, thresholds, splits, scale, False, "none", config, scales)
    return _launch_q4(
        x, qweight, scales, zeros, thresholds, splits, group_size, scale, False, "none", config
    )


def quant_gate_up_act(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None = None,
    thresholds: Tensor | None = None,
    act: str = "silu",
    group_size: int = 0,
    scale: Tensor | None = None,
    config: GemvConfig | None = None,
) -> Tensor:
    """``act(x_g @ gate) * (x_u @ up)`` for a quantized ``[gate | up]`` (``N = 2F``)."""
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}: expected one of {sorted(ACTS)}")
    n = scales.shape[-1]
    if n % 2:
        raise ValueError(f"gate|up needs an even N, got {n}")
    splits = (n // 2, n // 2)
    if group_size == 0:
        return _launch(x, qweight, thresholds, splits, scale, True, act, config, scales)
    return _launch_q4(
        x, qweight, scales, zeros, thresholds, splits, group_size, scale, True, act, config
    )
