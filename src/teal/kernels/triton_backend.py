"""The Triton kernels as the ``triton`` backend of the model's projection switch.

Each kernel is wrapped in a ``torch.library`` custom op so that ``torch.compile``
treats it as one opaque call (its launcher picks tile configurations on the host,
which the compiler need not trace) and a CUDA graph captures it like any kernel.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teal.errors import TealError
from teal.kernels import triton_gemv
from teal.kernels.dispatch import register_backend

MAX_ROWS = triton_gemv.MAX_BATCH


@torch.library.custom_op("teal::sparse_gemv_fused", mutates_args=())
def _fused(
    x: Tensor, wt: Tensor, thresholds: Tensor, splits: list[int], scale: Tensor | None
) -> Tensor:
    return triton_gemv.sparse_gemv_fused(x, wt, thresholds, tuple(splits), scale)


@_fused.register_fake
def _(x, wt, thresholds, splits, scale):  # noqa: ANN001, ANN202
    return x.new_empty(x.shape[0], wt.shape[1])


@torch.library.custom_op("teal::sparse_gate_up_act", mutates_args=())
def _gate_up(x: Tensor, wt: Tensor, thresholds: Tensor, act: str, scale: Tensor | None) -> Tensor:
    return triton_gemv.sparse_gate_up_act(x, wt, thresholds, act, scale)


@_gate_up.register_fake
def _(x, wt, thresholds, act, scale):  # noqa: ANN001, ANN202
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
    x: Tensor, wt: Tensor, thresholds: Tensor, splits: tuple[int, ...], scale: Tensor | None
) -> Tensor:
    y = _fused(_rows(x), wt, thresholds, list(splits), scale)
    return y.view(*x.shape[:-1], wt.shape[1])


def gate_up(x: Tensor, wt: Tensor, thresholds: Tensor, act: str, scale: Tensor | None) -> Tensor:
    y = _gate_up(_rows(x), wt, thresholds, act, scale)
    return y.view(*x.shape[:-1], wt.shape[1] // 2)


register_backend("triton", project, gate_up)
