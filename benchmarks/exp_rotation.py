"""Experiment (issue 5): does rotating the residual stream into its principal axes make
magnitude sparsity lose less?  One global rotation Q (eigenvectors of the second-moment
matrix of the normalised block inputs, all layers pooled, 2,048 calibration tokens) is
folded into the weights: RMSNorm gains into the next projections, Q into everything that
reads or writes the residual stream (embeddings, q|k|v, gate|up, o, down, an untied
lm_head), so the dense model is unchanged (max logit difference printed) and the
attn-in and mlp-in sites see rotated activations at no extra bytes per token.  Uniform
thresholds are calibrated on 16,384 tokens for each model; perplexity in the full
protocol on 4,096 evaluation tokens.

    PYTHONPATH=src python benchmarks/exp_rotation.py

Result (default model, 2026-12-01, benchmarks/results/rotation-default-2026-12-01.txt):
the rotation is worse at every level, so it is not a method here.
"""

from __future__ import annotations

import copy
import time

import torch

import teal
from teal.eval.corpus import bos_token, load_corpus
from teal.eval.perplexity import evaluate
from teal.sparsity.stats import collect_stats


def pca_rotation(model, ids: torch.Tensor) -> torch.Tensor:
    """Eigenvectors (largest first) of the pooled second moment of RMSNorm(h) / gain."""
    dim = model.config.dim
    acc = torch.zeros(dim, dim, dtype=torch.float64)

    def observe(layer, site, x, pos_mask):
        nonlocal acc
        if site == "attn_in":
            gain = model.layers[layer].attention_norm.weight
        elif site == "mlp_in":
            gain = model.layers[layer].ffn_norm.weight
        else:
            return
        z = (x / gain).reshape(-1, dim).double()
        acc += z.T @ z

    model.observer = observe
    with torch.no_grad():
        model(ids[None])
    model.observer = None
    evals, vecs = torch.linalg.eigh(acc)
    top = evals.flip(0)
    print("energy in the top 10 % of axes:", float(top[: dim // 10].sum() / top.sum()))
    return vecs.flip(-1).float()


@torch.no_grad()
def rotate(model, q: torch.Tensor):
    """A copy of ``model`` computing the same function with its residual stream in the
    basis ``q`` (gains folded, lm_head untied)."""
    r = copy.deepcopy(model)
    emb = r.tok_embeddings.weight
    head = (emb if r.lm_head is None else r.lm_head) * r.norm.weight[None, :]
    r.lm_head = torch.nn.Parameter(head @ q)
    r.norm.weight.fill_(1.0)
    r.tok_embeddings.weight.data = emb @ q
    for blk in r.layers:
        att, mlp = blk.attention, blk.mlp
        att.wqkv.data = q.T @ (blk.attention_norm.weight[:, None] * att.wqkv)
        blk.attention_norm.weight.fill_(1.0)
        mlp.w_gate_up.data = q.T @ (blk.ffn_norm.weight[:, None] * mlp.w_gate_up)
        blk.ffn_norm.weight.fill_(1.0)
        att.wo.data = att.wo @ q
        mlp.w_down.data = mlp.w_down @ q
    return r


def main() -> None:
    torch.manual_seed(0)
    model = teal.load()
    model.set_backend("torch")
    corpus = load_corpus(None)
    bos = bos_token(model.tokenizer)
    cal = corpus.part("calibration").tokens(model.tokenizer, 16384)
    ev = corpus.part("evaluation").tokens(model.tokenizer, 4096)
    rotated = rotate(model, pca_rotation(model, cal[:2048]))
    rotated.set_backend("torch")
    with torch.no_grad():
        ids = ev[:256][None]
        print("dense diff", (model(ids) - rotated(ids)).abs().max().item())
    t0 = time.time()
    stats = [collect_stats(m, cal, seq_len=2048, bos=bos, progress=False) for m in (model, rotated)]
    print("stats", time.time() - t0)
    for name, m, st in (("plain", model, stats[0]), ("rotated", rotated, stats[1])):
        levels = {0.0: None, **{p: st.thresholds(p) for p in (0.25, 0.4, 0.5)}}
        res = evaluate(m, ev, levels, ("full",), bos=bos, progress=False)
        rows = [(x.sparsity, round(x.perplexity, 3), round(x.measured_sparsity, 3)) for x in res]
        print(name, rows, flush=True)


if __name__ == "__main__":
    main()
