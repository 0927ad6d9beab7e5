"""Triton sparse GEMV for decoding: ``y = sparsify(x) @ wt`` reading only the kept rows of ``wt``.

``wt`` is input-major (``[K, N]``, one contiguous row per input channel), so a dropped
channel is a whole row never read. One launch does everything:

1. Compaction (``_compact``). Program ``(n, k)`` owns a chunk of ``K`` and, for its
   segment's threshold, writes the ascending list of kept channel indices of that chunk
   and the rows' masked values into a small scratch buffer. Masking loads inside a walk
   over every row does not make the walk shorter (PERFORMANCE.md, probe results); a
   compacted list does. A separate compaction kernel would cost a launch and a round
   trip through memory on kernels that take 10-30 us, so every program compacts its own
   chunk (a few KB of ``x``): all programs that share a chunk write the same bytes to
   the same scratch slot (an idempotent write; each program reads back what it wrote
   after a CTA barrier, so no program waits for another). gate|up with the activation
   loads ``x`` once and writes both lists; when the two thresholds are equal (every
   uniform setting) it writes one and walks it once for both (``_walk2``).
2. Row walk (``_walk``). The program gathers ``ROWS`` kept rows at a time, each a
   contiguous run of ``BLOCK_N`` weights, and accumulates in fp32. Time therefore falls
   with the kept bytes. The peeled variant (``peel``) runs whole steps unmasked and one
   masked step for the remainder: fewer instructions per weight byte, which shows once
   several CTAs share an SM. ``scalar_rows`` configs walk the kept rows as scalars
   instead (``_walk_rows``: 1-D accumulators, all of a step's row loads in flight; the
   form that made int4 30 % faster, untimed here so far). Compaction and walk are
   separate functions so that quantized weights (int8 per-output-channel scales,
   group-wise int4 along K) can reuse the compaction and swap in a walk that
   dequantizes.
3. Split-K reduction. When the ``N`` blocks alone cannot fill the GPU, ``K`` is split
   into ``split_k`` chunks. Each program writes its fp32 partial; an atomic ticket per
   output block elects the last arriving program, which sums the partials in fixed
   chunk order and applies the epilogue. The atomic only counts arrivals, so results
   are bitwise deterministic; it saves the second launch a reduction kernel would
   need. The ticket counters live in a per-device buffer that the last program resets
   to zero, so concurrent launches of these kernels on different streams of the same
   device are not supported (decoding uses one stream).

The block's glue can ride along (``norm=``, ``residual=``): with ``norm`` every program
normalises x itself (``_scores_norm``: the sum of squares over all of K, a few KB from
L2, instead of a separate RMSNorm kernel); with ``residual`` the epilogue adds the
residual stream. That removes three kernels per block from a decode step.

Batches of 2..64 rows use the union of the rows' kept channels (a row of ``wt`` is read
once for all rows) and a ``tl.dot`` over the gathered rows; each row still uses its own
masked values, so every row of the result equals the reference for that row.

The test is ``|x_i| * s_i > t`` with ``t`` rounded to x's dtype first, which is what
torch does when a half tensor meets a 0-dim fp32 threshold (``reference.sparse_linear_fused``).

Where the time goes (H100, benchmarks/results/kernels-h100-2026-11-23.json): the walk
streams kept rows at the rate cuBLAS streams a dense matrix, but a launch that drops every
input still costs about 9-10 us in that benchmark (x and the thresholds must arrive
before the first weight address is known, then the scratch round trip and the split-K
tickets), 2-3 us more than cuBLAS's smallest GEMV. So the large matrices beat cuBLAS on
the compacted matrix at 25-65 % sparsity and the small ones (q, k, v, o) trail it by
5-20 %.
On the H200, timed as decoding runs them (32 launches over distinct weights in one CUDA
graph; benchmarks/results/kernels-*-h200-2026-12-01-s2.json), a launch that drops every
input costs 5-10 us against 0.9-1.1 us for an empty kernel on the same grid and
2.4-3.1 us for cuBLAS on 16 rows; at p = 0 the launches take 1.10-1.22x cuBLAS's dense
time; the walk over kept rows reaches 3.3 TB/s on gate|up at 50 % (cuBLAS streams the
dense matrix at 4.3) and much less on the small launches, where the fixed cost weighs
most.

No host synchronisation, grid sizes depend only on shapes, and thresholds are read on
the device: the launchers can be captured in CUDA graphs. Configurations are picked
on the host from shapes (tuned table, runtime tuning results, then a heuristic); call
:func:`tune` or :func:`prepare` before capturing, never inside a capture.
"""

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

__all__ = [
    "GemvConfig",
    "sparse_gemv",
    "sparse_gemv_fused",
    "sparse_gate_up_act",
    "get_config",
    "set_config",
    "tune",
    "prepare",
]

ACTS = {"none": 0, "silu": 1, "relu": 2, "relu2": 3, "gelu": 4, "drelu": 5}
MAX_SEGMENTS = 4
MAX_BATCH = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


try:  # Programmatic dependent launch (Triton >= 3.4; Hopper and later GPUs).
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton
    gdc_launch_dependents = gdc_wait = None


@functools.cache
def _pdl_capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_mode(device: torch.device) -> bool:
    """Whether our kernels launch with programmatic dependent launch (the ``PDL``
    constexpr and :func:`pdl_options`).

    With it, a kernel's programs are placed on the GPU while the previous kernel is still
    finishing, and wait at ``gdc_wait`` (the first statement of each of our kernels, so
    every read and write follows the previous kernel's completion and the visibility of
    its writes) instead of the GPU draining between launches.  Each of our kernels lets
    the next one be placed once its walk is done (``gdc_launch_dependents``), before its
    reduction and epilogue.  End to end (H200, Llama-3-8B bf16, one process, interleaved
    rounds; benchmarks/results/ab-pdl-red-h200-2026-12-07.json): dense 218.2 -> 220.3
    tok/s, 40 % 282.7 -> 287.8, 50 % 311.0 -> 318.2, the same tokens; placing the next
    kernel right after the wait instead was slower (277 at 50 %).  On for sm_90 and
    later; TEAL_PDL=0 turns it off."""
    if gdc_wait is None or device.type != "cuda" or _interpreting():
        return False
    return os.environ.get("TEAL_PDL", "1") != "0" and _pdl_capable(device.index or 0)


def pdl_options(on: bool) -> dict:
    """Launch options for :func:`pdl_mode`."""
    return {"launch_pdl": True} if on else {}


# --------------------------------------------------------------------------- kernels


@triton.jit
def _scores(
    x_ptr,
    stride_xb,
    stride_xk,
    s_ptr,
    k_lo,
    k_len,
    B,
    BB: tl.constexpr,
    KC: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Load ``x[:, k_lo:k_lo+k_len]`` (padded to ``[BB, KC]``) and its scores ``|x| * s``."""
    offs = tl.arange(0, KC)
    kmask = offs < k_len
    k = k_lo + offs
    b = tl.arange(0, BB)
    m2 = (b < B)[:, None] & kmask[None, :]
    xv = tl.load(x_ptr + b[:, None] * stride_xb + k[None, :] * stride_xk, mask=m2, other=0.0)
    # fp32 before any arithmetic: the interpreter holds bf16 as raw bit patterns.
    score = tl.abs(xv.to(tl.float32))
    if HAS_SCALE:
        # Same rounding as the reference: scale cast to x's dtype, product in x's dtype.
        s = _round(tl.load(s_ptr + k, mask=kmask, other=0.0).to(tl.float32), xv.dtype, INTERPRET)
        score = _round(score * s[None, :], xv.dtype, INTERPRET)
    # Padding never passes the test, whatever the threshold.
    score = tl.where(m2, score, float("-inf"))
    return xv, score, k


@triton.jit
def _scores_norm(
    x_ptr,
    stride_xb,
    stride_xk,
    s_ptr,
    nw_ptr,
    eps,
    k_lo,
    k_len,
    B,
    K,
    BB: tl.constexpr,
    KC: tl.constexpr,
    NB: tl.constexpr,
    NSTEPS: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """``_scores`` of ``rms_norm(x) * w`` instead of ``x``: the RMSNorm in front of q|k|v
    and gate|up, done by every program of the launch (the sum of squares over all ``K``,
    ``NSTEPS`` tiles of ``NB``: a few KB from L2) instead of by a kernel of its own.
    Rounded as ``reference.rms_norm``: ``x * rsqrt(mean(x^2) + eps)`` in fp32, to x's
    dtype, times the gain in x's dtype."""
    b = tl.arange(0, BB)
    bmask = b < B
    ss = tl.zeros((BB,), dtype=tl.float32)
    for j in range(NSTEPS):
        o = j * NB + tl.arange(0, NB)
        m = bmask[:, None] & (o < K)[None, :]
        v = tl.load(x_ptr + b[:, None] * stride_xb + o[None, :] * stride_xk, mask=m, other=0.0)
        v = v.to(tl.float32)
        ss += tl.sum(v * v, axis=1)
    r = tl.math.rsqrt(ss / K + eps)
    offs = tl.arange(0, KC)
    kmask = offs < k_len
    k = k_lo + offs
    m2 = bmask[:, None] & kmask[None, :]
    xv = tl.load(x_ptr + b[:, None] * stride_xb + k[None, :] * stride_xk, mask=m2, other=0.0)
    xn = _round(xv.to(tl.float32) * r[:, None], xv.dtype, INTERPRET)
    g = tl.load(nw_ptr + k, mask=kmask, other=0.0).to(tl.float32)
    xo = _round(xn * g[None, :], xv.dtype, INTERPRET)
    score = tl.abs(xo)
    if HAS_SCALE:
        s = _round(tl.load(s_ptr + k, mask=kmask, other=0.0).to(tl.float32), xv.dtype, INTERPRET)
        score = _round(score * s[None, :], xv.dtype, INTERPRET)
    score = tl.where(m2, score, float("-inf"))
    # xo is exact in x's dtype (rounded above), so this cast is exact, also when the
    # interpreter truncates.
    return xo.to(xv.dtype), score, k


@triton.jit
def _compact(xv, score, k, t, B, idx_ptr, val_ptr, BB: tl.constexpr, KC: tl.constexpr):
    """Write the kept channels of the chunk in ascending order; return their count.

    ``idx_ptr[j]`` gets the j-th kept channel (kept = kept by any row), ``val_ptr[b*KC+j]``
    row b's value there, zero where row b itself drops it.
    """
    b = tl.arange(0, BB)
    keep2 = score > t
    keep = tl.max(keep2.to(tl.int32), axis=0)
    pos = tl.cumsum(keep, axis=0) - 1
    cnt = tl.sum(keep, axis=0)
    tl.store(idx_ptr + pos, k, mask=keep > 0)
    xm = tl.where(keep2, xv, tl.zeros_like(xv))
    tl.store(
        val_ptr + b[:, None] * KC + pos[None, :], xm, mask=(b < B)[:, None] & (keep > 0)[None, :]
    )
    return cnt


@triton.jit
def _codes_f32(w, INTERPRET: tl.constexpr):
    """A row's weights to fp32 for the scalar-row walk: int8 four bytes at a time on the
    GPU (XOR 0x80 makes each byte q + 128, one PRMT per byte sets it under the exponent of
    2^23, one FADD removes 2^23 + 128), the same values as ``_wf32``."""
    if w.dtype == tl.int8 and not INTERPRET:
        b = tl.inline_asm_elementwise(
            "{ .reg .b32 t, m; xor.b32 t, $4, 0x80808080; mov.b32 m, 0x4B000000; "
            "prmt.b32 $0, t, m, 0x7650; prmt.b32 $1, t, m, 0x7651; "
            "prmt.b32 $2, t, m, 0x7652; prmt.b32 $3, t, m, 0x7653; }",
            "=r,=r,=r,=r,r",
            [w],
            dtype=tl.int32,
            is_pure=True,
            pack=4,
        )
        return b.to(tl.float32, bitcast=True) - 8388736.0
    else:
        return _wf32(w)


@triton.jit
def _row_index(idx_ptr, val_ptr, j, cnt, ROWS: tl.constexpr):
    """Channels and inputs of rows ``j .. j+ROWS`` of the compacted list, as tuples of
    scalars (0 past ``cnt``)."""
    rows = ()
    vals = ()
    for i in tl.static_range(ROWS):
        ok = j + i < cnt
        rows = rows + (tl.load(idx_ptr + j + i, mask=ok, other=0),)
        vals = vals + (tl.load(val_ptr + j + i, mask=ok, other=0.0),)
    return rows, vals


@triton.jit
def _walk_rows(
    w_ptr, stride_wk, cols, cols2, nmask, idx_ptr, val_ptr, cnt, KC: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, TWO: tl.constexpr, INTERPRET: tl.constexpr,
    EVEN_N: tl.constexpr, OFF32: tl.constexpr, PREFETCH: tl.constexpr = False,
):  # fmt: skip
    """Batch 1 with kept rows as scalars (``scalar_rows`` configs): a step loads the
    channels and inputs of ``ROWS`` rows, then every row's run of the block's columns
    (and of ``cols2`` too when ``TWO``: gate and up sharing one list), then multiplies.
    The accumulators are 1-D, a thread holds a few columns of every row, and all of a
    step's weight loads are in flight together (written in that order; a loop body per
    row lets the compiler issue each load just before its use).  ``PREFETCH``: the next
    step's channels and inputs are loaded before this step's weights, so a step waits
    for one memory round trip instead of two.  Returns two ``[1, BLOCK_N]`` sums (the
    second is zero unless ``TWO``)."""
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # No tensor loop bounds in the interpreter (see _walk): masked steps over KC.
    if INTERPRET:
        n = KC
    else:
        n = cnt
    if PREFETCH:
        rows, vals = _row_index(idx_ptr, val_ptr, 0, cnt, ROWS)
    for j in range(0, n, ROWS):
        if PREFETCH:
            cur_rows, cur_vals = rows, vals
            rows, vals = _row_index(idx_ptr, val_ptr, j + ROWS, cnt, ROWS)
        else:
            cur_rows, cur_vals = _row_index(idx_ptr, val_ptr, j, cnt, ROWS)
        runs = ()
        runs2 = ()
        for i in tl.static_range(ROWS):
            if EVEN_N:
                m = j + i < cnt
            else:
                m = nmask & (j + i < cnt)
            if OFF32:
                base = w_ptr + cur_rows[i] * stride_wk
            else:
                base = w_ptr + cur_rows[i].to(tl.int64) * stride_wk
            runs = runs + (tl.load(base + cols, mask=m, other=0.0),)
            if TWO:
                runs2 = runs2 + (tl.load(base + cols2, mask=m, other=0.0),)
        for i in tl.static_range(ROWS):
            v = cur_vals[i].to(tl.float32)
            acc += v * _codes_f32(runs[i], INTERPRET)
            if TWO:
                acc2 += v * _codes_f32(runs2[i], INTERPRET)
    return acc[None, :], acc2[None, :]


@triton.jit
def _walk(
    w_ptr,
    stride_wk,
    cols,
    nmask,
    idx_ptr,
    val_ptr,
    cnt,
    B,
    BB: tl.constexpr,
    KC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    USE_DOT: tl.constexpr,
    F32_DOT: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTERPRET: tl.constexpr,
    ROW_SUM: tl.constexpr = False,
    PEEL: tl.constexpr = False,
    EVEN_N: tl.constexpr = False,
    OFF32: tl.constexpr = False,
    SCALAR: tl.constexpr = False,
):
    """Sum over the ``cnt`` compacted rows of ``val[b, j] * wt[idx[j], cols]`` in fp32.

    Returns ``[BB, BLOCK_N]`` (dot path) or ``[1, BLOCK_N]`` (batch 1, FMA path).
    """
    if SCALAR and not USE_DOT:
        one, _ = _walk_rows(
            w_ptr, stride_wk, cols, cols, nmask, idx_ptr, val_ptr, cnt, KC, BLOCK_N, ROWS,
            False, INTERPRET, EVEN_N, OFF32, PREFETCH,
        )  # fmt: skip
        return one
    # The interpreter (triton 3.6 with numpy >= 2.3) cannot take a tensor as a loop bound;
    # there the walk covers the whole chunk (KC) under masks, which computes the same sum.
    offs_r = tl.arange(0, ROWS)
    if USE_DOT:
        acc = tl.zeros((BB, BLOCK_N), dtype=tl.float32)
        b = tl.arange(0, BB)
    elif ROW_SUM:
        # 1-D accumulator, each step's rows summed at once: with a tile whose warps all
        # lie along N (BLOCK_N = 256 * num_warps for 16-byte loads) that sum stays inside
        # each thread, and the registers a 2-D accumulator would take hold more weight
        # loads in flight instead.
        acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    else:
        # 2-D accumulator: one cross-thread reduction at the end instead of per step.
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    # Row indices are loaded one step ahead, so the dependent index load (an L2 hit)
    # does not sit in front of every weight load.
    rows = tl.load(idx_ptr + offs_r, mask=offs_r < cnt, other=0)
    if PREFETCH:
        # Double buffering by hand (FMA path): the next step's weights are in flight
        # while this step's multiply-adds run.
        w, v = _load_rows(w_ptr, stride_wk, cols, nmask, val_ptr, rows, offs_r, cnt)
        rows = tl.load(idx_ptr + ROWS + offs_r, mask=ROWS + offs_r < cnt, other=0)
        if INTERPRET:
            for j in range(0, KC, ROWS):
                r1 = j + ROWS + offs_r
                w1, v1 = _load_rows(w_ptr, stride_wk, cols, nmask, val_ptr, rows, r1, cnt)
                rows = tl.load(idx_ptr + ROWS + r1, mask=ROWS + r1 < cnt, other=0)
                acc = _fma(acc, v, w, ROW_SUM)
                w, v = w1, v1
        else:
            for j in range(0, cnt, ROWS):
                r1 = j + ROWS + offs_r
                w1, v1 = _load_rows(w_ptr, stride_wk, cols, nmask, val_ptr, rows, r1, cnt)
                rows = tl.load(idx_ptr + ROWS + r1, mask=ROWS + r1 < cnt, other=0)
                acc = _fma(acc, v, w, ROW_SUM)
                w, v = w1, v1
    elif PEEL and not INTERPRET and not USE_DOT:
        # Whole steps first, with no row mask (and no column mask when the block width
        # divides N): the loads are unpredicated, the index and value loads 16-byte
        # vectors, and no register is zeroed for masked lanes. A step costs fewer
        # instructions per weight byte, which matters once several CTAs share an SM.
        # Then one masked step for the remainder. The scratch slots are padded by ROWS
        # so the index load one step ahead may read past the list (never used unmasked).
        n_full = cnt - cnt % ROWS
        for j in range(0, n_full, ROWS):
            j0 = tl.multiple_of(j, ROWS)
            w = _gather(w_ptr, stride_wk, cols, nmask, rows, offs_r < ROWS, EVEN_N, OFF32, False)
            v = tl.load(val_ptr + j0 + offs_r)
            rows = tl.load(idx_ptr + j0 + ROWS + offs_r)
            acc = _fma(acc, v, w, ROW_SUM)
        r = n_full + offs_r
        rmask = r < cnt
        w = _gather(w_ptr, stride_wk, cols, nmask, rows, rmask, EVEN_N, OFF32, True)
        v = tl.load(val_ptr + r, mask=rmask, other=0.0)
        acc = _fma(acc, v, w, ROW_SUM)
    else:
        if INTERPRET:
            for j in range(0, KC, ROWS):
                r = j + offs_r
                w, v = _load_rows(w_ptr, stride_wk, cols, nmask, val_ptr, rows, r, cnt)
                rows = tl.load(idx_ptr + ROWS + r, mask=ROWS + r < cnt, other=0)
                if USE_DOT:
                    acc = _dot_acc(acc, w, val_ptr, b, B, r, cnt, KC, F32_DOT)
                else:
                    acc = _fma(acc, v, w, ROW_SUM)
        else:
            for j in range(0, cnt, ROWS):
                r = j + offs_r
                w, v = _load_rows(w_ptr, stride_wk, cols, nmask, val_ptr, rows, r, cnt)
                rows = tl.load(idx_ptr + ROWS + r, mask=ROWS + r < cnt, other=0)
                if USE_DOT:
                    acc = _dot_acc(acc, w, val_ptr, b, B, r, cnt, KC, F32_DOT)
                else:
                    acc = _fma(acc, v, w, ROW_SUM)
    if USE_DOT or ROW_SUM:
        return acc
    else:
        return tl.sum(acc, axis=0)[None, :]


@triton.jit
def _fma(acc, v, w, ROW_SUM: tl.constexpr):
    """Batch-1 step: ``acc += v[:, None] * w``, summed over the step's rows at once
    when ``ROW_SUM`` (``acc`` is then ``[1, BLOCK_N]``)."""
    prod = v.to(tl.float32)[:, None] * _wf32(w)
    if ROW_SUM:
        return acc + tl.sum(prod, axis=0, keep_dims=True)
    else:
        return acc + prod


@triton.jit
def _gather(
    w_ptr,
    stride_wk,
    cols,
    nmask,
    rows,
    rmask,
    EVEN_N: tl.constexpr,
    OFF32: tl.constexpr,
    MASK_R: tl.constexpr,
):
    """Rows ``rows`` of the block's columns; masked by ``rmask`` only when ``MASK_R``,
    by ``nmask`` only when not ``EVEN_N``. ``OFF32``: row offsets fit in int32 (one
    wide multiply-add per row instead of a 64-bit product)."""
    if OFF32:
        ptrs = w_ptr + (rows * stride_wk)[:, None] + cols[None, :]
    else:
        ptrs = w_ptr + rows.to(tl.int64)[:, None] * stride_wk + cols[None, :]
    if MASK_R:
        if EVEN_N:
            m = rmask[:, None]
        else:
            m = rmask[:, None] & nmask[None, :]
        return tl.load(ptrs, mask=m, other=0.0)
    elif EVEN_N:
        return tl.load(ptrs)
    else:
        return tl.load(ptrs, mask=nmask[None, :], other=0.0)


@triton.jit
def _load_rows(w_ptr, stride_wk, cols, nmask, val_ptr, rows, r, cnt):
    """Kept rows ``r`` (positions in the compacted list; ``rows`` their channels): each a
    contiguous run of the block's columns, and the batch-1 input values there."""
    rmask = r < cnt
    w = tl.load(
        w_ptr + rows.to(tl.int64)[:, None] * stride_wk + cols[None, :],
        mask=rmask[:, None] & nmask[None, :],
        other=0.0,
    )
    v = tl.load(val_ptr + r, mask=rmask, other=0.0)
    return w, v


@triton.jit
def _dot_acc(acc, w, val_ptr, b, B, r, cnt, KC: tl.constexpr, F32_DOT: tl.constexpr):
    """Batch path: ``acc[BB, BLOCK_N] += vals[BB, ROWS] @ w[ROWS, BLOCK_N]`` on tensor cores."""
    v = tl.load(
        val_ptr + b[:, None] * KC + r[None, :],
        mask=(b < B)[:, None] & (r < cnt)[None, :],
        other=0.0,
    )
    if F32_DOT:
        acc += tl.dot(v.to(tl.float32), _wf32(w), input_precision="ieee")
    else:
        acc = tl.dot(v, w.to(v.dtype), acc)  # int8 codes are exact in fp16/bf16
    return acc


@triton.jit
def _wf32(w):
    """Weights to fp32.  int8 codes go through the mantissa of 2^23 (integer add, or,
    float subtract) instead of I2F, which runs at a quarter of the FMA rate on recent
    GPUs and would cap an int8 stream below the memory bandwidth."""
    if w.dtype == tl.int8:
        b = (w.to(tl.int32) + 128) | 0x4B000000
        return b.to(tl.float32, bitcast=True) - 8388736.0
    else:
        return w.to(tl.float32)


@triton.jit
def _round(v, dtype: tl.constexpr, INTERPRET: tl.constexpr):
    """fp32 ``v`` rounded to ``dtype`` (nearest even), returned as fp32.

    The interpreter truncates fp32 -> bf16; rounding by hand keeps CPU tests exact.
    """
    if INTERPRET and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
        return bits.to(tl.float32, bitcast=True)
    else:
        return v.to(dtype).to(tl.float32)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 1:  # silu
        return g / (1.0 + tl.exp(-g))
    elif ACT == 2 or ACT == 5:  # relu; drelu's gate (its up: _epilogue)
        return tl.maximum(g, 0.0)
    elif ACT == 3:  # relu2
        r = tl.maximum(g, 0.0)
        return r * r
    elif ACT == 4:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return 0.5 * g * (2.0 / (1.0 + tl.exp(-2.0 * z)))
    else:
        return g


@triton.jit
def _segment(pid_n, W0, W1, W2, W3, NSEG: tl.constexpr, BLOCK: tl.constexpr):
    """Which of up to four concatenated output segments (widths ``W0..W3``) output
    block ``pid_n`` lies in: ``(segment, block within it, its first column, its
    width)``.  Scalar arithmetic, no branches; a block never spans two segments."""
    nb0 = tl.cdiv(W0, BLOCK)
    blk = pid_n
    seg = pid_n * 0
    col0 = pid_n * 0
    width = pid_n * 0 + W0
    if NSEG > 1:
        s1 = (pid_n >= nb0).to(tl.int32)
        seg += s1
        blk -= s1 * nb0
        col0 += s1 * W0
        width += s1 * (W1 - W0)
    if NSEG > 2:
        nb1 = tl.cdiv(W1, BLOCK)
        s2 = (pid_n >= nb0 + nb1).to(tl.int32)
        seg += s2
        blk -= s2 * nb1
        col0 += s2 * W1
        width += s2 * (W2 - W1)
    if NSEG > 3:
        nb2 = tl.cdiv(W2, BLOCK)
        s3 = (pid_n >= nb0 + nb1 + nb2).to(tl.int32)
        seg += s3
        blk -= s3 * nb2
        col0 += s3 * W2
        width += s3 * (W3 - W2)
    return seg, blk, col0, width


@triton.jit
def _pair_walks(
    xv, score, k, t1, B, w_ptr, stride_wk, cols, cols2, nmask, idx_ptr, val_ptr, slot0,
    slot1, cnt0, BB: tl.constexpr, KC: tl.constexpr, BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr, USE_DOT: tl.constexpr, F32_DOT: tl.constexpr,
    PREFETCH: tl.constexpr, INTERPRET: tl.constexpr, ROW_SUM: tl.constexpr,
    PEEL: tl.constexpr, EVEN_N: tl.constexpr, OFF32: tl.constexpr, SCALAR: tl.constexpr,
):  # fmt: skip
    """gate|up with the up list compacted under its own threshold: two walks in turn."""
    cnt1 = _compact(xv, score, k, t1, B, idx_ptr + slot1 * KC, val_ptr + slot1 * BB * KC, BB, KC)
    # Makes this CTA's scratch writes visible to all of its threads.
    tl.debug_barrier()
    acc = _walk(
        w_ptr, stride_wk, cols, nmask, idx_ptr + slot0 * KC, val_ptr + slot0 * BB * KC, cnt0,
        B, BB, KC, BLOCK_N, ROWS, USE_DOT, F32_DOT, PREFETCH, INTERPRET, ROW_SUM, PEEL,
        EVEN_N, OFF32, SCALAR,
    )  # fmt: skip
    acc2 = _walk(
        w_ptr, stride_wk, cols2, nmask, idx_ptr + slot1 * KC, val_ptr + slot1 * BB * KC, cnt1,
        B, BB, KC, BLOCK_N, ROWS, USE_DOT, F32_DOT, PREFETCH, INTERPRET, ROW_SUM, PEEL,
        EVEN_N, OFF32, SCALAR,
    )  # fmt: skip
    return acc, acc2


@triton.jit
def _walk2(
    w_ptr, stride_wk, cols, cols2, nmask, idx_ptr, val_ptr, cnt, KC: tl.constexpr,
    BLOCK_N: tl.constexpr, ROWS: tl.constexpr, INTERPRET: tl.constexpr,
    ROW_SUM: tl.constexpr, EVEN_N: tl.constexpr, OFF32: tl.constexpr, SCALAR: tl.constexpr,
    PREFETCH: tl.constexpr = False,
):  # fmt: skip
    """Batch 1, one compacted list for two column runs of each row (gate and up): one
    index and value load per step serves both, both runs' loads are in flight together,
    and the loop starts and drains once. Peeled as in ``_walk``."""
    if SCALAR:
        return _walk_rows(
            w_ptr, stride_wk, cols, cols2, nmask, idx_ptr, val_ptr, cnt, KC, BLOCK_N, ROWS,
            True, INTERPRET, EVEN_N, OFF32, PREFETCH,
        )  # fmt: skip
    offs_r = tl.arange(0, ROWS)
    if ROW_SUM:
        acc = tl.zeros((1, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((1, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
        acc2 = tl.zeros((ROWS, BLOCK_N), dtype=tl.float32)
    rows = tl.load(idx_ptr + offs_r, mask=offs_r < cnt, other=0)
    if INTERPRET:
        # No tensor loop bounds in the interpreter (see _walk): masked steps over KC.
        for j in range(0, KC, ROWS):
            r = j + offs_r
            rmask = r < cnt
            w = _gather(w_ptr, stride_wk, cols, nmask, rows, rmask, EVEN_N, OFF32, True)
            w2 = _gather(w_ptr, stride_wk, cols2, nmask, rows, rmask, EVEN_N, OFF32, True)
            v = tl.load(val_ptr + r, mask=rmask, other=0.0)
            rows = tl.load(idx_ptr + ROWS + r, mask=ROWS + r < cnt, other=0)
            acc = _fma(acc, v, w, ROW_SUM)
            acc2 = _fma(acc2, v, w2, ROW_SUM)
    else:
        n_full = cnt - cnt % ROWS
        for j in range(0, n_full, ROWS):
            j0 = tl.multiple_of(j, ROWS)
            full = offs_r < ROWS
            w = _gather(w_ptr, stride_wk, cols, nmask, rows, full, EVEN_N, OFF32, False)
            w2 = _gather(w_ptr, stride_wk, cols2, nmask, rows, full, EVEN_N, OFF32, False)
            v = tl.load(val_ptr + j0 + offs_r)
            rows = tl.load(idx_ptr + j0 + ROWS + offs_r)
            acc = _fma(acc, v, w, ROW_SUM)
            acc2 = _fma(acc2, v, w2, ROW_SUM)
        r = n_full + offs_r
        rmask = r < cnt
        w = _gather(w_ptr, stride_wk, cols, nmask, rows, rmask, EVEN_N, OFF32, True)
        w2 = _gather(w_ptr, stride_wk, cols2, nmask, rows, rmask, EVEN_N, OFF32, True)
        v = tl.load(val_ptr + r, mask=rmask, other=0.0)
        acc = _fma(acc, v, w, ROW_SUM)
        acc2 = _fma(acc2, v, w2, ROW_SUM)
    if ROW_SUM:
        return acc, acc2
    else:
        return tl.sum(acc, axis=0)[None, :], tl.sum(acc2, axis=0)[None, :]


@triton.jit
def _sparse_gemv_kernel(
    x_ptr,
    stride_xb,
    stride_xk,
    w_ptr,
    stride_wk,
    t_ptr,
    s_ptr,
    idx_ptr,
    val_ptr,
    part_ptr,
    lock_ptr,
    y_ptr,
    stride_yb,
    qs_ptr,
    nw_ptr,
    eps,
    res_ptr,
    stride_rb,
    B,
    K,
    N_PART,
    k_chunk,
    W0,
    W1,
    W2,
    W3,
    NSEG: tl.constexpr,
    PAIR: tl.constexpr,
    ACT: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_QS: tl.constexpr,
    BB: tl.constexpr,
    KC: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    F32_DOT: tl.constexpr,
    PREFETCH: tl.constexpr,
    INTERPRET: tl.constexpr,
    ROW_SUM: tl.constexpr = False,
    PEEL: tl.constexpr = False,
    EVEN_N: tl.constexpr = False,
    OFF32: tl.constexpr = False,
    PAIR_WALK: tl.constexpr = False,
    NORM: tl.constexpr = False,
    NB: tl.constexpr = 16,
    NSTEPS: tl.constexpr = 1,
    RES: tl.constexpr = False,
    PDL: tl.constexpr = False,
    SCALAR: tl.constexpr = False,
):
    """Grid ``(output blocks, split_k)``.

    Plain/fused (PAIR=0): output block ``pid_n`` lies in one segment of ``wt``'s columns
    (segments never share a block, so each block has one threshold). PAIR=1 (gate|up with
    an activation): block ``pid_n`` covers the same columns of gate and of up, so the
    epilogue can form ``act(gate) * up`` in registers.
    """
    if PDL:
        gdc_wait()  # first: x, the residual and every buffer follow the previous kernel
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    k_lo = pid_k * k_chunk
    k_len = tl.minimum(k_chunk, K - k_lo)
    b = tl.arange(0, BB)
    bmask = b < B

    if PAIR:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < W0
        cols = offs_n
        cols2 = W0 + offs_n
        t0 = _round(tl.load(t_ptr).to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        t1 = _round(tl.load(t_ptr + 1).to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        slot0 = pid_k
        slot1 = SPLIT_K + pid_k
        if NORM:
            xv, score, k = _scores_norm(
                x_ptr, stride_xb, stride_xk, s_ptr, nw_ptr, eps, k_lo, k_len, B, K, BB, KC,
                NB, NSTEPS, HAS_SCALE, INTERPRET,
            )  # fmt: skip
        else:
            xv, score, k = _scores(
                x_ptr, stride_xb, stride_xk, s_ptr, k_lo, k_len, B, BB, KC, HAS_SCALE, INTERPRET
            )
        # One load of x serves both lists (gate and up may have different thresholds).
        cnt0 = _compact(
            xv, score, k, t0, B, idx_ptr + slot0 * KC, val_ptr + slot0 * BB * KC, BB, KC
        )
        if PAIR_WALK:
            if t0 == t1:
                # One threshold (every uniform setting): one list, and one walk that
                # loads the gate and the up run of each kept row together.
                tl.debug_barrier()
                acc, acc2 = _walk2(
                    w_ptr, stride_wk, cols, cols2, nmask, idx_ptr + slot0 * KC,
                    val_ptr + slot0 * BB * KC, cnt0, KC, BLOCK_N, ROWS, INTERPRET, ROW_SUM,
                    EVEN_N, OFF32, SCALAR, PREFETCH,
                )  # fmt: skip
            else:
                acc, acc2 = _pair_walks(
                    xv, score, k, t1, B, w_ptr, stride_wk, cols, cols2, nmask, idx_ptr,
                    val_ptr, slot0, slot1, cnt0, BB, KC, BLOCK_N, ROWS, USE_DOT, F32_DOT,
                    PREFETCH, INTERPRET, ROW_SUM, PEEL, EVEN_N, OFF32, SCALAR,
                )  # fmt: skip
        else:
            acc, acc2 = _pair_walks(
                xv, score, k, t1, B, w_ptr, stride_wk, cols, cols2, nmask, idx_ptr,
                val_ptr, slot0, slot1, cnt0, BB, KC, BLOCK_N, ROWS, USE_DOT, F32_DOT,
                PREFETCH, INTERPRET, ROW_SUM, PEEL, EVEN_N, OFF32, SCALAR,
            )  # fmt: skip
    else:
        seg, blk, col0, width = _segment(pid_n, W0, W1, W2, W3, NSEG, BLOCK_N)
        offs_n = blk * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = offs_n < width
        cols = col0 + offs_n
        # Compared in x's dtype, as torch compares a half tensor with a 0-dim fp32 tensor.
        t = _round(tl.load(t_ptr + seg).to(tl.float32), x_ptr.dtype.element_ty, INTERPRET)
        slot = seg * SPLIT_K + pid_k
        if NORM:
            xv, score, k = _scores_norm(
                x_ptr, stride_xb, stride_xk, s_ptr, nw_ptr, eps, k_lo, k_len, B, K, BB, KC,
                NB, NSTEPS, HAS_SCALE, INTERPRET,
            )  # fmt: skip
        else:
            xv, score, k = _scores(
                x_ptr, stride_xb, stride_xk, s_ptr, k_lo, k_len, B, BB, KC, HAS_SCALE, INTERPRET
            )
        cnt = _compact(xv, score, k, t, B, idx_ptr + slot * KC, val_ptr + slot * BB * KC, BB, KC)
        tl.debug_barrier()
        acc = _walk(
            w_ptr,
            stride_wk,
            cols,
            nmask,
            idx_ptr + slot * KC,
            val_ptr + slot * BB * KC,
            cnt,
            B,
            BB,
            KC,
            BLOCK_N,
            ROWS,
            USE_DOT,
            F32_DOT,
            PREFETCH,
            INTERPRET,
            ROW_SUM,
            PEEL,
            EVEN_N,
            OFF32,
            SCALAR,
        )
        acc2 = acc  # unused
        cols2 = cols  # unused
    if PDL:
        gdc_launch_dependents()  # the walk is done: the next kernel may be placed

    if USE_DOT:
        rb = b
        rmask = bmask
    else:
        rb = tl.arange(0, 1)
        rmask = rb < 1

    if SPLIT_K > 1:
        pmask = rmask[:, None] & nmask[None, :]
        pbase = part_ptr + pid_k * B * N_PART + rb[:, None] * N_PART
        tl.store(pbase + cols[None, :], acc, mask=pmask)
        if PAIR:
            tl.store(pbase + cols2[None, :], acc2, mask=pmask)
        # All threads' partial stores happen before the (release) ticket.
        tl.debug_barrier()
        ticket = tl.atomic_add(lock_ptr + pid_n, 1, sem="acq_rel")
        if ticket == SPLIT_K - 1:
            # Last to arrive: sum every chunk's partial in fixed order (deterministic).
            acc = _sum_parts(part_ptr, B, N_PART, rb, cols, pmask, acc, SPLIT_K)
            if PAIR:
                acc2 = _sum_parts(part_ptr, B, N_PART, rb, cols2, pmask, acc2, SPLIT_K)
            tl.atomic_xchg(lock_ptr + pid_n, 0)  # ready for the next launch
            _epilogue(
                y_ptr, stride_yb, rb, rmask, offs_n, cols, cols2, nmask, acc, acc2, qs_ptr,
                PAIR, ACT, HAS_QS, INTERPRET, res_ptr, stride_rb, RES,
            )  # fmt: skip
    else:
        _epilogue(
            y_ptr, stride_yb, rb, rmask, offs_n, cols, cols2, nmask, acc, acc2, qs_ptr,
            PAIR, ACT, HAS_QS, INTERPRET, res_ptr, stride_rb, RES,
        )  # fmt: skip


@triton.jit
def _sum_parts(part_ptr, B, N_PART, rb, cols, pmask, like, SPLIT_K: tl.constexpr):
    """Sum of the ``SPLIT_K`` fp32 partials of columns ``cols`` (rows ``rb``), in fixed
    order, one partial per step.  Measured slower end to end (Llama-3-8B bf16 at 50 %,
    benchmarks/results/ab-*-2026-12-07.json): ``[16, BLOCK_N]`` tiles summed along the
    first axis (H200: 311 -> 280 tok/s; their registers spill; every launch's floor rose
    too), and four partials per step unrolled (H100: 253 -> 244)."""
    acc = tl.zeros_like(like)
    for s in range(SPLIT_K):
        ptr = part_ptr + s * B * N_PART + rb[:, None] * N_PART + cols[None, :]
        acc += tl.load(ptr, mask=pmask, other=0.0, cache_modifier=".cg")
    return acc


@triton.jit
def _epilogue(
    y_ptr,
    stride_yb,
    rb,
    rmask,
    offs_n,
    cols,
    cols2,
    nmask,
    acc,
    acc2,
    qs_ptr,
    PAIR: tl.constexpr,
    ACT: tl.constexpr,
    HAS_QS: tl.constexpr,
    INTERPRET: tl.constexpr,
    res_ptr,
    stride_rb,
    RES: tl.constexpr,
):
    ty = y_ptr.dtype.element_ty
    omask = rmask[:, None] & nmask[None, :]
    if HAS_QS:
        # int8 weights: the per-output-channel scale factors out of the sum over K.
        acc = acc * tl.load(qs_ptr + cols, mask=nmask, other=0.0).to(tl.float32)[None, :]
        if PAIR:
            acc2 = acc2 * tl.load(qs_ptr + cols2, mask=nmask, other=0.0).to(tl.float32)[None, :]
    if PAIR:
        # Round gate, up and act(gate) to the output dtype before the product, as the
        # unfused reference does: a one-ulp difference here flips channels that sit at
        # the down projection's threshold, and flips compound over layers.
        g = _round(acc, ty, INTERPRET)
        u = _round(acc2, ty, INTERPRET)
        if ACT == 5:  # dReLU: the up branch through ReLU as well
            u = tl.maximum(u, 0.0)
        h = _round(_round(_act(g, ACT), ty, INTERPRET) * u, ty, INTERPRET)
        tl.store(y_ptr + rb[:, None] * stride_yb + offs_n[None, :], h.to(ty), mask=omask)
    else:
        h = _round(acc, ty, INTERPRET)
        if RES:
            # The residual add after o and down (``h + project(x)``): the projection's
            # output rounded first, then the sum rounded, as two torch ops would.
            r = tl.load(res_ptr + rb[:, None] * stride_rb + cols[None, :], mask=omask, other=0.0)
            h = _round(h + r.to(tl.float32), ty, INTERPRET)
        tl.store(y_ptr + rb[:, None] * stride_yb + cols[None, :], h.to(ty), mask=omask)


# --------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters. ``rows``: kept rows gathered per loop step; ``split_k``: K chunks."""

    block_n: int = 128
    rows: int = 32
    split_k: int = 4
    num_warps: int = 4
    num_stages: int = 1
    dot: bool = False  # batch 1 through tl.dot (batches > 1 always use it)
    prefetch: bool = False  # FMA path: load the next rows before this step's math
    row_sum: bool = False  # FMA path: 1-D accumulator, each step's rows summed at once
    peel: bool = False  # FMA path without prefetch: unmasked whole steps, one masked tail
    # Batch 1: kept rows as scalars, a step's row loads all in flight, 1-D accumulators
    # (int4: triton_quant._walk_q4_rows; fp16/bf16/int8: _walk_rows).
    scalar_rows: bool = False


# Batch 1, the launches decoding makes (qkv, o, gate|up with its activation, down).
# Llama-3-8B's four: winners of the in-graph search on one H100, 2026-12-07
# (benchmarks/bench_kernels.py --site-tune --site-family scalar;
# benchmarks/results/kernels-site-tune-scalar-h100-2026-12-07.json): least summed time at
# sparsity 0, .25, .4, .5, .65 with 32 launches over distinct weights in one CUDA graph;
# the walk over kept rows as scalars with the next step's channels loaded ahead won every
# site (3.5 % less per layer at 50 % than the entries before it, the H200 search of
# 2026-12-01). Llama-2-7B's three: the H200 search of 2026-12-01
# (kernels-site-tune-h200-2026-12-01-s2.json, gate|up from
# kernels-site-tune-pair-h200-2026-12-01-s2.json). Other entries: the H100 search
# (benchmarks/bench_kernels.py --tune, 2026-11-23), a starting point elsewhere; run tune()
# or --site-tune for another GPU.
# bf16; fp16 reads the same bytes and uses the same entries.
# Key: (K, N of the launch, pair, batch bucket).
_TABLE: dict[tuple[int, int, bool, int], GemvConfig] = {
    (4096, 6144, False, 1): GemvConfig(512, 16, 22, 4, prefetch=True, scalar_rows=True),
    (4096, 4096, False, 1): GemvConfig(512, 16, 33, 4, prefetch=True, scalar_rows=True),
    (4096, 28672, True, 1): GemvConfig(512, 16, 9, 4, prefetch=True, scalar_rows=True),
    (14336, 4096, False, 1): GemvConfig(512, 16, 33, 4, prefetch=True, scalar_rows=True),
    (4096, 12288, False, 1): GemvConfig(512, 16, 22, 4, 1, False, False, peel=True),
    (4096, 22016, True, 1): GemvConfig(256, 32, 6, 4, 1, False, False, peel=True),
    (11008, 4096, False, 1): GemvConfig(512, 16, 49, 4, 1, False, False, peel=True),
    # H100, 2026-11-23.
    (4096, 1024, False, 1): GemvConfig(128, 32, 32, 4, 1, False, False),
    (4096, 28672, False, 1): GemvConfig(512, 16, 5, 4, 1, False, True),
    (4096, 14336, False, 1): GemvConfig(512, 16, 10, 4, 1, False, True),
    (4096, 22016, False, 1): GemvConfig(512, 16, 7, 4, 1, False, True),
    (4096, 11008, False, 1): GemvConfig(512, 16, 12, 4, 1, False, True),
    (4096, 6144, False, 16): GemvConfig(256, 64, 11, 4, 1, True, False),
    (4096, 28672, True, 16): GemvConfig(256, 64, 10, 4, 1, True, False),
    (14336, 4096, False, 16): GemvConfig(256, 32, 33, 4, 3, True, False),
}

# Runtime results of tune() / set_config(): key (K, N, pair, batch bucket, dtype).
_TUNED: dict[tuple, GemvConfig] = {}

_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _NUM_SMS:
        _NUM_SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _NUM_SMS[i]


def _bucket(b: int) -> int:
    # Batches of 2..16 run the same kernel (the dot tile is padded to 16 rows).
    return 1 if b == 1 else max(16, triton.next_power_of_2(b))


def _heuristic(k: int, n: int, pair: bool, b: int, device: torch.device) -> GemvConfig:
    """What the H100 tuning (bench_kernels.py --tune) kept choosing, for shapes not in
    the table: wide row runs, about two CTAs per SM, chunks of K of a few hundred rows."""
    n_eff = n // 2 if pair else n
    sms = _num_sms(device)
    if b > 1:
        block_n, rows, waves = 256, 64, 2
    elif n_eff >= 2048:
        block_n, rows, waves = 512, 16, 2
    else:
        block_n, rows, waves = 128, 32, 4
    block_n = min(block_n, max(16, triton.next_power_of_2(n_eff)))
    n_blocks = triton.cdiv(n_eff, block_n)
    split = max(1, min(triton.cdiv(waves * sms, n_blocks), triton.cdiv(k, 128)))
    bb = 1 if b == 1 else max(16, triton.next_power_of_2(b))
    # Keep the compaction tile (bb x chunk) small enough for registers.
    while bb * triton.next_power_of_2(triton.cdiv(k, split)) > 16384:
        split *= 2
    prefetch = b == 1 and block_n <= 128
    # Wide batch-1 runs: the peeled walk was never slower in the H200 search, except for
    # gate|up, whose shared two-run walk at 512 columns was erratic across chunk counts
    # (60-200 us for Llama-2-7B's; kernels-site-tune-pair-h200-2026-12-01-s2.json).
    peel = b == 1 and not prefetch and not pair
    return GemvConfig(block_n, rows, split, 4, 1, b > 1, prefetch, peel=peel)


# Quantized weights (kernels/triton_quant.py): key (K, N, pair, batch bucket, format),
# format "int8" or "int4" (block_n counts output columns: int4 reads block_n / 2 bytes
# of each kept row).  Winners of the small search in benchmarks/bench_quant.py (least time
# at p = 0 plus p = 0.5; Llama-3-8B shapes).  int8: one H100, 2026-12-07, among the entries
# before it (an H200 search of 2026-12-01) and the walk over kept rows as scalars, which
# won q|k|v, gate|up and lm_head
# (benchmarks/results/quant-configs-int8-rows-h100-2026-12-07.json; decode 195.0 -> 216.5
# tok/s dense, 260.6 -> 297.6 at 50 %).  int4 g128: the same search on one H100,
# 2026-12-07, once the walk with rows as scalars existed (scalar_rows); it won every shape
# (quant-configs-int4-rows-h100-2026-12-07.json).
_QTABLE: dict[tuple[int, int, bool, int, str], GemvConfig] = {
    (4096, 6144, False, 1, "int8"): GemvConfig(512, 16, 44, 4, prefetch=True, scalar_rows=True),
    (4096, 4096, False, 1, "int8"): GemvConfig(512, 16, 33, 4, 1, False, True),
    (4096, 28672, True, 1, "int8"): GemvConfig(512, 16, 19, 4, scalar_rows=True),
    (14336, 4096, False, 1, "int8"): GemvConfig(512, 16, 33, 4, 1, False, True),
    (4096, 128256, False, 1, "int8"): GemvConfig(1024, 8, 5, 4, scalar_rows=True),
    (4096, 6144, False, 1, "int4"): GemvConfig(1024, 32, 32, 4, scalar_rows=True),
    (4096, 4096, False, 1, "int4"): GemvConfig(1024, 32, 32, 4, scalar_rows=True),
    (4096, 28672, True, 1, "int4"): GemvConfig(1024, 32, 32, 4, scalar_rows=True),
    (14336, 4096, False, 1, "int4"): GemvConfig(1024, 16, 66, 4, scalar_rows=True),
    (4096, 128256, False, 1, "int4"): GemvConfig(2048, 8, 9, 4, scalar_rows=True),
}


def _q_heuristic(fmt: str, k: int, n: int, pair: bool, b: int, device: torch.device) -> GemvConfig:
    if fmt == "int8" or b > 1:
        return _heuristic(k, n, pair, b, device)
    # int4: rows as scalars, a row run of 512 bytes per program (1024 outputs), about four
    # programs per SM, chunks of K of one or a few groups (what the H100 search kept).
    n_eff = n // 2 if pair else n
    sms = _num_sms(device)
    block_n = min(1024, max(32, triton.next_power_of_2(n_eff)))
    n_blocks = triton.cdiv(n_eff, block_n)
    split = max(1, min(triton.cdiv(4 * sms, n_blocks), triton.cdiv(k, 128)))
    return GemvConfig(block_n, 32, split, 4, scalar_rows=True)


def get_config(
    k: int,
    n: int,
    dtype: torch.dtype | str,
    b: int = 1,
    pair: bool = False,
    device: torch.device | str = "cuda",
) -> GemvConfig:
    """The configuration a launch of this shape uses (tuned, then table, then heuristic).
    ``dtype``: the activations' dtype, or ``"int8"`` / ``"int4"`` for quantized weights."""
    bk = _bucket(b)
    cfg = _TUNED.get((k, n, pair, bk, dtype))
    if isinstance(dtype, str):
        if cfg is None:
            cfg = _QTABLE.get((k, n, pair, bk, dtype))
        return cfg or _q_heuristic(dtype, k, n, pair, b, torch.device(device))
    if cfg is None:
        cfg = _TABLE.get((k, n, pair, bk))
    if cfg is None:
        cfg = _heuristic(k, n, pair, b, torch.device(device))
    return cfg


def set_config(
    k: int, n: int, dtype: torch.dtype | str, cfg: GemvConfig, b: int = 1, pair: bool = False
) -> None:
    """Pin the configuration used for a shape (what :func:`tune` does with its winner)."""
    _TUNED[(k, n, pair, _bucket(b), dtype)] = cfg


# --------------------------------------------------------------------------- launchers

_LOCKS: dict[tuple[str, int | None], Tensor] = {}


def _locks(device: torch.device, n: int) -> Tensor:
    """Per-device split-K ticket counters; zero between launches (the kernel resets them)."""
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 8192), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


_KEEP_ALL: dict[tuple[str, int | None, int], Tensor] = {}


def _as_threshold(t: Tensor | float | None, n: int, device: torch.device) -> Tensor:
    if t is None:
        # Dense: -inf keeps every channel (padding is scored -inf and still drops). One
        # cached tensor per device, so a captured graph allocates nothing for it.
        key = (device.type, device.index, n)
        if key not in _KEEP_ALL:
            _KEEP_ALL[key] = torch.full((n,), float("-inf"), device=device)
        return _KEEP_ALL[key]
    if not isinstance(t, Tensor):
        # Convenience only: a new tensor per call cannot be updated inside a CUDA graph.
        t = torch.full((n,), float(t), dtype=torch.float32, device=device)
    t = t.reshape(-1)
    if t.numel() == 1 and n > 1:
        t = t.expand(n).contiguous()
    if t.numel() != n:
        raise ValueError(f"expected {n} threshold(s), got a tensor of {t.numel()}")
    if t.device != device:
        raise ValueError(
            f"thresholds are on {t.device}, x on {device}: move them once, outside the decode loop"
        )
    return t if t.is_contiguous() else t.contiguous()


def _launch(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor | float,
    splits: tuple[int, ...],
    scale: Tensor | None,
    pair: bool,
    act: str,
    config: GemvConfig | None = None,
    qscale: Tensor | None = None,
    norm: tuple[Tensor, float] | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    if wt.dim() != 2:
        raise ValueError(f"wt must be [K, N], got shape {tuple(wt.shape)}")
    k, n = wt.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} channels, wt has {k} rows (wt is [K, N])")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if qscale is not None:
        if wt.dtype != torch.int8 or qscale.numel() != n:
            raise ValueError(
                f"int8 weights need wt int8 [K, N] and qscale [N], got {wt.dtype},"
                f" {tuple(qscale.shape)}"
            )
        qscale = qscale.reshape(-1)
    elif x.dtype != wt.dtype:
        raise ValueError(f"x and wt must share a float dtype, got {x.dtype} and {wt.dtype}")
    if wt.stride(1) != 1:
        raise ValueError(
            "wt must have contiguous rows (wt.stride(1) == 1): store it "
            "input-major once at load time, not per call"
        )
    if sum(splits) != n or not 1 <= len(splits) <= MAX_SEGMENTS:
        raise ValueError(f"splits {splits} must sum to N={n} with 1..{MAX_SEGMENTS} segments")
    if pair and (len(splits) != 2 or splits[0] != splits[1]):
        raise ValueError(f"gate|up needs two equal halves, got {splits}")
    if act not in ACTS:
        raise ValueError(f"unknown activation {act!r}: expected one of {sorted(ACTS)}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    b = x2.shape[0]
    if not 1 <= b <= MAX_BATCH:
        raise ValueError(
            f"sparse GEMV takes 1..{MAX_BATCH} rows, got {b}: use a dense matmul for prefill"
        )
    dev = x.device
    t = _as_threshold(thresholds, len(splits), dev)
    if scale is not None:
        if scale.numel() != k:
            raise ValueError(f"scale must have {k} entries (one per input channel)")
        scale = scale.reshape(-1).contiguous()
    if norm is not None:
        nw, eps = norm
        if nw.shape != (k,) or nw.dtype != x.dtype or nw.device != dev:
            raise ValueError(
                f"the norm's gain must be [{k}] in x's dtype on x's device, got"
                f" {tuple(nw.shape)} {nw.dtype} on {nw.device}"
            )
        nw = nw.contiguous()
    n_y = splits[0] if pair else n
    if residual is not None:
        if pair:
            raise ValueError("the residual add is for plain projections (o, down), not gate|up")
        if residual.numel() == b * n_y:
            residual = residual.reshape(b, n_y)
        if residual.shape != (b, n_y) or residual.dtype != x.dtype or residual.stride(1) != 1:
            raise ValueError(
                f"residual must be [{b}, {n_y}] with contiguous rows in x's dtype, got"
                f" {tuple(residual.shape)} {residual.dtype}"
            )
    key_dtype = x.dtype if qscale is None else "int8"
    cfg = config or get_config(k, n, key_dtype, b, pair, dev)

    use_dot = cfg.dot or b > 1
    bb = max(16, triton.next_power_of_2(b)) if use_dot else 1
    k_chunk = triton.cdiv(k, max(1, cfg.split_k))
    split = triton.cdiv(k, k_chunk)
    kc = max(16, triton.next_power_of_2(k_chunk))
    block_n = cfg.block_n
    rows = max(cfg.rows, 16) if use_dot else cfg.rows
    widths = list(splits) + [0] * (MAX_SEGMENTS - len(splits))
    if pair:
        grid_n = triton.cdiv(splits[0], block_n)
        n_out = splits[0]
        slots = 2
    else:
        grid_n = sum(triton.cdiv(w, block_n) for w in splits)
        n_out = n
        slots = len(splits)

    peel = cfg.peel and not use_dot and not cfg.prefetch
    # Tile of the fused RMSNorm's sum of squares: the whole row at batch 1.
    nb = max(16, min(triton.next_power_of_2(k), 4096 // bb))
    y = torch.empty((b, n_out), dtype=x.dtype, device=dev)
    # The peeled walk reads the next step's indices unmasked, up to ROWS past a slot.
    pad = rows if peel else 0
    idx = torch.empty(slots * split * kc + pad, dtype=torch.int32, device=dev)
    val = torch.empty(slots * split * bb * kc + pad, dtype=x.dtype, device=dev)
    if split > 1:
        part = torch.empty((split, b, n), dtype=torch.float32, device=dev)
        locks = _locks(dev, grid_n)
    else:
        part = y  # unused
        locks = idx  # unused
    pdl = pdl_mode(dev)
    _sparse_gemv_kernel[(grid_n, split)](
        x2,
        x2.stride(0),
        x2.stride(1),
        wt,
        wt.stride(0),
        t,
        scale if scale is not None else t,
        idx,
        val,
        part,
        locks,
        y,
        y.stride(0),
        qscale if qscale is not None else t,
        nw if norm is not None else t,
        float(norm[1]) if norm is not None else 0.0,
        residual if residual is not None else y,
        residual.stride(0) if residual is not None else 0,
        b,
        k,
        n,
        k_chunk,
        widths[0],
        widths[1],
        widths[2],
        widths[3],
        NSEG=len(splits),
        PAIR=pair,
        ACT=ACTS[act] if pair else 0,
        HAS_SCALE=scale is not None,
        HAS_QS=qscale is not None,
        BB=bb,
        KC=kc,
        BLOCK_N=block_n,
        ROWS=rows,
        SPLIT_K=split,
        USE_DOT=use_dot,
        PREFETCH=cfg.prefetch and not use_dot,
        F32_DOT=_interpreting() or x.dtype == torch.float32,
        INTERPRET=_interpreting(),
        ROW_SUM=cfg.row_sum and not use_dot,
        PEEL=peel,
        EVEN_N=all(w % block_n == 0 for w in splits),
        OFF32=k * wt.stride(0) < 2**31,
        PAIR_WALK=pair and (peel or (cfg.scalar_rows and not use_dot)),
        NORM=norm is not None,
        NB=nb,
        NSTEPS=triton.cdiv(k, nb),
        RES=residual is not None,
        PDL=pdl,
        SCALAR=cfg.scalar_rows and not use_dot,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_options(pdl),
    )
    return y.reshape(*lead, n_out)


def sparse_gemv(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    scale: Tensor | None = None,
    config: GemvConfig | None = None,
) -> Tensor:
    """``sparsify(x, t, scale) @ wt`` reading only the rows of ``wt`` that some row keeps.

    x: ``[..., K]`` (1 to 64 rows in all, any strides); wt: ``[K, N]`` with contiguous rows;
    thresholds: a 1-element fp32 tensor on x's device (a tensor so that a captured CUDA
    graph sees new values). Keeps channel i of a row where ``|x_i| * scale_i > t`` (t
    rounded to x's dtype). With several rows, a row of ``wt`` is read if any row keeps
    the channel, and each row still multiplies by zero where it drops the channel.
    Returns ``[..., N]`` in x's dtype, accumulated in fp32.
    """
    return _launch(x, wt, thresholds, (wt.shape[1],), scale, False, "none", config)


def sparse_gemv_fused(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: tuple[int, ...],
    scale: Tensor | None = None,
    config: GemvConfig | None = None,
    norm: tuple[Tensor, float] | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """One input, up to four weights concatenated along N (q|k|v, gate|up), one launch.

    Segment j (``splits[j]`` columns) sees the input sparsified with ``thresholds[j]``.
    ``norm = (gain, eps)``: the input is ``rms_norm(x, gain, eps)`` (computed in the
    launch, ``reference.rms_norm``'s rounding). ``residual``: returns ``residual + y``
    (``[..., N]``, the sum rounded as two torch ops would), the block's residual add.
    """
    return _launch(
        x, wt, thresholds, tuple(int(s) for s in splits), scale, False, "none", config,
        norm=norm, residual=residual,
    )  # fmt: skip


def sparse_gate_up_act(
    x: Tensor,
    wt_gate_up: Tensor,
    thresholds: Tensor,
    act: str = "silu",
    scale: Tensor | None = None,
    config: GemvConfig | None = None,
    norm: tuple[Tensor, float] | None = None,
) -> Tensor:
    """``act(x_g @ gate) * (x_u @ up)`` with ``wt_gate_up = [gate | up]`` (``[K, 2F]``).

    ``thresholds[0]`` sparsifies the gate input, ``thresholds[1]`` the up input. The
    activation runs in the epilogue: returns the down projection's input ``[..., F]``.
    ``norm = (gain, eps)``: the input is ``rms_norm(x, gain, eps)``, as in
    :func:`sparse_gemv_fused`.
    """
    f = wt_gate_up.shape[1] // 2
    if wt_gate_up.shape[1] != 2 * f:
        raise ValueError(f"wt_gate_up must be [K, 2F], got {tuple(wt_gate_up.shape)}")
    return _launch(x, wt_gate_up, thresholds, (f, f), scale, True, act, config, norm=norm)


# --------------------------------------------------------------------------- tuning


def candidate_configs(k: int, n: int, pair: bool, b: int = 1) -> list[GemvConfig]:
    """A small search space around what filled an H100 best: tile widths, rows per step,
    split-K (from a target number of waves of CTAs), double buffering, tl.dot, the walk
    over kept rows as scalars."""
    out = []
    n_eff = n // 2 if pair else n
    sms = 132

    def split_for(block_n, waves):
        n_blocks = triton.cdiv(n_eff, block_n)
        return max(1, min(triton.cdiv(waves * sms, n_blocks), triton.cdiv(k, 128)))

    if b > 1:
        # Batches always take the tl.dot path; its loads pipeline with num_stages > 1.
        for block_n in (64, 128, 256):
            for rows in (32, 64):
                for stages in (1, 3):
                    for waves in (2, 4):
                        split = split_for(block_n, waves)
                        out.append(GemvConfig(block_n, rows, split, 4, stages, True))
        return sorted(set(out), key=lambda c: (c.block_n, c.split_k, c.rows, c.num_stages))
    dot = False
    for block_n in (128, 256, 512):
        if block_n > max(16, triton.next_power_of_2(n_eff)):
            continue
        for waves in (2, 4):
            shapes = ((16, 4), (16, 8)) if block_n == 512 else ((16, 4), (32, 4))
            for rows, warps in shapes:
                for pre in (False, True):
                    split = split_for(block_n, waves)
                    out.append(GemvConfig(block_n, rows, split, warps, 1, dot, pre and not dot))
    # No split-K where the output blocks alone make enough CTAs: no partials, no tickets.
    for block_n in (64, 128):
        if triton.cdiv(n_eff, block_n) >= 3 * sms // 2:
            for rows in (32, 64):
                out.append(GemvConfig(block_n, rows, 1, 4, 1, False, True))
    # tl.dot: the compiler pipelines its operand loads (cp.async) num_stages deep.
    for block_n, rows, stages in ((128, 32, 3), (128, 64, 4), (256, 32, 3)):
        if block_n <= max(16, triton.next_power_of_2(n_eff)):
            out.append(GemvConfig(block_n, rows, split_for(block_n, 4), 4, stages, True))
    if n_eff < 256:
        out.append(GemvConfig(64, 32, split_for(64, 4), 4, 1, dot))
    # Kept rows as scalars (the walk int4's table uses everywhere), with and without the
    # next step's channels loaded ahead.
    for block_n, rows in ((512, 16), (1024, 16), (2048, 8)):
        if block_n <= max(16, triton.next_power_of_2(n_eff)):
            for waves in (2, 4):
                for pre in (False, True):
                    split = split_for(block_n, waves)
                    out.append(GemvConfig(block_n, rows, split, 4, prefetch=pre, scalar_rows=True))
    order = ("block_n", "split_k", "rows", "num_stages", "dot", "prefetch", "scalar_rows")
    return sorted(set(out), key=lambda c: tuple(getattr(c, f) for f in order))


def tune(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: tuple[int, ...] | None = None,
    pair: bool = False,
    act: str = "silu",
    scale: Tensor | None = None,
    candidates: list[GemvConfig] | None = None,
    rep_ms: int = 40,
) -> tuple[GemvConfig, list[tuple[GemvConfig, float]]]:
    """Time the candidates on these inputs (L2 flushed), pin and return the fastest.

    Run it before capturing a CUDA graph, on representative activations: timing depends
    on the kept fraction. Returns the winner and every (config, median us).
    """
    from triton.testing import do_bench

    k, n = wt.shape
    b = x.reshape(-1, k).shape[0]
    splits = tuple(splits) if splits else ((n // 2, n // 2) if pair else (n,))
    cands = candidates or candidate_configs(k, n, pair, b)
    results = []
    for cfg in cands:

        def fn(cfg=cfg):
            if pair:
                return sparse_gate_up_act(x, wt, thresholds, act, scale, config=cfg)
            return sparse_gemv_fused(x, wt, thresholds, splits, scale, config=cfg)

        ms = do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")
        results.append((cfg, ms * 1e3))
    best = min(results, key=lambda r: r[1])[0]
    set_config(k, n, x.dtype, best, b, pair)
    return best, results


def prepare(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: tuple[int, ...] | None = None,
    pair: bool = False,
    act: str = "silu",
    scale: Tensor | None = None,
) -> None:
    """Compile the kernel for this shape and allocate the ticket counters, outside capture."""
    k, n = wt.shape
    splits = tuple(splits) if splits else ((n // 2, n // 2) if pair else (n,))
    if pair:
        sparse_gate_up_act(x, wt, thresholds, act, scale)
    else:
        sparse_gemv_fused(x, wt, thresholds, splits, scale)
