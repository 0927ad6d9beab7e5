"""Run a ``teal`` command with kernel configurations pinned from a tuning result.

    PYTHONPATH=src python benchmarks/with_configs.py SITE_TUNE.json bench --device cuda ...

SITE_TUNE.json is what ``bench_kernels.py --site-tune`` writes: its per-site winners are
pinned with ``set_config`` (both half dtypes) before the command runs in this process,
so an end-to-end figure can be taken before the winners are pasted into ``_TABLE``.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_kernels  # noqa: E402
from teal.cli import main  # noqa: E402

if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        bench_kernels.apply_site_best(json.load(f))
    sys.exit(main(sys.argv[2:]))
