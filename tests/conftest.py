"""Shared fixtures (helpers shared by the test modules live in `testing.py`)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synthetic():
    import mtd_fast

    return mtd_fast.load_dataset("synthetic")
