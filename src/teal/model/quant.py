"""Weight-only quantization of the projections, in the input-major layout the sparse
kernels walk: int8 per output channel, int4 group-wise along the input dimension.

One call rewrites a model in place (``quantize_model(model, "int4", group_size=128)``
or ``model.quantize(...)``): each projection buffer (``wqkv``, ``wo``, ``w_gate_up``,
``w_down``) and, by default, ``lm_head`` becomes a :class:`QuantWeight`, and the
projection switch (``kernels/dispatch.py``) routes it to the quantized Triton kernels on
the GPU and to dequantize-then-matmul everywhere else (the reference).

Layouts (``K`` input channels, ``N`` output channels; ``wt = W^T`` is ``[K, N]``):

* ``int8``: ``qweight`` int8 ``[K, N]``, symmetric, ``scales`` fp32 ``[N]``:
  ``w[k, n] = q[k, n] * s[n]``.  A kept input channel is one contiguous row of ``N``
  bytes; the per-output scale factors out of the sum and is applied once per output.
* ``int4``: ``qweight`` uint8 ``[K, N/2]``, two output columns per byte, ``scales``
  ``[ceil(K/G), N]`` in the model's dtype, ``zeros`` uint8 ``[ceil(K/G), N]`` (or none:
  symmetric, zero point 8): ``w[k, n] = (q[k, n] - z[k//G, n]) * s[k//G, n]``.

Why two *output* columns per byte and not two input channels: activation sparsity drops
input channels, i.e. rows of ``W^T``.  Packing along ``K`` puts channels ``2i`` and
``2i+1`` in one byte, so the byte is read when either is kept; at 50 % sparsity with
independent drops, 75 % of the rows' bytes would still be read.  Packing along ``N``
keeps every input channel's row its own contiguous ``N/2`` bytes, skipped whole.  A
group's scales (one row of ``N``) are skipped when every channel of the group is
dropped; at moderate sparsity they are read anyway, and cost ``2/G`` bytes per weight
(3 % of the int4 bytes at ``G = 128`` in bf16; the uint8 zero points 1.6 % more).

Within a byte, column ``j`` of a segment of width ``W`` (q|k|v or gate|up are several
segments of one buffer) sits in the low nibble and column ``j + W/2`` in the high one.
A program of the kernel that reads bytes ``[b, b+B)`` of a segment thus produces two
contiguous runs of outputs, ``[b, b+B)`` and ``[W/2+b, W/2+b+B)``: contiguous scale loads
and stores, no shuffles.  Segments are packed apart so that each keeps its own threshold
(gate and up may differ) and its kept rows are read for it alone.

The quantizers are plain round-to-nearest (no calibration data): min/max per group with
a zero point (default) or absmax per group/channel.  Calibration of the sparsity
thresholds stays with the unquantized model: quantize after ``Calibration`` and the
method tables are made (they read the float weights); the model's fingerprint is kept,
so the same calibration file applies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

FORMATS = ("int8", "int4")
GROUP_SIZES = (16, 32, 64, 128, 256)


class QuantWeight(nn.Module):
    """A quantized input-major weight ``[K, N]`` (see the module's docstring)."""

    def __init__(
        self,
        fmt: str,
        qweight: Tensor,
        scales: Tensor,
        zeros: Tensor | None,
        shape: tuple[int, int],
        splits: tuple[int, ...],
        group_size: int = 0,
    ) -> None:
        super().__init__()
        if fmt not in FORMATS:
            raise ValueError(f"unknown format {fmt!r}: expected one of {FORMATS}")
        self.fmt = fmt
        self.shape = torch.Size(shape)
        self.splits = tuple(int(s) for s in splits)
        self.group_size = int(group_size)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zeros", zeros)

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}" if self.fmt == "int4" else ""
        z = ", zero_point" if self.zeros is not None else ""
        return f"{self.fmt}, shape={tuple(self.shape)}, splits={self.splits}{g}{z}"

    @property
    def nbytes(self) -> int:
        """Bytes a dense read of this weight touches (weights, scales, zero points)."""
        out = self.qweight.numel() * self.qweight.element_size()
        out += self.scales.numel() * self.scales.element_size()
        if self.zeros is not None:
            out += self.zeros.numel() * self.zeros.element_size()
        return out

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """The weight ``[K, N]`` it stands for, computed in fp32 and cast to ``dtype``."""
        if self.fmt == "int8":
            return (self.qweight.float() * self.scales.float()).to(dtype)
        k, n = self.shape
        g = self.group_size
        q = _pad_rows(unpack_int4(self.qweight, self.splits).float(), g).view(-1, g, n)
        z = 8.0 if self.zeros is None else self.zeros.float()[:, None, :]
        w = ((q - z) * self.scales.float()[:, None, :]).reshape(-1, n)[:k]
        return w.to(dtype)


def _pad_rows(t: Tensor, g: int) -> Tensor:
    k = t.shape[0]
    pad = (-k) % g
    if pad == 0:
        return t
    return torch.cat([t, t.new_zeros(pad, *t.shape[1:])])


def _check_splits(n: int, splits: tuple[int, ...] | None) -> tuple[int, ...]:
    splits = (n,) if splits is None else tuple(int(s) for s in splits)
    if sum(splits) != n:
        raise ValueError(f"splits {splits} must sum to N={n}")
    return splits


def pack_int4(q: Tensor, splits: tuple[int, ...]) -> Tensor:
    """uint8 nibbles ``[K, N]`` (values 0..15) -> ``[K, N/2]``: within each segment of
    width ``W``, column ``j`` in the low nibble and ``j + W/2`` in the high one."""
    out, start = [], 0
    for w in splits:
        if w % 2:
            raise ValueError(f"int4 packing needs even segment widths, got {splits}")
        seg = q[:, start : start + w]
        out.append(seg[:, : w // 2] | (seg[:, w // 2 :] << 4))
        start += w
    return torch.cat(out, dim=1).contiguous()


def unpack_int4(packed: Tensor, splits: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[K, N]`` with values 0..15."""
    out, start = [], 0
    for w in splits:
        seg = packed[:, start : start + w // 2]
        out += [seg & 15, seg >> 4]
        start += w // 2
    return torch.cat(out, dim=1)


def quantize_int8(wt: Tensor, splits: tuple[int, ...] | None = None) -> QuantWeight:
    """Symmetric int8 per output channel: ``s[n] = max_k |w[k, n]| / 127`` (fp32)."""
    k, n = wt.shape
    w = wt.detach().float()
    s = (w.abs().amax(dim=0) / 127.0).clamp(min=1e-12)
    q = torch.round(w / s).clamp(-127, 127).to(torch.int8)
    return QuantWeight("int8", q.contiguous(), s, None, (k, n), _check_splits(n, splits))


def quantize_int4(
    wt: Tensor,
    group_size: int = 128,
    splits: tuple[int, ...] | None = None,
    zero_point: bool = True,
    scale_dtype: torch.dtype | None = None,
) -> QuantWeight:
    """int4 in groups of ``group_size`` input channels, per output channel.

    ``zero_point``: ``s = (max - min) / 15``, ``z = round(-min / s)`` (the range
    stretched to include 0); else symmetric
    ``s = max |w| / 7`` with the zero point 8.  Scales are stored in ``scale_dtype``
    (default: the weight's dtype) and the codes are computed against the stored value.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    k, n = wt.shape
    splits = _check_splits(n, splits)
    sdt = scale_dtype or wt.dtype
    g = group_size
    w = _pad_rows(wt.detach().float().contiguous(), g).view(-1, g, n)
    if k % g:
        # Padding rows repeat the group's first row, so they do not widen its range.
        last = (k // g) * g
        w[-1, k - last :] = w[-1, :1]
    if zero_point:
        # The range includes 0 so that the zero point is a code (0..15).
        lo, hi = w.amin(dim=1).clamp(max=0), w.amax(dim=1).clamp(min=0)
        s = ((hi - lo) / 15.0).clamp(min=1e-8).to(sdt).float()
        z = torch.round(-lo / s).clamp(0, 15)
        q = torch.round(w / s[:, None, :] + z[:, None, :]).clamp(0, 15)
        zeros = z.to(torch.uint8).contiguous()
    else:
        s = (w.abs().amax(dim=1) / 7.0).clamp(min=1e-8).to(sdt).float()
        q = torch.round(w / s[:, None, :]).clamp(-8, 7) + 8
        zeros = None
    q = q.reshape(-1, n)[:k].to(torch.uint8)
    return QuantWeight(
        "int4", pack_int4(q, splits), s.to(sdt).contiguous(), zeros, (k, n), splits, g
    )


def quantize(
    wt: Tensor,
    fmt: str,
    group_size: int = 128,
    splits: tuple[int, ...] | None = None,
    zero_point: bool = True,
) -> QuantWeight:
    if fmt == "int8":
        return quantize_int8(wt, splits)
    if fmt == "int4":
        return quantize_int4(wt, group_size, splits, zero_point)
    raise ValueError(f"unknown quantization {fmt!r}: expected int8 or int4")


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize_model`` did (``model.quant``; ``teal bench`` reports ``fmt``)."""

    fmt: str
    group_size: int | None = None
    zero_point: bool = False
    lm_head: bool = True

    def label(self) -> str:
        if self.fmt == "int8":
            return "int8"
        return f"int4-g{self.group_size}" + ("" if self.zero_point else "-sym")


def _replace(module: nn.Module, name: str, value: nn.Module) -> None:
    if name in module._parameters:
        del module._parameters[name]
    elif hasattr(module, name) and name not in module._modules:
        delattr(module, name)
    setattr(module, name, value)


@torch.no_grad()
def quantize_model(
    model,
    fmt: str,
    group_size: int = 128,
    zero_point: bool = True,
    lm_head: bool = True,
) -> QuantConfig:
    """Replace the seven projections (and ``lm_head``) of ``model`` by quantized
    weights, one tensor at a time (the float copy is freed as it goes)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}: expected int8 or int4")
    if getattr(model, "quant", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quant.label()})")
    cfg = model.config
    for block in model.layers:
        att, mlp = block.attention, block.mlp
        _replace(att, "wqkv", quantize(att.wqkv, fmt, group_size, att.splits, zero_point))
        _replace(att, "wo", quantize(att.wo, fmt, group_size, None, zero_point))
        f = cfg.ffn_dim
        _replace(mlp, "w_gate_up", quantize(mlp.w_gate_up, fmt, group_size, (f, f), zero_point))
        _replace(mlp, "w_down", quantize(mlp.w_down, fmt, group_size, None, zero_point))
    if lm_head:
        # The head is stored [vocab, dim] (tied to the embedding or not); quantized it
        # becomes input-major like the projections.  A tied embedding keeps its float
        # table for the lookup.
        head = model.tok_embeddings.weight if model.lm_head is None else model.lm_head
        _replace(model, "lm_head", quantize(head.t(), fmt, group_size, None, zero_point))
    qc = QuantConfig(fmt, group_size if fmt == "int4" else None, fmt == "int4" and zero_point,
                     lm_head)  # fmt: skip
    model.quant = qc
    if model.device.type == "cuda":
        # Import the kernels now: a compiled decode step cannot run an import.
        from teal.kernels.dispatch import load_quant_backend

        load_quant_backend("triton")
    return qc
