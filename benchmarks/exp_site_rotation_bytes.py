"""Experiment (issue 5): rotating attn-in and mlp-in per layer, at equal bytes.

A rotation of a site whose input passes through RMSNorm cannot be folded away: each
token's input must be multiplied by it online, which reads its weights every token. So
the fair comparison spends those bytes: a site of ``d`` inputs and ``out`` outputs at
sparsity ``p`` reads ``(1 - p) d out`` weights; with a dense ``d x d`` rotation it may read
only ``(1 - p') d out + d^2`` (``p' = p + d / out``), with 64-blocks on the diagonal
``p' = p + 64 / out``.

Proxy, per layer and site, on held-out calibration tokens: the relative output error
``||W^T x - W^T s(x)||^2 / ||W^T x||^2`` of magnitude sparsity ``s`` at one threshold per
site (the ``p``-quantile of the site's magnitudes), summed over layers, for
(a) no rotation at ``p``; (b) the site's principal axes (full PCA, fitted on other
tokens) at ``p'``; (c) PCA within 64-blocks at its ``p'``.  Also (b) and (c) at ``p``
itself, which is what they would give if their bytes were free.

    PYTHONPATH=src python benchmarks/exp_site_rotation_bytes.py
"""

from __future__ import annotations

import torch

import teal
from teal.eval.corpus import bos_token, load_corpus

SITES = {"attn_in": "attention.wqkv", "mlp_in": "mlp.w_gate_up"}
LEVELS = (0.25, 0.4, 0.5)
BLOCK = 64


def pca(x: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of the second moment of the rows of ``x``, largest first."""
    _, vecs = torch.linalg.eigh((x.T @ x).double())
    return vecs.flip(-1).float()


def block_pca(x: torch.Tensor, b: int) -> torch.Tensor:
    d = x.shape[1]
    q = torch.zeros(d, d)
    for i in range(0, d, b):
        q[i : i + b, i : i + b] = pca(x[:, i : i + b])
    return q


def error(x: torch.Tensor, w: torch.Tensor, p: float) -> float:
    """Relative output error of dropping the p-quantile of |x| (one threshold)."""
    if p >= 1.0:
        return float("nan")
    a = x.abs().flatten()
    k = max(1, int(p * a.numel()))
    t = a.kthvalue(k).values
    xs = torch.where(x.abs() > t, x, torch.zeros_like(x))
    y = x @ w
    return float(((y - xs @ w) ** 2).sum() / (y**2).sum())


@torch.no_grad()
def main() -> None:
    model = teal.load()
    model.set_backend("torch")
    corpus = load_corpus(None)
    bos = bos_token(model.tokenizer)
    ids = corpus.part("calibration").tokens(model.tokenizer, 2048)
    if bos is not None:
        ids = torch.cat([torch.tensor([bos]), ids[:-1]])
    ids = ids[None]
    acts: dict[tuple[int, str], torch.Tensor] = {}

    def observe(layer, site, x, pos_mask):
        if site in SITES:
            acts[(layer, site)] = x.reshape(-1, x.shape[-1]).float()

    model.observer = observe
    model(ids)
    model.observer = None
    d = model.config.dim
    tot: dict[tuple[str, str, float], list[float]] = {}
    for (layer, site), x in sorted(acts.items()):
        w = model.layers[layer].get_parameter(SITES[site]).float()
        out = w.shape[1]
        # Fit on the first half of the positions (after the first, an attention sink),
        # score on the second.
        fit, test = x[1:1024], x[1024:]
        rotations = {"none": (None, 0.0), "full": (pca(fit), d / out),
                     f"block{BLOCK}": (block_pca(fit, BLOCK), BLOCK / out)}  # fmt: skip
        for name, (q, extra) in rotations.items():
            xt, wt = (test, w) if q is None else (test @ q, q.T @ w)
            for p in LEVELS:
                tot.setdefault((site, name + " at p", p), []).append(error(xt, wt, p))
                if q is not None:
                    tot.setdefault((site, name + " at equal bytes", p), []).append(
                        error(xt, wt, p + extra)
                    )
    print(f"default model, {model.config.n_layers} layers, d = {d}; summed relative error")
    for site in SITES:
        out = model.layers[0].get_parameter(SITES[site]).shape[1]
        print(f"\n{site} (out = {out}: full rotation adds {d / out:.3f} to p, "
              f"{BLOCK}-blocks {BLOCK / out:.3f})")  # fmt: skip
        for (s, name, p), v in sorted(tot.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if s == site:
                print(f"  {name:28s} p = {p:.2f}: {sum(v):8.4f}")


if __name__ == "__main__":
    main()
