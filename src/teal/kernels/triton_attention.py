"""One-token decode attention in one Triton launch: RoPE on q and k, the cache write and
attention over the cached positions.

The model's own path for a decode step is five to six small kernels per layer once
compiled (RoPE and the cache write, the bool mask made additive, the query prepared
for SDPA, SDPA itself, a copy): about 10 us per layer on an H200, a tenth of a sparse
step at 50 % (benchmarks/results/profile-decode-*-s2.json). Here one program per query
head does all of it:

* q and k get RoPE in the rotate-half layout, rounded as the model's torch ops round
  (``x * cos`` and ``rotate_half(x) * sin`` each to x's dtype, then their sum);
* the first head of each group writes the new key and value at ``input_pos``; every
  head takes the new position's key and value from registers and reads only earlier
  positions from the cache, so no program reads what another writes;
* scores, softmax and the weighted sum of values in fp32 with an online softmax over
  tiles of ``BLOCK_L`` positions, the output rounded once to x's dtype.

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

from teal.kernels.triton_gemv import _round

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
    out_ptr,
    stride_ob,
    sm_scale,
    window,
    HQ: tl.constexpr,
    HKV: tl.constexpr,
    D: tl.constexpr,
    BLOCK_L: tl.constexpr,
    MAX_L: tl.constexpr,
    INTERPRET: tl.constexpr,
):
    """Grid ``(batch, query heads)``."""
    pid_b = tl.program_id(0)
    h = tl.program_id(1)
    kvh = h // (HQ // HKV)
    d = tl.arange(0, D)
    dt = qkv_ptr.dtype.element_ty
    pos = tl.load(pos_ptr).to(tl.int32)
    cos = tl.load(cos_ptr + d).to(tl.float32)
    sin = tl.load(sin_ptr + d).to(tl.float32)
    row = qkv_ptr + pid_b * stride_qkv
    q = _rope(row + h * D, d, cos, sin, D, INTERPRET)
    k_new = _rope(row + HQ * D + kvh * D, d, cos, sin, D, INTERPRET)
    v_new = tl.load(row + (HQ + HKV) * D + kvh * D + d).to(tl.float32)
    cache = pid_b * stride_cb + kvh * stride_ch
    if h % (HQ // HKV) == 0:
        tl.store(k_ptr + cache + pos * stride_cl + d, k_new.to(dt))
        tl.store(v_ptr + cache + pos * stride_cl + d, v_new.to(dt))
    # The new position first (always attended), then the cached ones in tiles.
    m = tl.sum(q * k_new, axis=0) * sm_scale
    l_sum = m * 0.0 + 1.0
    acc = v_new
    lo = pos * 0
    if window > 0:
        lo = tl.maximum(pos - window + 1, 0)
    offs = tl.arange(0, BLOCK_L)
    if INTERPRET:
        # No tensor loop bounds in the interpreter: every tile of the cache, masked.
        for start in range(0, MAX_L, BLOCK_L):
            m, l_sum, acc = _tile(
                k_ptr, v_ptr, cache, stride_cl, start + offs, d, q, lo, pos, sm_scale, m,
                l_sum, acc,
            )  # fmt: skip
    else:
        for start in range(lo - lo % BLOCK_L, pos, BLOCK_L):
            m, l_sum, acc = _tile(
                k_ptr, v_ptr, cache, stride_cl, start + offs, d, q, lo, pos, sm_scale, m,
                l_sum, acc,
            )  # fmt: skip
    out = _round(acc / l_sum, dt, INTERPRET)
    tl.store(out_ptr + pid_b * stride_ob + h * D + d, out.to(dt))


@triton.jit
def _tile(k_ptr, v_ptr, cache, stride_cl, lpos, d, q, lo, pos, sm_scale, m, l_sum, acc):
    """Online-softmax update with the cached positions ``lpos`` in ``[lo, pos)``."""
    lmask = (lpos >= lo) & (lpos < pos)
    ptrs = cache + lpos[:, None] * stride_cl + d[None, :]
    k = tl.load(k_ptr + ptrs, mask=lmask[:, None], other=0.0).to(tl.float32)
    s = tl.sum(k * q[None, :], axis=1) * sm_scale
    s = tl.where(lmask, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=0))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new)
    v = tl.load(v_ptr + ptrs, mask=lmask[:, None], other=0.0).to(tl.float32)
    acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
    l_sum = l_sum * alpha + tl.sum(p, axis=0)
    return m_new, l_sum, acc


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
    out = torch.empty((b, 1, n_heads * d), dtype=qkv.dtype, device=qkv.device)
    _decode_attention_kernel[(b, n_heads)](
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
        out,
        out.stride(0),
        d**-0.5,
        int(window or 0),
        HQ=n_heads,
        HKV=n_kv_heads,
        D=d,
        BLOCK_L=32,
        MAX_L=triton.next_power_of_2(max_len),
        INTERPRET=_interpreting(),
        num_warps=4,
    )
    return out
