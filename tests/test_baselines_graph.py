"""The attention / graph / memory baselines on the shared pipeline: SASRec, SR-GNN, CSRM, CoSAN.

- one epoch on the default synthetic data: each beats POP's test P@20;
- padding invariance on ragged batches (eval mode), output shapes, recommend();
- SR-GNN: the session graph it feeds its GNN equals `session_graphs_ref`, and one
  propagation step plus the session read-out match a hand-written NumPy formula;
- CSRM / CoSAN: the outer memory is a FIFO written only in training mode, after the read;
- save / load round trip gives identical scores (CSRM / CoSAN: including the memory).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import mtd_fast
from mtd_fast.config import MTDConfig
from mtd_fast.data.store import Sessions, pad_batch
from mtd_fast.graph import session_graphs_ref
from mtd_fast.models import model_class
from mtd_fast.models.cosan import CoSAN
from mtd_fast.models.csrm import CSRM
from mtd_fast.models.sasrec import SASRec
from mtd_fast.models.srgnn import SRGNN

import testing

MODELS = ["sasrec", "srgnn", "csrm", "cosan"]
CLASSES = {"sasrec": SASRec, "srgnn": SRGNN, "csrm": CSRM, "cosan": CoSAN}
MEMORY_MODELS = ["csrm", "cosan"]

# float32 matmuls over different batch widths may round differently (BLAS blocking)
ATOL, RTOL = 2e-5, 1e-5


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine two threads ran these models 10-20x
    slower (measured: CSRM 2.5 s vs 0.34 s per forward under load); results are the same."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained(synthetic, one_thread):
    """One epoch of each model on the default synthetic data (trained once per module)."""
    return {name: mtd_fast.train(synthetic, model=name, epochs=1, quiet=True) for name in MODELS}


@pytest.fixture(scope="module")
def pop_p20(synthetic):
    """POP's test P@20: the training-click counts as scores (the project's tie rule), and the
    `pop` model when this install has it; the bar is the higher of the two."""
    bar = testing.pop_p20(synthetic)
    try:
        model_class("pop")
    except ValueError:
        return bar
    return max(bar, mtd_fast.train(synthetic, model="pop", quiet=True).metrics["P@20"])


def ragged_sessions(n_items: int, seed: int = 0) -> list[list[int]]:
    """Sessions of lengths 1..12 with repeats (SR-GNN graphs with self-loops and revisits)."""
    rng = np.random.default_rng(seed)
    out = []
    for length in [1, 2, 3, 5, 12, 4, 1, 9, 7, 2]:
        s = rng.integers(1, n_items + 1, size=length).tolist()
        if length >= 3:
            s[2] = s[0]  # a revisit
        out.append(s)
    out.append([3, 3, 3])  # self-transitions only
    return out


def score_lists(model, sessions: list[list[int]]) -> torch.Tensor:
    packed = Sessions.from_lists(sessions)
    model.eval()
    with torch.no_grad():
        return model.scores(model.batch_from_sessions(packed, np.arange(len(sessions))))


# ---- learning -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_one_epoch_beats_pop(trained, pop_p20, name):
    result = trained[name]
    assert result.model.name == name and isinstance(result.model, CLASSES[name])
    assert np.isfinite(result.history[0]["train_loss"])
    assert result.metrics["P@20"] > pop_p20, (name, result.metrics["P@20"], pop_p20)


def test_registry_resolves_these_models():
    for name, cls in CLASSES.items():
        assert model_class(name) is cls


# ---- padding, shapes, recommend -------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_padding_invariance(trained, name):
    model = trained[name].model
    sessions = ragged_sessions(model.n_items)
    together = score_lists(model, sessions)  # (B, M), padded to the longest session
    assert together.shape == (len(sessions), model.n_items)
    assert torch.isfinite(together).all()
    for i, s in enumerate(sessions):
        alone = score_lists(model, [s])  # no padding at all
        torch.testing.assert_close(alone[0], together[i], atol=ATOL, rtol=RTOL)
    # the same session beside a much longer one (wider padding) in a different batch position
    long = list(range(1, 31))
    pair = score_lists(model, [long, sessions[1]])
    torch.testing.assert_close(pair[1], together[1], atol=ATOL, rtol=RTOL)
    # and the scores do depend on the session
    assert not torch.allclose(together[0], together[4])


@pytest.mark.parametrize("name", MODELS)
def test_recommend_shapes_and_ids(trained, name):
    model = trained[name].model
    sessions = ragged_sessions(model.n_items, seed=1)
    top = model.recommend(sessions, k=20)
    assert top.shape == (len(sessions), 20) and top.dtype == torch.long
    assert int(top.min()) >= 1 and int(top.max()) <= model.n_items
    assert all(len(set(row.tolist())) == 20 for row in top)
    sc = score_lists(model, sessions)
    picked = sc.gather(1, top - 1)
    assert (picked[:, :-1] >= picked[:, 1:]).all()  # best first
    torch.testing.assert_close(picked[:, 0], sc.max(1).values)
    assert model.recommend([[1, 2]], k=1).shape == (1, 1)


@pytest.mark.parametrize("name", MODELS)
def test_train_mode_shapes_and_gradients(synthetic, name):
    torch.manual_seed(0)
    cfg = MTDConfig(hidden_size=16, memory_size=8)
    model = CLASSES[name](synthetic.n_items, cfg, dropout=0.3)
    model.train()
    items, lengths = pad_batch(synthetic.train.prefixes, np.arange(12))
    targets = torch.from_numpy(synthetic.train.targets[:12].astype(np.int64))
    for _ in range(2):  # the second pass reads a non-empty memory (CSRM / CoSAN)
        batch = model.prepare_batch(items, lengths)
        assert model.scores(batch).shape == (12, synthetic.n_items)
        model.zero_grad()
        loss = model.loss(batch, targets)
        loss.backward()
    assert torch.isfinite(loss)
    grad = model.item_emb.weight.grad
    assert grad is not None and grad[1:].abs().sum() > 0
    assert grad[0].abs().sum() == 0  # padding row gets no gradient


# ---- SR-GNN: graph and propagation ----------------------------------------------------------

HANDMADE = [[1, 2, 1, 3], [4, 4, 5], [7], [2, 3, 2, 3, 6], [9, 8, 7, 8]]


def test_srgnn_uses_reference_session_graphs():
    model = SRGNN(10, MTDConfig(hidden_size=8))
    items, lengths = pad_batch(Sessions.from_lists(HANDMADE), np.arange(len(HANDMADE)))
    batch = model.prepare_batch(items, lengths)
    ref = session_graphs_ref(items, lengths, packed=True)
    for key, field in (("node_ids", "node_ids"), ("click_node", "click_node"), ("click_session", "click_session"),
                       ("edge_out_rows", "edge_src"), ("edge_out_cols", "edge_dst"),
                       ("edge_in_rows", "edge_dst"), ("edge_in_cols", "edge_src")):
        np.testing.assert_array_equal(batch[key].numpy(), getattr(ref, field), err_msg=key)
    # and the reference is the SR-GNN graph: session [1, 2, 1, 3], nodes (1, 2, 3) (packed 0-2),
    # edges 1->2, 2->1, 1->3; out-rows normalised by out-degree, in-rows by in-degree
    assert batch["node_ids"][:3].tolist() == [1, 2, 3]
    assert batch["click_node"][:4].tolist() == [0, 1, 0, 2]
    out = {(int(r), int(c)): float(w) for r, c, w in zip(batch["edge_out_rows"], batch["edge_out_cols"],
                                                         batch["edge_out_weights"]) if r < 3}
    assert out == {(0, 1): .5, (0, 2): .5, (1, 0): 1.0}
    inn = {(int(r), int(c)): float(w) for r, c, w in zip(batch["edge_in_rows"], batch["edge_in_cols"],
                                                         batch["edge_in_weights"]) if r < 3}
    assert inn == {(1, 0): 1.0, (0, 1): 1.0, (2, 0): 1.0}
    # self-transition 4 -> 4 is an edge (SR-GNN keeps it): session [4, 4, 5], nodes 4, 5 at 3, 4
    out = {(int(r), int(c)): float(w) for r, c, w in zip(batch["edge_out_rows"], batch["edge_out_cols"],
                                                         batch["edge_out_weights"]) if 3 <= r < 5}
    assert out == {(3, 3): .5, (3, 4): .5}


def test_srgnn_packed_edges_are_the_dense_session_graphs():
    """The edge lists SR-GNN builds from the clicks are exactly the nonzeros of the padded
    A_in / A_out of the session-graph builder, at the packed node offsets, same weights."""
    model = SRGNN(20, MTDConfig(hidden_size=4))
    sessions = ragged_sessions(20) + HANDMADE
    items, lengths = pad_batch(Sessions.from_lists(sessions), np.arange(len(sessions)))
    batch = model.prepare_batch(items, lengths)
    ref = session_graphs_ref(items, lengths)
    first = np.cumsum(ref.n_nodes) - ref.n_nodes
    for name, adj in (("in", ref.adj_in), ("out", ref.adj_out)):
        b, i, j = np.nonzero(adj)
        want = {(int(r), int(c)): float(w) for r, c, w in zip(first[b] + i, first[b] + j, adj[b, i, j])}
        got = {(int(r), int(c)): float(w) for r, c, w in zip(batch[f"edge_{name}_rows"], batch[f"edge_{name}_cols"],
                                                             batch[f"edge_{name}_weights"])}
        assert got == want, name
    assert batch["node_ids"].tolist() == [int(x) for k, n in enumerate(ref.n_nodes) for x in ref.nodes[k, :n]]


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def test_srgnn_propagation_matches_hand_formula():
    """Session [1, 2, 1, 3] (nodes 1, 2, 3): the paper's eqs. 1-5, then eqs. 6-7, in float64."""
    torch.manual_seed(3)
    d = 6
    model = SRGNN(5, MTDConfig(hidden_size=d, gnn_steps=2)).double().eval()
    g = model.gnn
    W = lambda lin: lin.weight.detach().numpy()  # noqa: E731  (y = x W^T)
    E = model.item_emb.weight.detach().numpy()
    a_out = np.array([[0, .5, .5], [1, 0, 0], [0, 0, 0]])  # written by hand from the edges
    a_in = np.array([[0, 1, 0], [1, 0, 0], [1, 0, 0]])
    v = E[[1, 2, 3]]  # (3, d)
    Wz, Wr, Wo = np.split(W(g.w), 3, axis=0)
    Uz, Ur = np.split(W(g.u_zr), 2, axis=0)
    b = g.b.detach().numpy()
    for _ in range(2):
        a = np.concatenate([a_in @ v @ W(g.h_in).T, a_out @ v @ W(g.h_out).T], axis=1) + b
        z = _sigmoid(a @ Wz.T + v @ Uz.T)
        r = _sigmoid(a @ Wr.T + v @ Ur.T)
        c = np.tanh(a @ Wo.T + (r * v) @ W(g.u_o).T)
        v = (1 - z) * v + z * c
    items, lengths = pad_batch(Sessions.from_lists([[1, 2, 1, 3], [4, 5]]), np.arange(2))
    batch = model.prepare_batch(items, lengths)
    batch = {k: (t.double() if t.is_floating_point() else t) for k, t in batch.items()}
    states = model.click_states(batch).detach().numpy()
    np.testing.assert_allclose(states[:4], v[[0, 1, 0, 2]], rtol=1e-12, atol=1e-12)  # packed: session 0 first
    # read-out: alpha_i = q . sigmoid(W1 v_n + c + W2 v_i) (no softmax), s_h = W3 [v_n ; s_g]
    seq = v[[0, 1, 0, 2]]
    last = seq[-1]
    alpha = _sigmoid(last @ W(model.w1).T + model.w1.bias.detach().numpy() + seq @ W(model.w2).T) \
        @ model.q.detach().numpy()
    s_h = np.concatenate([last, (alpha[:, None] * seq).sum(0)]) @ W(model.w3).T
    np.testing.assert_allclose(model(batch)[0].detach().numpy(), s_h, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(model.scores(batch)[0].detach().numpy(), E[1:] @ s_h, rtol=1e-12, atol=1e-12)


# ---- CSRM / CoSAN memory --------------------------------------------------------------------

def test_csrm_memory_is_fifo_written_in_training_only():
    torch.manual_seed(0)
    model = CSRM(20, MTDConfig(hidden_size=4, memory_size=8), dropout=0.0)
    mem = model.outer
    first = Sessions.from_lists([[1, 2], [3], [4, 5, 6], [7, 8], [9]])
    second = Sessions.from_lists([[10], [11, 12], [13, 14], [15], [16, 17]])
    model.train()
    b1 = model.batch_from_sessions(first, np.arange(5))
    assert int(mem.mem_count) == 0
    r = model.read_outer(model.inner(b1)[1])
    assert torch.equal(r, torch.zeros_like(r))  # empty memory reads 0
    model(b1)
    _, c_l1 = model.inner(b1)
    assert int(mem.mem_count) == 5 and int(mem.mem_ptr) == 5
    torch.testing.assert_close(mem.memory[:5], c_l1.detach())
    b2 = model.batch_from_sessions(second, np.arange(5))
    model(b2)
    _, c_l2 = model.inner(b2)
    assert int(mem.mem_count) == 8 and int(mem.mem_ptr) == 2  # wrapped around
    torch.testing.assert_close(mem.memory[5:8], c_l2[:3].detach())
    torch.testing.assert_close(mem.memory[:2], c_l2[3:].detach())  # oldest slots overwritten
    assert not mem.memory.requires_grad
    snapshot = mem.memory.clone()
    model.eval()
    model(b1)
    model.scores(b2)
    assert torch.equal(mem.memory, snapshot) and int(mem.mem_ptr) == 2  # eval never writes
    # a batch larger than the memory keeps its last rows
    model.train()
    big = Sessions.from_lists([[i + 1] for i in range(11)])
    bb = model.batch_from_sessions(big, np.arange(11))
    model(bb)
    _, c_big = model.inner(bb)
    assert int(mem.mem_count) == 8
    assert {tuple(np.round(row, 6)) for row in mem.memory.numpy()} == \
        {tuple(np.round(row, 6)) for row in c_big[-8:].detach().numpy()}


@pytest.mark.parametrize("blocks,heads", [(1, 1), (2, 2), (0, 1)])
def test_sasrec_packed_encoder_equals_the_dense_formula(blocks, heads):
    """SASRec runs on packed clicks and its last block computes the last position only: the
    same representation as the dense pre-LN stack (causal attention over the padded batch,
    padding zeroed after every block) read at each session's last click."""
    from torch.nn import functional as F

    from mtd_fast.ops.common import position_index
    from mtd_fast.ops.session_attention import session_attention_ref

    torch.manual_seed(0)
    model = SASRec(20, MTDConfig(hidden_size=8, num_blocks=blocks, num_heads=heads, max_position=6), dropout=0.0)
    model.eval()
    sessions = ragged_sessions(20)
    b = model.batch_from_sessions(Sessions.from_lists(sessions), np.arange(len(sessions)))
    items, lengths = b["items"], b["lengths"]
    with torch.no_grad():
        got = model.encode(items, lengths)
        L = items.shape[1]
        valid = (torch.arange(L)[None, :] < lengths[:, None]).unsqueeze(-1).float()
        x = (model.item_emb(items) + model.pos_emb(position_index(lengths, L).clamp_max(6))) * valid
        for blk in model.blocks:
            y = blk.ln1(x)
            x = x + session_attention_ref(blk.wq(y), blk.wk(y), blk.wv(y), lengths, num_heads=heads)
            x = (x + blk.w2(F.relu(blk.w1(blk.ln2(x))))) * valid
        ref = model.ln_final(x)[torch.arange(len(sessions)), lengths - 1]
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)
    model.train()  # with dropout: finite, and every parameter of the blocks gets a gradient
    model.dropout_p = 0.3
    for blk in model.blocks:
        blk.p = 0.3
    model.encode(items, lengths).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.blocks.parameters())


@pytest.mark.parametrize("name", ["gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan", "mtd"])
def test_packed_models_refuse_empty_or_too_long_sessions(name):
    """On packed rows a length of 0 (or above the padded width) would silently shift every
    later session onto another one's clicks: each model refuses it, naming the problem."""
    model = model_class(name)(10, MTDConfig(hidden_size=4)).eval()
    items = np.array([[1, 2, 0], [0, 0, 0], [3, 0, 0]])
    for lengths in (np.array([2, 0, 1]), np.array([2, 4, 1])):
        with pytest.raises(ValueError, match="session lengths must be in 1..3"):
            model.score_parts(model.prepare_batch(items, lengths))


def test_csrm_packed_grus_equal_the_padded_formula():
    """CSRM runs its GRUs on packed sequences: the same c_g, c_l as the GRUs over the padded
    batch read at each session's last click (a GRU state at click t depends on clicks <= t)."""
    torch.manual_seed(0)
    model = CSRM(20, MTDConfig(hidden_size=6), dropout=0.0).eval()
    sessions = ragged_sessions(20)
    b = model.batch_from_sessions(Sessions.from_lists(sessions), np.arange(len(sessions)))
    items, lengths = b["items"], b["lengths"]
    with torch.no_grad():
        c_g, c_l = model.inner(b)
        x = model.item_emb(items)
        rows = torch.arange(len(sessions))
        ref_g = model.gru_global(x)[0][rows, lengths - 1]
        h = model.gru_local(x)[0]
        e = torch.sigmoid(model.a1(h[rows, lengths - 1])[:, None, :] + model.a2(h)) @ model.v
        valid = torch.arange(items.shape[1])[None, :] < lengths[:, None]
        ref_l = (torch.softmax(e.masked_fill(~valid, float("-inf")), -1).unsqueeze(-1) * h).sum(1)
    torch.testing.assert_close(c_g, ref_g, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(c_l, ref_l, atol=ATOL, rtol=RTOL)


def test_cosan_memory_written_in_training_only():
    torch.manual_seed(0)
    model = CoSAN(20, MTDConfig(hidden_size=4, memory_size=6), dropout=0.0)
    sessions = Sessions.from_lists([[1, 2], [3], [4, 5, 6], [7, 8]])
    batch = model.batch_from_sessions(sessions, np.arange(4))
    model.train()
    z = model(batch)
    assert int(model.neighbors.mem_count) == 4
    torch.testing.assert_close(model.neighbors.memory[:4], z.detach())
    model.eval()
    before = model.neighbors.memory.clone()
    model(batch)
    assert torch.equal(model.neighbors.memory, before)


@pytest.mark.parametrize("name", MEMORY_MODELS)
def test_memory_changes_the_scores(trained, name):
    """The trained memory is read at evaluation: wiping it changes the scores."""
    model = trained[name].model
    mem = model.outer if name == "csrm" else model.neighbors
    assert int(mem.mem_count) == mem.size  # filled by training
    sessions = ragged_sessions(model.n_items)
    with_memory = score_lists(model, sessions)
    saved = {k: v.clone() for k, v in mem.state_dict().items()}
    try:
        mem.mem_count.zero_()
        assert not torch.allclose(score_lists(model, sessions), with_memory)
    finally:
        mem.load_state_dict(saved)
    torch.testing.assert_close(score_lists(model, sessions), with_memory, atol=0, rtol=0)


# ---- save / load ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(trained, tmp_path, name):
    model = trained[name].model
    path = tmp_path / f"{name}.pt"
    mtd_fast.save(model, path)
    loaded = mtd_fast.load(path)
    assert type(loaded) is type(model) and loaded.name == name and not loaded.training
    sessions = ragged_sessions(model.n_items, seed=2)
    torch.testing.assert_close(score_lists(loaded, sessions), score_lists(model, sessions), atol=0, rtol=0)
    if name in MEMORY_MODELS:
        a = model.outer if name == "csrm" else model.neighbors
        b = loaded.outer if name == "csrm" else loaded.neighbors
        assert int(b.mem_count) == int(a.mem_count) > 0 and int(b.mem_ptr) == int(a.mem_ptr)
        assert torch.equal(b.memory, a.memory)
    assert torch.equal(loaded.recommend([[1, 2, 3]], k=5), model.recommend([[1, 2, 3]], k=5))
