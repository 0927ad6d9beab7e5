"""A rotation of each KV head's value space, folded into the weights: free per token.

A query head's attention output is a convex combination of its KV head's values, so
for an orthogonal ``Q_g`` per KV head ``g`` the model with ``v' = v Q_g`` (wv's output
columns of ``g``, and their bias) and ``Q_g^T`` on the rows of o_proj that read ``g``'s
query heads computes the same function.  Only the o_proj input (site ``attn-out``)
changes: it is then expressed in the axes ``Q_g``.  With ``Q_g`` the principal axes of
the attention outputs of ``g``'s query heads on calibration text (eigenvectors of their
second moment), their energy gathers in a few channels of each head, and dropping the
smallest inputs by magnitude loses much less of o_proj's output (on the default model 3-4
times less at 25-65 %; perplexity: docs/RESULTS.md, ``benchmarks/exp_head_rotation.py``).

The rotation belongs to a calibration (its attn-out statistics are in that basis):
``teal.sparsity.calibrate`` fits it and stores it with the statistics, and a model is put
in a calibration's basis when the two meet (``Calibration.bind``).  ``model.value_bases``
(``[layers, kv_heads, head_dim, head_dim]`` fp32 on the CPU, or None for the checkpoint's
own basis) records the rotation a model carries relative to its checkpoint, so going from
one calibration's basis to another's is one more fold.  The fingerprint stays the
checkpoint's: it names the weights as loaded, and the cache of calibrations is keyed by it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from teal.errors import TealError
from teal.sparsity.stats import dense_pass, windows

# Calibration tokens the rotation is fitted on (the first of the calibration stream): a
# 64 x 64 second moment per KV head needs far fewer, and the pass costs about 3 % of a
# default calibration.
FIT_TOKENS = 4096
TABLE = "rotation.values"  # the calibration table holding the bases


def _group(cfg) -> int:  # noqa: ANN001
    return cfg.n_heads // cfg.n_kv_heads


@torch.no_grad()
def value_moments(model, token_ids: Tensor, seq_len: int, bos: int | None = None) -> Tensor:
    """Second moments ``[layers, kv_heads, hd, hd]`` (fp64) of the attention outputs of
    ``model`` on ``token_ids`` (a 1-D stream, cut into windows of ``seq_len`` with
    ``bos`` leading each, or ``[n, T]`` windows), each KV head's query heads pooled."""
    cfg = model.config
    hd, group = cfg.head_dim, _group(cfg)
    acc = torch.zeros(cfg.n_layers, cfg.n_kv_heads, hd, hd, dtype=torch.float64)

    def observe(layer: int, site: str, x: Tensor, pos_mask: Tensor | None) -> None:
        if site == "attn_out":
            z = x.reshape(-1, cfg.n_kv_heads, group, hd).double().cpu()
            acc[layer] += torch.einsum("ngki,ngkj->gij", z, z)

    # The last MLP and the head change no moment.
    dense_pass(model, windows(token_ids, seq_len, bos), observe, (cfg.n_layers - 1, "attn_out"))
    return acc


def principal_axes(moments: Tensor) -> Tensor:
    """The eigenvectors of each moment, largest eigenvalue first, as fp32 columns."""
    _, vecs = torch.linalg.eigh(moments.double())
    return vecs.flip(-1).float()


def _float_weights(att) -> None:  # noqa: ANN001
    for name in ("wqkv", "wo"):
        if not isinstance(getattr(att, name), torch.Tensor):
            raise TealError(
                "this calibration rotates the value heads, which needs the float weights:"
                " apply the calibration (teal.sparsify, --sparsity) before quantizing, or"
                " calibrate with --no-rotation"
            )


@torch.no_grad()
def fold(model, delta: Tensor) -> None:
    """Fold ``delta[layer, g]`` into our ``Transformer`` in place: wv's columns of KV head
    ``g`` times ``delta``, o_proj's rows of ``g``'s query heads times ``delta^T`` (fp64
    products, rounded once to the weights' dtype)."""
    cfg = model.config
    hd, group = cfg.head_dim, _group(cfg)
    v0 = (cfg.n_heads + cfg.n_kv_heads) * hd
    for layer, blk in enumerate(model.layers):
        att = blk.attention
        _float_weights(att)
        for g in range(cfg.n_kv_heads):
            q = delta[layer, g].to(att.wqkv.device, torch.float64)
            cols = slice(v0 + g * hd, v0 + (g + 1) * hd)
            att.wqkv[:, cols] = (att.wqkv[:, cols].double() @ q).to(att.wqkv.dtype)
            if att.bqkv is not None:
                att.bqkv[cols] = (att.bqkv[cols].double() @ q).to(att.bqkv.dtype)
            for h in range(g * group, (g + 1) * group):
                rows = slice(h * hd, (h + 1) * hd)
                att.wo[rows] = (q.T @ att.wo[rows].double()).to(att.wo.dtype)


def same_basis(a: Tensor | None, b: Tensor | None) -> bool:
    """Whether two recorded bases (None: the checkpoint's own) are the same."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b)


def set_value_bases(model, target: Tensor | None) -> None:
    """Put ``model`` (ours, or ``teal.hf.InputMajorView``) in the value basis ``target``
    (None: the checkpoint's own), folding only the difference from its current one."""
    current = getattr(model, "value_bases", None)
    if same_basis(current, target):
        return
    cfg = model.config
    shape = (cfg.n_layers, cfg.n_kv_heads, cfg.head_dim, cfg.head_dim)
    if target is not None and tuple(target.shape) != shape:
        raise TealError(
            f"the calibration's value rotation has shape {tuple(target.shape)}, the model"
            f" needs {shape}: recalibrate with `teal calibrate` for this model"
        )
    eye = torch.eye(cfg.head_dim, dtype=torch.float64).expand(shape)
    cur = eye if current is None else current.double()
    tgt = eye if target is None else target.double()
    delta = cur.transpose(-1, -2) @ tgt  # v Q_cur delta = v Q_tgt
    fold_values = getattr(model, "fold_values", None)
    if fold_values is not None:
        fold_values(delta)
    else:
        fold(model, delta)
    model.value_bases = None if target is None else target.detach().float().cpu().clone()


def fit_and_rotate(model, token_ids: Tensor, seq_len: int, bos: int | None = None) -> Tensor:
    """Fit the principal axes on the first ``FIT_TOKENS`` of ``token_ids`` and put our
    ``model`` in them; returns the bases (relative to the checkpoint)."""
    if token_ids.dim() == 1:
        ids = token_ids[:FIT_TOKENS]
    else:
        ids = token_ids[: max(1, -(-FIT_TOKENS // token_ids.shape[-1]))]
    axes = principal_axes(value_moments(model, ids, seq_len, bos))
    current = getattr(model, "value_bases", None)
    # Measured in the model's current basis: relative to the checkpoint it is current @ axes.
    target = axes if current is None else (current.double() @ axes.double()).float()
    set_value_bases(model, target)
    return model.value_bases
