"""Assertions shared by the op test modules (imported by name: pytest puts tests/ on sys.path)."""
from __future__ import annotations

from typing import Iterable

import torch


def assert_padded_rows_zero(t: torch.Tensor, lengths: Iterable[int], name: str = "") -> None:
    """Rows at or past each session's length are exactly zero (never NaN, never garbage)."""
    prefix = f"{name}: " if name else ""
    for bi, n in enumerate(lengths):
        assert torch.equal(t[bi, n:], torch.zeros_like(t[bi, n:])), f"{prefix}padded rows of session {bi}"
