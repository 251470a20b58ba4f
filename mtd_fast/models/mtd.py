"""MTD: Huang et al., "Graph-Enhanced Multi-Task Learning of Multi-Level Transition
Dynamics for Session-based Recommendation", AAAI 2021.

Exactly `MTD_SPEC.md` (sections 2-3, 5): a position-aware self-attention session encoder
with attentive + position-decay aggregation (intra-session), and a GCN over the global
item graph trained with Deep Graph Infomax whose output is written back into the item
table (inter-session). Where the paper and the authors' TF code differ, `MTDConfig` has
the switch and the spec's default:
- item attention: additive (paper) | product (code);
- graph: undirected binary (code) | directed | weighted; normalization sym (paper) | mean | none (code);
- positions above `max_position` (200) are clipped (the code's 20-row table zeroes them);
- gamma = 0.75 (code constant), optionally learned.
Ablations of Figure 3: MTD-va / MTD-at (`use_self_attention=False`, `use_position_decay`),
MTD-lo (`graph_phases=0`), MTD-ga (`graph_encoder="gat"`).

How the graph side reaches the recommender is `graph_mode` (README "Graph integration"):
- "overwrite": E[nodes] = H after each graph phase (the authors' code);
- "rescaled":  the same, each written row scaled to the norm it had: E[n] = H_n |E_n| / |H_n|;
- "joint":     L = L_rec + lambda_g L_DGI(GCN(E[nodes])) at every step, no write-back, so
               the DGI gradient reaches E (the paper's equation);
- "residual":  the table T = E + GCN(E) on graph nodes (`residual_form="gcn"`; with
               `graph_dropout` p, T = E + dropout_p(GCN(E)) in training), or
               T = mean_l A_hat^l E (`"light"`, LightGCN's layer mean), is used for the
               session's items and the candidates at every step (+ lambda_g L_DGI when > 0).
`score_norm=True` (the default) scores by `score_scale * cos(q, T_j)` (NISER); False by the
paper's `q . T_j`. The defaults (residual + cosine) were chosen on validation data:
README "Graph integration", benches/figures/graph_modes.md.
`repeat_bias=True` (the default, chosen on validation; not in the paper: False is the paper's
model) adds a learned bias to the scores of the session's own items, RepeatNet's repeat mode as
an additive term (models/repeat.py, README "Re-clicks"); `repeat_identity=True` adds to it a
learned weight on scoring those items by their own embeddings instead of their graph-smoothed
rows (`identity_shift`).

The hot ops go through `mtd_fast.ops` (session attention, aggregation, SpMM) so every
backend computes the same function; dropout masks are drawn here, outside any kernel.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import MTDConfig
from ..ops.common import normalize_rows, permute_rows, position_index, segment_softmax, segment_sum
from .base import Batch, SessionModel
from .layers import LN_EPS, Packing, SelfAttentionBlock, init_attention_encoder
from .repeat import RepeatBias, session_items

__all__ = ["MTD", "GCNLayer", "GATLayer"]


class GCNLayer(nn.Module):
    """H' = tanh(LN(A_hat H W)), W d x d without bias (A_hat (H W) computed in that order)."""

    def __init__(self, d: int, norm: str, backend: Any) -> None:
        super().__init__()
        self.weight = nn.Linear(d, d, bias=False)
        self.ln = nn.LayerNorm(d, eps=LN_EPS)
        self.norm = norm
        self.backend = backend

    def forward(self, h: torch.Tensor, graph) -> torch.Tensor:
        return self.from_projected(self.weight(h), graph)

    def from_projected(self, hw: torch.Tensor, graph) -> torch.Tensor:
        """The layer given H W already computed: tanh(LN(A_hat (H W)))."""
        return torch.tanh(self.ln(ops.spmm(graph, hw, norm=self.norm, backend=self.backend)))


class GATLayer(nn.Module):
    """MTD-ga: single-head graph attention over the same graph (edges of A + I), then
    tanh(LN(.)) as in the GCN layer. e_ij = LeakyReLU(a_l . W h_i + a_r . W h_j),
    softmax over the neighbours j of i (the CSR row). Pure PyTorch (gather/scatter)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.weight = nn.Linear(d, d, bias=False)
        self.att_l = nn.Parameter(torch.empty(d))
        self.att_r = nn.Parameter(torch.empty(d))
        self.ln = nn.LayerNorm(d, eps=LN_EPS)
        bound = math.sqrt(6.0 / (d + 1))
        nn.init.uniform_(self.att_l, -bound, bound)
        nn.init.uniform_(self.att_r, -bound, bound)

    def forward(self, h: torch.Tensor, graph) -> torch.Tensor:
        t = graph.torch_tensors(h.device)
        indptr, indices = t.indptr, t.indices
        n = h.shape[0]
        rows = torch.repeat_interleave(torch.arange(n, device=h.device), indptr[1:] - indptr[:-1])
        cols = indices.long()
        wh = self.weight(h)  # (N, d)
        e = F.leaky_relu((wh @ self.att_l)[rows] + (wh @ self.att_r)[cols], 0.2)  # (nnz,)
        alpha = segment_softmax(e, rows, n)  # over each node's neighbours
        return torch.tanh(self.ln(segment_sum(alpha[:, None] * wh[cols], rows, n)))


class MTD(SessionModel):
    """The MTD model. Shapes: items (B, L) left-aligned, 0-padded; lengths (B,) >= 1."""

    name = "mtd"
    uses_global_graph = True

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        cfg = self.config
        d = cfg.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)  # E, row 0 = padding
        self.pos_emb = nn.Embedding(cfg.max_position + 1, d, padding_idx=0)  # P, row 0 = padding
        n_blocks = cfg.num_blocks if cfg.use_self_attention else 0
        self.blocks = nn.ModuleList(SelfAttentionBlock(d, cfg.num_heads, dropout, backend) for _ in range(n_blocks))
        if cfg.item_attention == "additive":
            self.att_last = nn.Linear(d, d, bias=False)  # W3
            self.att_item = nn.Linear(d, d, bias=False)  # W4
        else:
            self.att_last = nn.Linear(d, d, bias=False)  # shared W of the code's product form
            self.att_item = self.att_last
        self.att_vec = nn.Parameter(torch.empty(d))  # g (paper) / w (code)
        gamma = torch.tensor(float(cfg.position_decay))
        if cfg.learn_position_decay:
            self.gamma = nn.Parameter(gamma)
        else:
            self.register_buffer("gamma", gamma)
        n_parts = 3 if cfg.use_position_decay else 2
        self.combine = nn.Linear(n_parts * d, d, bias=False)  # W_c
        # ---- inter-session (graph) side ----
        if cfg.graph_encoder == "gcn":
            self.gnn = nn.ModuleList(GCNLayer(d, cfg.graph_norm, backend) for _ in range(cfg.num_gcn_layers))
        else:
            self.gnn = nn.ModuleList(GATLayer(d) for _ in range(cfg.num_gcn_layers))
        self.discriminator = nn.Linear(d, d, bias=False)  # W_D
        if cfg.score_norm:
            scale = torch.tensor(float(cfg.score_scale))
            if cfg.learn_score_scale:
                self.score_scale = nn.Parameter(scale)
            else:
                self.register_buffer("score_scale", scale)
        # the learned bias on the session's own items (models/repeat.py); None when off
        self.repeat = RepeatBias(d, identity=cfg.repeat_identity) if cfg.repeat_bias else None
        self.graph = None  # GlobalGraph of the training sessions; set by `set_graph` when a mode reads it per step
        self._table_cache: Optional[tuple[tuple, torch.Tensor]] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        d = self.config.hidden_size
        init_attention_encoder(self.item_emb, self.pos_emb, self.blocks, d)
        glorot = [self.att_last.weight, self.att_item.weight, self.combine.weight, self.discriminator.weight]
        glorot += [layer.weight.weight for layer in self.gnn]
        for w in glorot:
            nn.init.xavier_uniform_(w)
        nn.init.uniform_(self.att_vec, -math.sqrt(6.0 / (d + 1)), math.sqrt(6.0 / (d + 1)))  # Glorot for (d, 1)
        if self.repeat is not None:
            self.repeat.reset_parameters()
        if self.config.graph_mode == "residual":
            # T = E + tanh(LN(.)): with LN's gain at 1 the branch starts with row norms ~6.5 against
            # E's ~0.58 and drowns the embeddings (the overwrite mode's failure); start it at the
            # element scale of E's init, U(-1/sqrt(d), 1/sqrt(d)) -> std 1/sqrt(3d), where tanh is linear
            for layer in self.gnn:
                nn.init.constant_(layer.ln.weight, 1.0 / math.sqrt(3 * d))

    # ---- parameter groups ------------------------------------------------------------------
    def graph_parameters(self, discriminator: bool = True) -> list[nn.Parameter]:
        """The graph side: the GCN (GAT) layers and, unless `discriminator=False`, DGI's W_D."""
        return list(self.gnn.parameters()) + (list(self.discriminator.parameters()) if discriminator else [])

    def rec_parameters(self) -> list[nn.Parameter]:
        graph = {id(p) for p in self.graph_parameters()}
        return [p for p in self.parameters() if p.requires_grad and id(p) not in graph]

    # ---- the item table the recommender reads ---------------------------------------------
    def set_graph(self, graph) -> None:
        """Attach the global graph (a `GlobalGraph` over this catalogue) for the per-step
        modes; `graph_mode="residual"` also needs it at inference, so `save` stores it."""
        if graph is not None and graph.n_items != self.n_items:
            raise ValueError(f"the graph covers {graph.n_items} items, the model {self.n_items}")
        self.graph = graph
        self._table_cache = None

    @property
    def graph_per_step(self) -> bool:
        """True when a graph is attached and the mode trains it at every step."""
        return self.graph is not None and self.config.graph_mode in ("joint", "residual")

    def graph_output(self, h0: torch.Tensor) -> torch.Tensor:
        """The graph encoder on node features h0 (N, d) -> (N, d): the GCN (or GAT) layers, or
        for `residual_form="light"` the parameter-free mean of A_hat^l h0, l = 0..num_gcn_layers."""
        cfg = self.config
        if cfg.graph_mode == "residual" and cfg.residual_form == "light":
            x, acc = h0, h0
            for _ in range(cfg.num_gcn_layers):
                x = ops.spmm(self.graph, x, norm=cfg.graph_norm, backend=self.backend)
                acc = acc + x
            return acc / (cfg.num_gcn_layers + 1)
        return self.graph_encode(h0, self.graph)

    def graph_output_pair(self, h0: torch.Tensor, perm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(graph_output(h0), graph_output(h0[perm])): DGI's real and corrupted passes. The GCN
        encoder shares its first layer's product: (h0[perm]) W = (h0 W)[perm], so h0 W and its
        backward run once, not twice (3 of the step's 43k x 100 x 100 matmuls on Diginetica)."""
        cfg = self.config
        if cfg.graph_mode == "residual" and cfg.residual_form == "light":
            return self.graph_output(h0), self.graph_output(permute_rows(h0, perm))
        return self.graph_encode_pair(h0, perm, self.graph)

    def propagate(self) -> tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(T (M+1, d) the item table for session items and candidates, H^0 = E[nodes] (N, d),
        H = graph_output(H^0) (N, d)); H^0 and H are None when no graph is read per step."""
        return self._propagate(None)[:3]

    def _propagate(self, perm: Optional[torch.Tensor]):
        """`propagate`'s (T, H^0, H) and, with a corruption `perm`, H~ = graph_output(H^0[perm])
        (else None), the two passes sharing what they can (`graph_output_pair`)."""
        emb = self.item_emb.weight
        if not self.graph_per_step:
            return emb, None, None, None
        nodes = self.graph.torch_tensors(emb.device).nodes
        h0 = emb.index_select(0, nodes)
        h, h_neg = self.graph_output_pair(h0, perm) if perm is not None else (self.graph_output(h0), None)
        if self.config.graph_mode == "joint":
            return emb, h0, h, h_neg  # the DGI term reads H; the recommender reads E itself
        if self.config.residual_form == "light":
            return emb.index_copy(0, nodes, h.to(emb.dtype)), h0, h, h_neg  # T[nodes] = layer mean (incl. E)
        branch = F.dropout(h, self.config.graph_dropout, self.training) if self.config.graph_dropout else h
        return emb.index_add(0, nodes, branch.to(emb.dtype)), h0, h, h_neg  # T[nodes] = E[nodes] + GCN(E[nodes])

    def item_table(self) -> torch.Tensor:
        """The (M+1, d) table the recommender reads: E, or the propagated table of
        `graph_mode="residual"`. Without autograd it is cached until a weight changes."""
        if not (self.graph_per_step and self.config.graph_mode == "residual"):
            return self.item_emb.weight
        if torch.is_grad_enabled():
            return self.propagate()[0]
        # the mode too: in training mode the table carries graph_dropout's draw
        key = (id(self.graph), str(self.item_emb.weight.device), self.training,
               *(p._version for p in self.parameters()))
        if self._table_cache is None or self._table_cache[0] != key:
            self._table_cache = (key, self.propagate()[0].detach())
        return self._table_cache[1]

    # ---- intra-session encoder -------------------------------------------------------------
    def encode(self, items: torch.Tensor, lengths: torch.Tensor, table: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Session representation q (B, d) before scoring. items (B, L), lengths (B,);
        `table` (M+1, d): the item table to read (default `item_table()`)."""
        cfg = self.config
        b, L = items.shape
        table = self.item_table() if table is None else table
        packing = Packing(lengths, L)
        tokens = items.reshape(-1)[packing.index]  # (N,) valid clicks, never the padding row
        if cfg.use_self_attention:
            pos = position_index(lengths, L).clamp_max(cfg.max_position).reshape(-1)[packing.index]
            x = F.dropout(table.index_select(0, tokens) + self.pos_emb(pos), self.dropout_p, self.training)  # X0 (N, d)
            for blk in self.blocks:
                x = blk(x, lengths, packing)  # (N, d)
        else:  # MTD-va / MTD-at: raw item embeddings
            x = F.dropout(table.index_select(0, tokens), self.dropout_p, self.training)
        last = x[packing.last]  # x_t (B, d)
        # the rows layout (N, d): the packed backend reads the clicks as they are
        x_s, p_s = ops.aggregate(x, self.att_item(x), self.att_last(last), self.att_vec, lengths,
                                 gamma=self.gamma, mode=cfg.item_attention, backend=self.backend)
        parts = [last, x_s, p_s] if cfg.use_position_decay else [last, x_s]
        return F.dropout(self.combine(torch.cat(parts, dim=-1)), self.dropout_p, self.training)

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.encode(batch["items"], batch["lengths"])

    def score_parts(self, batch: Batch, table: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """q (B, d) and the candidates (M, d), tied to the input table; with `score_norm` both are
        unit rows and q carries the scale, so q @ cand.T = scale * cosine."""
        table = self.item_table() if table is None else table
        q, cand = self.encode(batch["items"], batch["lengths"], table), table[1:]
        if self.config.score_norm:
            q, cand = normalize_rows(q) * self.score_scale, normalize_rows(cand)
        return q, cand

    def score_terms(self, batch: Batch, table: Optional[torch.Tensor] = None):
        """`score_parts`, and with `repeat_bias` the bias on each session's distinct items."""
        table = self.item_table() if table is None else table
        q, cand = self.score_parts(batch, table)
        if self.repeat is None:
            return q, cand, None
        ids, recency, count = session_items(batch["items"], batch["lengths"])
        z = self.identity_shift(q, table, ids) if self.config.repeat_identity else None
        return q, cand, (ids, self.repeat(q, ids, recency, count, z))

    def identity_shift(self, q: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """z_ij = q_i . e_j - q_i . t_j (B, U) for the session's distinct items j (`repeat_identity`):
        e_j = E_j, the item's own embedding, t_j its row of `table` (what the recommender scores),
        both normalized when the scoring is cosine (q then carries the scale). Adding z_ij to
        item j's score scores it by its own embedding; exactly 0 where table = E (no graph)."""
        e, t = self.item_emb.weight[ids], table[ids]  # (B, U, d); padding ids read row 0 (masked by the bias)
        if self.config.score_norm:
            e, t = normalize_rows(e), normalize_rows(t)
        return torch.einsum("bd,bud->bu", q, e - t)

    def multitask_loss(self, batch: Batch, targets: torch.Tensor, graph_weight: float,
                       perm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Per-step loss of graph_mode "joint" / "residual": mean cross-entropy + graph_weight *
        DGI BCE (mean over the 2N real and corrupted rows), one propagation shared by both.
        `perm` (N,): the corruption's row permutation (default: torch.randperm). Returns
        (loss, the DGI term or None)."""
        dgi_on = self.graph_per_step and graph_weight != 0
        if dgi_on and perm is None:
            perm = torch.randperm(self.graph.num_nodes, device=self.item_emb.weight.device)
        table, _, h, h_neg = self._propagate(perm if dgi_on else None)
        rec = self.terms_loss(*self.score_terms(batch, table), self._check_targets(targets))
        if not dgi_on:
            return rec, None
        dgi = self.dgi_bce(h, h_neg)
        return rec + graph_weight * dgi, dgi

    # ---- inter-session encoder -------------------------------------------------------------
    def graph_encode(self, h0: torch.Tensor, graph) -> torch.Tensor:
        h = h0
        for layer in self.gnn:
            h = layer(h, graph)
        return h

    def graph_encode_pair(self, h0: torch.Tensor, perm: torch.Tensor, graph) -> tuple[torch.Tensor, torch.Tensor]:
        """(graph_encode(h0), graph_encode(h0[perm])), the GCN's first-layer product shared."""
        if self.config.graph_encoder != "gcn":
            return self.graph_encode(h0, graph), self.graph_encode(permute_rows(h0, perm), graph)
        first = self.gnn[0]
        hw = first.weight(h0)
        h, h_neg = first.from_projected(hw, graph), first.from_projected(permute_rows(hw, perm), graph)
        for layer in self.gnn[1:]:
            h, h_neg = layer(h, graph), layer(h_neg, graph)
        return h, h_neg

    def dgi_loss(self, graph, h0: Optional[torch.Tensor] = None,
                 perm: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Deep Graph Infomax loss (BCE part only) and H, with H^0 = E[nodes] frozen.

        Corruption permutes the rows of H^0 (a fresh permutation unless `perm` is given).
        """
        nodes = graph.torch_tensors(self.device).nodes
        if h0 is None:
            h0 = self.item_emb.weight.detach().index_select(0, nodes)
        if perm is None:
            perm = torch.randperm(h0.shape[0], device=h0.device)
        h, h_neg = self.graph_encode_pair(h0, perm, graph)  # (N, d) each
        return self.dgi_bce(h, h_neg), h

    def dgi_bce(self, h: torch.Tensor, h_neg: torch.Tensor) -> torch.Tensor:
        """DGI discriminator loss: readout c = sigmoid(mean H), D(x) = c^T W_D x, mean BCE with
        label 1 on the rows of H and 0 on the rows of the corrupted H~ (both (N, d))."""
        c = torch.sigmoid(h.mean(0))  # readout (d,)
        wc = self.discriminator.weight.t() @ c  # D(h) = c^T W_D h = h . (W_D^T c)
        logits = torch.cat([h @ wc, h_neg @ wc])
        labels = torch.cat([torch.ones(h.shape[0], device=h.device), torch.zeros(h.shape[0], device=h.device)])
        return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))

    @torch.no_grad()
    def write_back(self, graph, h: torch.Tensor) -> None:
        """E[nodes] = H (overwrite), or H rescaled row-wise to the norms of E[nodes] (rescaled)."""
        nodes = graph.torch_tensors(self.device).nodes
        h = h.to(self.item_emb.weight.dtype)
        if self.config.graph_mode == "rescaled":
            old = self.item_emb.weight[nodes].norm(dim=1, keepdim=True)
            h = h * (old / h.norm(dim=1, keepdim=True).clamp_min(1e-12))
        self.item_emb.weight[nodes] = h

    # ---- interpretation --------------------------------------------------------------------
    def explain(self, sessions):
        """Per-session weights (paper Figure 5), computed by the reference ops in evaluation
        mode: {"sessions", "self_attention" (per session (blocks, heads, n, n), rows sum to 1;
        None without self-attention), "alpha" (n,), "position_decay" (n,) (None without that
        branch), "gamma", "representation" (B, d)}. `sessions`: lists of item ids. See
        `mtd_fast.models.explain`."""
        from .explain import explain

        return explain(self, sessions)
