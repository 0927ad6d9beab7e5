"""Experiment: how many held-out tokens, in windows of what length, the greedy search sees.

Makes one calibration file per ``TOKENSxWINDOW`` variant (``allocate.HELD_OUT_TOKENS``,
``allocate.HELD_OUT_WINDOW``) from one file's histograms, with the greedy tables made
again; compare them with ``teal eval --method greedy-layers --calibration FILE``.

    PYTHONPATH=src python benchmarks/exp_greedy_budget.py --calibration BASE \\
        --variants 512x256,512x512,1024x1024 --out /tmp/budget
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import teal
from teal.eval.corpus import load_corpus
from teal.sparsity import allocate, tables
from teal.sparsity.artifact import Calibration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", required=True, help="file whose histograms are reused")
    ap.add_argument("--variants", default="512x256,512x512", help="comma list of TOKENSxWINDOW")
    ap.add_argument("--out", required=True, help="folder for cal-TOKENSxWINDOW.safetensors")
    args = ap.parse_args()
    model = teal.load(dtype="fp32")
    part = load_corpus(None).part("calibration")
    base = Calibration.load(args.calibration, model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for variant in args.variants.split(","):
        n_tokens, window = (int(v) for v in variant.split("x"))
        allocate.HELD_OUT_TOKENS = n_tokens
        allocate.HELD_OUT_WINDOW = window
        meta = copy.deepcopy(base.metadata)
        meta.pop("tables", None)
        cal = Calibration(base.stats, meta)
        start = time.perf_counter()
        tables.add_tables_from_text(model, cal, part, kinds=("greedy",))
        path = cal.save(out / f"cal-{variant}.safetensors")
        print(f"{variant}: {path} in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
