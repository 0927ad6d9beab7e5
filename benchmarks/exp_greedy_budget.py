"""Experiment: how many held-out tokens, in windows of what length, the greedy search sees.

Makes one calibration file per ``TOKENSxWINDOW`` variant (``allocate.HELD_OUT_TOKENS``,
``allocate.HELD_OUT_WINDOW``) from one file's histograms, with the greedy tables made
again; compare them with ``teal eval --method greedy-layers --calibration FILE``.

    PYTHONPATH=src python benchmarks/exp_greedy_budget.py --calibration BASE \\
        --variants 512x256,512x512,1024x1024 --out /tmp/budget
"""

from __future__ import annotations

import argparse

from exp_greedy_weighting import remake  # the same loop, other knobs
from teal.sparsity import allocate


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calibration", required=True, help="file whose histograms are reused")
    ap.add_argument("--variants", default="512x256,512x512", help="comma list of TOKENSxWINDOW")
    ap.add_argument("--out", required=True, help="folder for cal-TOKENSxWINDOW.safetensors")
    args = ap.parse_args()

    def configure(variant: str) -> dict:
        n_tokens, window = (int(v) for v in variant.split("x"))
        allocate.HELD_OUT_TOKENS = n_tokens
        allocate.HELD_OUT_WINDOW = window
        return {"held_out_window": window}  # add_tables records held_out_tokens

    remake(args.calibration, args.out, args.variants.split(","), configure)


if __name__ == "__main__":
    main()
