"""Experiment: weights fitted to the sparsified inputs (least squares), in float and int4.

Magnitude sparsity replaces a projection's input ``x`` by ``x * m`` (``m = |x| > t``).
For a fixed threshold the weight ``W*`` that best maps the sparsified input onto the dense
output with a ridge toward ``W``, ``min E ||(x * m)^T W* - x^T W||^2 + lam ||W* - W||^2``,
is ``(H_m + lam I)^-1 (C_m + lam I) W`` (``lam``: ``--damp`` times the mean of diag ``H_m``) with
``H_m = E[(x m)(x m)^T]`` and ``C_m = E[(x m) x^T]``, per projection (each has its own
threshold).  Quantizing ``W*`` with GPTQ under ``H_m`` then targets the dense output
directly, so quantization could absorb part of the sparsity error instead of adding to
it.  ``W*`` fits one sparsity level and one sparse mode: in the decode-like protocol the
dense prefill also runs on ``W*`` (a real engine would need both weights), so the full
protocol (every position sparse) is the fair one.

    python benchmarks/exp_sparse_compensation.py --sparsity 0.4,0.5 --max-tokens 4096 \\
        --out benchmarks/results/sparse-compensation-default-2026-12-08.json

Statistics: the dense model over ``--stat-tokens`` calibration tokens, each position's
input scaled to unit norm (as ``gptq.collect_hessians``); thresholds: uniform, from the
cached calibration (the one ``teal eval`` uses, value rotation included).  Variants, each
evaluated with the same thresholds: fp32 ``W`` and ``W*``; int4 g128 GPTQ of ``W`` under
the dense statistics (what ``--gptq`` does) and of ``W*`` under ``H_m``, both dequantized
into a float model (the perplexity path dequantizes anyway).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time

import torch


def _stats(model, tokens, bos, table):
    """Per layer and projection j: ``H_m`` and ``C_m`` (fp64 sums) and the position count;
    plus the dense ``H`` per site."""
    from teal.kernels.reference import keep_mask
    from teal.model.decoder import SITE_PROJECTIONS, SITES
    from teal.sparsity.stats import dense_pass, windows

    cfg = model.config
    rows = [r for r in windows(tokens, min(512, cfg.max_seq_len), bos) if r.numel()]
    hm, cm, hd = {}, {}, {}
    count = [0]
    last = (cfg.n_layers - 1, SITES[-1])

    def add(d, key, a, b):
        if key in d:
            d[key].addmm_(a.t(), b)
        else:
            d[key] = a.t() @ b

    def observe(layer, site, x, pos_mask):
        x = x.reshape(-1, x.shape[-1])
        x2 = x.double()
        x2 = x2 / x2.norm(dim=1, keepdim=True).clamp(min=1e-12)
        add(hd, (layer, site), x2, x2)
        for j in SITE_PROJECTIONS[site]:
            xm = x2 * keep_mask(x, table[layer, j].to(x.dtype))
            add(hm, (layer, j), xm, xm)
            add(cm, (layer, j), xm, x2)
        if (layer, site) == last:
            count[0] += x2.shape[0]

    dense_pass(model, rows, observe, last)
    n = count[0]
    return ({k: v / n for k, v in hm.items()}, {k: v / n for k, v in cm.items()},
            {k: v / n for k, v in hd.items()})  # fmt: skip


def _slices(model):
    """(layer, projection j, module, attribute, column slice) of every projection."""
    f = model.config.ffn_dim
    out = []
    for i, block in enumerate(model.layers):
        att, mlp = block.attention, block.mlp
        c = 0
        for j, w in enumerate(att.splits):
            out.append((i, j, att, "wqkv", slice(c, c + w)))
            c += w
        out.append((i, 3, att, "wo", slice(None)))
        out.append((i, 4, mlp, "w_gate_up", slice(0, f)))
        out.append((i, 5, mlp, "w_gate_up", slice(f, 2 * f)))
        out.append((i, 6, mlp, "w_down", slice(None)))
    return out


def _variant(base, hm, cm, hd, compensate, quant, damp, group):
    from teal.model.decoder import SITE_PROJECTIONS
    from teal.model.gptq import gptq

    site_of = {j: site for site, js in SITE_PROJECTIONS.items() for j in js}

    model = copy.deepcopy(base)
    for i, j, mod, attr, cols in _slices(model):
        p = getattr(mod, attr)
        w = p.data[:, cols].double()
        if compensate:
            # Ridge toward W (not toward 0): damp = 0 is the plain least-squares fit,
            # large damp leaves W as it is.
            h = hm[(i, j)].clone()
            lam = damp * torch.diagonal(h).mean()
            h += lam * torch.eye(h.shape[0], dtype=h.dtype)
            w = torch.linalg.solve(h, cm[(i, j)] @ w + lam * w)
        if quant:
            h = (hm[(i, j)] if compensate else hd[(i, site_of[j])]).float()
            w = gptq(w.float().contiguous(), h, "int4", group).dequantize(torch.float64)
        p.data[:, cols] = w.to(p.dtype)
    return model


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sparsity", default="0.4,0.5")
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--stat-tokens", type=int, default=4096)
    ap.add_argument("--damp", default="0.01,0.1,1", help="comma list (the -comp variants)")
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--variants", default="fp32,fp32-comp,int4-gptq,int4-gptq-comp")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import teal
    from teal.commands.eval import evaluate_methods, get_calibration, protocols_of
    from teal.eval.corpus import bos_token, load_corpus
    from teal.eval.perplexity import resolve_window

    t0 = time.time()
    base = teal.load(None, dtype="fp32", device="cpu")
    parts = load_corpus(None).split()
    cal = get_calibration(base, None, parts["calibration"], None, ["uniform"])
    tokens = parts["evaluation"].tokens(base.tokenizer, args.max_tokens)
    stat_tokens = parts["calibration"].tokens(base.tokenizer, args.stat_tokens)
    bos = bos_token(base.tokenizer)
    window = resolve_window(base, None)
    rows = []
    for p in [float(s) for s in args.sparsity.split(",")]:
        t1 = time.time()
        hm, cm, hd = _stats(base, stat_tokens, bos, cal.thresholds(p))
        print(f"p={p}: statistics {time.time() - t1:.0f} s", file=sys.stderr, flush=True)
        runs = [
            (name, d)
            for name in args.variants.split(",")
            for d in ([float(x) for x in args.damp.split(",")] if name.endswith("-comp") else [0])
        ]
        for name, damp in runs:
            model = _variant(base, hm, cm, hd, name.endswith("-comp"), name.startswith("int4"),
                             damp, args.group_size)  # fmt: skip
            levels = [0.0, p] if name in ("fp32", "int4-gptq") else [p]
            results, _ = evaluate_methods(
                model, cal, tokens, ["uniform"], levels, protocols_of("both"), window=window,
                bos=bos,
            )  # fmt: skip
            for r in results:
                row = {"variant": name, "damp": damp, "fitted_for": p, **r.to_json()}
                rows.append(row)
                print(f"{name} damp {damp} fitted for {p}: {row['protocol']} p={row['sparsity']} "
                      f"ppl {row['perplexity']:.3f}", file=sys.stderr, flush=True)  # fmt: skip
            del model
    obj = {
        "date": datetime.date.today().isoformat(),
        "command": "python " + " ".join(sys.argv),
        "model": "default (SmolLM2-135M-Instruct), fp32, CPU",
        "method": "uniform thresholds of the cached calibration",
        "seconds": round(time.time() - t0, 1),
        "results": rows,
    }
    text = json.dumps(obj, indent=1) + "\n"
    if args.out:
        from pathlib import Path

        from teal.report import atomic_write

        atomic_write(Path(args.out), text.encode())
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
