"""Experiment (issue 9): do int4 weights compose better with sparsity when the thresholds
come from the int4 model's own activations instead of the unquantized model's?

Uniform thresholds from ``collect_stats`` on 8,192 calibration tokens of (a) the fp32
model and (b) its int4 g128 copy (round to nearest, code zero points); the int4 model
is evaluated with each, and the fp32 model with (a) for the "independent" estimate
(int4 dense perplexity times the fp32 sparse/dense ratio). Full protocol, 4,096
evaluation tokens, the checkpoint's own basis (no value rotation), fp32 activations.

    PYTHONPATH=src python benchmarks/exp_quant_own_thresholds.py
"""

from __future__ import annotations

import copy
import time

import torch

import teal
from teal.eval.corpus import bos_token, load_corpus
from teal.eval.perplexity import evaluate
from teal.sparsity.stats import collect_stats

LEVELS = (0.25, 0.4, 0.5)


def ppl(model, ev, thresholds, bos):
    levels = {0.0: None, **{p: thresholds.thresholds(p) for p in LEVELS}}
    res = evaluate(model, ev, levels, ("full",), bos=bos, progress=False)
    return {x.sparsity: (round(x.perplexity, 3), round(x.measured_sparsity, 4)) for x in res}


def main() -> None:
    torch.manual_seed(0)
    base = teal.load()
    base.set_backend("torch")
    corpus = load_corpus(None)
    bos = bos_token(base.tokenizer)
    cal = corpus.part("calibration").tokens(base.tokenizer, 8192)
    ev = corpus.part("evaluation").tokens(base.tokenizer, 4096)
    q = copy.deepcopy(base)
    q.quantize("int4", group_size=128)
    t0 = time.time()
    st_fp = collect_stats(base, cal, seq_len=2048, bos=bos, progress=False)
    st_q = collect_stats(q, cal, seq_len=2048, bos=bos, progress=False)
    print(f"statistics: {time.time() - t0:.0f} s", flush=True)
    fp = ppl(base, ev, st_fp, bos)
    print("fp32, fp32 thresholds:", fp, flush=True)
    a = ppl(q, ev, st_fp, bos)
    print("int4, fp32 thresholds:", a, flush=True)
    b = ppl(q, ev, st_q, bos)
    print("int4, own thresholds: ", b, flush=True)
    for p in LEVELS:
        indep = a[0.0][0] * fp[p][0] / fp[0.0][0]
        print(f"{p:.2f}: independent {indep:.2f}, fp32 thresholds {a[p][0]:.2f} "
              f"({a[p][1]:.1%}), own {b[p][0]:.2f} ({b[p][1]:.1%})")  # fmt: skip


if __name__ == "__main__":
    main()
