"""Experiment: how a token's output error counts in the greedy search.

Makes one calibration file per weighting (``teal.sparsity.allocate.ERROR_WEIGHTING``)
from the same histograms, with the tables of ``--kinds`` made again under that
weighting; compare them with ``teal eval --calibration FILE``.

    PYTHONPATH=src python benchmarks/exp_greedy_weighting.py --calibration BASE \\
        --weighting absolute,per-token --out /tmp/w
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import teal
from teal.eval.corpus import load_corpus
from teal.model import rotate
from teal.sparsity import allocate, tables
from teal.sparsity.artifact import Calibration


def remake(calibration: str, out: str, variants, configure, kinds=("greedy",)) -> None:
    """For each variant: ``configure(variant)`` sets ``allocate``'s knobs and returns what
    to record in the tables' metadata; then the tables of ``kinds`` are made again on the
    histograms of ``calibration`` and saved as ``out/cal-VARIANT.safetensors``."""
    model = teal.load(dtype="fp32")
    part = load_corpus(None).part("calibration")
    base = Calibration.load(calibration, model)
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        recorded = configure(variant)
        meta = copy.deepcopy(base.metadata)
        meta.pop("tables", None)
        keep = {k: v for k, v in base.tables.items() if k == rotate.TABLE}  # its basis
        cal = Calibration(base.stats, meta, keep)
        start = time.perf_counter()
        tables.add_tables_from_text(model, cal, part, kinds=tuple(kinds))
        cal.metadata["tables"].update(recorded)
        path = cal.save(folder / f"cal-{variant.replace(':', '-')}.safetensors")
        print(f"{variant}: {path} in {time.perf_counter() - start:.0f} s", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", required=True, help="file whose histograms are reused")
    ap.add_argument(
        "--weighting",
        default="absolute,per-token",
        help="comma list of WEIGHTING or WEIGHTING:INPUTS (INPUTS dense or sparse)",
    )
    ap.add_argument("--kinds", default="greedy", help="tables to make (comma list)")
    ap.add_argument("--out", required=True, help="folder for cal-WEIGHTING.safetensors")
    args = ap.parse_args()

    def configure(variant: str) -> dict:
        weighting, _, inputs = variant.partition(":")
        allocate.ERROR_WEIGHTING = weighting
        allocate.SEARCH_INPUTS = inputs or "dense"
        return {"error_weighting": weighting, "search_inputs": allocate.SEARCH_INPUTS}

    kinds = [k.strip() for k in args.kinds.split(",")]
    remake(args.calibration, args.out, args.weighting.split(","), configure, kinds)


if __name__ == "__main__":
    main()
