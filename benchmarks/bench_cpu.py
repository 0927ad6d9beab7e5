"""CPU decode speed of the default model (issue 8): our dense, our sparse, llama.cpp.

    PYTHONPATH=src python benchmarks/bench_cpu.py --dtype fp32 --threads 2 \\
        --sparsity 0,0.25,0.4,0.5 --new-tokens 256 --out benchmarks/results/cpu-fp32.json

One process, one thread count, one prompt.  Ours (``teal.bench.bench_decode``): the
model's plain dense path, the sparse kernel with every channel kept, and the sparse
kernel at each level, in interleaved rounds, thresholds from the cached calibration on
the default text, measured sparsity counted on the generated tokens.  llama.cpp
(``llama-cpp-python``, the optional ``bench`` extra): the shipped Q4_1 GGUF and GGUFs
written here with the ``gguf`` package from the dequantized tensors (F16, and F32 for
equal precision with our fp32), the same prompt tokens, greedy (argmax of the logits,
as ours), prefill excluded.  The share of the CPUs that other processes used while each
part ran is recorded: on a shared machine the figures are only as good as that number.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

import teal
from teal.bench import PROMPT, bench_decode, calibration_thresholds, format_table
from teal.data.packages import cache_dir


@contextmanager
def other_cpu_use(record: dict, key: str):
    """Share of the machine's CPU time used by other processes while the block ran."""

    def busy() -> tuple[int, int]:
        with open("/proc/stat") as f:
            vals = [int(v) for v in f.readline().split()[1:]]
        idle = vals[3] + vals[4]
        return sum(vals) - idle, sum(vals)

    try:
        b0, t0 = busy()
    except OSError:
        yield
        return
    s0 = os.times()
    yield
    b1, t1 = busy()
    s1 = os.times()
    ticks = os.sysconf("SC_CLK_TCK")
    ours = (s1.user + s1.system - s0.user - s0.system) * ticks
    record[key] = round(max(0.0, (b1 - b0 - ours) / max(1, t1 - t0)), 3)


# llama_ftype of each file we write: MOSTLY_F16, ALL_F32, MOSTLY_Q8_0.
FILE_TYPES = {"F16": 1, "F32": 0, "Q8_0": 7}


def write_dequantized_gguf(src: Path, dst: Path, ftype: str) -> Path:
    """A copy of ``src`` with every tensor dequantized: 2-D weights stored as ``ftype``
    (F16, F32, or Q8_0 re-quantized by the ``gguf`` package from the dequantized
    values), norms as F32; all metadata (tokenizer included) copied."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    tmp = dst.with_suffix(".tmp")
    writer = gguf.GGUFWriter(str(tmp), arch)
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name == "general.architecture":
            continue
        if name == "general.file_type":
            writer.add_file_type(FILE_TYPES[ftype])
            continue
        vtype = gguf.GGUFValueType(field.types[0])
        sub = gguf.GGUFValueType(field.types[1]) if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if data.ndim > 1 and ftype == "F16":
            data = data.astype(np.float16)
        if data.ndim > 1 and ftype == "Q8_0":
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(t.name, gguf.quants.quantize(data, q8), raw_dtype=q8)
            continue
        writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, dst)
    return dst


def llama_cpp_decode(path: Path, prompt: list[int], new_tokens: int, threads: int, repeats: int):
    """Greedy decode tokens/s of llama.cpp on ``path``: prefill, then ``new_tokens - 1``
    one-token steps, greedy (top-k 1 in llama.cpp's own sampler, as ours takes the
    argmax); the clock starts when the first token is out (prefill excluded)."""
    from llama_cpp import Llama

    n_ctx = len(prompt) + new_tokens + 8
    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(512, n_ctx),
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def run() -> tuple[float, list[int]]:
        # Llama.generate, not Llama.eval + scores: in 0.3.36 the latter leaves the scores
        # unwritten (all tokens 0) or, with n_batch > n_ctx, crashes.
        steps = llm.generate(list(prompt), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0)
        out = [next(steps)]
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):
            out.append(next(steps))
        seconds = time.perf_counter() - t0
        steps.close()
        return (new_tokens - 1) / seconds, [int(t) for t in out]

    run()  # warm-up
    runs, tokens = [], []
    for _ in range(repeats):
        tps, tokens = run()
        runs.append(round(tps, 2))
    return {"tokens_per_second": round(statistics.median(runs), 2), "runs": runs,
            "tokens": tokens}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sparsity", default="0,0.25,0.4,0.5")
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    ap.add_argument(
        "--llama-weights",
        default=None,
        help="llama.cpp files to run, a comma list of Q4_1, F16, F32, Q8_0 (default: Q4_1,"
        " F16, F32, and Q8_0 with --quant int8)",
    )
    ap.add_argument(
        "--quant",
        choices=("int8", "int4", "gguf"),
        default=None,
        help="our rows on quantized weights (thresholds from the unquantized model): int8"
        " (projections and lm_head; llama.cpp adds a Q8_0 file), int4 (--group-size,"
        " --zero-point), gguf (the file's own Q4_1 blocks; its head, tied to a Q8_0"
        " embedding, int8 per output channel)",
    )
    ap.add_argument("--group-size", type=int, default=32, help="int4 group (default 32)")
    ap.add_argument(
        "--zero-point",
        default="offset",
        choices=("offset", "code", "none"),
        help="int4 zero points: float offsets (default), codes, or symmetric",
    )
    ap.add_argument("--llama-build-seconds", type=float, default=None, help="recorded as given")
    ap.add_argument("--llama-build", default=None, help="how llama-cpp-python was built (recorded)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    date = datetime.date.today().isoformat()
    tag = args.dtype + (f"-{args.quant}" if args.quant else "")
    if args.quant == "int4" and (args.group_size, args.zero_point) != (32, "offset"):
        tag += f"-g{args.group_size}-{args.zero_point}"
    out = Path(args.out or f"benchmarks/results/cpu-{tag}-{date}.json")
    busy: dict[str, float] = {}

    model = teal.load(None, dtype=args.dtype)
    prompt = model.tokenizer(PROMPT, add_special_tokens=True)["input_ids"]
    levels = [float(p) for p in args.sparsity.split(",")]
    thresholds = None
    if args.quant:
        # As for evaluation: thresholds from the unquantized model, then quantize.
        thresholds = calibration_thresholds(model, levels)
        if args.quant == "int4":
            model.quantize("int4", group_size=args.group_size, zero_point=args.zero_point)
        else:
            model.quantize(args.quant)
        model.set_backend("cpu")
    with other_cpu_use(busy, "ours"):
        ours = bench_decode(
            model,
            sparsities=levels,
            thresholds=thresholds,
            new_tokens=args.new_tokens,
            threads=args.threads,
            repeats=args.repeats,
            prompt=list(prompt),
            model_name="SmolLM2-135M-Instruct (default model)",
        )
    print(format_table(ours), flush=True)
    result = {
        "command": " ".join(["python", *sys.argv]),
        "date": date,
        "device": ours["device"],
        "threads": args.threads,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "quant": args.quant,
        "new_tokens": args.new_tokens,
        "prompt_tokens": len(prompt),
        "ours": ours,
    }
    del model
    if not args.no_llama:
        import llama_cpp

        from teal.data.default_model import default_model_path

        q4 = default_model_path()
        wanted = ["Q4_1", "F16", "F32", *(("Q8_0",) if args.quant == "int8" else ())]
        if args.llama_weights:
            wanted = [w.strip() for w in args.llama_weights.split(",")]
        files = {"Q4_1": q4} if "Q4_1" in wanted else {}
        for ftype in (w for w in wanted if w != "Q4_1"):
            dst = cache_dir() / "bench" / f"{q4.stem.rsplit('.', 1)[0]}.{ftype}.gguf"
            if not dst.exists():
                dst.parent.mkdir(parents=True, exist_ok=True)
                print(f"writing {dst}", file=sys.stderr, flush=True)
                write_dequantized_gguf(q4, dst, ftype)
            files[ftype] = dst
        rows = []
        with other_cpu_use(busy, "llama_cpp"):
            for ftype, path in files.items():
                r = llama_cpp_decode(path, list(prompt), args.new_tokens, args.threads,
                                     args.repeats)  # fmt: skip
                r = {"weights": ftype, "file": path.name, **r}
                print(f"llama.cpp {ftype}: {r['tokens_per_second']} tok/s", flush=True)
                rows.append(r)
        result["llama_cpp"] = {
            "package": f"llama-cpp-python=={llama_cpp.__version__}",
            "build": args.llama_build,
            "build_seconds": args.llama_build_seconds,
            "results": rows,
        }
        best = {r["path"]: r["tokens_per_second"] for r in ours["results"] if r["sparsity"] == 0}
        ratios = {}
        for r in ours["results"]:
            key = f"{r['path']}@{r['sparsity']:g}"
            ratios[key] = {
                f"vs_llama_{x['weights']}": round(
                    r["tokens_per_second"] / x["tokens_per_second"], 3
                )
                for x in rows
            }
        result["ratios_to_llama_cpp"] = ratios
        result["dense_rows"] = best
    result["other_processes_cpu_share"] = busy
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
