"""SASRec: Kang & McAuley, "Self-Attentive Sequential Recommendation", ICDM 2018.

Causal self-attention blocks over the clicks of a session with learned position
embeddings; the session is represented by the output at its last valid position and
every item is scored by a dot product with the (shared) item embedding table.

Published P@20 / MRR@20 on our datasets: the SASRec paper evaluates on Amazon, Steam and
MovieLens with sampled metrics, never on Diginetica / Yoochoose 1/64 / Retailrocket; no
figure under the SR-GNN protocol was found in the SR-GNN, CSRM, CoSAN or MTD material we
could read (the MTD paper's baseline table could not be retrieved here), so none is quoted.

Architecture (paper section III, with the authors' TF code where the paper is silent):
    X0 = dropout(E[items] + P[pos]) * mask            E (M+1, d), P (max_position+1, d), row 0 padding
    per block (pre-LN, paper eq. "g(x) = x + Dropout(g(LayerNorm(x)))"):
        Y = LN1(X);  X = X + dropout(Attn(Y Wq, Y Wk, Y Wv))   causal + key-padding mask,
                                                               dropout on the attention weights (code)
        Y = LN2(X);  X = X + dropout(W2 dropout(relu(W1 Y + b1)) + b2)
        X = X * mask
    H = LN_final(X) (code: a last LayerNorm after the blocks);  s = H[b, lengths[b]-1]
    scores = s E[1:]^T

Deliberate deviations (and decisions):
- Training objective: the paper trains every position of a user's sequence at once with
  binary cross-entropy against one sampled negative per position. Here SASRec is trained
  like every model of this project: on the prefix samples (session[:-i], session[-i]) with
  full-softmax cross-entropy over all M items, using only the last valid position. Same
  encoder, a different (stronger, comparable) loss.
- Positions: the TF code left-pads every sequence to `maxlen` and numbers positions from the
  padded start, so at inference the most recent click always has the same position
  embedding. Our batches are left-aligned (right-padded), so we number positions from the
  end (1 = most recent click, `ops.common.position_index`), which reproduces that
  inference-time property exactly and keeps scores independent of the batch width.
  Positions above `max_position` (200) share its embedding.
- Q/K/V have no bias and heads are concatenated without an output projection (paper
  formula; the TF code's dense layers add biases). Item embeddings are not multiplied by
  sqrt(d) (the code does; the paper does not).
- Sizes come from `MTDConfig`: `hidden_size` (paper 50; 100 here, shared by all models),
  `num_blocks` (paper 2; config default 1, pass `num_blocks=2` for the paper's setting),
  `num_heads` (paper 1). Dropout is `TrainConfig.dropout`.
- Only the valid clicks are computed (`layers.Packing`: embeddings, LayerNorms,
  projections and FFN on N = sum(lengths) rows; a batch of 512 pads to its longest prefix,
  84 clicks on average on Yoochoose 1/64 against a mean of 5.1), and the last block
  computes only the last position, the one the session representation reads: its query
  attends to every click of the session (packed, per-session softmax), the same function
  as the dense causal attention at that row. The other blocks' attention runs through
  `mtd_fast.ops.session_attention` (same op as MTD), so the Triton backend accelerates
  them; dropout masks are drawn here.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import MTDConfig
from ..ops.common import position_index
from .base import Batch, SessionModel
from .layers import LN_EPS, Packing, dropout_mask, rows_self_attention, segment_softmax, segment_sum

__all__ = ["SASRec", "PreLNBlock"]


class PreLNBlock(nn.Module):
    """x + Dropout(SA(LN(x))), then x + Dropout(FFN(LN(x))) (SASRec section III-C)."""

    def __init__(self, d: int, num_heads: int, dropout: float, backend: Any) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.p = dropout
        self.backend = backend
        self.ln1 = nn.LayerNorm(d, eps=LN_EPS)
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.ln2 = nn.LayerNorm(d, eps=LN_EPS)
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, packing: Packing, lengths: torch.Tensor, last_only: bool = False
                ) -> torch.Tensor:
        """x: (N, d) the batch's valid tokens (`Packing`) -> (N, d); with `last_only`, the
        block's output at each session's last click only (B, d): its query attends to every
        click of the session (the causal mask allows them all), so neither the other
        queries nor a (B, L, L) score matrix are computed."""
        y = self.ln1(x)
        if last_only:
            att = self._last_query_attention(y, packing)  # (B, d)
            x = x[packing.last]
        else:
            att = rows_self_attention(self, y, lengths, packing.width)  # causal, (N, d)
        x = x + F.dropout(att, self.p, self.training)
        y = self.ln2(x)
        ff = self.w2(F.dropout(F.relu(self.w1(y)), self.p, self.training))
        return x + F.dropout(ff, self.p, self.training)

    def _last_query_attention(self, y: torch.Tensor, packing: Packing) -> torch.Tensor:
        """Attention of each session's last click over all its clicks, on packed rows:
        y (N, d) -> (B, d); heads split d; dropout on the attention weights as in the
        dense path (a mask scaled by 1/(1-p), after the softmax)."""
        h = self.num_heads
        n, d = y.shape
        session = packing.session  # (N,)
        q = self.wq(y[packing.last]).view(-1, h, d // h)  # (B, h, dh)
        k, v = self.wk(y).view(n, h, d // h), self.wv(y).view(n, h, d // h)
        scores = (q[session] * k).sum(-1) / math.sqrt(d // h)  # (N, h)
        attn = segment_softmax(scores, session, packing.batch)
        if self.training and self.p > 0:
            attn = attn * dropout_mask(attn.shape, self.p, y)
        return segment_sum((attn[..., None] * v).view(n, d), session, packing.batch)  # (B, d)


class SASRec(SessionModel):
    """SASRec on prefix samples. Shapes: items (B, L) left-aligned, 0-padded; lengths (B,) >= 1."""

    name = "sasrec"

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        cfg = self.config
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_position + 1, d, padding_idx=0)
        self.blocks = nn.ModuleList(PreLNBlock(d, cfg.num_heads, dropout, backend) for _ in range(cfg.num_blocks))
        self.ln_final = nn.LayerNorm(d, eps=LN_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.hidden_size
        bound = 1.0 / math.sqrt(d)
        for w in (self.item_emb.weight, self.pos_emb.weight):
            nn.init.uniform_(w, -bound, bound)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            self.pos_emb.weight[0].zero_()
        for blk in self.blocks:
            for lin in (blk.wq, blk.wk, blk.wv, blk.w1, blk.w2):
                nn.init.xavier_uniform_(lin.weight)  # TF dense default (Glorot uniform)
            nn.init.zeros_(blk.w1.bias)
            nn.init.zeros_(blk.w2.bias)

    def encode(self, items: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Session representation (B, d): the last valid position of the block stack. Runs
        on the valid clicks only (`Packing`); the last block computes its last position only."""
        packing = Packing(lengths, items.shape[1])
        pos = position_index(lengths, items.shape[1]).clamp_max(self.config.max_position)  # 1 = most recent
        x = self.item_emb(packing.pack(items)) + self.pos_emb(packing.pack(pos))  # (N, d)
        x = F.dropout(x, self.dropout_p, self.training)
        for i, blk in enumerate(self.blocks):
            x = blk(x, packing, lengths, last_only=i == len(self.blocks) - 1)
        if not len(self.blocks):
            x = x[packing.last]
        return self.ln_final(x)  # (B, d)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.encode(batch["items"], batch["lengths"])

    def score_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(batch), self.item_emb.weight[1:]  # q (B, d), the shared item table (M, d)
