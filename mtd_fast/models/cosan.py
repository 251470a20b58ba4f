"""CoSAN: Luo et al., "Collaborative Self-Attention Network for Session-based
Recommendation", IJCAI 2020 (pp. 2591-2597, doi:10.24963/ijcai.2020/359).

No public code exists, and of the paper only its abstract could be read from here (the
full text was not reachable with the available tools). What the abstract states, and what
is therefore fixed here:
  1. a *collaborative item representation*: for each item of the current session,
     neighbourhood sessions are retrieved according to that item and their embeddings are
     aggregated into the item's representation, so that the same item is represented
     differently for different users (sessions) at the same time step;
  2. *self-attention* over the collaborative items learns long-range dependencies and gives
     the *collaborative session representation*;
  3. the session is represented by *concatenating* the collaborative session
     representation and the *embedding of the current session*; items are scored from it.
Everything else is a decision of ours, listed under "Decisions" so that it can be
revisited against the full paper.

Published P@20 / MRR@20 on our datasets: the CoSAN paper reports experiments on "two
real-world datasets" (abstract); its result table could not be retrieved here, so no
figure is quoted (see the project report).

Model (d = config.hidden_size, e_i = E[s_i]):
    s_cur = mean of e_i over the valid clicks                       current-session embedding
    memory Mem (memory_size, d): detached final representations z of recent training samples
    per click i (neighbourhood retrieved according to the item):
        N_i   = the k slots of Mem most similar to e_i (cosine)
        beta  = softmax_{j in N_i}(Mem_j . s_cur / sqrt(d))           session-dependent weights
        c_i   = W_c sum_{j in N_i} beta_j Mem_j;   x_i = e_i + c_i    collaborative item
    X0 = dropout(x + P[pos])  (learned positions, 1 = most recent click, as in MTD)
    H  = `num_blocks` post-LN self-attention blocks (MTD's block: causal + key-padding mask)
    h  = H[b, lengths[b]-1]                                         collaborative session repr.
    z  = W_z [h ; s_cur]   (2d -> d, no bias)                      concatenation + projection
    scores_i = dropout(z) . E[i]  (tied item embeddings), full-softmax cross-entropy

Decisions (no public code; the abstract is silent on these):
- Neighbourhood sessions live in a FIFO memory of `config.memory_size` slots (the knob CSRM
  uses, default 512), like CSRM's outer memory (`csrm.FifoMemory`): each slot is the final
  representation z of a recently seen training sample, detached. Only training-mode
  forwards write, after the batch has read the memory; eval mode only reads it, so scores
  are deterministic and batch-independent. The buffers (`neighbors.memory`, `mem_ptr`,
  `mem_count`) are in `state_dict` and survive `mtd_fast.save`/`load`.
- "Retrieved according to each item": the k = `config.cosan_neighbors` = 10 slots whose z is most
  cosine-similar to the item's embedding, i.e. recent sessions whose intent points at that
  item. z lives in the item-embedding space (it is scored by dot product with E), which is
  what makes this similarity meaningful. k should become an `MTDConfig` field; until then a
  class constant.
- "Represented differently for different users": the aggregation weights over an item's
  neighbours use the current session's embedding s_cur, so the same item gets a different
  collaborative representation in different sessions. The collaborative item keeps the
  item itself (x_i = e_i + c_i, residual), so an empty memory (first batch) degrades to a
  plain self-attention model rather than to no item information. The aggregate goes
  through a learned d x d map W_c initialised to zero: memory slots are session vectors
  in score space, several times the norm of an item embedding at initialisation, and
  added raw they drowned the item identity (one-epoch synthetic P@20 16.7 with a raw sum,
  23.6 with W_c); W_c learns how much neighbourhood to let in.
- "Embedding of the current session": the mean of its item embeddings (STAMP's general
  interest), parameter-free.
- Self-attention block: MTD's post-LN transformer block (no Q/K/V bias, ReLU FFN d -> d),
  `num_blocks` / `num_heads` from `MTDConfig`; causal masking is used because it is what
  `mtd_fast.ops.session_attention` computes (with one block, the default, the last
  position sees every click either way). Positions numbered from the most recent click.
- Trained like every model here: prefix samples, full-softmax cross-entropy, Adam, L2 over
  all parameters, `TrainConfig.dropout` on the embeddings, in the block and on z.
- The memory holds training prefixes, not whole sessions (the trainer's samples), so while
  training a longer prefix of the same session may be among the neighbours, as in CSRM.
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
from .layers import FifoMemory, Packing, SelfAttentionBlock, init_attention_encoder, segment_sum

__all__ = ["CoSAN"]


class CoSAN(SessionModel):
    """CoSAN. Shapes: items (B, L) left-aligned, 0-padded; lengths (B,) >= 1."""

    name = "cosan"

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        cfg = self.config
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(cfg.max_position + 1, d, padding_idx=0)
        self.neighbors = FifoMemory(cfg.memory_size, d)
        self.collab_proj = nn.Linear(d, d, bias=False)  # W_c, maps memory (score space) to item space
        self.blocks = nn.ModuleList(SelfAttentionBlock(d, cfg.num_heads, dropout, backend)
                                    for _ in range(cfg.num_blocks))
        self.combine = nn.Linear(2 * d, d, bias=False)  # W_z
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_attention_encoder(self.item_emb, self.pos_emb, self.blocks, self.config.hidden_size)
        nn.init.xavier_uniform_(self.combine.weight)
        nn.init.zeros_(self.collab_proj.weight)  # start as plain self-attention; see the module docstring

    def collaborative_items(self, e: torch.Tensor, session: torch.Tensor, s_cur: torch.Tensor) -> torch.Tensor:
        """c (N, d): neighbourhood aggregate of every valid click (0 with an empty memory).

        e: (N, d) embeddings of the batch's valid clicks (`Packing`); session: (N,) the batch
        row of each; s_cur: (B, d).
        """
        _, idx = self.neighbors.topk_cosine(e, self.config.cosan_neighbors)  # (N, k) slots
        if idx.shape[1] == 0:
            return torch.zeros_like(e)
        mem = self.neighbors.filled()  # (n, d), detached
        per_session = s_cur @ mem.t() / math.sqrt(e.shape[-1])  # (B, n): Mem_j . s_cur / sqrt(d)
        beta = torch.softmax(per_session[session].gather(1, idx), dim=-1)  # (N, k)
        return self.collab_proj(self.neighbors.aggregate(beta, idx))  # (N, d)

    def forward(self, batch: Batch) -> torch.Tensor:
        """Final session representation z (B, d); writes the memory in training mode. Runs on
        the batch's valid clicks only (`Packing`)."""
        items, lengths = batch["items"], batch["lengths"]
        packing = Packing(lengths, items.shape[1])
        session = packing.session
        e = self.item_emb(packing.pack(items))  # (N, d)
        s_cur = segment_sum(e, session, packing.batch) / lengths[:, None].to(e.dtype)  # mean over valid clicks
        x = e + self.collaborative_items(e, session, s_cur)
        pos = position_index(lengths, items.shape[1]).clamp_max(self.config.max_position)
        h = F.dropout(x + self.pos_emb(packing.pack(pos)), self.dropout_p, self.training)
        for blk in self.blocks:
            h = blk(h, lengths, packing=packing)
        z = self.combine(torch.cat([h[packing.last], s_cur], dim=-1))
        if self.training:
            self.neighbors.write(z)  # after the read: a sample never retrieves itself
        return z

    def score_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        z = F.dropout(self.forward(batch), self.dropout_p, self.training)
        return z, self.item_emb.weight[1:]  # z (B, d), item table (M, d): scores z E[1:]^T
