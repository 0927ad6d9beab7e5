"""Experiment (issue 5): is the plain principal-axes basis of ``teal.model.rotate`` the
best choice, or does weighting it by o_proj's weights do better?

For each KV head, with ``M`` the second moment of its attention outputs and ``G`` the
Gram matrix of the o_proj rows that read its query heads, try the eigenvectors of ``M``
(what ``teal.model.rotate`` fits), of ``M^1/2 G M^1/2`` and of ``G^1/2 M G^1/2``, and the
identity (no rotation). Each is scored by ``exp_head_rotation.proxy_errors``: the
relative o_proj output error when the smallest fraction p of its inputs is dropped, one
threshold per layer, fitted on the first half of the first 4,096 calibration tokens and
measured on the second half.

    PYTHONPATH=src python benchmarks/exp_head_rotation_bases.py
"""

from __future__ import annotations

import os
import sys

import torch

import teal
from teal.eval.corpus import bos_token, load_corpus
from teal.model import rotate

sys.path.insert(0, os.path.dirname(__file__))
from exp_head_rotation import proxy_errors  # noqa: E402


def _sqrtm(a: torch.Tensor) -> torch.Tensor:
    e, v = torch.linalg.eigh(a)
    return v @ torch.diag_embed(e.clamp_min(0).sqrt()) @ v.transpose(-1, -2)


def main() -> None:
    model = teal.load(dtype="fp32")
    cfg = model.config
    hd, group = cfg.head_dim, cfg.n_heads // cfg.n_kv_heads
    bos = bos_token(model.tokenizer)
    fit = load_corpus(None).part("calibration").tokens(model.tokenizer, rotate.FIT_TOKENS)
    half = fit.numel() // 2
    m = rotate.value_moments(model, fit[:half], 2048, bos)
    g = torch.zeros_like(m)
    for layer, blk in enumerate(model.layers):
        wo = blk.attention.wo.double()
        for kv in range(cfg.n_kv_heads):
            for h in range(kv * group, (kv + 1) * group):
                w = wo[h * hd : (h + 1) * hd]
                g[layer, kv] += w @ w.T
    ms, gs = _sqrtm(m), _sqrtm(g)
    bases = {
        "principal axes of M (teal.model.rotate)": rotate.principal_axes(m),
        "M^1/2 G M^1/2": rotate.principal_axes(ms @ g @ ms),
        "G^1/2 M G^1/2": rotate.principal_axes(gs @ m @ gs),
        "identity": torch.eye(hd).expand_as(m).clone(),
    }
    for name, b in bases.items():
        err = proxy_errors(model, fit[half:], 2048, bos, b)["rotated"]
        print(f"{name:40}", "  ".join(f"{p}: {e:.5f}" for p, e in err.items()), flush=True)


if __name__ == "__main__":
    main()
