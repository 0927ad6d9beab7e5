"""The Triton kernels as the ``triton`` backend of the model's projection switch.

Each kernel is wrapped in a ``torch.library`` custom op so that ``torch.compile``
treats it as one opaque call (its launcher picks tile configurations on the host,
which the compiler need not trace) and a CUDA graph captures it like any kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teal.errors import TealError
from teal.kernels import triton_attention, triton_gemv, triton_quant
from teal.kernels.dispatch import (
    register_backend,
    register_decode_attention,
    register_quant_backend,
)

MAX_ROWS = triton_gemv.MAX_BATCH


@torch.library.custom_op("teal::sparse_gemv_fused", mutates_args=())
def _fused(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: list[int],
    scale: Tensor | None,
    norm_w: Tensor | None,
    eps: float,
    residual: Tensor | None,
) -> Tensor:
    norm = None if norm_w is None else (norm_w, eps)
    return triton_gemv.sparse_gemv_fused(
        x, wt, thresholds, tuple(splits), scale, norm=norm, residual=residual
    )


@_fused.register_fake
def _(x, wt, thresholds, splits, scale, norm_w, eps, residual):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], wt.shape[1])


@torch.library.custom_op("teal::sparse_gate_up_act", mutates_args=())
def _gate_up(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    act: str,
    scale: Tensor | None,
    norm_w: Tensor | None,
    eps: float,
) -> Tensor:
    norm = None if norm_w is None else (norm_w, eps)
    return triton_gemv.sparse_gate_up_act(x, wt, thresholds, act, scale, norm=norm)


@_gate_up.register_fake
def _(x, wt, thresholds, act, scale, norm_w, eps):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], wt.shape[1] // 2)


def _rows(x: Tensor) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS:
        raise TealError(
            f"the Triton sparse kernels take at most {MAX_ROWS} rows per decode step,"
            f" got {rows.shape[0]}: decode with a smaller batch"
        )
    return rows


def project(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    splits: tuple[int, ...],
    scale: Tensor | None,
    norm: tuple[Tensor, float] | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``norm``: ``(gain, eps)`` of the RMSNorm in front (done in the kernel);
    ``residual``: added to the output in the kernel's epilogue."""
    nw, eps = norm if norm is not None else (None, 0.0)
    res = None if residual is None else residual.reshape(-1, wt.shape[1])
    y = _fused(_rows(x), wt, thresholds, list(splits), scale, nw, float(eps), res)
    return y.view(*x.shape[:-1], wt.shape[1])


def gate_up(
    x: Tensor,
    wt: Tensor,
    thresholds: Tensor,
    act: str,
    scale: Tensor | None,
    norm: tuple[Tensor, float] | None = None,
) -> Tensor:
    nw, eps = norm if norm is not None else (None, 0.0)
    y = _gate_up(_rows(x), wt, thresholds, act, scale, nw, float(eps))
    return y.view(*x.shape[:-1], wt.shape[1] // 2)


register_backend("triton", project, gate_up, fuses_glue=True)


@torch.library.custom_op("teal::quant_gemv", mutates_args=())
def _quant(
    x: Tensor,
    qweight: Tensor,
    scales: Tensor,
    zeros: Tensor | None,
    thresholds: Tensor | None,
    splits: list[int],
    group_size: int,
    act: str,
    scale: Tensor | None,
) -> Tensor:
    if act:
        return triton_quant.quant_gate_up_act(
            x, qweight, scales, zeros, thresholds, act, group_size, scale
        )
    return triton_quant.quant_gemv(
        x, qweight, scales, zeros, thresholds, tuple(splits), group_size, scale
    )


@_quant.register_fake
def _(x, qweight, scales, zeros, thresholds, splits, group_size, act, scale):  # noqa: ANN001, ANN202
    n = scales.shape[-1]
    return x.new_empty(x.shape[0], n // 2 if act else n)


def quant_project(
    x: Tensor,
    qw,  # noqa: ANN001  (teal.model.quant.QuantWeight)
    thresholds: Tensor | None,
    splits: tuple[int, ...],
    scale: Tensor | None,
    act: str | None,
) -> Tensor:
    """A projection (``act`` None) or gate|up with its activation on quantized weights;
    ``thresholds`` None: dense."""
    n = qw.shape[1] // 2 if act else qw.shape[1]
    y = _quant(
        _rows(x), qw.qweight, qw.scales, qw.zeros, thresholds, list(splits), qw.group_size,
        act or "", scale,
    )  # fmt: skip
    return y.view(*x.shape[:-1], n)


register_quant_backend("triton", quant_project)


@torch.library.custom_op("teal::decode_attention", mutates_args=("k_cache", "v_cache"))
def _decode_attention(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    input_pos: Tensor,
    n_heads: int,
    n_kv_heads: int,
    window: int,
) -> Tensor:
    return triton_attention.decode_attention(
        qkv, cos, sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads, window or None
    )


@_decode_attention.register_fake
def _(qkv, cos, sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads, window):  # noqa: ANN001, ANN202
    return qkv.new_empty(qkv.shape[0], 1, n_heads * k_cache.shape[-1])


def decode_attention(
    qkv: Tensor,
    cos: Tensor,
    sin: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    input_pos: Tensor,
    n_heads: int,
    n_kv_heads: int,
    window: int | None,
) -> Tensor:
    return _decode_attention(
        qkv, cos, sin, k_cache, v_cache, input_pos, n_heads, n_kv_heads, int(window or 0)
    )


register_decode_attention("triton", decode_attention)
