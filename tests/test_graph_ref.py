"""Reference graph builder against a hand-computed graph (MTD_SPEC.md section 3)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mtd_fast
from mtd_fast.data import Sessions
from mtd_fast.graph import global_graph_ref, session_graphs_ref
from mtd_fast.ops import spmm

from testing import shared_path

# sessions over items 1..7; item 6 only repeats itself (no edge), item 7 never occurs
SESSIONS = Sessions.from_lists([[1, 2, 3], [2, 1], [3, 3, 4], [5], [6, 6], [2, 1, 2]])
# transitions (s[i] != s[i+1]): 1->2, 2->3, 2->1, 3->4, 2->1, 1->2
# nodes: items with an edge = 1, 2, 3, 4  (5: singleton session, 6: only a repeat)


def dense(g, norm="none"):
    return g.to_scipy(norm).toarray()


def test_undirected_binary_by_hand():
    g = global_graph_ref(SESSIONS, 7)
    assert g.nodes.tolist() == [1, 2, 3, 4]
    assert g.values is None and g.indices.dtype == np.int32 and g.indptr.dtype == np.int64
    expect = np.array([[1, 1, 0, 0],
                       [1, 1, 1, 0],
                       [0, 1, 1, 1],
                       [0, 0, 1, 1]], dtype=float)
    assert np.array_equal(dense(g), expect)
    assert g.degrees.tolist() == [2, 3, 3, 2]
    for r in range(4):  # sorted within rows
        row = g.indices[g.indptr[r]:g.indptr[r + 1]]
        assert np.all(np.diff(row) > 0)


def test_directed_weighted_by_hand():
    g = global_graph_ref(SESSIONS, 7, directed=True, weighted=True)
    # counts: 1->2 x2, 2->3 x1, 2->1 x2, 3->4 x1; plus self loops of weight 1
    expect = np.array([[1, 2, 0, 0],
                       [2, 1, 1, 0],
                       [0, 0, 1, 1],
                       [0, 0, 0, 1]], dtype=float)
    assert np.array_equal(dense(g), expect)
    assert g.degrees.tolist() == [3, 4, 2, 1]


def test_undirected_weighted_and_directed_binary():
    g = global_graph_ref(SESSIONS, 7, weighted=True)
    # undirected weight = count(i->j) + count(j->i): (1,2): 2 + 2 = 4
    expect = np.array([[1, 4, 0, 0], [4, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]], dtype=float)
    assert np.array_equal(dense(g), expect)
    g = global_graph_ref(SESSIONS, 7, directed=True)
    expect = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1], [0, 0, 0, 1]], dtype=float)
    assert np.array_equal(dense(g), expect)


def test_normalizations_by_hand():
    g = global_graph_ref(SESSIONS, 7)
    a = dense(g)
    d = a.sum(1)
    assert np.allclose(dense(g, "sym"), a / np.sqrt(np.outer(d, d)))
    assert np.allclose(dense(g, "mean"), a / d[:, None])


def test_no_edges():
    g = global_graph_ref(Sessions.from_lists([[1], [2, 2]]), 3)
    assert g.num_nodes == 0 and g.nnz == 0 and g.indptr.tolist() == [0]


@pytest.mark.parametrize("norm", ["sym", "mean", "none"])
@pytest.mark.parametrize("directed,weighted", [(False, False), (True, True)])
def test_spmm_reference_against_dense(norm, directed, weighted):
    g = global_graph_ref(SESSIONS, 7, directed=directed, weighted=weighted)
    x = torch.randn(g.num_nodes, 5, dtype=torch.float64, requires_grad=True)
    y = spmm(g, x, norm=norm, backend="reference")
    a = torch.from_numpy(dense(g, norm))
    assert torch.allclose(y, a @ x)
    gy = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert torch.allclose(gx, a.t() @ gy)


def test_spmm_rejects_wrong_shape():
    g = global_graph_ref(SESSIONS, 7)
    with pytest.raises(ValueError, match="num_nodes=4"):
        spmm(g, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="unknown norm"):
        spmm(g, torch.zeros(4, 2), norm="row")


def test_session_graphs_by_hand():
    items = np.array([[3, 1, 3, 2], [5, 0, 0, 0], [4, 4, 0, 0]])
    g = session_graphs_ref(items, np.array([4, 1, 2]))
    assert g.nodes[0].tolist() == [1, 2, 3] and g.n_nodes.tolist() == [3, 1, 1]
    assert g.alias[0].tolist() == [2, 0, 2, 1]
    # session 0 edges: 3->1, 1->3, 3->2  (node idx: 2->0, 0->2, 2->1)
    a = np.zeros((3, 3))
    a[2, 0] = a[0, 2] = a[2, 1] = 1
    indeg, outdeg = a.sum(0), a.sum(1)
    assert np.allclose(g.adj_out[0], a / np.maximum(outdeg, 1)[:, None])
    assert np.allclose(g.adj_in[0], (a / np.maximum(indeg, 1)[None, :]).T)
    assert g.adj_in[2][0, 0] == 1.0  # 4 -> 4 self transition kept (SR-GNN)


def test_packed_session_graphs_by_hand():
    """packed=True: the same graphs as node / click / edge lists, offsets 0, 3, 4 per session."""
    items = np.array([[3, 1, 3, 2], [5, 0, 0, 0], [4, 4, 0, 0]])
    p = session_graphs_ref(items, np.array([4, 1, 2]), packed=True)
    assert p.node_ids.tolist() == [1, 2, 3, 5, 4] and p.node_ptr.tolist() == [0, 3, 4, 5]
    assert p.click_node.tolist() == [2, 0, 2, 1, 3, 4, 4] and p.click_session.tolist() == [0, 0, 0, 0, 1, 2, 2]
    # session 0: 3->1, 1->3, 3->2 (nodes 2->0, 0->2, 2->1); session 2: 4->4 (node 4); sorted by (src, dst)
    assert list(zip(p.edge_src.tolist(), p.edge_dst.tolist())) == [(0, 2), (2, 0), (2, 1), (4, 4)]
    assert p.out_degree.tolist() == [1, 0, 2, 0, 1] and p.in_degree.tolist() == [1, 1, 1, 0, 1]


def test_real_graph_size():
    ds = mtd_fast.load_dataset("diginetica", root=shared_path("diginetica"))
    g = global_graph_ref(ds.train_sessions, ds.n_items)
    # the SR-GNN-preprocessed training sessions (168,003; 43,097 items): 42,884 items take part in a
    # transition, 762,502 stored entries of A + I (2 x 359,809 undirected pairs + 42,884 self-loops)
    assert (ds.n_items, len(ds.train_sessions)) == (43_097, 168_003)
    assert (g.num_nodes, g.nnz) == (42_884, 762_502)
    assert np.array_equal(g.degrees, np.diff(g.indptr).astype(np.float32))
