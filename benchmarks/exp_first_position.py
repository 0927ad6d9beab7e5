"""Experiment (issue 5): why greedy-layers lost to uniform at 25 % in the full protocol
while winning decode-like.  The default model's tokenizer adds no BOS, so each
evaluation window starts with an ordinary token that later positions attend to heavily,
and only the full protocol sparsifies it.  For uniform and greedy-layers at 25 %, the
loss over dense (nat per scored token, full protocol, 8,192 evaluation tokens in
windows of 2048, as `teal eval`) with every position sparse and with position 0 kept
dense (positions 1.. scored in both, so the two compare), per window, and the KL of
the next-token distribution from dense with every position sparse.

    PYTHONPATH=src python benchmarks/exp_first_position.py CALIBRATION_FILE

Result (default model, 2026-12-01, benchmarks/results/first-position-default-2026-12-01.txt):
uniform's full-protocol loss at 25 % is small only while position 0 is sparsified;
keeping it dense raises it in every window, greedy-layers' barely moves.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

import teal
from teal.eval.corpus import load_corpus
from teal.sparsity.artifact import Calibration
from teal.sparsity.methods import setting_for

WINDOW, N_WINDOWS, LEVEL = 2048, 4, 0.25


@torch.inference_mode()
def logprobs(model, ids: torch.Tensor, thr, first_dense: bool) -> torch.Tensor:
    """Log-probabilities ``[B, T, vocab]``, one window at a time (memory)."""
    mask = None
    if thr is None:
        model.clear_sparsity()
    elif first_dense:
        model.set_sparsity(thr, mode="decode")
        mask = torch.ones(1, ids.shape[1], dtype=torch.bool)
        mask[:, 0] = False
    else:
        model.set_sparsity(thr, mode="all")
    out = [F.log_softmax(model(row[None], sparse_mask=mask).float(), -1) for row in ids]
    model.clear_sparsity()
    return torch.cat(out)


def main() -> None:
    model = teal.load()
    model.set_backend("torch")
    cal = Calibration.load(sys.argv[1], model)
    tokens = load_corpus(None).split()["evaluation"].tokens(model.tokenizer, WINDOW * N_WINDOWS)
    ids = tokens[: WINDOW * N_WINDOWS].view(N_WINDOWS, WINDOW)
    target = ids[:, 2:, None]  # predictions made at positions 1 .. T-2

    def nll(lp: torch.Tensor) -> torch.Tensor:
        return -lp[:, 1:-1].gather(-1, target).squeeze(-1)

    dense = logprobs(model, ids, None, False)
    dense_nll = nll(dense)
    print(f"dense: mean NLL {float(dense_nll.mean()):.4f} (positions 1..)")
    for method in ("uniform", "greedy-layers"):
        thr = setting_for(cal, method, LEVEL, model).thresholds
        for first_dense in (False, True):
            lp = logprobs(model, ids, thr, first_dense)
            loss = nll(lp) - dense_nll
            kl = (dense.exp() * (dense - lp)).sum(-1)[:, 1:-1]
            wins = ", ".join(f"{float(v):+.4f}" for v in loss.mean(1))
            label = "position 0 dense" if first_dense else "every position sparse"
            print(
                f"{method} {LEVEL:.0%} full, {label}: loss {float(loss.mean()):+.4f} nat"
                f" (windows {wins}), KL from dense {float(kl.mean()):.4f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
