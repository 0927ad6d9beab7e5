"""A low-rank split of the MLP input: its principal subspace dense, the rest sparse.

The gate|up input ``x`` (after RMSNorm) has a spread-out magnitude profile: at 50 %
magnitude sparsity gate|up loses 3.4 % of its output energy on the default model, more
than any other site, and gate|up holds half the projection weights.  Much of that energy
lies in a few directions: with ``U`` the top ``r`` eigenvectors of the second moment of
``x`` (per layer, on calibration text),

    x @ W = (x U) (U^T W) + (x - x U U^T) @ W

and only the remainder ``x_res = x - x U U^T`` is sparsified by magnitude.  The first
term is a rank-``r`` product read densely every step: ``U`` (``dim x r``) and ``U^T W``
(``r x 2 ffn``), ``r (dim + 2 ffn)`` weights per layer (at ``r = 16``: 1.65 % of the
projection weights on the default model, 0.24 % on Llama-3-8B).  Those bytes are
counted: the methods raise every level by that share, so that the bytes skipped are the
sparsity asked for, and the measured sparsity subtracts it (``overhead_share``).

Measured on the default model (docs/RESULTS.md, 2026-12-07): with ``r = 16`` uniform thresholds
lose far less (50 %: 23.2 -> 21.5 decode-like, 24.7 -> 21.3 full; 65 %: 203 -> 88 and
298 -> 99), but ``auto``, whose greedy allocation already spares gate|up, gains only at
50 % full and 65 % and loses a little below.  And the split runs as separate ops (no
fused norm or activation, no native CPU step): 17 % fewer tokens per second at 50 % on
the H100 (Llama-3-8B shapes, ``r = 32``), 35 % on the CPU.  So it is opt-in.

The split belongs to a calibration (its mlp-in statistics are of ``x_res``): calibration
fits it (``teal calibrate --lowrank R``) and stores ``U`` as table ``lowrank.mlp_in``;
``Calibration.bind`` sets it on a model (``set_lowrank``), where ``MLP.forward`` applies
it whenever the MLP runs sparse or is observed.  A dense forward is the plain product.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teal.errors import TealError
from teal.sparsity.stats import dense_pass, windows

FIT_TOKENS = 4096  # calibration tokens the subspace is fitted on (as the value rotation)
TABLE = "lowrank.mlp_in"  # the calibration table holding U, [layers, dim, r]


@torch.no_grad()
def mlp_moments(model, token_ids: Tensor, seq_len: int, bos: int | None = None) -> Tensor:
    """Second moments ``[layers, dim, dim]`` (fp64) of the gate|up input of the dense
    model on ``token_ids``, the first position of each window left out: a prefill
    always computes it dense, and as an attention sink it is no typical input."""
    cfg = model.config
    acc = torch.zeros(cfg.n_layers, cfg.dim, cfg.dim, dtype=torch.float64)

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        if site == "mlp_in":
            z = x[:, 1:].reshape(-1, x.shape[-1]).double().cpu()
            acc[layer] += z.T @ z

    saved_split = lowrank_bases(model)
    try:
        set_lowrank(model, None)  # the moments of the plain input
        rows = windows(token_ids, seq_len, bos)
        dense_pass(model, rows, observe, (cfg.n_layers - 1, "mlp_in"))
    finally:
        set_lowrank(model, saved_split)
    return acc


def top_axes(moments: Tensor, rank: int) -> Tensor:
    """``[layers, dim, rank]`` fp32: the eigenvectors of the ``rank`` largest eigenvalues."""
    _, vecs = torch.linalg.eigh(moments)
    return vecs.flip(-1)[..., :rank].float().contiguous()


def lowrank_bases(model) -> Tensor | None:
    """The ``U`` set on ``model`` (``[layers, dim, r]`` on the CPU), or None."""
    return getattr(model, "lowrank_bases", None)


def set_lowrank(model, bases: Tensor | None) -> None:
    """Give every MLP of ``model`` the split ``bases`` (``[layers, dim, r]``; None: none).
    ``U^T W`` is taken from the model's gate|up weights as they are now."""
    from teal.model.decoder import Transformer

    if not isinstance(model, Transformer):
        if bases is not None:
            raise TealError(
                "this calibration splits the MLP input (teal calibrate --lowrank), which"
                " only teal's own model runs: load the checkpoint with teal.load, or"
                " recalibrate without --lowrank"
            )
        return
    if bases is None:
        for blk in model.layers:
            blk.mlp.set_lowrank(None, None)
        model.lowrank_bases = None
        return
    cfg = model.config
    if tuple(bases.shape[:2]) != (cfg.n_layers, cfg.dim):
        raise TealError(
            f"low-rank bases of shape {tuple(bases.shape)} do not fit a model of"
            f" {cfg.n_layers} layers and width {cfg.dim}"
        )
    for i, blk in enumerate(model.layers):
        w = blk.mlp.w_gate_up
        if not isinstance(w, torch.Tensor):
            raise TealError("set the low-rank split before quantizing the weights")
        u = bases[i].to(w.device, torch.float32)
        uw = u.T @ w.detach().float()
        blk.mlp.set_lowrank(u.to(w.dtype), uw.to(w.dtype))
    model.lowrank_bases = bases.detach().float().cpu().clone()


def fit_lowrank(
    model, token_ids: Tensor, seq_len: int, rank: int, bos: int | None = None
) -> Tensor:
    """Fit ``U`` on the first ``FIT_TOKENS`` of ``token_ids`` and set it on ``model``."""
    cfg = model.config
    if not 0 < rank < cfg.dim:
        raise TealError(f"the low-rank split needs 0 < rank < {cfg.dim}, not {rank}")
    moments = mlp_moments(model, token_ids.flatten()[:FIT_TOKENS], seq_len, bos)
    bases = top_axes(moments, rank)
    set_lowrank(model, bases)
    return bases


def overhead_share(config, rank: int) -> float:
    """The weights the dense rank-``rank`` term adds per layer, as a share of the
    layer's seven projections (the same in every layer)."""
    if rank <= 0:
        return 0.0
    shapes = config.projection_shapes
    total = sum(k * n for k, n in shapes.values())
    return rank * (config.dim + 2 * config.ffn_dim) / total


def model_overhead(model) -> float:
    """``overhead_share`` of the split set on ``model`` (0 without one)."""
    bases = lowrank_bases(model)
    return 0.0 if bases is None else overhead_share(model.config, int(bases.shape[2]))


def same_split(a: Tensor | None, b: Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and torch.allclose(a.float().cpu(), b.float().cpu(), atol=1e-6)
