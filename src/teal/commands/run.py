"""``teal run``: the main job. Calibrate the model, evaluate dense and sparse in both
protocols, generate from a few prompts dense and sparse side by side, and write a
report folder (results.json, run.json, report.md, report.html, perplexity.png)."""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from teal.commands.calibrate import add_text_arg, positive_int
from teal.commands.common import add_model_args, parse_float_list
from teal.commands.eval import (
    add_eval_args,
    check_eval_args,
    log,
    protocols_of,
    results_json,
)

RUN_SPARSITIES = "0,0.25,0.4,0.5,0.65"
# Chosen so that the whole run fits in ten minutes on a 2-core CPU with the default
# model: calibration with auto's tables takes about five of them there (288 s), then nine
# forward passes over this many tokens at roughly 300 tok/s (8,192 tokens took 630 s
# in all on 2026-12-06; `teal eval --max-tokens 8192` gives the README's tables).
RUN_MAX_TOKENS = 4096
PROMPTS = (
    "What is the capital of France?",
    "Write a short poem about the sea.",
    "Explain in two sentences why the sky is blue.",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run",
        help="the whole loop: calibrate, evaluate, sample; write a report folder",
        description="The whole quality loop on one model: calibration, perplexity against"
        " sparsity in both protocols, dense and sparse samples, and a report folder.",
    )
    add_model_args(p)
    add_text_arg(p)
    add_eval_args(p, max_tokens=RUN_MAX_TOKENS, sparsity=RUN_SPARSITIES)
    p.add_argument(
        "--out", default=None, metavar="DIR", help="report folder (default teal-runs/<timestamp>/)"
    )
    p.add_argument(
        "--sample-sparsity",
        default="0.4,0.5",
        help="sparse levels shown beside dense in the samples (default 0.4,0.5)",
    )
    p.add_argument("--sample-tokens", default=48, help="new tokens per sample (default 48)")
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (report files and results) instead of the report path",
    )
    p.set_defaults(func=main)


def _machine(model: Any) -> str:
    import torch

    if model.device.type == "cuda":
        return f"{torch.cuda.get_device_name(model.device)}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:  # Linux names the CPU model here; platform.processor() often does not
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {torch.get_num_threads()} torch threads,"
        f" torch {torch.__version__}"
    )


def main(args: argparse.Namespace) -> int:
    import teal
    from teal.commands.eval import evaluate_methods
    from teal.eval.corpus import bos_token, load_corpus
    from teal.eval.perplexity import resolve_window
    from teal.report import write_report
    from teal.sparsity.artifact import Calibration
    from teal.sparsity.calibrate import DEFAULT_TOKENS, calibrate_text, default_path
    from teal.sparsity.tables import add_tables_from_text, has_tables, kinds_for

    sparsities = check_eval_args(args)
    args.sample_tokens = positive_int(args.sample_tokens, "--sample-tokens")
    sample_levels = parse_float_list(args.sample_sparsity, "--sample-sparsity")
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("teal-runs") / stamp)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    log("teal run [1/4]: loading the model")
    t = time.perf_counter()
    model = teal.load(args.model, dtype=args.dtype, device=args.device)
    window = resolve_window(model, args.window)  # a bad window fails before the work
    parts = load_corpus(args.text).split()
    timings["load"] = time.perf_counter() - t

    t = time.perf_counter()
    if args.calibration:
        log(f"teal run [2/4]: using calibration {args.calibration}")
        cal = Calibration.load(args.calibration, model)
    else:
        tokens = args.tokens or DEFAULT_TOKENS
        log(f"teal run [2/4]: calibrating on {tokens} tokens of {parts['calibration'].label}")
        cal = calibrate_text(model, parts["calibration"], tokens=tokens)
    kinds = kinds_for(args.methods)
    if kinds and not has_tables(cal, kinds):  # the methods' tables, in the same file
        add_tables_from_text(model, cal, parts["calibration"], kinds=kinds)
    if not args.calibration:
        cal.save(out / "calibration.safetensors")
        cal.save(default_path(model, parts["calibration"]))  # teal eval/generate reuse it
    timings["calibration"] = time.perf_counter() - t

    protocols = protocols_of(args.protocol)
    log(
        f"teal run [3/4]: perplexity at {', '.join(f'{p:.0%}' for p in sparsities)}"
        f" ({', '.join(protocols)}), up to {args.max_tokens} tokens each"
    )
    t = time.perf_counter()
    stream = parts["evaluation"].tokens(model.tokenizer, args.max_tokens)
    results, unreachable = evaluate_methods(
        model,
        cal,
        stream,
        args.methods,
        sparsities,
        protocols,
        window=window,
        stride=args.stride,
        batch_size=args.batch_size,
        bos=bos_token(model.tokenizer),
    )
    timings["evaluation"] = time.perf_counter() - t
    obj = results_json(model, parts["evaluation"].label, results, unreachable)

    levels = [0.0] + [p for p in sample_levels if p > 0]
    log(f"teal run [4/4]: {len(PROMPTS)} prompts at {', '.join(f'{p:.0%}' for p in levels)}")
    t = time.perf_counter()
    samples = _samples(model, cal, args.methods[0], levels, args.sample_tokens)
    timings["generation"] = time.perf_counter() - t

    run = {
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": shlex.join(["teal", *sys.argv[1:]]),
        "model": model.source,
        "fingerprint": model.fingerprint,
        "dtype": str(model.dtype).replace("torch.", ""),
        "machine": _machine(model),
        "method": ",".join(args.methods),
        "calibration_text": parts["calibration"].label,
        "calibration_tokens": cal.tokens,
        "window": window,
        "stride": args.stride,
        "max_tokens": args.max_tokens,
        "sample_tokens": args.sample_tokens,
        "timings": {k: round(v, 1) for k, v in timings.items()},
        "seconds_total": round(time.perf_counter() - t_all, 1),
        # Process CPU time: far below threads x wall means the machine was shared.
        "cpu_seconds": round(sum(os.times()[:2]), 1),
        "samples": samples,
    }
    paths = write_report(out, obj, run)
    for r in obj["results"]:
        log(
            f"  {r['protocol']:<12} {r['sparsity']:>4.0%}  measured {r['measured_sparsity']:.1%}"
            f"  perplexity {r['perplexity']:.2f}"
        )
    log(f"teal run: done in {run['seconds_total']:.0f} s; report in {out}/")
    if args.json:
        from teal.commands.common import print_json

        print_json(
            {"out": str(out), "files": {k: str(v) for k, v in paths.items()}, "results": obj}
        )
    else:
        print(paths["markdown"])
    return 0


def _samples(
    model: Any, cal: Any, method: str, levels: list[float], n_new: int
) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    from teal.sparsity.methods import setting_for

    chat = bool(getattr(model.tokenizer, "chat_template", None))
    out = []
    try:
        with tqdm(
            total=len(PROMPTS) * len(levels), unit="sample", desc="generating", dynamic_ncols=True
        ) as bar:
            for p in levels:
                if p == 0:
                    model.clear_sparsity()
                else:
                    setting = setting_for(cal, method, p, model, mode="decode")
                    if not setting.reachable:
                        continue
                    setting.apply(model, mode="decode")
                for prompt in PROMPTS:
                    res = model.generate(prompt, max_new_tokens=n_new, chat=chat)
                    out.append(
                        {
                            "prompt": prompt,
                            "sparsity": p,
                            "text": res.text,
                            "new_tokens": res.new_tokens,
                            "tokens_per_second": round(res.tokens_per_second, 1),
                        }
                    )
                    bar.update(1)
    finally:
        model.clear_sparsity()
    return out
