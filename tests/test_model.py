"""MTD model: shapes, masks, initialisation, the GAT layer (MTD-ga) by hand, the ablations' learning,
the multi-task schedule, and a training step /
run through each fast backend of the encoder ops against the reference (`MODEL_TOL`)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtd_fast
from mtd_fast import MTD, MTDConfig, TrainConfig
from mtd_fast.config import ConfigError
from mtd_fast.data import Sessions
from mtd_fast.graph import global_graph_ref
from mtd_fast.models.mtd import GATLayer, GCNLayer

from testing import MODEL_TOL, TRITON_DEVICE, TRITON_MARKS, device_for, force_packed, pop_p20, triton_only

SMALL = dict(hidden_size=16)


def make(n_items=30, **kw):
    torch.manual_seed(0)
    return MTD(n_items, MTDConfig(**{**SMALL, **kw}), dropout=0.3)


def batch_of(model, seqs):
    return model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(len(seqs)))


def test_initialisation_follows_spec():
    m = make()
    d = 16
    assert torch.all(m.item_emb.weight[0] == 0) and torch.all(m.pos_emb.weight[0] == 0)
    assert m.item_emb.weight.abs().max() <= 1 / d ** 0.5
    blk = m.blocks[0]
    assert blk.wq.bias is None and blk.wk.bias is None and blk.wv.bias is None
    assert torch.all(blk.w1.bias == 0) and torch.all(blk.ln1.weight == 1) and blk.ln1.eps == 1e-8
    assert m.combine.weight.shape == (d, 3 * d) and m.combine.bias is None


@pytest.mark.parametrize("kw", [{}, {"item_attention": "product"}, {"num_heads": 4, "num_blocks": 2},
                                {"use_self_attention": False, "use_position_decay": False},
                                {"use_self_attention": False}, {"learn_position_decay": True}])
def test_padding_invariance_and_shapes(kw):
    m = make(**kw).eval()
    seqs = [[3, 4, 5], [7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [2, 2]]
    full = m.scores(batch_of(m, seqs))
    assert full.shape == (4, 30) and torch.isfinite(full).all()
    for i, s in enumerate(seqs):
        alone = m.scores(batch_of(m, [s]))
        assert torch.allclose(alone[0], full[i], atol=1e-5), i


def test_padding_row_gets_no_gradient():
    m = make().train()
    b = batch_of(m, [[1, 2], [3]])
    m.loss(b, torch.tensor([4, 5])).backward()
    assert torch.all(m.item_emb.weight.grad[0] == 0) and torch.all(m.pos_emb.weight.grad[0] == 0)


def test_l2_penalty_value_and_gradient():
    """0.5 * sum ||p||^2 over several tensors; the gradient is bit-identical to autograd
    through 0.5 * (p * p).sum(), also for a non-contiguous parameter."""
    torch.manual_seed(0)
    a = torch.randn(300, 7, requires_grad=True)
    b = torch.randn(5, 9).t().requires_grad_()  # a transposed view: not contiguous
    net = make()
    value = net.l2_penalty([a, b])
    ref = 0.5 * sum((p * p).sum() for p in (a, b))
    assert torch.allclose(value, ref, rtol=1e-6)
    (3e-5 * value).backward()
    got = [a.grad.clone(), b.grad.clone()]
    a.grad = b.grad = None
    (3e-5 * ref).backward()
    assert torch.equal(got[0], a.grad) and torch.equal(got[1], b.grad)


def test_attention_dropout_mask_is_random_only_where_weights_live():
    """Random keep values (0 or 1/(1-p)) cover each session's own length block (its length
    bucket of the attention op, >= the length); the rest of the padded square is 1 (the
    weights there are 0); the drop rate is p."""
    from mtd_fast.models.layers import attention_dropout_mask
    from mtd_fast.ops.session_attention import length_buckets

    torch.manual_seed(0)
    lengths = torch.tensor([1, 3, 9, 40, 17, 64, 2, 33] * 8)
    p = 0.3
    mask = attention_dropout_mask(lengths, 2, 64, p, torch.zeros(1))
    assert mask.shape == (64, 2, 64, 64)
    kept = 1 / (1 - p)
    drawn = torch.zeros_like(mask, dtype=torch.bool)
    for idx, w in length_buckets(lengths, 64):
        drawn[idx, :, :w, :w] = True
    for b, n in enumerate(lengths.tolist()):
        assert drawn[b, :, :n, :n].all()  # every weight a session can have is covered
    inside, outside = mask[drawn], mask[~drawn]
    assert torch.all((inside == 0) | torch.isclose(inside, torch.tensor(kept)))
    assert torch.all(outside == 1) and outside.numel() > 0
    assert abs(float((inside == 0).float().mean()) - p) < 0.01  # ~290k draws


def test_long_sessions_clip_positions():
    # max_position=4: positions 5..10 of a 10-click session must use row 4. A model with 10
    # position rows whose rows 5..10 are copies of row 4 must then give the same scores.
    small = make(max_position=4).eval()
    big = make(max_position=10).eval()
    state = {k: v.clone() for k, v in small.state_dict().items()}
    pos = state.pop("pos_emb.weight")
    big.load_state_dict(state, strict=False)
    with torch.no_grad():
        big.pos_emb.weight[:5] = pos
        big.pos_emb.weight[5:] = pos[4]
    session = [list(range(1, 11))]
    assert torch.allclose(small.scores(batch_of(small, session)), big.scores(batch_of(big, session)), atol=1e-6)
    with torch.no_grad():
        big.pos_emb.weight[7] += 1.0  # now position 7 differs from row 4: scores must change
    assert not torch.allclose(small.scores(batch_of(small, session)), big.scores(batch_of(big, session)))
    m2 = make(max_session_length=3).eval()
    a = m2.scores(batch_of(m2, [list(range(1, 11))]))
    b = m2.scores(batch_of(m2, [[8, 9, 10]]))
    assert torch.allclose(a, b)  # only the most recent 3 clicks count


def test_config_validation_names_field():
    with pytest.raises(ConfigError, match="num_heads=3 is invalid: must divide hidden_size=100"):
        MTDConfig(num_heads=3)
    with pytest.raises(ConfigError, match="graph_norm='row'"):
        MTDConfig(graph_norm="row")
    with pytest.raises(ConfigError, match="dropout=1.5"):
        TrainConfig(dropout=1.5)
    with pytest.raises(ConfigError, match="batch_size=0"):
        TrainConfig(batch_size=0)


def test_recommend_validates_input():
    m = make()
    top = m.recommend([[1, 2, 3], [4]], k=5)
    assert top.shape == (2, 5) and top.dtype == torch.long
    assert torch.equal(m.recommend(np.array([[1, 2, 3]]), k=5), top[:1])  # a 2-D array of equal-length sessions
    assert top.min() >= 1 and top.max() <= 30
    with pytest.raises(ValueError, match="empty"):
        m.recommend([[1], []])
    with pytest.raises(ValueError, match=r"sessions\[0\]\[1\] = 31 is not an item id in 1..30"):
        m.recommend([[1, 31]])
    with pytest.raises(ValueError, match="k=0"):
        m.recommend([[1]], k=0)


def toy_dataset():
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 21, size=rng.integers(2, 7)).tolist() for _ in range(200)]
    test = mtd_fast.data.expand_samples(Sessions.from_lists(seqs[-20:]))
    return mtd_fast.data.Dataset("toy", Sessions.from_lists(seqs[:-20]), test, n_items=25)


def test_graph_phase_changes_item_table_and_rec_phase_leaves_gcn_alone(monkeypatch):
    ds = toy_dataset()
    snaps = {}
    import sys

    tr = sys.modules["mtd_fast.train"]  # the module (the package attribute `train` is the function)

    real_graph_phase, real_rec_epoch = tr.graph_phase, tr.rec_epoch

    def graph_phase(net, graph, *a, **k):
        snaps["E_before_graph"] = net.item_emb.weight.detach().clone()
        snaps["gcn_before_graph"] = [p.detach().clone() for p in net.graph_parameters()]
        out = real_graph_phase(net, graph, *a, **k)
        snaps["E_after_graph"] = net.item_emb.weight.detach().clone()
        snaps["nodes"] = torch.from_numpy(graph.nodes)
        snaps["gcn_after_graph"] = [p.detach().clone() for p in net.graph_parameters()]
        return out

    def rec_epoch(net, *a, **k):
        out = real_rec_epoch(net, *a, **k)
        snaps["gcn_after_rec"] = [p.detach().clone() for p in net.graph_parameters()]
        return out

    monkeypatch.setattr(tr, "graph_phase", graph_phase)
    monkeypatch.setattr(tr, "rec_epoch", rec_epoch)
    res = mtd_fast.train(ds, epochs=1, quiet=True, hidden_size=16, graph_mode="overwrite", graph_steps=5, batch_size=64,
                         eval_test_each_epoch=False)
    nodes = snaps["nodes"]
    before, after = snaps["E_before_graph"], snaps["E_after_graph"]
    assert not torch.allclose(before[nodes], after[nodes])  # write-back happened
    others = torch.ones(before.shape[0], dtype=torch.bool)
    others[nodes] = False
    assert torch.equal(before[others], after[others])  # items off the graph untouched
    assert after[nodes].abs().max() <= 1.0  # H = tanh(...)
    assert any(not torch.equal(a, b) for a, b in zip(snaps["gcn_before_graph"], snaps["gcn_after_graph"]))
    assert all(torch.equal(a, b) for a, b in zip(snaps["gcn_after_graph"], snaps["gcn_after_rec"]))
    assert res.history[0]["graph_loss"] is not None and res.history[0]["graph_steps"] >= 1


def test_dgi_loss_by_hand():
    ds = toy_dataset()
    m = make(n_items=25)
    g = global_graph_ref(ds.train_sessions, 25)
    n = g.num_nodes
    perm = torch.randperm(n)
    loss, h = m.dgi_loss(g, perm=perm)
    # H = tanh(LN(A_hat H0 W)) with the dense symmetric normalization; corrupted rows permuted
    a = torch.from_numpy(g.to_scipy("sym").toarray()).float()
    h0 = m.item_emb.weight.detach()[torch.from_numpy(g.nodes)]
    layer = m.gnn[0]

    def enc(x):
        return torch.tanh(layer.ln(a @ layer.weight(x)))

    h_pos, h_neg = enc(h0), enc(h0[perm])
    c = torch.sigmoid(h_pos.mean(0))
    w = m.discriminator.weight
    pos = torch.stack([c @ w @ h_pos[i] for i in range(n)])
    neg = torch.stack([c @ w @ h_neg[i] for i in range(n)])
    expect = (torch.nn.functional.softplus(-pos).sum() + torch.nn.functional.softplus(neg).sum()) / (2 * n)
    assert torch.allclose(loss, expect, atol=1e-5)
    assert torch.allclose(h, h_pos, atol=1e-5)
    # corruption matters: the identity permutation gives a different loss
    assert not torch.allclose(m.dgi_loss(g, perm=torch.arange(n))[0], loss)


def test_gat_layer_by_hand():
    # MTD-ga's layer on a 3-node graph by hand: e_ij = LeakyReLU_0.2(a_l . W h_i + a_r . W h_j)
    # over the CSR row i (edges of A + I), alpha = softmax over the row, out_i = sum_j alpha_ij W h_j,
    # then tanh(LN(out)). W = I, a_l = (-1, 0, 0), a_r = (0, 1, 0): s_l = -h[:, 0], s_r = h[:, 1].
    h = torch.tensor([[1.0, 0.0, 2.0], [0.0, 2.0, 1.0], [2.0, 1.0, 0.0]])
    layer = GATLayer(3)
    with torch.no_grad():
        layer.weight.weight.copy_(torch.eye(3))
        layer.att_l.copy_(torch.tensor([-1.0, 0.0, 0.0]))
        layer.att_r.copy_(torch.tensor([0.0, 1.0, 0.0]))

    def softmax(*e):
        w = [math.exp(x) for x in e]
        return [x / sum(w) for x in w]

    def expect(rows):
        out = torch.stack([sum(a * h[j] for a, j in zip(alpha, cols)) for alpha, cols in rows])
        z = (out - out.mean(1, keepdim=True)) / torch.sqrt(out.var(1, unbiased=False, keepdim=True) + 1e-8)
        return torch.tanh(z)

    # directed session 1 -> 2 -> 3: rows {0, 1}, {1, 2}, {2}
    g = global_graph_ref(Sessions.from_lists([[1, 2, 3]]), 3, directed=True)
    assert [g.indices[g.indptr[i]:g.indptr[i + 1]].tolist() for i in range(3)] == [[0, 1], [1, 2], [2]]
    want = expect([(softmax(-0.2, 1.0), [0, 1]),  # e_00 = LReLU(-1 + 0), e_01 = -1 + 2
                   (softmax(2.0, 1.0), [1, 2]),   # e_11 = 0 + 2, e_12 = 0 + 1
                   ([1.0], [2])])                 # a single neighbour: out_2 = h_2
    torch.testing.assert_close(layer(h, g), want, atol=1e-6, rtol=1e-6)
    # undirected: rows {0, 1}, {0, 1, 2}, {1, 2}
    g = global_graph_ref(Sessions.from_lists([[1, 2, 3]]), 3)
    want = expect([(softmax(-0.2, 1.0), [0, 1]),
                   (softmax(0.0, 2.0, 1.0), [0, 1, 2]),
                   (softmax(0.0, -0.2), [1, 2])])  # e_21 = LReLU(-2 + 2), e_22 = LReLU(-2 + 1)
    torch.testing.assert_close(layer(h, g), want, atol=1e-6, rtol=1e-6)


def test_graph_phase_schedule():
    ds = toy_dataset()
    res = mtd_fast.train(ds, epochs=5, quiet=True, hidden_size=8, graph_mode="overwrite", graph_steps=3,
                         rec_frequency=2, graph_phases=2,
                         patience=10, batch_size=128, eval_test_each_epoch=False)
    ran = [h["graph_loss"] is not None for h in res.history]
    assert ran == [True, False, True, False, False]  # r % f == 0 and r // f < graph_phases
    lo = mtd_fast.train(ds, model="mtd-lo", epochs=2, quiet=True, hidden_size=8, batch_size=128)
    assert all(h["graph_loss"] is None for h in lo.history)


def test_lr_decay_steps():
    # step schedule (StepLR, as SR-GNN's and the MTD code's staircase decay): x0.1 every lr_decay_epochs
    ds = toy_dataset()
    res = mtd_fast.train(ds, epochs=5, quiet=True, hidden_size=8, graph_phases=0, lr_decay_epochs=2, patience=10,
                         batch_size=128, eval_test_each_epoch=False, max_steps_per_epoch=1)
    assert [h["lr"] for h in res.history] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-5])


# Figure 3's ablations after one epoch on the default synthetic data (5,000 sessions, 500 items;
# popularity's test P@20 there is 14.6). Measured over seeds 0-7 (1 thread): MTD-ga 39.9-42.6,
# MTD-va 25.6-36.7, MTD-at 28.8-33.8; a model that does not learn stays near popularity or below.
ABLATION_BARS = {"mtd-ga": 2.5, "mtd-va": 1.5, "mtd-at": 1.5}  # x popularity's P@20


@pytest.mark.parametrize("name", sorted(ABLATION_BARS))
def test_ablation_learns_beyond_popularity(synthetic, name):
    r = mtd_fast.train(synthetic, model=name, epochs=1, seed=0, quiet=True)
    cfg = r.model.config
    assert (cfg.graph_encoder, cfg.use_self_attention, cfg.use_position_decay) == {
        "mtd-ga": ("gat", True, True), "mtd-va": ("gcn", False, False), "mtd-at": ("gcn", False, True)}[name]
    assert len(r.model.blocks) == (cfg.num_blocks if cfg.use_self_attention else 0)
    assert all(isinstance(layer, GATLayer if name == "mtd-ga" else GCNLayer) for layer in r.model.gnn)
    bar = ABLATION_BARS[name] * pop_p20(synthetic)
    assert r.metrics["P@20"] > bar, (name, r.metrics["P@20"], bar)


def test_ablation_conflicts_raise():
    with pytest.raises(ValueError, match="fixes graph_phases=0"):
        mtd_fast.train(toy_dataset(), model="mtd-lo", graph_phases=2)


def test_linear_warmup_then_step_decay(monkeypatch):
    import sys

    tr = sys.modules["mtd_fast.train"]
    real_step, lrs = tr.train_step, []

    def step(net, samples, idx, opt, *a, **k):
        lrs.append(opt.param_groups[0]["lr"])
        return real_step(net, samples, idx, opt, *a, **k)

    monkeypatch.setattr(tr, "train_step", step)
    mtd_fast.train(toy_dataset(), epochs=3, quiet=True, hidden_size=8, graph_phases=0, warmup_steps=3,
                   lr_decay_epochs=2, patience=10, batch_size=64, max_steps_per_epoch=2, eval_test_each_epoch=False)
    # steps 1-3 ramp to lr, the rest of epochs 1-2 at lr, epoch 3 decayed (warm-up spans epochs)
    assert lrs == pytest.approx([1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-4, 1e-4])
    with pytest.raises(ConfigError, match="warmup_steps"):
        TrainConfig(warmup_steps=-1)


# ---- backends: a training step and a run through the fast encoder ops ----------------------
# each backend keeps the batch (session lengths) and configs it was tested on
STEP_SEQS = {"packed": [1, 2, 3, 7, 19, 4, 1, 12, 5, 2, 3], "triton": [1, 2, 3, 7, 19, 4, 12]}
STEP_CASES = [
    pytest.param("packed", {"num_heads": 2, "learn_position_decay": True}, id="packed-heads2-learned-decay"),
    pytest.param("packed", {"item_attention": "product", "num_blocks": 2}, id="packed-product-blocks2"),
    pytest.param("triton", {"num_heads": 2, "learn_position_decay": True}, id="triton-heads2-learned-decay",
                 marks=TRITON_MARKS),
    pytest.param("triton", {"item_attention": "product"}, id="triton-product", marks=TRITON_MARKS),
]


@pytest.mark.parametrize("backend,kw", STEP_CASES)
def test_training_step_through_backend_matches_reference(backend, kw, monkeypatch):
    # the model's real call pattern (dropout masks drawn by the model, gamma a buffer or a
    # Parameter, q/k/v unpacked from valid tokens): same loss and same parameter gradients with
    # the backend's session_attention and aggregate as with the reference
    force_packed(monkeypatch)
    dev = device_for(backend)
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 41, size=n)) for n in STEP_SEQS[backend]]
    targets = torch.tensor(rng.integers(1, 41, size=len(seqs)), device=dev)
    results = []
    for spec in ({"session_attention": backend, "aggregate": backend}, "reference"):
        torch.manual_seed(0)
        model = MTD(40, MTDConfig(hidden_size=16, **kw), dropout=0.3, backend=spec).to(dev)
        model.train()
        batch = batch_of(model, seqs)  # on the model's device
        torch.manual_seed(1)  # the same dropout masks for both backends
        loss = model.loss(batch, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_b, grads_b), (loss_r, grads_r) = results
    atol, rtol = MODEL_TOL[backend]
    assert grads_b.keys() == grads_r.keys() and len(grads_b) > 5
    for name, got, want in [("loss", loss_b, loss_r)] + [(n, grads_b[n], grads_r[n]) for n in grads_r]:
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


@triton_only
def test_one_epoch_through_triton_same_metrics():
    # a whole (tiny) training run through the kernels: same losses and the same metrics
    ds = mtd_fast.load_dataset("synthetic", n_sessions=60, n_items=30, seed=1)
    runs = {}
    for backend in ({"session_attention": "triton", "aggregate": "triton"}, "reference"):
        runs[str(backend)] = mtd_fast.train(ds, epochs=1, seed=0, backend=backend, quiet=True, hidden_size=16,
                                            batch_size=32, device=TRITON_DEVICE)
    fast, ref = runs.values()
    assert fast.backends["session_attention"] == "triton" and ref.backends["session_attention"] == "reference"
    atol, rtol = MODEL_TOL["triton"]
    torch.testing.assert_close(fast.history[0]["train_loss"], ref.history[0]["train_loss"], atol=atol, rtol=rtol)
    for key in ("P@5", "P@10", "P@20", "MRR@20", "NDCG@20"):
        assert abs(fast.metrics[key] - ref.metrics[key]) < 1e-3, (key, fast.metrics[key], ref.metrics[key])
