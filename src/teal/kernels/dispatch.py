"""Route each projection to the right implementation: dense matmul, the plain-torch
sparse reference, the CPU gather kernel or the Triton GPU kernels.

Every projection weight is stored input-major (``wt``: ``[K, N]``), so one buffer serves
the dense path (``x @ wt``) and the sparse kernels (a dropped input channel is a skipped
contiguous row).  The model never calls a kernel directly; it calls ``project`` and
``project_gate_up`` here, which is the single switch that later kernels plug into.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from teal.kernels import reference
from teal.model.quant import QuantWeight

BACKENDS = ("torch", "cpu", "triton")


@dataclass
class SparseCall:
    """What one block needs to sparsify its four sites in one forward pass."""

    thresholds: Tensor  # [7] fp32: q, k, v, o, gate, up, down
    pos_mask: Tensor | None  # [B, T] bool, True where the position is sparse; None: all
    scales: dict[str, Tensor] | None  # per-site per-channel score scale (weight-informed)
    backend: str


# Backend registry: name -> (project, project_gate_up).  Filled lazily so that importing
# the model never imports Triton.
_FAST: dict[str, tuple[Callable[..., Tensor], Callable[..., Tensor]]] = {}


# Backends whose kernels also take the block's glue around a sparse projection: the
# RMSNorm in front of q|k|v and gate|up (``norm=``) and the residual add after o and
# down (``residual=``), so a decode step runs three kernels fewer per block.
_FUSES_GLUE: set[str] = set()


def register_backend(
    name: str,
    project_fn: Callable[..., Tensor],
    gate_up_fn: Callable[..., Tensor],
    fuses_glue: bool = False,
) -> None:
    _FAST[name] = (project_fn, gate_up_fn)
    if fuses_glue:
        _FUSES_GLUE.add(name)


# One-token attention kernels (RoPE, cache write, attention in one launch): name -> fn
# with ``reference.decode_attention``'s signature.
_ATTENTION: dict[str, Callable[..., Tensor]] = {}


def register_decode_attention(name: str, fn: Callable[..., Tensor]) -> None:
    _ATTENTION[name] = fn


def load_decode_attention(name: str) -> Callable[..., Tensor]:
    """The decode-attention kernel of a backend (``triton``), or the torch reference
    (``torch``)."""
    if name == "torch":
        return reference.decode_attention
    if name not in _ATTENTION and name == "triton":
        import teal.kernels.triton_backend  # noqa: F401  (registers itself)
    if name not in _ATTENTION:
        raise RuntimeError(f"no decode-attention kernel for backend {name!r}")
    return _ATTENTION[name]


def fuses_glue(sparse: SparseCall | None) -> bool:
    """Whether this call's projections take the norm and residual add themselves (the
    model then hands them the un-normalised residual stream)."""
    if sparse is None or sparse.pos_mask is not None or sparse.backend == "torch":
        return False
    load_backend(sparse.backend)
    return sparse.backend in _FUSES_GLUE


# Quantized weights (``teal.model.quant``): name -> one function for both kinds of call,
# ``fn(x, qw, thresholds | None, splits, scale, act | None)`` (act: gate|up epilogue).
_QUANT: dict[str, Callable[..., Tensor]] = {}


def register_quant_backend(name: str, fn: Callable[..., Tensor]) -> None:
    _QUANT[name] = fn


def load_quant_backend(name: str) -> Callable[..., Tensor]:
    if name not in _QUANT and name == "triton":
        import teal.kernels.triton_backend  # noqa: F401  (registers itself)
    if name not in _QUANT and name == "cpu":
        import teal.kernels.cpu  # noqa: F401  (registers itself)
    if name not in _QUANT:
        raise RuntimeError(f"quantized backend {name!r} is not available")
    return _QUANT[name]


def _quant_kernel(
    x: Tensor, wt: QuantWeight, sparse: SparseCall | None
) -> Callable[..., Tensor] | None:
    """The quantized kernel for this call, or None for the reference (dequantize, then
    matmul).  Dense calls on the GPU use the kernels too (threshold None): there is no
    cuBLAS for these formats; prefill (many rows) dequantizes."""
    if sparse is not None:
        if sparse.pos_mask is not None or sparse.backend not in ("triton", "cpu"):
            return None
        if sparse.backend == "cpu":
            from teal.kernels import cpu

            if cpu.implementation() != "native":  # no compiler: the reference it is
                return None
        return load_quant_backend(sparse.backend)
    if not (x.is_cuda and x.numel() // x.shape[-1] <= 64):
        return None
    return load_quant_backend("triton")


def load_backend(name: str) -> tuple[Callable[..., Tensor], Callable[..., Tensor]]:
    if name not in _FAST:
        if name == "cpu":
            import teal.kernels.cpu  # noqa: F401  (registers itself)
        elif name == "triton":
            import teal.kernels.triton_backend  # noqa: F401  (registers itself)
    if name not in _FAST:
        raise RuntimeError(f"sparse backend {name!r} is not available")
    return _FAST[name]


def _masked(x: Tensor, t: Tensor, scale: Tensor | None, pos_mask: Tensor | None) -> Tensor:
    keep = reference.keep_mask(x, t, scale)
    if pos_mask is not None:
        keep = keep | ~pos_mask[..., None]
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


def project(
    x: Tensor,
    wt: Tensor,
    bias: Tensor | None,
    sparse: SparseCall | None,
    proj: slice,
    splits: tuple[int, ...],
    site: str,
    *,
    norm: tuple[Tensor, float] | None = None,
    residual: Tensor | None = None,
) -> Tensor:
    """``x @ wt + bias`` with the input of each output segment sparsified by its own
    threshold (``thresholds[proj]``, one per entry of ``splits``).

    ``norm = (gain, eps)``: ``x`` is first ``rms_norm(x, gain, eps)``; ``residual``: returns
    ``residual + (x @ wt + bias)``. Backends that fuse the glue do both inside the sparse
    kernel; everywhere else they run here as the torch ops they stand for."""
    if (
        (norm is not None or residual is not None)
        and not isinstance(wt, QuantWeight)
        and fuses_glue(sparse)
        and (bias is None or residual is None)
    ):
        fn, _ = load_backend(sparse.backend)
        scale = sparse.scales.get(site) if sparse.scales else None
        y = fn(x, wt, sparse.thresholds[proj], splits, scale, norm=norm, residual=residual)
        return y if bias is None else y + bias
    if norm is not None:
        x = reference.rms_norm(x, *norm)
    y = _project(x, wt, bias, sparse, proj, splits, site)
    return y if residual is None else residual + y


def _project(
    x: Tensor,
    wt: Tensor,
    bias: Tensor | None,
    sparse: SparseCall | None,
    proj: slice,
    splits: tuple[int, ...],
    site: str,
) -> Tensor:
    if isinstance(wt, QuantWeight):
        fn = _quant_kernel(x, wt, sparse)
        if fn is not None:
            thr = sparse.thresholds[proj] if sparse is not None else None
            scale = sparse.scales.get(site) if sparse is not None and sparse.scales else None
            y = fn(x, wt, thr, splits, scale, None)
            return y if bias is None else y + bias
        wt = wt.dequantize(x.dtype)
    if sparse is None:
        y = x @ wt
    elif sparse.backend == "torch" or sparse.pos_mask is not None:
        # The reference handles every case, including the per-position mask used by the
        # decode-like perplexity protocol; fast kernels only run decode steps.
        thr = sparse.thresholds[proj]
        scale = sparse.scales.get(site) if sparse.scales else None
        if len(splits) == 1:
            y = _masked(x, thr[0], scale, sparse.pos_mask) @ wt
        else:
            outs, start = [], 0
            for j, width in enumerate(splits):
                xs = _masked(x, thr[j], scale, sparse.pos_mask)
                outs.append(xs @ wt[:, start : start + width])
                start += width
            y = torch.cat(outs, dim=-1)
    else:
        fn, _ = load_backend(sparse.backend)
        scale = sparse.scales.get(site) if sparse.scales else None
        y = fn(x, wt, sparse.thresholds[proj], splits, scale)
    return y if bias is None else y + bias


def project_gate_up(
    x: Tensor,
    wt_gate_up: Tensor,
    sparse: SparseCall | None,
    act: str,
    norm: tuple[Tensor, float] | None = None,
) -> Tensor:
    """``act(gate) * up``, the input of the down projection (site mlp-mid); with ``norm``
    of ``rms_norm(x, *norm)`` (fused into the kernel where the backend does that)."""
    ffn = wt_gate_up.shape[1] // 2
    if norm is not None:
        cats = sparse is not None and sparse.scales and "mlp_cats" in sparse.scales
        if not isinstance(wt_gate_up, QuantWeight) and not cats and fuses_glue(sparse):
            _, fn = load_backend(sparse.backend)
            scale = sparse.scales.get("mlp_in") if sparse.scales else None
            return fn(x, wt_gate_up, sparse.thresholds[4:6], act, scale, norm=norm)
        x = reference.rms_norm(x, *norm)
    if sparse is not None and sparse.scales and "mlp_cats" in sparse.scales:
        if isinstance(wt_gate_up, QuantWeight):
            wt_gate_up = wt_gate_up.dequantize(x.dtype)
        return _cats_gate_up(x, wt_gate_up, sparse, act)
    if isinstance(wt_gate_up, QuantWeight):
        fn = _quant_kernel(x, wt_gate_up, sparse)
        if fn is not None:
            thr = sparse.thresholds[4:6] if sparse is not None else None
            scale = sparse.scales.get("mlp_in") if sparse is not None and sparse.scales else None
            return fn(x, wt_gate_up, thr, (ffn, ffn), scale, act)
    elif sparse is not None and sparse.backend != "torch" and sparse.pos_mask is None:
        _, fn = load_backend(sparse.backend)
        scale = sparse.scales.get("mlp_in") if sparse.scales else None
        return fn(x, wt_gate_up, sparse.thresholds[4:6], act, scale)
    gu = project(x, wt_gate_up, None, sparse, slice(4, 6), (ffn, ffn), "mlp_in")
    return reference.gate_up_product(gu[..., :ffn], gu[..., ffn:], act)


def _cats_gate_up(x: Tensor, wt_gate_up: Tensor, sparse: SparseCall, act: str) -> Tensor:
    """CATS (the baseline): gate is read dense, ``act(gate)`` is thresholded by
    ``thresholds[4]`` and the one mask skips the matching up rows (here computed and
    discarded: plain torch) and, through the zeros it leaves, the down columns.  Runs
    on the reference path on every backend."""
    ffn = wt_gate_up.shape[1] // 2
    a = reference.apply_act(x @ wt_gate_up[:, :ffn], act)
    keep = a.abs() > sparse.thresholds[4]
    if sparse.pos_mask is not None:
        keep = keep | ~sparse.pos_mask[..., None]
    up = x @ wt_gate_up[:, ffn:]
    mid = a * (torch.relu(up) if act == "drelu" else up)
    return torch.where(keep, mid, torch.zeros((), dtype=mid.dtype, device=mid.device))


def decode_glue(backend: str, h: Tensor, input_pos: Tensor):  # noqa: ANN201
    """What runs the glue of a one-token decode step at ``input_pos`` (the norms and
    attention between the projections) natively: a ``teal.kernels.cpu.DecodeGlue``, or
    None for the model's torch ops.  Only the CPU backend has one; on the GPU the engine
    compiles that glue instead."""
    if backend != "cpu":
        return None
    from teal.kernels import cpu  # imported already by set_backend("cpu")

    return cpu.DecodeGlue(int(input_pos)) if cpu.decode_glue_available(h) else None


def lm_head(h: Tensor, weight: Tensor, backend: str) -> Tensor:
    """The dense output projection.  On the CPU backend a decode step's few rows go
    through the CPU kernels' multi-threaded dense GEMV: torch's BLAS runs this shape on
    one thread, and the head is a sixth of a small model's bytes per token.  A quantized
    head (``QuantWeight``, input-major) runs like a dense quantized projection."""
    if isinstance(weight, QuantWeight):
        if backend == "cpu" and h.shape[-2] == 1 and not h.is_cuda:
            # Codes streamed by the CPU kernel (every channel kept), not dequantized.
            return load_quant_backend("cpu")(h, weight, None, (weight.shape[1],))
        return project(h, weight, None, None, slice(0, 1), (weight.shape[1],), "head")
    if backend == "cpu" and h.device.type == "cpu" and h.shape[-2] == 1:
        from teal.kernels import cpu

        return cpu.linear(h, weight)
    return torch.nn.functional.linear(h, weight)
