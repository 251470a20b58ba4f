"""S-POP: session popularity (a baseline as the NARM paper, Li et al. CIKM 2017,
defines it, used again by STAMP and SR-GNN): the items of the current session ranked by
how often they occur in it; ties, and every item not in the session, ranked by global
popularity (training click counts, as in `pop.py`).

Published P@20 / MRR@20 (SR-GNN, Wu et al. AAAI 2019, Table 2, numbers taken over
from STAMP/NARM): Yoochoose 1/64 30.44 / 18.35; Diginetica 21.06 / 13.68. This code on
the shared data (`mtd-fast train --model spop --dataset NAME --data-dir ../shared/data/NAME`):
Diginetica 21.05 / 13.67, Yoochoose 1/64 29.40 / 18.26.

Implementation: score = count_in_session * R + popularity_rank, where
popularity_rank in 0..R-1 is the dense rank of the item's global count (equal counts,
equal rank: those ties are left to the evaluation's tie rule). Both terms are integers,
so the lexicographic order is exact in float32 as long as L * R < 2**24; beyond that the
scores are computed in float64. The session counts are one `scatter_add_` over the
padded batch (padding goes to column 0, which is dropped): no loop per sample.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from ..config import MTDConfig
from .base import Batch, SessionModel
from .pop import click_counts

__all__ = ["SPOP", "session_counts"]

# integers below 2**24 are exact in float32: scores (session count * ranks + popularity rank)
# that stay below it are computed in float32, the others in float64 (the tests lower it to
# check the float64 path on a small catalogue)
FLOAT32_EXACT = 2 ** 24


def session_counts(items: torch.Tensor, lengths: torch.Tensor, n_items: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(B, M) occurrences of items 1..M in each padded session (items (B, L), lengths (B,))."""
    b, width = items.shape
    valid = torch.arange(width, device=items.device)[None, :] < lengths[:, None]
    idx = torch.where(valid, items, torch.zeros_like(items)).long()
    out = torch.zeros(b, n_items + 1, device=items.device, dtype=dtype)
    out.scatter_add_(1, idx, valid.to(dtype))
    return out[:, 1:]


class SPOP(SessionModel):
    """In-session counts first, global popularity second."""

    name = "spop"
    neural = False

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        self.register_buffer("pop_rank", torch.zeros(n_items))  # dense popularity rank, 0 = least clicked
        self.register_buffer("n_ranks", torch.ones((), dtype=torch.int64))  # R

    def fit(self, dataset) -> None:
        counts = click_counts(dataset, self.n_items)
        levels, rank = np.unique(counts, return_inverse=True)
        self.pop_rank.copy_(torch.from_numpy(rank.reshape(-1).astype(np.float32)))
        self.n_ranks.fill_(int(levels.size))

    def scores(self, batch: Batch) -> torch.Tensor:
        items, lengths = batch["items"], batch["lengths"]
        r = int(self.n_ranks)
        exact32 = (items.shape[1] + 1) * r < FLOAT32_EXACT
        dtype = torch.float32 if exact32 else torch.float64
        counts = session_counts(items, lengths, self.n_items, dtype)  # (B, M)
        return counts.mul_(r).add_(self.pop_rank.to(dtype))
