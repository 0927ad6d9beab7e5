"""Experiment (issue 5): does rotating each KV head's value space into the principal axes
of its attention outputs make magnitude sparsity lose less?

The input of ``o_proj`` (the ``attn-out`` site) is, per query head, a convex
combination of that head's values, so an orthogonal ``Q_g`` per KV head folds exactly
into the weights: ``v' = v Q_g`` (wv's output columns of head ``g``) and ``Q_g^T`` into
the rows of ``o_proj`` that read every query head of ``g``.  The dense model computes the
same function (the largest logit difference is printed), no byte is added per token, and
only ``attn-out`` sees other activations.  ``Q_g``: the eigenvectors of the second moment
of the attention outputs of ``g``'s query heads (pooled), on the first 4,096
calibration tokens (``teal.model.rotate``; the rotated variant is what ``teal.calibrate``
makes by default, the plain one ``rotate=False``).

For each variant (``plain``, ``rotated``): ``teal.calibrate`` (statistics and the method
tables, as ``teal calibrate --dtype fp32``), then perplexity of uniform, greedy-layers
and greedy-layers-seq in both protocols on the same evaluation tokens as ``teal eval
--max-tokens 8192``; ``auto``'s figure is its chosen candidate's (``setting_for`` returns
that candidate's setting).  Before that, a cheap proxy per layer: the relative output
error of ``o_proj`` when the smallest fraction p of its inputs is dropped (one threshold
per layer, as uniform does), in the original basis and the rotated one, fitted on one
half of the fit tokens and measured on the other.

    PYTHONPATH=src python benchmarks/exp_head_rotation.py \\
        --out benchmarks/results/head-rotation-default-2026-12-07.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
import time

import torch

import teal
from teal.api import calibrate
from teal.commands.eval import evaluate_methods
from teal.eval.corpus import bos_token, load_corpus
from teal.eval.perplexity import resolve_window
from teal.model import rotate
from teal.sparsity.methods import select_method

LEVELS = (0.25, 0.4, 0.5, 0.65)
MODES = {"decode-like": "decode", "full": "all"}
CANDIDATES = ("uniform", "greedy-layers", "greedy-layers-seq")


@torch.no_grad()
def proxy_errors(model, ids, window, bos, bases) -> dict:
    """Relative o_proj output error ``|drop(x) W_o|^2 / |x W_o|^2`` at each level, one
    threshold per layer (the level's quantile of |x|), in the original basis and in
    ``bases``; mean over layers."""
    cfg = model.config
    group = cfg.n_heads // cfg.n_kv_heads
    xs: dict[int, list[torch.Tensor]] = {}

    def observe(layer, site, x, pos_mask):
        if site == "attn_out":
            xs.setdefault(layer, []).append(x.reshape(-1, x.shape[-1]).double())

    saved, model.observer = model.observer, observe
    try:
        chunk = ids[: window - (bos is not None)]
        if bos is not None:
            chunk = torch.cat([torch.tensor([bos]), chunk])
        model(chunk[None])
    finally:
        model.observer = saved
    out: dict[str, list[float]] = {"original": [0.0] * len(LEVELS), "rotated": [0.0] * len(LEVELS)}
    for layer in range(cfg.n_layers):
        x = torch.cat(xs[layer])
        wo = model.layers[layer].attention.wo.double()
        rot = torch.block_diag(*[bases[layer, h // group].double() for h in range(cfg.n_heads)])
        for name, (xx, ww) in (("original", (x, wo)), ("rotated", (x @ rot, rot.T @ wo))):
            ref = (xx @ ww).pow(2).sum()
            for i, p in enumerate(LEVELS):
                t = torch.quantile(xx.abs().flatten()[::3].float(), p).double()
                drop = xx * (xx.abs() <= t)
                out[name][i] += float((drop @ ww).pow(2).sum() / ref) / cfg.n_layers
    return {name: dict(zip(map(str, LEVELS), vals, strict=True)) for name, vals in out.items()}


def run_variant(name, model, ev_tokens, window, bos, levels, cal_dir) -> dict:
    start = time.perf_counter()
    cal = calibrate(model, None, methods=("auto",), progress=False, rotate=name == "rotated")
    cal_s = time.perf_counter() - start
    print(f"{name}: calibrated in {cal_s:.0f} s", flush=True)
    if cal_dir:
        cal.save(f"{cal_dir}/cal-{name}.safetensors")
    start = time.perf_counter()
    rows, _ = evaluate_methods(
        model, cal, ev_tokens, list(CANDIDATES), [0.0, *levels], tuple(MODES),
        window=window, bos=bos, progress=False,
    )  # fmt: skip
    eval_s = time.perf_counter() - start
    results = [r.to_json() for r in rows]
    by = {(r["method"], r["protocol"], r["sparsity"]): r for r in results}
    auto = []
    for proto, mode in MODES.items():
        for p in levels:
            chosen = select_method(cal, p, mode)
            r = dict(by[(chosen, proto, p)], method="auto", runs=chosen)
            auto.append(r)
    for r in results + auto:
        print(f"{name:8} {r['method']:18} {r['protocol']:12} {r['sparsity']:.2f}"
              f" ({r['measured_sparsity']:.3f}) {r['perplexity']:.3f}", flush=True)  # fmt: skip
    return {
        "calibrate_seconds": round(cal_s, 1),
        "calibrate_stats_seconds": cal.metadata.get("seconds"),
        "eval_seconds": round(eval_s, 1),
        "results": results + auto,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="JSON file for the results")
    ap.add_argument("--max-tokens", type=int, default=8192, help="evaluation tokens")
    ap.add_argument("--skip-tokens", type=int, default=0, help="evaluation tokens skipped first")
    ap.add_argument("--levels", default=",".join(map(str, LEVELS)), help="comma list")
    ap.add_argument("--variants", default="plain,rotated")
    ap.add_argument("--cal-dir", default=None, help="also save each variant's calibration here")
    args = ap.parse_args()

    torch.manual_seed(0)
    model = teal.load(dtype="fp32")
    window = resolve_window(model, None)
    parts = load_corpus(None).split()
    bos = bos_token(model.tokenizer)
    fit = parts["calibration"].tokens(model.tokenizer, rotate.FIT_TOKENS)
    ev = parts["evaluation"].tokens(model.tokenizer, args.skip_tokens + args.max_tokens)
    ev = ev[args.skip_tokens :]
    levels = [float(v) for v in args.levels.split(",")]

    start = time.perf_counter()
    rotated = copy.deepcopy(model)
    rotate.fit_and_rotate(rotated, fit, window, bos)  # what calibration does (rotate=True)
    fit_s = time.perf_counter() - start
    with torch.no_grad():
        ids = ev[:512][None]
        dense_diff = float((model(ids) - rotated(ids)).abs().max())
    del rotated
    print(f"fit {fit_s:.1f} s, dense max |logit diff| {dense_diff:.2e}", flush=True)
    half = fit.numel() // 2
    bases = rotate.principal_axes(rotate.value_moments(model, fit[:half], window, bos))
    proxy = proxy_errors(model, fit[half:], window, bos, bases)
    print("proxy o_proj relative error (mean over layers):", json.dumps(proxy), flush=True)

    record = {
        "experiment": "per-KV-head value rotation (PCA of attention outputs) folded into wv/o_proj",
        "command": " ".join(["PYTHONPATH=src python", *sys.argv]),
        "date": dt.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, torch CPU, fp32",
        "model": model.source,
        "fit_tokens": int(fit.numel()),
        "fit_seconds": round(fit_s, 2),
        "dense_max_logit_diff": dense_diff,
        "proxy_o_proj_relative_error": proxy,
        "eval_tokens": int(ev.numel()),
        "eval_tokens_skipped": args.skip_tokens,
        "measured": "perplexity (both protocols) of uniform, greedy-layers, greedy-layers-seq"
        " with each variant's own calibration (teal.calibrate, methods auto); auto = its"
        " chosen candidate's row",
        "variants": {},
    }
    for name in filter(None, args.variants.split(",")):
        # Each variant calibrates a fresh copy: the rotated one is rotated by calibration.
        record["variants"][name] = run_variant(
            name, copy.deepcopy(model), ev, window, bos, levels, args.cal_dir
        )
        with open(args.out, "w") as f:
            json.dump(record, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
