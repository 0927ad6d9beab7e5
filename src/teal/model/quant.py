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
  ``[ceil(K/G), N]`` in the model's dtype, and ``zeros`` ``[ceil(K/G), N]`` of one of
  three kinds (``QuantWeight.zero``): ``"code"``, uint8 zero points,
  ``w[k, n] = (q[k, n] - z[k//G, n]) * s[k//G, n]``; ``"offset"``, float offsets,
  ``w = q * s + m`` (GGUF's Q4_1; ``m`` need not be a multiple of ``s``, so the range
  need not include 0); ``"none"`` (``zeros`` None), symmetric, zero point 8 (Q4_0).

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

The quantizers here are round-to-nearest (no calibration data): min/max per group with
a zero point (default) or an offset, or absmax per group/channel.  ``teal.model.gptq``
chooses codes on the same grids with error feedback from calibration activations
(``quantize_model(..., hessians=...)``).  A GGUF file's own
Q4_0 / Q4_1 weights are repacked as they are (``quantize_model(model, "gguf")``): groups
of 32, the file's fp16 scales and offsets, no second rounding.  Calibration of the sparsity
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
ZERO_KINDS = ("code", "offset", "none")


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

    @property
    def zero(self) -> str:
        """int4 zero kind: ``"code"`` (uint8 zero points), ``"offset"`` (float), ``"none"``."""
        if self.zeros is None:
            return "none"
        return "offset" if self.zeros.is_floating_point() else "code"

    def extra_repr(self) -> str:
        g = f", group_size={self.group_size}, zero={self.zero}" if self.fmt == "int4" else ""
        return f"{self.fmt}, shape={tuple(self.shape)}, splits={self.splits}{g}"

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
        s = self.scales.float()[:, None, :]
        if self.zero == "offset":
            w = q * s + self.zeros.float()[:, None, :]
        else:
            z = 8.0 if self.zeros is None else self.zeros.float()[:, None, :]
            w = (q - z) * s
        return w.reshape(-1, n)[:k].to(dtype)


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


def _zero_kind(zero_point: bool | str) -> str:
    if zero_point is True:
        return "code"
    if zero_point is False:
        return "none"
    if zero_point not in ZERO_KINDS:
        raise ValueError(f"zero_point must be one of {ZERO_KINDS} (or a bool), got {zero_point!r}")
    return zero_point


def quantize_int4(
    wt: Tensor,
    group_size: int = 128,
    splits: tuple[int, ...] | None = None,
    zero_point: bool | str = True,
    scale_dtype: torch.dtype | None = None,
) -> QuantWeight:
    """int4 in groups of ``group_size`` input channels, per output channel.

    ``zero_point`` ``"code"`` (or True): ``s = (max - min) / 15``, ``z = round(-min / s)``
    (the range stretched to include 0); ``"offset"``: ``s = (max - min) / 15`` and the
    offset ``min`` itself, stored like the scales; ``"none"`` (or False): symmetric
    ``s = max |w| / 7`` with the zero point 8.  Scales are stored in ``scale_dtype``
    (default: the weight's dtype) and the codes are computed against the stored values.
    """
    if group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    zero = _zero_kind(zero_point)
    k, n = wt.shape
    splits = _check_splits(n, splits)
    sdt = scale_dtype or wt.dtype
    g = group_size
    w = _pad_rows(wt.detach().float().contiguous(), g).view(-1, g, n)
    if k % g:
        # Padding rows repeat the group's first row, so they do not widen its range.
        last = (k // g) * g
        w[-1, k - last :] = w[-1, :1]
    s, zp = int4_group_params(w, zero, sdt)
    q = int4_codes(w, s[:, None, :], zp[:, None, :], zero)
    return int4_weight(q.reshape(-1, n)[:k], s, zp, zero, sdt, (k, n), splits, g)


def int4_group_params(w: Tensor, zero: str, sdt: torch.dtype) -> tuple[Tensor, Tensor]:
    """Scale and zero point of groups ``w`` ``[..., G, N]`` (fp32): ``s``, ``zp``
    ``[..., N]`` in fp32, ``s`` (and an offset) already rounded to ``sdt`` so that codes
    are computed against the stored values; ``zp`` is the code (``"code"``), the
    offset (``"offset"``) or 8 (``"none"``)."""
    if zero == "code":
        # The range includes 0 so that the zero point is a code (0..15).
        lo, hi = w.amin(dim=-2).clamp(max=0), w.amax(dim=-2).clamp(min=0)
        s = ((hi - lo) / 15.0).clamp(min=1e-8).to(sdt).float()
        return s, torch.round(-lo / s).clamp(0, 15)
    if zero == "offset":
        lo, hi = w.amin(dim=-2), w.amax(dim=-2)
        s = ((hi - lo) / 15.0).clamp(min=1e-8).to(sdt).float()
        return s, lo.to(sdt).float()
    s = (w.abs().amax(dim=-2) / 7.0).clamp(min=1e-8).to(sdt).float()
    return s, torch.full_like(s, 8.0)


def int4_codes(w: Tensor, s: Tensor, zp: Tensor, zero: str) -> Tensor:
    """Codes 0..15 (fp32) of ``w`` for scales and zero points that broadcast to it."""
    if zero == "offset":
        return torch.round((w - zp) / s).clamp(0, 15)
    return torch.round(w / s + zp).clamp(0, 15)


def int4_values(q: Tensor, s: Tensor, zp: Tensor, zero: str) -> Tensor:
    """The weights codes ``q`` stand for (fp32), as :meth:`QuantWeight.dequantize`."""
    return q * s + zp if zero == "offset" else (q - zp) * s


def int4_weight(
    q: Tensor,
    s: Tensor,
    zp: Tensor,
    zero: str,
    sdt: torch.dtype,
    shape: tuple[int, int],
    splits: tuple[int, ...],
    group_size: int,
) -> QuantWeight:
    """Pack codes ``q`` ``[K, N]`` and group parameters ``[ceil(K/G), N]``."""
    if zero == "code":
        zeros = zp.to(torch.uint8).contiguous()
    elif zero == "offset":
        zeros = zp.to(sdt).contiguous()
    else:
        zeros = None
    packed = pack_int4(q.to(torch.uint8), splits)
    return QuantWeight("int4", packed, s.to(sdt).contiguous(), zeros, shape, splits, group_size)


def quantize(
    wt: Tensor,
    fmt: str,
    group_size: int = 128,
    splits: tuple[int, ...] | None = None,
    zero_point: bool | str = True,
) -> QuantWeight:
    if fmt == "int8":
        return quantize_int8(wt, splits)
    if fmt == "int4":
        return quantize_int4(wt, group_size, splits, zero_point)
    raise ValueError(f"unknown quantization {fmt!r}: expected int8 or int4")


@dataclass(frozen=True)
class QuantConfig:
    """What ``quantize_model`` did (``model.quant``; ``teal bench`` reports ``label()``)."""

    fmt: str
    group_size: int | None = None
    zero: str | None = None  # int4: "code" | "offset" | "none"
    lm_head: bool = True
    # "rtn": rounded to nearest here; "gptq": with error feedback (teal.model.gptq);
    # "gguf": the checkpoint's own 4-bit blocks
    source: str = "rtn"

    def label(self) -> str:
        tail = "-gptq" if self.source == "gptq" else ""
        if self.fmt == "int8":
            return "int8" + tail
        if self.source == "gguf":
            return f"int4-g{self.group_size}-gguf"
        zero = {"code": "", "offset": "-offset"}.get(self.zero, "-sym")
        return f"int4-g{self.group_size}" + zero + tail


def _replace(module: nn.Module, name: str, value: nn.Module) -> None:
    if name in module._parameters:
        del module._parameters[name]
    elif hasattr(module, name) and name not in module._modules:
        delattr(module, name)
    setattr(module, name, value)


def _load_quant_backend(model) -> None:
    if model.device.type == "cuda":
        # Import the kernels now: a compiled decode step cannot run an import.
        from teal.kernels.dispatch import load_quant_backend

        load_quant_backend("triton")


@torch.no_grad()
def quantize_model(
    model,
    fmt: str,
    group_size: int = 128,
    zero_point: bool | str = True,
    lm_head: bool = True,
    hessians: dict[tuple[int, str], Tensor] | None = None,
) -> QuantConfig:
    """Replace the seven projections (and ``lm_head``) of ``model`` by quantized
    weights, one tensor at a time (the float copy is freed as it goes).

    ``fmt`` ``"gguf"``: keep the 4-bit weights of the GGUF file the model was loaded
    from (:func:`repack_gguf`); ``group_size`` and ``zero_point`` do not apply.
    ``hessians`` (``teal.model.gptq.collect_hessians``): round the projections with
    error feedback (GPTQ) instead of to nearest; ``lm_head`` stays round-to-nearest."""
    if getattr(model, "quant", None) is not None:
        raise ValueError(f"the model is already quantized ({model.quant.label()})")
    if fmt == "gguf":
        return repack_gguf(model, lm_head)
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization {fmt!r}: expected int8, int4 or gguf")
    zero = _zero_kind(zero_point) if fmt == "int4" else None
    if fmt == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"group_size must be one of {GROUP_SIZES}, got {group_size}")
    cfg = model.config
    f = cfg.ffn_dim

    def q(i: int, site: str, wt: Tensor, splits: tuple[int, ...] | None) -> QuantWeight:
        if hessians is None:
            return quantize(wt, fmt, group_size, splits, zero_point)
        from teal.model.gptq import gptq

        h = hessians.get((i, site))
        if h is None:
            raise ValueError(f"no GPTQ statistics for layer {i} {site}: collect them again")
        return gptq(wt, h, fmt, group_size, splits, zero or "code")

    for i, block in enumerate(model.layers):
        att, mlp = block.attention, block.mlp
        _replace(att, "wqkv", q(i, "attn_in", att.wqkv, att.splits))
        _replace(att, "wo", q(i, "attn_out", att.wo, None))
        _replace(mlp, "w_gate_up", q(i, "mlp_in", mlp.w_gate_up, (f, f)))
        _replace(mlp, "w_down", q(i, "mlp_mid", mlp.w_down, None))
    if lm_head:
        # The head is stored [vocab, dim] (tied to the embedding or not); quantized it
        # becomes input-major like the projections.  A tied embedding keeps its float
        # table for the lookup.
        head = model.tok_embeddings.weight if model.lm_head is None else model.lm_head
        _replace(model, "lm_head", quantize(head.t(), fmt, group_size, None, zero_point))
    source = "rtn" if hessians is None else "gptq"
    qc = QuantConfig(fmt, group_size if fmt == "int4" else None, zero, lm_head, source)
    model.quant = qc
    _load_quant_backend(model)
    return qc


# ----------------------------------------------------------------- GGUF repacking


def _repack(blocks: list, splits: tuple[int, ...]) -> QuantWeight:
    """Q4 blocks of the parts of one buffer (``[out_i, K]`` each, stacked along the
    output) -> one int4 ``QuantWeight`` ``[K, sum out_i]`` with groups of 32."""
    codes = torch.cat([b.codes for b in blocks]).t().contiguous()
    scales = torch.cat([b.scales for b in blocks]).t().contiguous()
    if all(b.offsets is None for b in blocks):
        zeros = None  # all Q4_0: the symmetric format, zero point 8
    else:
        # Q4_0 parts join as offsets -8 d (exact in fp16).
        zeros = torch.cat([b.scales * -8 if b.offsets is None else b.offsets for b in blocks])
        zeros = zeros.t().contiguous()
    k, n = codes.shape
    return QuantWeight("int4", pack_int4(codes, splits), scales, zeros, (k, n), splits, 32)


def _check_same(name: str, qw: QuantWeight, wt: Tensor, source: str) -> None:
    """The repacked weight must be the one the model holds (up to the model's rounding)."""
    if tuple(qw.shape) != tuple(wt.shape):
        raise ValueError(f"{name}: {source} holds {tuple(qw.shape)}, the model {tuple(wt.shape)}")
    ref = wt.float()
    eps = torch.finfo(wt.dtype).eps
    bad = (qw.dequantize(torch.float32) - ref).abs() > ref.abs() * eps + 1e-6
    if bool(bad.any()):
        raise ValueError(
            f"{name}: the model's weights are not those stored in {source} (changed since "
            "loading?); reload the model, or use int4 to quantize the weights it holds"
        )


@torch.no_grad()
def repack_gguf(model, lm_head: bool = True) -> QuantConfig:
    """Keep the GGUF file's own Q4_0 / Q4_1 weights: repack them into the int4 layout
    (groups of 32, the file's fp16 scales, Q4_1's offsets) instead of rounding the
    dequantized weights a second time.  The seven projections of every block must be
    Q4_0 or Q4_1.  ``lm_head`` is repacked when it is too; stored otherwise (the default
    model ties it to a Q8_0 embedding) it becomes int8 per output channel, as
    ``quantize_model(..., "int8")`` makes it (a Q8_0 head moves by at most half a step of
    its row's scale; on the default model the head is half the bytes of a 4-bit step,
    so left in float it would cap the speed-up); ``lm_head=False`` keeps it in float.
    Each repacked weight is checked against the model's own copy before it replaces it.
    A model whose value heads are rotated (``teal.model.rotate``, by its calibration) no
    longer matches the file in wqkv and wo: those two are rounded from the model's
    weights to the same format (groups of 32, float offsets) instead."""
    from teal.model.loaders import open_checkpoint

    source = getattr(model, "source", None) or ""
    if not source.endswith(".gguf"):
        raise ValueError(
            f"gguf keeps the 4-bit weights of a GGUF file; this model was loaded from "
            f"{source or 'no file'}: use int4 or int8 instead"
        )
    cfg = model.config
    rotated = getattr(model, "value_bases", None) is not None
    with open_checkpoint(source) as ckpt:

        def blocks(name: str):  # noqa: ANN202
            b = ckpt.q4_blocks(name)
            if b is None:
                raise ValueError(
                    f"{name} is not stored as Q4_0 or Q4_1 in {source}; only those are "
                    "repacked (use int4 to quantize the model's weights instead)"
                )
            return b

        new = []
        for i, block in enumerate(model.layers):
            p = f"model.layers.{i}."
            att, mlp = block.attention, block.mlp
            for mod, attr, names, splits in (
                (att, "wqkv", ("q", "k", "v"), att.splits),
                (att, "wo", ("o",), None),
                (mlp, "w_gate_up", ("gate", "up"), (cfg.ffn_dim, cfg.ffn_dim)),
                (mlp, "w_down", ("down",), None),
            ):
                parts = [
                    blocks(
                        p
                        + ("self_attn." if n in ("q", "k", "v", "o") else "mlp.")
                        + n
                        + "_proj.weight"
                    )  # fmt: skip
                    for n in names
                ]
                wt = getattr(mod, attr)
                if rotated and mod is att:
                    # The file's blocks hold the unrotated v and o: round the model's own
                    # (rotated) weights the same way instead (groups of 32, fp16 offsets).
                    new.append((mod, attr, quantize_int4(wt, 32, splits, "offset", torch.float16)))
                    continue
                # Checked where the model lives (the file's blocks are read on the host).
                qw = _repack(parts, splits or (wt.shape[1],)).to(wt.device)
                _check_same(f"layer {i} {attr}", qw, wt, source)
                new.append((mod, attr, qw))
        head = None
        if lm_head:
            name = "lm_head.weight" if model.lm_head is not None else "model.embed_tokens.weight"
            b = ckpt.q4_blocks(name)
            w = model.tok_embeddings.weight if model.lm_head is None else model.lm_head
            if b is not None:
                head = _repack([b], (w.shape[0],)).to(w.device)
                _check_same("lm_head", head, w.t(), source)
            else:
                head = quantize_int8(w.t())
    # Replace only once every weight is repacked and checked: an error leaves the model whole.
    for mod, attr, qw in new:
        _replace(mod, attr, qw.to(model.device))
    if head is not None:
        _replace(model, "lm_head", head.to(model.device))
    zero = "offset" if any(qw.zero == "offset" for *_, qw in new) else "none"
    qc = QuantConfig("int4", 32, zero, lm_head, source="gguf")
    model.quant = qc
    _load_quant_backend(model)
    return qc
