"""What the test modules share (imported by name: pytest puts tests/ on sys.path).

- real data: `SHARED_DATA` (`mtd_fast.data.data_root`: $MTD_FAST_DATA, else ../shared/data
  beside the project) and `shared_path`, which skips a test when the data is absent.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from mtd_fast.data import data_root

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = data_root(PROJECT)


def shared_path(*parts: str) -> Path:
    """Path under the shared data folder, or skip the test with a reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p} (tests read it from $MTD_FAST_DATA, else ../shared/data)")
    return p
