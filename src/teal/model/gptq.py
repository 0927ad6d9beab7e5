"""Quantization with error feedback (GPTQ, Frantar et al. 2022) in the input-major layout.

Round-to-nearest rounds every weight on its own.  GPTQ rounds the input channels one
after another (the rows of ``wt = W^T``) and, after each, moves the rounding error
onto the rows not yet rounded, weighted by how the inputs correlate: with
``H = E[x x^T]`` over calibration activations of the projection's input, it minimises
``E ||x^T (W_q - W)||^2`` greedily, channel by channel.  The grid is the same as
round-to-nearest's (int8 per output channel; int4 group-wise along the input with the
group's scale and zero point fixed when its first channel is reached), so the kernels and
the file format do not change: only which code each weight gets.

Why here: on the default model round-to-nearest int4 at g128 costs ~57 % perplexity and
composes with activation sparsity worse than independently (README); error feedback
spends the rounding budget where the inputs are large, which are also the channels that
sparsity keeps.

``collect_hessians`` runs the dense float model over calibration text once (an observer
at the four sites); ``quantize_model(..., hessians=H)`` uses them for the seven
projections.  ``lm_head`` stays round-to-nearest (its input is not observed).
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from teal.model.quant import (
    QuantWeight,
    _check_splits,
    int4_codes,
    int4_group_params,
    int4_values,
    int4_weight,
)

DAMP = 0.01  # diagonal loading, as a fraction of the mean of diag(H)
BLOCK = 128  # channels per lazy batch update (a multiple of every group size)


class _Done(Exception):
    pass


@torch.inference_mode()
def collect_hessians(
    model,
    token_ids: Tensor,
    seq_len: int = 512,
    bos: int | None = None,
    per_token: bool = True,
    sparse: bool = False,
) -> dict[tuple[int, str], Tensor | tuple[Tensor, ...]]:
    """``H[(layer, site)] = mean over positions of x x^T`` (fp32 ``[K, K]``) of each
    site's input, from the dense model over ``token_ids`` (a 1-D stream cut into
    windows of ``seq_len``).  ``per_token``: each position's ``x`` scaled to unit norm
    first, so that the fit weighs every token's error relative to its input; otherwise
    the few positions with massive activations (an attention sink carries most of a
    site's energy) decide it.  ``sparse``: with the model's sparsity setting on at every
    position, and one ``H`` per projection of a site (a tuple in the order of
    ``SITE_PROJECTIONS``) from its input as that projection sees it, dropped channels
    zeroed: the rounding is then fitted to the sparse model it will run in."""
    from teal.model.decoder import SITE_PROJECTIONS, SITES
    from teal.sparsity.stats import windows

    if sparse and (model.sparse_mode == "off" or model.sparse_scales):
        raise ValueError("sparse statistics need a sparsity setting without scales on the model")

    cfg = model.config
    rows = [r for r in windows(token_ids, min(seq_len, cfg.max_seq_len), bos) if r.numel()]
    if not rows:
        raise ValueError("no calibration tokens for GPTQ: the text is empty")
    sums: dict[tuple[int, str], Tensor] = {}
    count = [0]
    last = cfg.n_layers - 1

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()
        if per_token:
            x2 = x2 / x2.norm(dim=1, keepdim=True).clamp(min=1e-12)
        if sparse:
            t = model.thresholds[layer]
            for j in SITE_PROJECTIONS[site]:
                # |x| > t in x's dtype, as the sparse projections test it.
                xs = x2 * (x.reshape(x2.shape).abs() > t[j].to(x.dtype))
                _accumulate(sums, (layer, site, j), xs)
        else:
            _accumulate(sums, (layer, site), x2)
        if layer == last and site == SITES[-1]:
            count[0] += x2.shape[0]
            raise _Done

    was_sparse, saved = model.sparse_mode, model.observer
    model.sparse_mode = "all" if sparse else "off"
    model.observer = observe
    try:
        for r in rows:
            with contextlib.suppress(_Done):
                model(r[None].to(model.device))
    finally:
        model.observer = saved
        model.sparse_mode = was_sparse
    out: dict[tuple[int, str], Tensor | tuple[Tensor, ...]] = {}
    for key, v in sums.items():
        if len(key) == 2:
            out[key] = v / count[0]
    if sparse:
        for layer in range(cfg.n_layers):
            for site in SITES:
                out[(layer, site)] = tuple(
                    sums[(layer, site, j)] / count[0] for j in SITE_PROJECTIONS[site]
                )
    return out


def _accumulate(sums: dict, key: tuple, x2: Tensor) -> None:
    if key in sums:
        sums[key].addmm_(x2.t(), x2)
    else:
        sums[key] = x2.t() @ x2


def _inverse_factor(h: Tensor, k: int) -> Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``.  A channel never active in the
    calibration text (zero row and column) gets a unit diagonal: it neither takes nor
    gives error, so its row is rounded to nearest (it may be active elsewhere)."""
    h = h.double().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    damp = DAMP * torch.diagonal(h).mean()
    h += damp * torch.eye(k, dtype=h.dtype, device=h.device)
    inv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inv, upper=True).float()


def gptq(
    wt: Tensor,
    h: Tensor | tuple[Tensor, ...],
    fmt: str,
    group_size: int = 128,
    splits: tuple[int, ...] | None = None,
    zero: str = "code",
) -> QuantWeight:
    """Quantize ``wt`` ``[K, N]`` (input-major) with error feedback under ``h``
    (``[K, K]``, :func:`collect_hessians`; or one per segment of ``splits``, as its
    ``sparse`` statistics give: each output column depends only on its own ``H``);
    formats as ``quant.quantize``."""
    k, n = wt.shape
    splits = _check_splits(n, splits)
    hs = tuple(h) if isinstance(h, (tuple, list)) else (h,)
    if len(hs) not in (1, len(splits)):
        raise ValueError(f"{len(hs)} H matrices for {len(splits)} segments {splits}")
    for hh in hs:
        if hh.shape != (k, k):
            raise ValueError(f"H must be [{k}, {k}] for a weight with {k} input channels")
    if fmt not in ("int8", "int4"):
        raise ValueError(f"unknown quantization {fmt!r}: expected int8 or int4")
    bounds = [0]
    for width in splits if len(hs) > 1 else (n,):
        bounds.append(bounds[-1] + width)
    w = wt.detach().float()
    q = torch.zeros_like(w)
    # int8: per output channel over all of K, fixed before any row is rounded.
    s8 = (w.abs().amax(dim=0) / 127.0).clamp(min=1e-12) if fmt == "int8" else None
    n_groups = -(-k // group_size) if fmt == "int4" else 0
    s4 = torch.empty(n_groups, n, device=w.device)
    z4 = torch.empty(n_groups, n, device=w.device)
    for c, hh in enumerate(hs):
        a, b = bounds[c], bounds[c + 1]
        hinv = _inverse_factor(hh.to(w.device), k)
        if fmt == "int8":
            _fit(w[:, a:b].clone(), hinv, q[:, a:b], s8[a:b], None, None, zero, wt.dtype)
        else:
            _fit(w[:, a:b].clone(), hinv, q[:, a:b], s4[:, a:b], z4[:, a:b], group_size,
                 zero, wt.dtype)  # fmt: skip
    if fmt == "int8":
        return QuantWeight("int8", q.to(torch.int8).contiguous(), s8, None, (k, n), splits)
    return int4_weight(q, s4, z4, zero, wt.dtype, (k, n), splits, group_size)


def _fit(
    w: Tensor,
    hinv: Tensor,
    q: Tensor,
    s: Tensor,
    z: Tensor | None,
    g: int | None,
    zero: str,
    sdt: torch.dtype,
) -> None:
    """Round ``w`` ``[K, n]`` (updated in place) row by row into codes ``q``; int8 when
    ``g`` is None (scales ``s`` given), else int4 groups of ``g`` whose parameters are
    written to ``s``, ``z`` as each group starts."""
    k = w.shape[0]
    block = BLOCK if g is None else max(BLOCK, g)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].clone()
        err = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = w1[i]
            if g is None:
                code = torch.round(row / s).clamp(-127, 127)
                val = code * s
            else:
                gi = (i1 + i) // g
                if (i1 + i) % g == 0:
                    # The group's parameters from its rows as they are now (with the
                    # error of the channels before it already moved onto them).
                    s[gi], z[gi] = int4_group_params(w1[i : i + g], zero, sdt)
                code = int4_codes(row, s[gi], z[gi], zero)
                val = int4_values(code, s[gi], z[gi], zero)
            q[i1 + i] = code
            e = (row - val) / hb[i, i]
            w1[i + 1 :] -= hb[i, i + 1 :, None] * e[None, :]
            err[i] = e
        w[i2:] -= hinv[i1:i2, i2:].t() @ err
