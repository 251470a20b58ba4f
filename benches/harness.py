"""What the benches and the bench scripts share (imported by name: `benches/` is on sys.path
under pytest and when a script in it runs).

- real data: `DATA` (`mtd_fast.data.data_root`: $MTD_FAST_DATA, else ../shared/data beside
  the project), `data_dir(name)` and, for pytest benches, `data_dir_or_skip(name)`;
- `SMOKE` (MTD_BENCH_SMOKE=1: every bench at tiny scale, correctness checks included).
"""
from __future__ import annotations

import os
from pathlib import Path

from mtd_fast.data import data_root, dataset_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = data_root(ROOT)
SMOKE = os.environ.get("MTD_BENCH_SMOKE") == "1"


def data_dir(name: str) -> Path:
    """The folder of shared dataset `name` (a key of `mtd_fast.data.DATASETS`)."""
    return dataset_dir(name, ROOT)


def data_dir_or_skip(name: str) -> Path:
    """`data_dir(name)`, or skip the calling pytest bench with where it looked."""
    import pytest

    path = data_dir(name)
    if not path.is_dir():
        pytest.skip(f"{name}: real data not found at {path} (benches read $MTD_FAST_DATA, else ../shared/data; "
                    "MTD_BENCH_SMOKE=1 runs on synthetic data)")
    return path
