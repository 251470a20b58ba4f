"""Reference (NumPy) graph builders: the executable form of `MTD_SPEC.md` section 3.

`global_graph_ref` builds the unnormalized CSR of `A + I` over the items that have at
least one transition edge; normalization happens in the product (`mtd_fast.ops.spmm`),
never here, and nothing is ever dense. `session_graphs_ref` builds the per-session
graphs of the SR-GNN family with a per-session NumPy loop, the way peers do it (the
Numba builder replaces it; this one stays as the truth for tests); `packed=True` returns
them without padding (`PackedSessionGraphs`), packed from those dense arrays.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, NamedTuple, Optional

import numpy as np

from ..data.store import Sessions

if TYPE_CHECKING:  # torch is imported lazily: building graphs needs only NumPy
    import torch

__all__ = ["GlobalGraph", "GraphTensors", "SessionGraphs", "PackedSessionGraphs", "global_graph_ref",
           "session_graphs_ref", "pack_session_graphs", "transition_pairs"]


class GraphTensors(NamedTuple):
    """A `GlobalGraph` as torch tensors on one device (`GlobalGraph.torch_tensors`)."""

    indptr: torch.Tensor  # (N + 1,) row pointers of the CSR of A + I
    indices: torch.Tensor  # (nnz,) column (node) indices
    values: Optional[torch.Tensor]  # (nnz,) edge weights, None for a binary graph
    degrees: torch.Tensor  # (N,) row sums of A + I
    nodes: torch.Tensor  # (N,) the item id of each node (row)


@dataclass(frozen=True)
class GlobalGraph:
    """Unnormalized CSR of `A + I` over `N` nodes.

    indptr:  int64 (N + 1,)
    indices: int32 (nnz,), sorted within each row
    values:  float32 (nnz,) or None when binary (every stored entry is 1)
    degrees: float32 (N,), row sums of `A + I`
    nodes:   int64 (N,), node -> item id (ascending)
    """

    indptr: np.ndarray
    indices: np.ndarray
    values: Optional[np.ndarray]
    degrees: np.ndarray
    nodes: np.ndarray
    n_items: int
    directed: bool = False
    weighted: bool = False
    _torch_cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_nodes(self) -> int:
        return int(self.nodes.size)

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    @property
    def symmetric(self) -> bool:
        """True when the stored matrix equals its transpose (undirected graphs)."""
        return not self.directed

    def to_scipy(self, norm: str = "none"):
        """The normalized matrix as scipy CSR (float64), for tests and benches."""
        import scipy.sparse as sp

        n = self.num_nodes
        vals = np.ones(self.nnz) if self.values is None else self.values.astype(np.float64)
        rows = np.repeat(np.arange(n), np.diff(self.indptr))
        deg = self.degrees.astype(np.float64)
        if norm == "sym":
            vals = vals / np.sqrt(deg[rows] * deg[self.indices])
        elif norm == "mean":
            vals = vals / deg[rows]
        elif norm != "none":
            raise ValueError(f"unknown norm {norm!r}")
        return sp.csr_matrix((vals, self.indices, self.indptr), shape=(n, n))

    def torch_tensors(self, device="cpu") -> GraphTensors:
        """The CSR and the node ids as torch tensors (`GraphTensors`), cached per device."""
        import torch

        key = str(device)
        if key not in self._torch_cache:
            self._torch_cache[key] = GraphTensors(
                torch.from_numpy(self.indptr).to(device),
                torch.from_numpy(self.indices).to(device),
                None if self.values is None else torch.from_numpy(self.values).to(device),
                torch.from_numpy(self.degrees).to(device),
                torch.from_numpy(self.nodes).to(device),
            )
        return self._torch_cache[key]


def transition_pairs(sessions: Sessions) -> tuple[np.ndarray, np.ndarray]:
    """(src, dst) item ids of every consecutive click pair with src != dst, in session order."""
    items = sessions.items.astype(np.int64)
    if items.size < 2:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    # a pair (k, k+1) is inside one session unless k+1 starts a session
    inside = np.ones(items.size - 1, dtype=bool)
    starts = sessions.offsets[1:-1]
    inside[starts[(starts > 0) & (starts < items.size)] - 1] = False
    src, dst = items[:-1][inside], items[1:][inside]
    keep = src != dst
    return src[keep], dst[keep]


def global_graph_ref(sessions: Sessions, n_items: int, directed: bool = False, weighted: bool = False) -> GlobalGraph:
    """Global item-transition graph of the training sessions (`MTD_SPEC.md` section 3)."""
    src, dst = transition_pairs(sessions)
    if src.size and (max(src.max(), dst.max()) > n_items or min(src.min(), dst.min()) < 0):
        bad = int(max(src.max(), dst.max())) if max(src.max(), dst.max()) > n_items else int(min(src.min(), dst.min()))
        raise ValueError(f"item id {bad} is out of range for n_items={n_items}")
    if not directed:
        src, dst = np.concatenate([src, dst]), np.concatenate([dst, src])
    nodes = np.unique(np.concatenate([src, dst]))
    n = nodes.size
    node_of = np.full(n_items + 1, -1, dtype=np.int64)
    node_of[nodes] = np.arange(n)
    r, c = node_of[src], node_of[dst]
    # self-loops: weight 1 each, whatever the transitions say
    keys = r * n + c
    keys, counts = np.unique(keys, return_counts=True)
    r, c = keys // n, keys % n
    weights = counts.astype(np.float64)
    loops = np.arange(n, dtype=np.int64)
    r = np.concatenate([r, loops])
    c = np.concatenate([c, loops])
    w = np.concatenate([weights, np.ones(n)])
    order = np.lexsort((c, r))
    r, c, w = r[order], c[order], w[order]
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(r, minlength=n), out=indptr[1:])
    if weighted:
        values = w.astype(np.float32)
        degrees = np.bincount(r, weights=w, minlength=n).astype(np.float32)
    else:
        values = None
        degrees = np.diff(indptr).astype(np.float32)
    return GlobalGraph(indptr, c.astype(np.int32), values, degrees, nodes.astype(np.int64), int(n_items),
                       directed=bool(directed), weighted=bool(weighted))


@dataclass(frozen=True)
class SessionGraphs:
    """Per-session graphs of a padded batch (SR-GNN, Wu et al. 2019).

    nodes:   int64 (B, N) unique items of each session, ascending, 0-padded
    alias:   int64 (B, L) position -> index into nodes (0 on padding)
    adj_in:  float32 (B, N, N) adj_in[b, i, j] = A[j, i] / indeg(i): mean over predecessors
    adj_out: float32 (B, N, N) adj_out[b, i, j] = A[i, j] / outdeg(i): mean over successors
    n_nodes: int64 (B,)
    A is binary: A[u, v] = 1 when v follows u somewhere in the session (self-transitions
    included, as in SR-GNN).
    """

    nodes: np.ndarray
    alias: np.ndarray
    adj_in: np.ndarray
    adj_out: np.ndarray
    n_nodes: np.ndarray


@dataclass(frozen=True)
class PackedSessionGraphs:
    """The graphs of `SessionGraphs` without padding: the K nodes of all sessions in one
    list, the N valid clicks row-major, the E distinct edges as pairs of packed nodes.

    node_ids:      int64 (K,) each session's unique items, ascending, session after session
    node_ptr:      int64 (B + 1,) session b owns nodes node_ptr[b] .. node_ptr[b + 1] - 1
    click_node:    int64 (N,) the packed node of each valid click (session by session)
    click_session: int64 (N,) the session of each valid click
    edge_src, edge_dst: int64 (E,) A[u, v] = 1 (v follows u somewhere in the session,
                   self-transitions included), each edge once, sorted by (src, dst)
    out_degree, in_degree: int64 (K,) edges leaving / entering each node
    So A_out[u, v] = 1 / out_degree[u] and A_in[v, u] = 1 / in_degree[v] on every edge: the
    nonzeros of `SessionGraphs.adj_out` / `adj_in` at the packed offsets.
    """

    node_ids: np.ndarray
    node_ptr: np.ndarray
    click_node: np.ndarray
    click_session: np.ndarray
    edge_src: np.ndarray
    edge_dst: np.ndarray
    out_degree: np.ndarray
    in_degree: np.ndarray


def check_session_batch(items: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """items (B, L) and lengths (B,) as arrays, or a ValueError / TypeError naming the problem."""
    items = np.asarray(items)
    lengths = np.asarray(lengths)
    if items.ndim != 2:
        raise ValueError(f"items must be (batch, seq_len), got shape {items.shape}")
    if lengths.shape != (items.shape[0],):
        raise ValueError(f"lengths must be (batch,) = ({items.shape[0]},), got shape {lengths.shape}")
    if items.dtype.kind not in "iu" or lengths.dtype.kind not in "iu":
        raise TypeError(f"items and lengths must be integer arrays, got {items.dtype} and {lengths.dtype}")
    if lengths.size and (lengths.min() < 0 or lengths.max() > items.shape[1]):
        raise ValueError(f"lengths must lie in [0, seq_len={items.shape[1]}]")
    return items, lengths


def pack_session_graphs(g: SessionGraphs, lengths: np.ndarray) -> PackedSessionGraphs:
    """`PackedSessionGraphs` read off the padded arrays of `g` (the batch's `lengths`)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n_nodes = g.n_nodes.astype(np.int64)
    node_ptr = np.zeros(n_nodes.size + 1, dtype=np.int64)
    np.cumsum(n_nodes, out=node_ptr[1:])
    first = node_ptr[:-1]
    node_ids = g.nodes[np.arange(g.nodes.shape[1])[None, :] < n_nodes[:, None]]
    session, step = np.nonzero(np.arange(g.alias.shape[1])[None, :] < lengths[:, None])
    b, i, j = np.nonzero(g.adj_out)  # (b, i, j) ascending: edges sorted by (src, dst)
    src, dst = first[b] + i, first[b] + j
    k = int(node_ptr[-1])
    return PackedSessionGraphs(node_ids.astype(np.int64), node_ptr, first[session] + g.alias[session, step],
                               session.astype(np.int64), src.astype(np.int64), dst.astype(np.int64),
                               np.bincount(src, minlength=k).astype(np.int64),
                               np.bincount(dst, minlength=k).astype(np.int64))


def session_graphs_ref(items: np.ndarray, lengths: np.ndarray, packed: bool = False):
    """Per-session Python/NumPy loop, the way peers build these graphs (truth for tests):
    `SessionGraphs`, or with `packed=True` the same graphs unpadded (`PackedSessionGraphs`)."""
    items, lengths = check_session_batch(items, lengths)
    if packed:
        return pack_session_graphs(session_graphs_ref(items, lengths), lengths)
    b, L = items.shape
    uniq = [np.unique(items[k, :lengths[k]]) for k in range(b)]
    width = max((u.size for u in uniq), default=0)
    width = max(width, 1)
    nodes = np.zeros((b, width), dtype=np.int64)
    alias = np.zeros((b, L), dtype=np.int64)
    adj_in = np.zeros((b, width, width), dtype=np.float32)
    adj_out = np.zeros((b, width, width), dtype=np.float32)
    n_nodes = np.zeros(b, dtype=np.int64)
    for k in range(b):
        u = uniq[k]
        n_nodes[k] = u.size
        nodes[k, :u.size] = u
        n = int(lengths[k])
        al = np.searchsorted(u, items[k, :n])
        alias[k, :n] = al
        a = np.zeros((width, width), dtype=np.float32)
        for t in range(n - 1):
            a[al[t], al[t + 1]] = 1.0
        indeg = a.sum(0)
        indeg[indeg == 0] = 1.0
        outdeg = a.sum(1)
        outdeg[outdeg == 0] = 1.0
        adj_in[k] = (a / indeg[None, :]).T
        adj_out[k] = a / outdeg[:, None]
    return SessionGraphs(nodes, alias, adj_in, adj_out, n_nodes)
