"""POP: global popularity, the simplest baseline of the session-based literature
(baseline of GRU4Rec, Hidasi et al. ICLR 2016; NARM; STAMP; SR-GNN).

Every session gets the same list: the items with the most clicks in the training
sessions (`dataset.train_sessions`, i.e. without the validation sessions). Ties keep
the evaluation's tie rule (lower id first), so a count tie never flatters the model.

Published P@20 / MRR@20 (SR-GNN, Wu et al. AAAI 2019, Table 2, numbers taken over
from STAMP/NARM): Yoochoose 1/64 6.71 / 1.65; Diginetica 0.89 / 0.20. This code on the
shared data (training sessions without the last 10% kept for validation)
(`mtd-fast train --model pop --dataset NAME --data-dir ../shared/data/NAME`): Diginetica
0.85 / 0.20, Yoochoose 1/64 5.42 / 0.94 (the published 1/64 figure comes from NARM's own
preprocessing).

Non-neural: `fit(dataset)` is one `np.bincount`; the counts live in a persistent buffer
of shape (M,) so `mtd_fast.save` / `load` round-trips the fitted model.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..config import MTDConfig
from ..data.store import DataError
from .base import Batch, SessionModel

__all__ = ["POP", "click_counts"]


def click_counts(dataset, n_items: int) -> np.ndarray:
    """Clicks of items 1..M in `dataset.train_sessions`: int64 (M,)."""
    if dataset.n_items > n_items:
        raise DataError(f"dataset {dataset.name!r} has {dataset.n_items} items but the model was built for "
                        f"{n_items}")
    items = np.asarray(dataset.train_sessions.items, dtype=np.int64)
    return np.bincount(items, minlength=n_items + 1)[1:n_items + 1]


class POP(SessionModel):
    """Scores = training click count of each item, the same for every session."""

    name = "pop"
    neural = False

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        # float32 counts: exact up to 2**24 clicks per item, far above any dataset here
        self.register_buffer("counts", torch.zeros(n_items))

    def fit(self, dataset) -> None:
        counts = click_counts(dataset, self.n_items)
        self.counts.copy_(torch.from_numpy(counts.astype(np.float32)))

    def scores(self, batch: Batch) -> torch.Tensor:
        b = batch["items"].shape[0]
        return self.counts.unsqueeze(0).expand(b, -1)  # (B, M), a view: no per-batch copy
