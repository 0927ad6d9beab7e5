"""A/B of kernel variants end to end: one model, one engine, one graph per (variant,
sparsity mode), rounds interleaved so that drift of the machine hits every variant alike
(accelerator only).

    PYTHONPATH=src python benchmarks/ab_decode.py --preset llama-3-8b --dtype bf16 \\
        --sparsity 0,0.5 --variant off:TEAL_PDL=0 --variant on: --out ab.json

A variant is ``NAME:KEY=VALUE,...``, what the kernels' launchers see while that
variant's graph is captured (a replay runs what was captured): environment variables
(``TEAL_PDL``: see ``kernels/triton_gemv.py``), and ``cfg.FIELD=VALUE`` to override a
field of every batch-1 ``GemvConfig``, quantized formats too (``cfg.num_stages=3``;
``cfg.split_mul`` scales ``split_k``), and ``lowrank=R`` to run the low-rank split of the
MLP input (``teal.model.lowrank``) with random orthonormal bases of rank R (its cost:
the thresholds stay the plain model's). Each row reports the median of ``--rounds`` timed
runs of ``--new-tokens`` tokens and its ratio to the first variant's dense row.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys

import torch

from teal.engine.cuda import CudaEngine
from teal.kernels import triton_gemv as tg
from teal.kernels import triton_quant as tq
from teal.model.build import parse_dtype, random_model
from teal.model.config import PRESETS
from teal.model.lowrank import set_lowrank

sys.path.insert(0, os.path.dirname(__file__))
from bench_decode import calibrate, header, random_split  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, str]]:
    name, _, spec = text.partition(":")
    env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    return name, env


_get_config = tg.get_config
_OVERRIDE: dict[str, float] = {}


def _patched_get_config(k, n, dtype, b=1, pair=False, device="cuda"):
    cfg = _get_config(k, n, dtype, b, pair, device)
    if b != 1 or not _OVERRIDE:
        return cfg
    fields = {f: type(getattr(cfg, f))(v) for f, v in _OVERRIDE.items() if f != "split_mul"}
    if "split_mul" in _OVERRIDE:
        fields["split_k"] = max(1, round(cfg.split_k * _OVERRIDE["split_mul"]))
    return dataclasses.replace(cfg, **fields)


tg.get_config = tq.get_config = _patched_get_config


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama-3-8b", choices=sorted(PRESETS))
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--sparsity", default="0,0.5")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--quant", default=None, choices=("int8", "int4"), help="g128 for int4")
    ap.add_argument("--dense-all", action="store_true", help="a dense row for every variant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    variants = [parse_variant(v) for v in args.variant]
    levels = [float(p) for p in args.sparsity.split(",")]

    model = random_model(PRESETS[args.preset], dtype=parse_dtype(args.dtype, "cuda"), device="cuda")
    stats = calibrate(model)
    thresholds = {p: (None if p == 0 else stats.thresholds(p).cuda()) for p in levels}
    if args.quant:
        model.quantize(args.quant)  # thresholds from the float model, as teal bench does
    prompt_len = 16
    gen = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen).cuda()
    engine = CudaEngine(model, prompt_len + args.new_tokens)
    current = {"name": variants[0][0]}
    plain_key = engine._key
    engine._key = lambda: (*plain_key(), current["name"])
    own = ("cfg.", "lowrank")
    saved = {k for _, env in variants for k in env if not k.startswith(own)}
    splits: dict[int, tuple] = {}

    def use_split(rank: int) -> None:
        """The same tensors every time, so each variant's captured graph stays valid."""
        if not rank:
            set_lowrank(model, None)
            return
        if rank not in splits:
            set_lowrank(model, random_split(model.config, rank, seed=rank))
            tensors = [(blk.mlp.lr_u, blk.mlp.lr_uw) for blk in model.layers]
            splits[rank] = (model.lowrank_bases, tensors)
        bases, tensors = splits[rank]
        for blk, (u, uw) in zip(model.layers, tensors, strict=True):
            blk.mlp.set_lowrank(u, uw)
        model.lowrank_bases = bases

    def select(name: str, env: dict[str, str], p: float) -> float:
        for k in saved:
            os.environ.pop(k, None)
        os.environ.update({k: v for k, v in env.items() if not k.startswith(own)})
        use_split(int(env.get("lowrank", 0)))
        _OVERRIDE.clear()
        _OVERRIDE.update({k[4:]: float(v) for k, v in env.items() if k.startswith("cfg.")})
        current["name"] = name
        if thresholds[p] is None:
            model.clear_sparsity()
        else:
            model.set_sparsity(thresholds[p], mode="decode")
            model.set_backend("triton")
        return engine.capture()

    times: dict[tuple[str, float], list[float]] = {}
    compile_s: dict[tuple[str, float], float] = {}
    tokens: dict[tuple[str, float], list[int]] = {}

    # Dense rows run cuBLAS: only the first variant measures them (unless --dense-all).
    def levels_of(i: int) -> list[float]:
        return levels if i == 0 or args.dense_all else [p for p in levels if p > 0]

    for i, (name, env) in enumerate(variants):
        for p in levels_of(i):
            compile_s[(name, p)] = select(name, env, p)
            engine.generate(prompt, args.new_tokens)  # warm-up
    for _ in range(args.rounds):
        for i, (name, env) in enumerate(variants):
            for p in levels_of(i):
                select(name, env, p)
                run = engine.generate(prompt, args.new_tokens)
                times.setdefault((name, p), []).append(run.tokens_per_second)
                tokens[(name, p)] = run.tokens.tolist()
    base_dense = statistics.median(times[(variants[0][0], levels[0])])
    rows = []
    for i, (name, env) in enumerate(variants):
        for p in levels_of(i):
            tps = statistics.median(times[(name, p)])
            ref = tokens[(variants[0][0], p)]
            row = {
                "variant": name,
                "env": env,
                "sparsity": p,
                "tokens_per_second": round(tps, 2),
                "runs": [round(t, 2) for t in times[(name, p)]],
                "vs_first_dense": round(tps / base_dense, 3),
                "compile_seconds": round(compile_s[(name, p)], 2),
                "same_tokens_as_first_variant": sum(a == b for a, b in zip(tokens[(name, p)], ref)),
            }
            rows.append(row)
            print(json.dumps(row), flush=True)
    result = {
        **header(args.preset, args.dtype),
        "quant": args.quant,
        "new_tokens": args.new_tokens,
        "results": rows,
    }
    out = args.out or os.path.join(os.environ.get("OUT", "."), f"ab-{args.preset}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
