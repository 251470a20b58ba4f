"""SR-GNN: Wu et al., "Session-based Recommendation with Graph Neural Networks", AAAI 2019.

Each session is a directed graph over its distinct items (an edge u -> v when v follows u);
a gated GNN propagates item embeddings over it for `config.gnn_steps` steps; the session
is the hybrid of its last click and a soft-attention pooling of all its clicks; items are
scored against the same (tied) embedding table.

Published P@20 / MRR@20 (SR-GNN paper, Table 2, best epoch on the test set):
Diginetica 50.73 / 17.59; Yoochoose 1/64 70.57 / 30.94 (also quoted in MTD_SPEC.md section 7).
Retailrocket: not in the SR-GNN paper; the MTD paper's table, which has it, could not be
retrieved here, so no figure is quoted.

Model (paper section "The Proposed Method", notation of the paper):
    session graph: A_in, A_out (n x n) from `mtd_fast.ops.session_graphs` (built in
        `prepare_batch` by the Numba builder when available, never in `forward`):
        A_out[i, j] = 1/outdeg(i) for an edge i -> j, A_in[i, j] = 1/indeg(i) for j -> i
    v^0 = E[nodes]
    for t in 1..gnn_steps (eqs. 1-5), for every node i:
        a_i = [A_in[i, :] V H_in ; A_out[i, :] V H_out] + b          H_in, H_out d x d, b (2d,)
        z_i = sigmoid(W_z a_i + U_z v_i)
        r_i = sigmoid(W_r a_i + U_r v_i)
        c_i = tanh(W_o a_i + U_o (r_i * v_i))
        v_i = (1 - z_i) * v_i + z_i * c_i
    clicks s_1..s_n take their node's final state (alias);
    s_l = v_n (last click);  alpha_i = q^T sigmoid(W_1 v_n + W_2 v_i + c) (eq. 6, no softmax,
        padding masked);  s_g = sum_i alpha_i v_i
    s_h = W_3 [s_l ; s_g] (eq. 7);  scores z_i = s_h^T E[i] (eq. 8, tied embeddings)
Loss: softmax cross-entropy (eq. 9). Initialisation: every parameter ~ U(-1/sqrt(d),
1/sqrt(d)) (the authors' code); the padding row of E is zero.

Deliberate deviations (and decisions):
- The gate equations are the paper's. The authors' PyTorch code (CRIPAC-DIG/SR-GNN,
  pytorch_code/model.py) computes the candidate as tanh(W_o a + r * (U_o v + b)) (GRUCell
  form, biases on every gate, a bias on H_in / H_out before the adjacency product and
  another after it), swaps the roles of z and 1 - z, and gives W_2 and W_3 biases; the
  paper form is the one implemented here and tested against a hand-written formula.
- Trained by the shared trainer (Adam lr 1e-3, L2 over all parameters, decay 0.1 after
  `lr_decay_epochs`, batch 512) instead of the paper's batch 100, L2 1e-5, decay every 3
  epochs. SR-GNN has no dropout: `TrainConfig.dropout` is ignored by this model.
- Session graphs come from `mtd_fast.ops.session_graphs(packed=True)`
  (`PackedSessionGraphs`): nodes are the session's distinct items in ascending id order
  (the authors use np.unique too), all sessions' nodes in one list, A_in / A_out as edge
  lists, the valid clicks as indices into the nodes; nothing padded and nothing n x n or
  M x M, so a session's scores do not depend on what it is batched with. The padded
  `SessionGraphs` (the authors' B x n x n arrays) hold the same graphs (tested).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

from .. import ops
from ..config import MTDConfig
from ..ops.common import check_lengths
from .base import Batch, SessionModel
from .layers import segment_sum, uniform_init_

__all__ = ["SRGNN", "GatedGNN"]


class GatedGNN(nn.Module):
    """The gated graph neural network of SR-GNN (paper eqs. 1-5), batched over sessions."""

    def __init__(self, d: int, steps: int) -> None:
        super().__init__()
        self.steps = steps
        self.h_in = nn.Linear(d, d, bias=False)  # H_in (incoming edges)
        self.h_out = nn.Linear(d, d, bias=False)  # H_out (outgoing edges)
        self.b = nn.Parameter(torch.empty(2 * d))  # b of eq. 1
        self.w = nn.Linear(2 * d, 3 * d, bias=False)  # [W_z; W_r; W_o]
        self.u_zr = nn.Linear(d, 2 * d, bias=False)  # [U_z; U_r]
        self.u_o = nn.Linear(d, d, bias=False)  # U_o

    def step(self, v: torch.Tensor, adj_in: Callable[[torch.Tensor], torch.Tensor],
             adj_out: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One propagation step over node states v (..., d); adj_in / adj_out apply A_in /
        A_out to node features of v's shape (dense (B, n, n) products or packed sparse ones)."""
        a = torch.cat([adj_in(self.h_in(v)), adj_out(self.h_out(v))], dim=-1) + self.b  # (..., 2d)
        wz, wr, wo = self.w(a).chunk(3, dim=-1)
        uz, ur = self.u_zr(v).chunk(2, dim=-1)
        z = torch.sigmoid(wz + uz)
        r = torch.sigmoid(wr + ur)
        c = torch.tanh(wo + self.u_o(r * v))
        return (1 - z) * v + z * c

    def forward(self, v: torch.Tensor, adj_in: Callable[[torch.Tensor], torch.Tensor],
                adj_out: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        for _ in range(self.steps):
            v = self.step(v, adj_in, adj_out)
        return v


class SRGNN(SessionModel):
    """SR-GNN. Batch: items (B, L) left-aligned, 0-padded; lengths (B,); plus the packed
    session graphs of `prepare_batch` (node_ids (K,), edge lists of A_in / A_out,
    click_node / click_session (N,))."""

    name = "srgnn"

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__(n_items, config, dropout, backend)
        d = self.config.hidden_size
        self.item_emb = nn.Embedding(n_items + 1, d, padding_idx=0)
        self.gnn = GatedGNN(d, self.config.gnn_steps)
        self.w1 = nn.Linear(d, d, bias=True)  # W_1 (its bias is c of eq. 6)
        self.w2 = nn.Linear(d, d, bias=False)  # W_2
        self.q = nn.Parameter(torch.empty(d))  # q
        self.w3 = nn.Linear(2 * d, d, bias=False)  # W_3
        self.reset_parameters()

    def reset_parameters(self) -> None:
        uniform_init_(self, self.item_emb, self.config.hidden_size)

    # ---- batch ------------------------------------------------------------------------------
    def prepare_batch(self, items: np.ndarray, lengths: np.ndarray) -> Batch:
        """The session graphs of the batch, packed (`ops.session_graphs(packed=True)`): the K
        nodes of all sessions in one list, A_in / A_out as edge lists over it, and the N valid
        clicks in row-major order as indices into it. Nothing is padded, so building the
        graphs, the GNN and the read-out cost O(K + N) rows instead of B x (longest session)
        (a batch of 512 pads to 84 clicks on average on Yoochoose 1/64 against a mean of 5.1)."""
        lengths = np.asarray(lengths, dtype=np.int64)
        check_lengths(torch.from_numpy(lengths), items.shape[1], "SR-GNN")  # a 0 would read another session's click
        g = ops.session_graphs(items, lengths, packed=True, backend=self.backend)
        dev = self.device
        batch = {"items": torch.from_numpy(np.ascontiguousarray(items)).to(dev),
                 "lengths": torch.from_numpy(lengths).to(dev),
                 "node_ids": torch.from_numpy(g.node_ids).to(dev),  # (K,)
                 "click_node": torch.from_numpy(g.click_node).to(dev),  # (N,)
                 "click_session": torch.from_numpy(g.click_session).to(dev)}  # (N,)
        for name, rows, cols, deg in (("in", g.edge_dst, g.edge_src, g.in_degree),
                                      ("out", g.edge_src, g.edge_dst, g.out_degree)):
            batch[f"edge_{name}_rows"] = torch.from_numpy(rows).to(dev)  # A_in[v, u] = 1 / indeg(v)
            batch[f"edge_{name}_cols"] = torch.from_numpy(cols).to(dev)  # A_out[u, v] = 1 / outdeg(u)
            batch[f"edge_{name}_weights"] = torch.from_numpy((1.0 / deg[rows]).astype(np.float32)).to(dev)
        return batch

    # ---- encoder ----------------------------------------------------------------------------
    def click_states(self, batch: Batch) -> torch.Tensor:
        """(N, d): the final GNN state of each valid click's node, clicks in row-major order."""
        def adjacency(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
            rows, cols, w = (batch[f"edge_{name}_{f}"] for f in ("rows", "cols", "weights"))
            return lambda x: x.new_zeros(x.shape).index_add(0, rows, w[:, None].to(x.dtype) * x[cols])

        v = self.gnn(self.item_emb(batch["node_ids"]), adjacency("in"), adjacency("out"))  # (K, d)
        return v[batch["click_node"]]

    def forward(self, batch: Batch) -> torch.Tensor:
        """Hybrid session embedding s_h (B, d)."""
        s = self.click_states(batch)  # (N, d)
        session = batch["click_session"]
        b = batch["lengths"].shape[0]
        last = s[torch.cumsum(batch["lengths"], 0) - 1]  # s_l = v_n (B, d)
        alpha = torch.sigmoid(self.w1(last)[session] + self.w2(s)) @ self.q  # (N,), no softmax
        s_g = segment_sum(alpha[:, None] * s, session, b)  # (B, d)
        return self.w3(torch.cat([last, s_g], dim=-1))

    def score_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward(batch), self.item_emb.weight[1:]  # s_h (B, d), item table (M, d): z = s_h E[1:]^T
