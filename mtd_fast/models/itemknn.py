"""ItemKNN: the item-to-item nearest-neighbour baseline of GRU4Rec (Hidasi et al.,
"Session-based Recommendations with Recurrent Neural Networks", ICLR 2016, baselines),
used unchanged by NARM, STAMP and SR-GNN and as `iknn` by Ludewig & Jannach
("Evaluation of session-based recommendation algorithms", UMUAI 2018).

Definition: two items are similar when they occur in the same training sessions.
With n_i the number of training sessions that contain item i and c_ij the number that
contain both,

    sim(i, j) = c_ij / (sqrt(n_i) * sqrt(n_j) + lambda),   i != j,

the cosine similarity of the items' binary session vectors, with the regularization
lambda (`knn_shrink`, 20 as in the GRU4Rec baseline code) that the GRU4Rec paper adds "to
avoid coincidental high similarities of rarely visited items". Each item keeps its
`config.knn_neighbors` (100) most similar items.

Scoring uses the session's LAST item only: score(j) = sim(last, j). This is the
baseline as the GRU4Rec paper defines it ("items similar to the actually viewed item
are recommended") and as Ludewig & Jannach's `iknn` implements it, so it is the model
behind the published Item-KNN numbers; summing over all session items is the
session-based kNN family (SKNN), a different baseline. Items outside the neighbourhood
score 0 (ties resolved by the evaluation's rule, lower id first).

Published P@20 / MRR@20 (SR-GNN, Wu et al. AAAI 2019, Table 2, numbers taken over from
STAMP/NARM): Yoochoose 1/64 51.60 / 21.81; Diginetica 35.75 / 11.57. This code on the
shared data (training sessions without the validation 10%, lambda 20, K 100)
(`mtd-fast train --model itemknn --dataset NAME --data-dir ../shared/data/NAME`):
Diginetica 34.52 / 11.13 (fit 3.3 s), Yoochoose 1/64 51.65 / 21.92 (fit 1.4 s).

Implementation: one pass with sparse matrices, never a dense M x M: X (sessions x items,
binary CSR), C = X^T X (sparse), similarity on C's nonzeros, the top-K per row by one
`np.lexsort` over all nonzeros (row, -sim, column). The neighbours live in persistent
buffers of shape (M + 1, K) (row 0 and unused slots: item 0 with similarity 0), so
`save`/`load` round-trips the fitted model; scoring is a gather of K neighbours per
session and one `scatter_add_` into a (B, M + 1) tensor.
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np
import scipy.sparse as sp
import torch

from ..config import MTDConfig
from ..data.store import DataError, Sessions
from .base import Batch, SessionModel

__all__ = ["ItemKNN", "item_knn"]


def item_knn(sessions: Sessions, n_items: int, k: int, shrink: float) -> tuple[np.ndarray, np.ndarray]:
    """Top-k neighbours of every item 0..M: (neighbours int32 (M+1, k), similarities float32 (M+1, k)),
    each row best first (ties by lower id); empty slots hold item 0 with similarity 0."""
    n_sess = len(sessions)
    rows = np.repeat(np.arange(n_sess, dtype=np.int64), sessions.lengths)
    cols = np.asarray(sessions.items, dtype=np.int64)
    x = sp.csr_matrix((np.ones(cols.size, dtype=np.float64), (rows, cols)), shape=(n_sess, n_items + 1))
    x.sum_duplicates()
    x.data[:] = 1.0  # binary: a session counts once per item, however often it clicks it
    support = np.asarray(x.sum(axis=0)).ravel()  # n_i (M+1,)
    co = (x.T @ x).tocoo()  # c_ij, symmetric, diagonal = n_i
    off = co.row != co.col
    r, c, v = co.row[off].astype(np.int64), co.col[off].astype(np.int64), co.data[off]
    sim = v / (np.sqrt(support[r]) * np.sqrt(support[c]) + shrink)
    order = np.lexsort((c, -sim, r))  # by row, then similarity descending, then lower id
    r, c, sim = r[order], c[order], sim[order]
    row_start = np.searchsorted(r, np.arange(n_items + 1))
    slot = np.arange(r.size, dtype=np.int64) - row_start[r]  # rank within the row
    keep = slot < k
    nbrs = np.zeros((n_items + 1, k), dtype=np.int32)
    sims = np.zeros((n_items + 1, k), dtype=np.float32)
    nbrs[r[keep], slot[keep]] = c[keep]
    sims[r[keep], slot[keep]] = sim[keep]
    return nbrs, sims


class ItemKNN(SessionModel):
    """score(j) = sim(last item of the session, j) over each item's top-K neighbours."""

    name = "itemknn"
    neural = False

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        self.k = max(1, min(self.config.knn_neighbors, n_items - 1))
        self.register_buffer("neighbours", torch.zeros(n_items + 1, self.k, dtype=torch.int32))
        self.register_buffer("similarities", torch.zeros(n_items + 1, self.k))

    def fit(self, dataset) -> None:
        if dataset.n_items > self.n_items:
            raise DataError(f"dataset {dataset.name!r} has {dataset.n_items} items but the model was built for "
                            f"{self.n_items}")
        nbrs, sims = item_knn(dataset.train_sessions, self.n_items, self.k, float(self.config.knn_shrink))
        self.neighbours.copy_(torch.from_numpy(nbrs))
        self.similarities.copy_(torch.from_numpy(sims))

    def scores(self, batch: Batch) -> torch.Tensor:
        items, lengths = batch["items"], batch["lengths"]
        b = items.shape[0]
        last = items[torch.arange(b, device=items.device), lengths - 1].long()  # (B,)
        idx = self.neighbours[last].long()  # (B, K)
        out = torch.zeros(b, self.n_items + 1, device=items.device, dtype=self.similarities.dtype)
        out.scatter_add_(1, idx, self.similarities[last])  # empty slots add 0 to column 0
        return out[:, 1:]
