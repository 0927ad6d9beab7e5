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

from collections.abc import Sequence

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


@torch.inference_mode()
def collect_hessians(
    model,
    token_ids: Tensor,
    seq_len: int = 512,
    bos: int | None = None,
    per_token: bool = True,
    thresholds: Sequence[Tensor] = (),
) -> dict[tuple[int, str], Tensor]:
    """``H[(layer, site)] = mean over positions of x x^T`` (fp32 ``[K, K]``) of each
    site's input, from the dense model over ``token_ids`` (a 1-D stream cut into
    windows of ``seq_len``).  ``per_token``: each position's ``x`` scaled to unit norm
    first, so that the fit weighs every token's error relative to its input; otherwise
    the few positions with massive activations (an attention sink carries most of a
    site's energy) decide it.

    ``thresholds``: tables ``[n_layers, 7]`` (``Calibration.thresholds(p)``) of the
    sparsity levels the quantized model will run at.  Each adds the statistics of the
    input as each projection of the site sees it, ``x * (|x| > t)``, and ``H`` is the
    mean over the dense input and every (level, projection): the rounding is then fitted
    to the inputs that survive sparsification, not only to the dense ones.  Measured on
    the default model at int4 g128 (docs/RESULTS.md, 2026-12-07) it is worse than the dense
    statistics alone, dense and sparse, so ``--gptq`` does not pass any."""
    from teal.kernels.reference import keep_mask
    from teal.model.decoder import SITE_PROJECTIONS, SITES
    from teal.sparsity.stats import dense_pass, windows

    cfg = model.config
    rows = [r for r in windows(token_ids, min(seq_len, cfg.max_seq_len), bos) if r.numel()]
    if not rows:
        raise ValueError("no calibration tokens for GPTQ: the text is empty")
    sums: dict[tuple[int, str], Tensor] = {}
    count = [0]
    last = (cfg.n_layers - 1, SITES[-1])

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        x = x.reshape(-1, x.shape[-1])
        x2 = x.float()
        if per_token:
            x2 = x2 / x2.norm(dim=1, keepdim=True).clamp(min=1e-12)
        # Masked as the model masks (|x| > t, compared in x's dtype).
        views = [x2] + [
            x2 * keep_mask(x, table[layer, j].to(x.dtype))
            for table in thresholds
            for j in SITE_PROJECTIONS[site]
        ]
        key = (layer, site)
        for v in views:
            if key in sums:
                sums[key].addmm_(v.t(), v)
            else:
                sums[key] = v.t() @ v
        if key == last:
            count[0] += x2.shape[0]

    dense_pass(model, rows, observe, last)
    # Each position added one view of the dense input and one per (level, projection).
    views = {site: 1 + len(thresholds) * len(SITE_PROJECTIONS[site]) for site in SITES}
    return {(i, site): v / (count[0] * views[site]) for (i, site), v in sums.items()}


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
    h: Tensor,
    fmt: str,
    group_size: int = 128,
    splits: tuple[int, ...] | None = None,
    zero: str = "code",
) -> QuantWeight:
    """Quantize ``wt`` ``[K, N]`` (input-major) with error feedback under ``h``
    (``[K, K]``, :func:`collect_hessians`); formats as ``quant.quantize``."""
    k, n = wt.shape
    if h.shape != (k, k):
        raise ValueError(f"H must be [{k}, {k}] for a weight with {k} input channels")
    splits = _check_splits(n, splits)
    sdt = wt.dtype
    w = wt.detach().float().clone()
    hinv = _inverse_factor(h.to(w.device), k)
    q = torch.zeros_like(w)
    if fmt == "int8":
        # Per output channel over all of K, fixed before any row is rounded.
        s8 = (wt.detach().float().abs().amax(dim=0) / 127.0).clamp(min=1e-12)
    elif fmt == "int4":
        g = group_size
        n_groups = -(-k // g)
        s4 = torch.empty(n_groups, n, device=w.device)
        z4 = torch.empty(n_groups, n, device=w.device)
    else:
        raise ValueError(f"unknown quantization {fmt!r}: expected int8 or int4")
    block = BLOCK if fmt == "int8" else max(BLOCK, group_size)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1 = w[i1:i2].clone()
        err = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            row = w1[i]
            if fmt == "int8":
                code = torch.round(row / s8).clamp(-127, 127)
                val = code * s8
            else:
                if (i1 + i) % g == 0:
                    # The group's parameters from its rows as they are now (with the
                    # error of the channels before it already moved onto them).
                    gi = (i1 + i) // g
                    s4[gi], z4[gi] = int4_group_params(w1[i : i + g], zero, sdt)
                gi = (i1 + i) // g
                code = int4_codes(row, s4[gi], z4[gi], zero)
                val = int4_values(code, s4[gi], z4[gi], zero)
            q[i1 + i] = code
            e = (row - val) / hb[i, i]
            w1[i + 1 :] -= hb[i, i + 1 :, None] * e[None, :]
            err[i] = e
        w[i2:] -= hinv[i1:i2, i2:].t() @ err
    if fmt == "int8":
        return QuantWeight("int8", q.to(torch.int8).contiguous(), s8, None, (k, n), splits)
    return int4_weight(q, s4, z4, zero, sdt, (k, n), splits, g)
