"""Original item ids <-> the compact ids of `load_dataset(..., compact_ids=True)`.

A dataset loaded with `compact_ids=True` numbers its items 1..D and keeps
`original_ids` (int64 (D + 1,), increasing after the padding entry 0: new id -> original
id). A model trained on it carries the same array, and `recommend` takes and returns
original ids through these two functions.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .store import DataError

__all__ = ["to_compact_ids", "to_original_ids"]


def to_compact_ids(original_ids: np.ndarray, sessions: Sequence[Sequence[Any]]) -> list[list[int]]:
    """Sessions of original ids -> sessions of compact ids; an id the catalogue does not hold
    raises naming it (the model never saw that item)."""
    out = []
    known = original_ids[1:]
    for i, s in enumerate(sessions):
        if isinstance(s, (str, bytes)) or not isinstance(s, (Sequence, np.ndarray)):
            raise TypeError(f"sessions[{i}] must be a list of item ids, got {type(s).__name__}")
        row = []
        for j, x in enumerate(s):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                raise DataError(f"sessions[{i}][{j}] = {x!r} is not an item id")
            k = int(np.searchsorted(known, int(x)))
            if k >= known.size or known[k] != int(x):
                raise DataError(f"sessions[{i}][{j}] = {x!r} is not an item of this model's catalogue (it was "
                                f"trained on {known.size} items renumbered by compact_ids=True; this id never "
                                "occurred in its data)")
            row.append(k + 1)
        out.append(row)
    return out


def to_original_ids(original_ids: np.ndarray, ids: torch.Tensor) -> torch.Tensor:
    """Compact ids (any shape) -> original ids."""
    return torch.from_numpy(original_ids[ids.numpy()]) if ids.numel() else ids
