"""Experiment (issue 5): compensate the dropped channels' expected contribution.

For each (layer, site) and level p, the mean over calibration tokens of
``x * (|x| <= t_p)`` (what sparsification removes) is measured on 4,096 calibration
tokens; its product with the projection's weights is a bias added to the sparse
projection's output (kernel-compatible: no extra weight bytes at decode, one vector per
projection and level).  Uniform thresholds from 8,192 calibration tokens; perplexity on
4,096 evaluation tokens, both protocols.  The bias is injected by wrapping
``teal.kernels.dispatch.project`` (an experiment, not a code path of the library).

    PYTHONPATH=src python benchmarks/exp_compensation.py

Result (default model, 2026-12-01, benchmarks/results/compensation-default-2026-12-01.txt):
worse than plain magnitude sparsity at every level (13.04 -> 13.11 at 25 %, 15.36 ->
15.60 at 40 %, 23.79 -> 26.26 at 50 %, full protocol), so it is not a method here.
"""

from __future__ import annotations

import time

import torch

import teal
import teal.model.decoder as dec
from teal.eval.corpus import bos_token, load_corpus
from teal.eval.perplexity import evaluate
from teal.kernels import dispatch

LEVELS = (0.25, 0.4, 0.5)
SITE_COL = {"attn_in": 0, "attn_out": 3, "mlp_in": 4, "mlp_mid": 6}


def dropped_means(model, cal, thr, bos) -> dict:
    """{p: {(layer, site): mean of x * (|x| <= t)}} over the first 4,096 tokens."""
    sums: dict = {p: {} for p in LEVELS}
    count = [0]

    def observe(layer, site, x, pos_mask):
        z = x.reshape(-1, x.shape[-1]).float()
        if layer == 0 and site == "attn_in":
            count[0] += z.shape[0]
        for p in LEVELS:
            t = float(thr[p][layer, SITE_COL[site]].to(x.dtype))
            s = (z * (z.abs() <= t)).sum(0)
            sums[p][(layer, site)] = sums[p].get((layer, site), 0) + s

    model.observer = observe
    with torch.no_grad():
        for i in range(0, 4096, 2048):
            ids = cal[i : i + 2048]
            if bos is not None:
                ids = torch.cat([torch.tensor([bos]), ids[:-1]])
            model(ids[None])
    model.observer = None
    print("mean tokens", count[0], flush=True)
    return {p: {k: v / count[0] for k, v in d.items()} for p, d in sums.items()}


def main() -> None:
    from teal.sparsity.stats import collect_stats

    torch.manual_seed(0)
    model = teal.load()
    model.set_backend("torch")
    corpus = load_corpus(None)
    bos = bos_token(model.tokenizer)
    cal = corpus.part("calibration").tokens(model.tokenizer, 8192)
    ev = corpus.part("evaluation").tokens(model.tokenizer, 4096)
    t0 = time.time()
    stats = collect_stats(model, cal, seq_len=2048, bos=bos, progress=False)
    print("stats", round(time.time() - t0), flush=True)
    thr = {p: stats.thresholds(p) for p in LEVELS}
    means = dropped_means(model, cal, thr, bos)
    state: dict = {"p": None}
    plain = dispatch.project
    base = model.thresholds.data_ptr()

    def project(x, wt, bias, sparse, proj, splits, site):
        y = plain(x, wt, bias, sparse, proj, splits, site)
        if sparse is None or state["p"] is None:
            return y
        layer = (sparse.thresholds.data_ptr() - base) // (7 * 4)  # row of the table
        add = (means[state["p"]][(layer, site)].to(wt.dtype) @ wt).to(y.dtype)
        if sparse.pos_mask is not None:
            return y + add * sparse.pos_mask[..., None].to(y.dtype)
        return y + add

    for name in ("plain", "compensated"):
        for p in LEVELS:
            if name == "compensated":
                dispatch.project = dec.project = project
                state["p"] = p
            res = evaluate(model, ev, {p: thr[p]}, ("full", "decode-like"), bos=bos, progress=False)
            dispatch.project = dec.project = plain
            state["p"] = None
            rows = [(r.protocol, round(r.perplexity, 3), round(r.measured_sparsity, 3))
                    for r in res]  # fmt: skip
            print(name, p, rows, flush=True)


if __name__ == "__main__":
    main()
