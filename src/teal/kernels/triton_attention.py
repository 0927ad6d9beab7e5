"""One-token decode attention in one Triton launch: RoPE on q and k, the cache write and
attention over the cached positions.

The model's own path for a decode step is five to six small kernels per layer once
compiled (RoPE and the cache write, the bool mask made additive, the query prepared
for SDPA, SDPA itself, a copy): about 10 us per layer on an H200, a tenth of a sparse
step at 50 % (benchmarks/results/profile-decode-*-s2.json). Here one launch does all of
it, with up to 16 programs per query head, each over one span of the cached positions
(so the launch is about one tile deep at any position):

* q and k get RoPE in the rotate-half layout, rounded as the model's torch ops round
  (``x * cos`` and ``rotate_half(x) * sin`` each to x's dtype, then their sum);
* the first head of each group writes the new key and value at ``input_pos``; every
  head takes the new position's key and value from registers and reads only earlier
  positions from the cache, so no program reads what another writes;
* scores, softmax and the weighted sum of values in fp32 with an online softmax over
  tiles of ``BLOCK_L`` positions; the last program of a head to finish (an atomic
  ticket that only counts arrivals) combines the spans' partials in fixed order, so the
  result is deterministic; the output is rounded once to x's dtype.

``reference.decode_attention`` is the same computation in plain torch (what the model
runs without this kernel). The position is read on the device, so a CUDA graph replays
it for every position; grid and tiles depend only on shapes.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from teal.kernels.triton_gemv import _round, gdc_launch_dependents, gdc_wait, pdl_mode, pdl_options

__all__ = ["decode_attention"]


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _rope(x_ptr, d, cos, sin, D: tl.constexpr, INTERPRET: tl.constexpr):
    """``x * cos + rotate_half(x) * sin`` for one head at ``x_ptr``, eager torch's roundings."""
    x = tl.load(x_ptr + d).to(tl.float32)
    other = tl.load(x_ptr + (d + D // 2) % D).to(tl.float32)
    rot = tl.where(d < D // 2, -other, other)
    dt = x_ptr.dtype.element_ty
    a = _round(x * cos, dt, INTERPRET)
    b = _round(rot * sin, dt, INTERPRET)
    return _round(a + b, dt, INTERPRET)


@triton.jit
def _decode_attention_kernel(
    qkv_ptr,
    stride_qkv,
    cos_ptr,
    sin_ptr,
    k_ptr,
    v_ptr,
    stride_cb,
    stride_ch,
    stride_cl,
    pos_ptr,
    part_ptr,
    lock_ptr,
    out_ptr,
    stride_ob,
    sm_scale,
    window,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    SPAN: tl.constexpr,
    NSPLIT: tl.constexpr,
    NSPLIT_P2: tl.constexpr,
    INTERPRET: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Grid ``(batch, query heads, NSPLIT)``: program ``s`` covers cached positions
    ``[s * SPAN, (s + 1) * SPAN)`` (within the window and before ``input_pos``); program 0
    also takes the new position. Each writes its softmax partial (running max, sum,
    weighted values); the last of a head to arrive (a ticket, as the GEMV's split-K)
    combines them in fixed order, so the result is deterministic."""
    if PDL:
        gdc_wait()  # first: see triton_gemv.pdl_mode
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    sid = tl.program_id(2)
    kvh = h // (HQ // HKV)
    d = tl.arange(0, D)
    dt = qkv_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int32)
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)
    row = qkv_ptr + pid_b * stride_qkv
    q = _rope(row + h * D, d, cos, sin, D, INTERPRET)
    cache = pid_b * stride_cb + kvh * stride_ch
    # A finite floor instead of -inf: exp(floor - floor) is 1, never nan.
    m = tl.sum(q * 0.0, axis=0) - 1e30
    l_sum = m * 0.0
    acc = q * 0.0
    if sid == 0:
        k_new = _rope(row + HQ * D + kvh * D, d, cos, sin, D, INTERPRET)
        v_new = tl.load(row + (HQ + HKV) * D + kvh * D + d).to(tl.float32)
        if h % (HQ // HKV) == 0:
            tl.store(k_ptr + cache + pos * stride_cl + d, k_new.to(dt))
            tl.store(v_ptr + cache + pos * stride_cl + d, v_new.to(dt))
        m = tl.sum(q * k_new, axis=0) * sm_scale
        l_sum = m * 0.0 + 1.0
        acc = v_new
    lo = pos * 0
    if window > 0:
        lo = tl.maximum(pos - window + 1, 0)
    first = sid * SPAN
    offs = tl.arange(0, BLOCK_L)
    # Only positions before input_pos come from the cache: no program reads what
    # program 0 writes.
    if INTERPRET:
        # No tensor loop bounds in the interpreter: every tile of the span, masked.
        for t0 in range(0, SPAN, BLOCK_L):
            m, l_sum, acc = _tile(
                k_ptr, v_ptr, cache, stride_cl, first + t0 + offs, d, q, lo, pos, sm_scale,
                m, l_sum, acc,
            )  # fmt: skip
    else:
        stop = tl.minimum(first + SPAN, pos)
        for t0 in range(first, stop, BLOCK_L):
            m, l_sum, acc = _tile(
                k_ptr, v_ptr, cache, stride_cl, t0 + offs, d, q, lo, pos, sm_scale, m, l_sum,
                acc,
            )  # fmt: skip
    if PDL:
        gdc_launch_dependents()
    head = pid_b * HQ + h
    if NSPLIT == 1:
        out = _round(acc / l_sum, dt, INTERPRET)
        tl.store(out_ptr + pid_b * stride_ob + h * D + d, out.to(dt))
    else:
        base = part_ptr + (head * NSPLIT + sid) * (D + 2)
        tl.store(base + d, acc)
        tl.store(base + D, m)
        tl.store(base + D + 1, l_sum)
        # All threads' partial stores happen before the (release) ticket.
        tl.debug_barrier()
        ticket = tl.atomic_add(lock_ptr + head, 1, sem="acq_rel")
        if ticket == NSPLIT - 1:
            hb = part_ptr + head * NSPLIT * (D + 2)
            js = tl.arange(0, NSPLIT_P2)
            ms = tl.load(hb + js * (D + 2) + D, mask=js < NSPLIT, other=-1e30, cache_modifier=".cg")
            mx = tl.max(ms, axis=0)
            tot = acc * 0.0
            den = mx * 0.0
            for j in range(NSPLIT):
                pj = hb + j * (D + 2)
                w = tl.exp(tl.load(pj + D, cache_modifier=".cg") - mx)
                tot += w * tl.load(pj + d, cache_modifier=".cg")
                den += w * tl.load(pj + D + 1, cache_modifier=".cg")
            tl.atomic_xchg(lock_ptr + head, 0)  # ready for the next launch
            out = _round(tot / den, dt, INTERPRET)
            tl.store(out_ptr + pid_b * stride_ob + h * D + d, out.to(dt))


@triton.jit
def _tile(k_ptr, v_ptr, cache, stride_cl, lpos, d, q, lo, pos, sm_scale, m, l_sum, acc):
    """Online-softmax update with the cached positions ``lpos`` in ``[lo, pos)``; keys
    and values are loaded together before any arithmetic."""
    lmask = (lpos >= lo) & (lpos < pos)
    ptrs = cache + lpos[:, None] * stride_cl + d[None, :]
    k = tl.load(k_ptr + ptrs, mask=lmask[:, None], other=0.0)
    v = tl.load(v_ptr + ptrs, mask=lmask[:, None], other=0.0)
    s = tl.sum(k.to(tl.float32) * q[None, :], axis=1) * sm_scale
    s = tl.where(lmask, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new)
    acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), axis=0)
    l_sum = l_sum * alpha + tl.sum(p, axis=0)
    return m_new, l_sum, acc


_LOCKS: dict[tuple[str, int | None], Tensor] = {}


def _locks(device: torch.device, n: int) -> Tensor:
    """Per-device ticket counters, zero between launches (the combining program resets
    its own); like the GEMV's, not for concurrent launches on several streams."""
    key = (device.type, device.index)
    buf = _LOCKS.get(key)
    if buf is None or buf.numel() < n:
        buf = torch.zeros(max(n, 1024), dtype=torch.int32, device=device)
        _LOCKS[key] = buf
    return buf


def _splits(max_len: int) -> tuple[int, int, int]:
    """(tile, span, programs per head): spans of one to a few tiles, at most 16 programs
    per head, so that a step's attention is about one tile deep whatever the position."""
    block_l = 32
    nsplit = min(16, triton.cdiv(max_len, block_l))
    span = triton.cdiv(triton.cdiv(max_len, nsplit), block_l) * block_l
    return block_l, span, triton.cdiv(max_len, span)


def decode_attention(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    input_pos: Tensor,
    n_heads: int,
    n_kv_heads: int,
    window: int | None = None,
) -> Tensor:
    """Attention of one new token per sequence; writes its key and value into the cache.

    qkv: ``[B, 1, (n_heads + 2 n_kv_heads) * D]`` (q|k|v, before RoPE); cos, sin: ``[1, D]``
    for the token's position; k_cache, v_cache: ``[B, n_kv_heads, max_len, D]``;
    input_pos: ``[1]`` on the device; window: sliding window (None: the whole cache).
    Returns ``[B, 1, n_heads * D]`` in qkv's dtype, as ``reference.decode_attention``.
    """
    b, t, width = qkv.shape
    _, hkv, max_len, d = k_cache.shape
    if t != 1 or hkv != n_kv_heads or width != (n_heads + 2 * n_kv_heads) * d:
        raise ValueError(
            f"decode attention takes qkv [B, 1, (heads + 2 kv heads) * D], got {tuple(qkv.shape)}"
            f" with a cache of {tuple(k_cache.shape)} and {n_heads}/{n_kv_heads} heads"
        )
    if n_heads % n_kv_heads or d != triton.next_power_of_2(d) or d < 16:
        raise ValueError(f"decode attention needs a power-of-two head size >= 16, got {d}")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache must share strides with contiguous heads")
    if not (qkv.dtype == k_cache.dtype == v_cache.dtype == cos.dtype == sin.dtype):
        raise ValueError("qkv, cache and rope tables must share one dtype")
    q2 = qkv.reshape(b, width)
    if q2.stride(1) != 1:
        q2 = q2.contiguous()
    dev = qkv.device
    out = torch.empty((b, 1, n_heads * d), dtype=qkv.dtype, device=dev)
    block_l, span, nsplit = _splits(max_len)
    part = torch.empty((b * n_heads * nsplit, d + 2), dtype=torch.float32, device=dev)
    pdl = pdl_mode(dev)
    _decode_attention_kernel[(b, n_heads, nsplit)](
        q2,
        q2.stride(0),
        cos.reshape(-1).contiguous(),
        sin.reshape(-1).contiguous(),
        k_cache,
        v_cache,
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        input_pos,
        part,
        _locks(dev, b * n_heads),
        out,
        out.stride(0),
        d**-0.5,
        int(window or 0),
        HQ=n_heads,
        HKV=n_kv_heads,
        D=d,
        BLOCK_L=block_l,
        SPAN=span,
        NSPLIT=nsplit,
        NSPLIT_P2=triton.next_power_of_2(nsplit),
        INTERPRET=_interpreting(),
        PDL=pdl,
        num_warps=4,
        **pdl_options(pdl),
    )
    return out
