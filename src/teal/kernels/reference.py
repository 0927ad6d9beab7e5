"""Plain-torch reference for every sparse kernel in this package.

Weights are stored input-major: ``wt`` has shape ``[K, N]`` (one contiguous row of
``W^T`` per input channel), so ``y = x @ wt`` and a dropped input channel is a
skipped contiguous row.  Every fast kernel is tested against these functions.
"""

from __future__ import annotations

import torch
from torch import Tensor


def keep_mask(x: Tensor, threshold: Tensor | float, scale: Tensor | None = None) -> Tensor:
    """Channels that survive: ``|x_i| * s_i > t`` (``s`` defaults to 1)."""
    score = x.abs() if scale is None else x.abs() * scale.to(x.dtype)
    return score > threshold


def sparsify(x: Tensor, threshold: Tensor | float, scale: Tensor | None = None) -> Tensor:
    """``x * (|x| * s > t)``: zero the inputs whose (scaled) magnitude is at most ``t``."""
    return torch.where(
        keep_mask(x, threshold, scale), x, torch.zeros((), dtype=x.dtype, device=x.device)
    )


def sparse_linear(
    x: Tensor, wt: Tensor, threshold: Tensor | float, scale: Tensor | None = None
) -> Tensor:
    """``sparsify(x) @ wt`` with fp32 accumulation, returned in ``x``'s dtype."""
    xs = sparsify(x, threshold, scale)
    return (xs.float() @ wt.float()).to(x.dtype)


def sparse_linear_fused(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: tuple[int, ...],
    scale: Tensor | None = None,
) -> Tensor:
    """One input, several weights concatenated along N (q|k|v or gate|up).

    ``splits`` are the output widths of the segments (summing to N); segment ``j``
    sees the input sparsified with ``thresholds[j]``.
    """
    outs = []
    start = 0
    for j, width in enumerate(splits):
        outs.append(sparse_linear(x, wt[:, start : start + width], thresholds[j], scale))
        start += width
    return torch.cat(outs, dim=-1)


def sparse_gate_up_act(
    x: Tensor,
    wt_gate_up: Tensor,
    thresholds: Tensor,
    act: str = "silu",
    scale: Tensor | None = None,
) -> Tensor:
    """``act(gate) * up`` where ``wt_gate_up = [gate | up]`` along N (the down input)."""
    ffn = wt_gate_up.shape[1] // 2
    gu = sparse_linear_fused(x, wt_gate_up, thresholds, (ffn, ffn), scale).float()
    gate, up = gu[..., :ffn], gu[..., ffn:]
    return gate_up_product(gate, up, act).to(x.dtype)


def gate_up_product(gate: Tensor, up: Tensor, act: str) -> Tensor:
    """The MLP's middle from its two projections: ``act(gate) * up``; with dReLU (as in
    TurboSparse) the up branch passes through ReLU too, so the middle is zero wherever
    either branch is negative."""
    if act == "drelu":
        up = torch.relu(up)
    return apply_act(gate, act) * up


def apply_act(x: Tensor, act: str) -> Tensor:
    """The MLP activations of the Llama family and its ReLU-family relatives (``drelu``:
    ReLU on the gate here; ``gate_up_product`` applies it to the up branch)."""
    if act == "silu":
        return torch.nn.functional.silu(x)
    if act in ("relu", "drelu"):
        return torch.relu(x)
    if act == "relu2":
        return torch.relu(x).square()
    if act == "gelu":
        return torch.nn.functional.gelu(x, approximate="tanh")
    raise ValueError(f"unknown activation {act!r}: expected silu, relu, relu2, drelu or gelu")


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """RMSNorm as the model computes it: normalised in fp32, cast back to ``x``'s dtype
    before the gain (in bf16 the order of these two steps changes the result)."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(x.dtype)


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
    """One decode step's attention as the model's torch ops do it (``decoder.Attention``):
    RoPE on q and k (rotate-half), the new key and value written into the cache at
    ``input_pos``, SDPA over the positions up to it (and inside the window)."""
    b, t, _ = qkv.shape
    d = k_cache.shape[-1]
    q, k, v = qkv.split((n_heads * d, n_kv_heads * d, n_kv_heads * d), dim=-1)
    q = q.view(b, t, n_heads, d).transpose(1, 2)
    k = k.view(b, t, n_kv_heads, d).transpose(1, 2)
    v = v.view(b, t, n_kv_heads, d).transpose(1, 2)

    def rope(x: Tensor) -> Tensor:
        rot = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), dim=-1)
        return x * cos + rot * sin

    q, k = rope(q), rope(k)
    k_cache.index_copy_(2, input_pos, k)
    v_cache.index_copy_(2, input_pos, v)
    k_pos = torch.arange(k_cache.shape[2], device=qkv.device)
    mask = k_pos[None, :] <= input_pos[:, None]
    if window is not None:
        mask = mask & (k_pos[None, :] > input_pos[:, None] - window)
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k_cache, v_cache, attn_mask=mask, enable_gqa=n_heads != n_kv_heads
    )
    return out.transpose(1, 2).reshape(b, t, n_heads * d)
