"""CPU decode speed with and without other programs running, for several OpenMP spin
counts (why ``teal`` defaults ``GOMP_SPINCOUNT`` to 1000).

    PYTHONPATH=src python benchmarks/bench_cpu_load.py --threads 2 --spin default,0,1000,10000 \\
        --busy 2 --out benchmarks/results/cpu-load.json

Each case runs in a fresh process (libgomp reads ``GOMP_SPINCOUNT`` once, when it loads):
the default model in bf16 generates 64 greedy tokens twice, dense and at 50 % (uniform
thresholds from the cached calibration), best of the two kept.  "Loaded" cases start
``--busy`` single-thread busy loops at nice 19, each in its own session (as other
programs a user runs are, so the nice level hardly lowers their share), before the
case and stop them after.  ``default`` leaves ``GOMP_SPINCOUNT`` unset and asks teal not
to set it either (libgomp's own default, 300,000 spins).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

CASE = r"""
import json, os, sys, torch
import teal, teal.bench
torch.set_num_threads(int(sys.argv[1]))
m = teal.load(None, dtype="bf16")
th = teal.bench.calibration_thresholds(m, [0.5], progress=False)[0.5]
out = {}
for name in ("dense", "sparse-0.5"):
    if name != "dense":
        m.set_sparsity(th, mode="decode")
    runs = [m.generate("The capital of France is", max_new_tokens=64).tokens_per_second
            for _ in range(2)]
    out[name] = round(max(runs), 1)
print(json.dumps(out))
"""


def run_case(spin: str, threads: int, busy: int) -> dict:
    env = dict(os.environ)
    if spin == "default":
        env.pop("GOMP_SPINCOUNT", None)
        env["TEAL_KEEP_OMP_ENV"] = "1"
    else:
        env["GOMP_SPINCOUNT"] = spin
    loops = [
        subprocess.Popen(
            ["nice", "-n", "19", sys.executable, "-c", "while True: pass"],
            start_new_session=True,
        )
        for _ in range(busy)
    ]
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CASE, str(threads)],
            env=env, capture_output=True, text=True, timeout=900, check=True,
        )  # fmt: skip
    finally:
        for p in loops:
            p.kill()
            p.wait()
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--spin", default="default,0,1000,10000")
    ap.add_argument("--busy", type=int, default=2, help="busy loops in the loaded cases")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = []
    for spin in args.spin.split(","):
        for busy in (0, args.busy):
            r = run_case(spin, args.threads, busy)
            row = {"GOMP_SPINCOUNT": spin, "busy_processes": busy, "threads": args.threads,
                   "tokens_per_second": r}  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    date = datetime.date.today().isoformat()
    result = {"command": " ".join(["python", *sys.argv]), "date": date, "results": rows}
    out = Path(args.out or f"benchmarks/results/cpu-load-{date}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
