"""NARM: Li, Ren, Chen, Ren, Lian, Ma, "Neural Attentive Session-based
Recommendation", CIKM 2017.

A GRU encodes the session. Global encoder: c_g = h_t, the state after the last click.
Local encoder: c_l = sum_j alpha_tj h_j with alpha_tj = v^T sigmoid(A1 h_t + A2 h_j)
(paper eq. 6-7: an additive score, not softmax-normalized). Session c_t = [c_g; c_l]
(2h); bi-linear decoder S_i = emb_i^T B c_t with B (d x 2h) and the same item
embeddings as the input (tied), softmax over all items.

Published P@20 / MRR@20: Yoochoose 1/64 68.32 / 28.63 (the NARM paper's comparison;
repeated in SR-GNN, Wu et al. AAAI 2019, Table 2); Diginetica 49.70 / 16.17 (SR-GNN
Table 2, on STAMP's Diginetica preprocessing, the split used here). The NARM paper's
own 62.58 / 27.35 on Diginetica is on its different Diginetica split: not comparable.

Deliberate deviations:
- item embedding size = GRU size = `hidden_size` (100); the paper used 50 and 100;
- dropout `TrainConfig.dropout` (0.3) both after the embeddings and on c_t (the paper:
  0.25 and 0.5); Adam lr 1e-3 and batch 512 of the shared schedule (paper: lr 1e-3,
  batch 512, too);
- attention as written in the paper (sigmoid, unnormalized, padding weighted 0); the
  authors' Theano code, as we read it, uses a hard sigmoid and a masked softmax.

Padding: the GRU and the attention run on the batch's valid clicks only (packed rows,
`layers.rnn_batch` / `run_gru`; the attention sum is per session over those rows), so
padding is never read and batching never changes a session's scores.
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
from .layers import rnn_batch, run_gru, segment_sum

__all__ = ["NARM"]


class NARM(SessionModel):
    """Hybrid (global + local attentive) GRU encoder, bi-linear decoder over tied embeddings."""

    name = "narm"

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        d = self.config.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.gru = nn.GRU(d, d, batch_first=True)
        self.a1 = nn.Linear(d, d, bias=False)  # applied to h_t
        self.a2 = nn.Linear(d, d, bias=False)  # applied to h_j
        self.v = nn.Linear(d, 1, bias=False)
        self.bilinear = nn.Linear(2 * d, d, bias=False)  # B (d x 2h)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.hidden_size
        bound = 1.0 / math.sqrt(d)
        nn.init.uniform_(self.item_emb.weight, -bound, bound)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        for lin in (self.a1, self.a2, self.v, self.bilinear):
            nn.init.xavier_uniform_(lin.weight)
        for name, w in self.gru.named_parameters():
            if name.startswith("weight"):
                nn.init.xavier_uniform_(w)
            else:
                nn.init.zeros_(w)

    def prepare_batch(self, items: np.ndarray, lengths: np.ndarray) -> Batch:
        return rnn_batch(self, items, lengths)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Session representation after the bi-linear map, B c_t: (B, d)."""
        session = batch["click_session"]  # (N,): the batch row of each valid click
        x = F.dropout(self.item_emb(batch["click_ids"]), self.dropout_p, self.training)  # (N, d)
        c_g, h = run_gru(self.gru, x, batch, outputs=True)  # (B, d), (N, d)
        alpha = self.v(torch.sigmoid(self.a1(c_g)[session] + self.a2(h)))  # (N, 1)
        c_l = segment_sum(alpha * h, session, c_g.shape[0])  # (B, d)
        c = F.dropout(torch.cat([c_g, c_l], dim=-1), self.dropout_p, self.training)  # (B, 2d)
        return self.bilinear(c)

    def score_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(batch), self.item_emb.weight[1:]  # q (B, d), item table (M, d): scores q @ E[1:]^T
