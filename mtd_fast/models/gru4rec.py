"""GRU4Rec: Hidasi, Karatzoglou, Baltrunas, Tikk, "Session-based Recommendations with
Recurrent Neural Networks", ICLR 2016.

A GRU reads the session's clicks; its state after the last click, through a
feed-forward output layer (one weight vector and one bias per item), scores every item.

Published P@20 / MRR@20 on our datasets (the GRU4Rec paper itself reports only the
full RSC15/Yoochoose split and a private VIDEO set): Yoochoose 1/64 60.64 / 22.89
(NARM, Li et al. CIKM 2017, repeated in SR-GNN, Wu et al. AAAI 2019, Table 2);
Diginetica 29.45 / 8.33 (SR-GNN Table 2, on STAMP's preprocessing, the split used here;
NARM gives 43.82 / 15.46 on its own, different Diginetica split).

Deliberate deviations (all so that every model shares one pipeline):
- trained on the shared prefix samples (every prefix -> next click, `MTD_SPEC.md` 1)
  with full-softmax cross-entropy, not with session-parallel mini-batches and the
  sampled TOP1 / BPR ranking losses of the paper (cross-entropy is one of the losses of
  the authors' later version, Hidasi & Karatzoglou, CIKM 2018);
- the output layer's scores `h W^T + b` are computed as `[h, 1] . [W | b]` (`score_parts`),
  so training and ranking share the chunked full-softmax path of the other models;
- input: an item embedding of size `hidden_size` (the paper's optional embedding layer)
  instead of the 1-of-N input it found best; output: separate per-item weights and bias
  (as in the paper), not tied to the input embedding;
- one GRU layer of `hidden_size` (100) units (the paper: 100 or 1000), Adam lr 1e-3
  (the paper: Adagrad), dropout `TrainConfig.dropout` on the input embeddings and on
  the final state (the paper: dropout on the hidden layer only).

Padding: the GRU runs on the batch's valid clicks packed as a `PackedSequence`
(`layers.rnn_batch` / `run_gru`), embedded and dropped out as N = sum(lengths) rows, so
padding is never read or computed and the final state is each session's own state
after its last click. With prefix samples a 512-row batch is padded to its longest
prefix while most are short (measured, one thread, B 512, d 100, lengths geometric with
mean 5 and max 69: GRU forward + backward 170-195 ms packed against 885-1007 ms over the
padded tensor).
"""
from __future__ import annotations

import math
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import MTDConfig
from .base import Batch, SessionModel
from .layers import rnn_batch, run_gru

__all__ = ["GRU4Rec"]


class GRU4Rec(SessionModel):
    """Embedding -> GRU -> state after the last click -> per-item output layer."""

    name = "gru4rec"

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        d = self.config.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.output = nn.Linear(d, n_items)  # W_y (M, d), b_y (M,): row j scores item j + 1
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # the paper's initialization: uniform in +-sqrt(6 / (fan_in + fan_out))
        d = self.config.hidden_size
        for w in (self.item_emb.weight, self.output.weight):
            bound = math.sqrt(6.0 / (w.shape[0] + d))
            nn.init.uniform_(w, -bound, bound)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        nn.init.zeros_(self.output.bias)
        for name, w in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(w)
            else:
                nn.init.zeros_(w)

    def prepare_batch(self, items: np.ndarray, lengths: np.ndarray) -> Batch:
        return rnn_batch(self, items, lengths)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Session state (B, d)."""
        x = F.dropout(self.item_emb(batch["click_ids"]), self.dropout_p, self.training)  # (N, d) valid clicks
        h = run_gru(self.gru, x, batch)  # (B, d)
        return F.dropout(h, self.dropout_p, self.training)

    def score_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The output layer h W^T + b as one dot product: q = [h, 1] (B, d+1) against the
        table [W | b] (M, d+1), so the loss and ranking run chunked like the tied models.
        The concatenated table is a copy per call (17 MB at Diginetica's 43k items)."""
        h = self.forward(batch)  # (B, d)
        q = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
        return q, torch.cat([self.output.weight, self.output.bias[:, None]], 1)
