"""STAMP: Liu, Zeng, Mokhosi, Zhang, "STAMP: Short-Term Attention/Memory Priority
Model for Session-based Recommendation", KDD 2018.

No recurrence: with x_i the item embeddings of the session, x_t the last one and
m_s = mean_i x_i,
    alpha_i = w0^T sigmoid(W1 x_i + W2 x_t + W3 m_s + b_a)     (attention, unnormalized)
    m_a     = sum_i alpha_i x_i
    h_s     = tanh(W_s m_a + b_s),   h_t = tanh(W_t x_t + b_t)   (two one-layer MLPs)
    z_j     = <h_s, h_t, x_j> = (h_s * h_t) . x_j               (trilinear, tied embeddings)
and a softmax over all items j.

Published P@20 / MRR@20: Yoochoose 1/64 68.74 / 29.67; Diginetica 45.64 / 14.32 (the
STAMP paper's comparison, section 5; repeated in SR-GNN, Wu et al. AAAI 2019, Table 2,
and in `MTD_SPEC.md` section 7).

Deliberate deviations:
- logits are the trilinear products z_j; the paper writes sigmoid(z_j) before the
  softmax. The sigmoid is monotone (same ranking) but squeezes every logit into (0, 1),
  which caps the softmax at a ratio of e between the best and the worst item (common
  reimplementations, e.g. RecBole's, also feed z_j to the cross-entropy);
- dropout `TrainConfig.dropout` on the session's item embeddings (the paper has no
  dropout; `dropout=0` recovers it); Adam lr 1e-3 of the shared schedule (paper: 5e-3);
- initialization: weights N(0, 0.05^2) and biases 0 as in the paper, but embeddings
  uniform in +-1/sqrt(d) (as MTD's) instead of the paper's N(0, 0.002^2), which was
  chosen for its lr 5e-3: at the shared lr 1e-3 the trilinear product of three tiny
  factors barely moves, and one epoch on the synthetic data left STAMP at popularity
  level (P@20 15.2 against POP's 14.6; 29.6 with these embeddings).

Padding: the model runs on the batch's valid clicks only (`layers.Packing`); m_s averages
them and the attention sums over them, so padding is never computed and batching never
changes a session's scores.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MTDConfig
from .base import Batch, SessionModel
from .layers import Packing, segment_sum

__all__ = ["STAMP"]


class STAMP(SessionModel):
    """Attention over the session memory + last-click priority, trilinear scoring."""

    name = "stamp"
    WEIGHT_STD = 0.05

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        d = self.config.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.w1 = nn.Linear(d, d, bias=False)  # on x_i
        self.w2 = nn.Linear(d, d, bias=False)  # on x_t
        self.w3 = nn.Linear(d, d)  # on m_s; its bias is b_a
        self.w0 = nn.Linear(d, 1, bias=False)
        self.mlp_s = nn.Linear(d, d)  # W_s, b_s
        self.mlp_t = nn.Linear(d, d)  # W_t, b_t
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.config.hidden_size)
        nn.init.uniform_(self.item_emb.weight, -bound, bound)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        for lin in (self.w0, self.w1, self.w2, self.w3, self.mlp_s, self.mlp_t):
            nn.init.normal_(lin.weight, 0.0, self.WEIGHT_STD)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def forward(self, batch: Batch) -> torch.Tensor:
        """h_s * h_t (B, d): the vector every item embedding is scored against. Runs on the
        batch's valid clicks only (`Packing`, N = sum(lengths) rows)."""
        items, lengths = batch["items"], batch["lengths"]
        packing = Packing(lengths, items.shape[1])
        session, b = packing.session, packing.batch
        x = F.dropout(self.item_emb(packing.pack(items)), self.dropout_p, self.training)  # (N, d)
        x_t = x[packing.last]  # (B, d)
        m_s = segment_sum(x, session, b) / lengths[:, None].to(x.dtype)  # (B, d)
        alpha = self.w0(torch.sigmoid(self.w1(x) + (self.w2(x_t) + self.w3(m_s))[session]))  # (N, 1)
        m_a = segment_sum(alpha * x, session, b)  # (B, d)
        h_s = torch.tanh(self.mlp_s(m_a))
        h_t = torch.tanh(self.mlp_t(x_t))
        return h_s * h_t

    def score_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(batch), self.item_emb.weight[1:]  # q (B, d), item table (M, d): scores q @ E[1:]^T
