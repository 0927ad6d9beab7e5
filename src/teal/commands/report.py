"""``teal report``: one page comparing run folders and result files (``teal.compare``)."""

from __future__ import annotations

import argparse
import datetime as _dt
from pathlib import Path

from teal.commands.common import print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "report",
        help="one HTML + markdown page comparing runs: quality, speed, plots",
        description="Compare runs side by side: folders written by `teal run` and JSON files"
        " from `teal eval --json` or `teal bench --json/--out` (a folder's *.json are all"
        " read). Writes report.html (self-contained), report.md, the plots as PNG and"
        " comparison.json.",
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folder or results JSON file")
    p.add_argument(
        "--out", default=None, metavar="DIR", help="where to write (default teal-reports/<time>/)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from teal.compare import write_comparison

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or Path("teal-reports") / stamp)
    summary = write_comparison(args.runs, out)
    if args.json:
        print_json(summary)
    else:
        for r in summary["runs"]:
            print(
                f"{r['label']}: {r['perplexity_rows']} perplexity, {r['task_rows']} task,"
                f" {r['speed_rows']} speed rows"
            )
        print(summary["html"])
    return 0
