"""MTDConfig.repeat_bias: the bias on the session's own items, its exact loss, ranking and top-k."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _memcheck import largest_tensor

import mtd_fast
from mtd_fast import MTD, MTDConfig
from mtd_fast.data.dataset import Dataset, DataWarning
from mtd_fast.data.store import Samples, Sessions
from mtd_fast.metrics import ranks_from_scores, topk_from_scores
from mtd_fast.models import repeat as rp
from mtd_fast.ops.linear_cross_entropy import row_logsumexp

from testing import MODEL_TOL, TRITON_DEVICE, assert_close, triton_only


def _padded(rng, b, max_len, n_items):
    lengths = rng.integers(1, max_len + 1, b)
    items = np.zeros((b, max_len), dtype=np.int64)
    for i, n in enumerate(lengths):
        items[i, :n] = rng.integers(1, n_items + 1, n)  # small catalogue: many repeats
    return torch.from_numpy(items), torch.from_numpy(lengths)


def test_session_items_lists_each_distinct_item_with_its_recency_and_count():
    rng = np.random.default_rng(0)
    items, lengths = _padded(rng, 40, 9, 6)
    ids, rec, cnt = rp.session_items(items, lengths)
    assert ids.shape == rec.shape == cnt.shape
    for i in range(len(items)):
        seq = items[i, :lengths[i]].tolist()
        want = {x: (len(seq) - 1 - max(p for p, y in enumerate(seq) if y == x), seq.count(x)) for x in set(seq)}
        got = {int(x): (int(r), int(c)) for x, r, c in zip(ids[i], rec[i], cnt[i]) if x > 0}
        assert got == want
        assert ids[i, len(want):].eq(0).all() and cnt[i, len(want):].eq(0).all()
        assert ids[i, :len(want)].tolist() == sorted(want)
    assert ids.shape[1] == max(len(set(items[i, :lengths[i]].tolist())) for i in range(len(items)))
    empty = rp.session_items(torch.zeros((0, 3), dtype=torch.long), torch.zeros(0, dtype=torch.long))
    assert all(t.shape == (0, 0) for t in empty)


def test_row_logsumexp_is_logsumexp_and_its_gradient():
    torch.manual_seed(0)
    q = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    t = torch.randn(23, 5, dtype=torch.float64, requires_grad=True)
    for chunk in (7, 7 * 4, None):  # one item per chunk, a ragged last chunk, one chunk
        got = row_logsumexp(q, t, chunk)
        assert torch.allclose(got, torch.logsumexp(q @ t.t(), 1), rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda a, b: row_logsumexp(a, b, 7 * 4), (q, t))
    with pytest.raises(ValueError, match="row_logsumexp"):
        row_logsumexp(q, t[:, :4])


def _case(seed=0, dtype=torch.float64, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    b, m, d = 6, 40, 8
    q = torch.randn(b, d, generator=g, dtype=dtype)
    table = torch.randn(m, d, generator=g, dtype=dtype)
    # rows: several items, one, the last item id, none (padding only), four, two
    ids = torch.tensor([[1, 5, 9, 0], [2, 0, 0, 0], [40, 3, 0, 0], [0, 0, 0, 0], [7, 8, 10, 11], [12, 13, 0, 0]])
    bias = torch.randn(b, 4, generator=g, dtype=dtype) * scale
    targets = torch.tensor([4, 1, 39, 5, 9, 20])  # rows 0, 2, 4 re-click a session item, the others do not
    return q, table, ids, bias, targets


@pytest.mark.parametrize("scale", [0.0, 3.0, 15.0])
def test_biased_cross_entropy_is_the_dense_formula_with_its_gradients(scale):
    q, table, ids, bias, targets = _case(scale=scale)
    args = [x.clone().requires_grad_(True) for x in (q, table, bias)]
    want = rp.biased_cross_entropy_ref(args[0], args[1], targets, ids, args[2])
    g_want = torch.autograd.grad(want, args)
    from mtd_fast.ops.linear_cross_entropy import sparse_biased_cross_entropy

    # a 42-logit chunk holds one row of 40 items: the lse correction; None: the fused rows pass
    assert sparse_biased_cross_entropy(q, table, targets, ids, bias, 6 * 7) is None
    assert sparse_biased_cross_entropy(q, table, targets, ids, bias) is not None
    for chunk in (6 * 7, None):
        got = rp.biased_cross_entropy(args[0], args[1], targets, ids, args[2], chunk_size=chunk)
        assert got.item() == pytest.approx(want.item(), rel=1e-12)
        for a, b in zip(torch.autograd.grad(got, args), g_want):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    # the padding columns' bias changes nothing; a session item's does
    bias2 = bias.clone()
    bias2[ids == 0] += 100.0
    assert rp.biased_cross_entropy(q, table, targets, ids, bias2).item() == pytest.approx(
        rp.biased_cross_entropy(q, table, targets, ids, bias).item(), rel=1e-12)
    bias2[0, 0] += 1.0
    assert rp.biased_cross_entropy(q, table, targets, ids, bias2).item() != pytest.approx(
        rp.biased_cross_entropy(q, table, targets, ids, bias).item(), rel=1e-9)


def test_biased_cross_entropy_in_float32_matches_the_dense_formula():
    q, table, ids, bias, targets = _case(seed=1, dtype=torch.float32, scale=5.0)
    assert rp.biased_cross_entropy(q * 4, table, targets, ids, bias).item() == pytest.approx(
        rp.biased_cross_entropy_ref(q * 4, table, targets, ids, bias).item(), rel=1e-5)


def test_biased_ranks_and_topk_are_the_dense_ones_in_any_column_chunking():
    q, table, ids, bias, targets = _case()
    q, table = q.round(), table.round()  # integer scores: many ties, broken by the smaller id
    bias = bias.round()
    dense = rp.dense_biased_scores(q, table, ids, bias)
    assert dense[0, 4] == (q[0] @ table[4]) + bias[0, 1] and dense[3].equal(q[3] @ table.t())
    want_r, want_k = ranks_from_scores(dense, targets + 1), topk_from_scores(dense, 10)
    # one column a chunk, chunks that split a session's items, one chunk
    for chunk in (1, 4, 7, None):
        assert rp.biased_ranks(q, table, targets + 1, ids, bias, chunk).equal(want_r), chunk
        assert rp.biased_topk(q, table, ids, bias, 10, chunk).equal(want_k), chunk
    with pytest.raises(ValueError, match="session ids"):
        rp.biased_ranks(q, table, targets + 1, ids + 40, bias)
    with pytest.raises(ValueError, match="session ids"):
        rp.biased_topk(q, table, ids + 40, bias, 10)


@pytest.mark.parametrize("b", [2, 64, 300])
def test_biased_ranks_fp32_bit_for_bit_with_repeated_ids_and_no_batch_by_items_tensor(b):
    # real-valued fp32 scores; every row holds its target among its session items in some
    # rows, and one item twice (the two terms add up, in order, as in dense_biased_scores)
    g = torch.Generator().manual_seed(b)
    m, d, u = 5003, 32, 6
    q, table = torch.randn(b, d, generator=g), torch.randn(m, d, generator=g) * 0.1
    ids = torch.randint(0, m + 1, (b, u), generator=g)
    ids[:, 1] = ids[:, 0]
    ids[0, :] = 0
    bias = torch.randn(b, u, generator=g)
    targets = torch.randint(1, m + 1, (b,), generator=g)
    targets[1::2] = ids[1::2, 2].clamp_min(1)
    dense = rp.dense_biased_scores(q, table, ids, bias)
    want_r, want_k = ranks_from_scores(dense, targets), topk_from_scores(dense, 20)
    assert (want_r != ranks_from_scores(q @ table.t(), targets)).any()  # the term changes ranks
    for chunk in (1000, 4096, None):
        assert rp.biased_ranks(q, table, targets, ids, bias, chunk).equal(want_r), chunk
        assert rp.biased_topk(q, table, ids, bias, 20, chunk).equal(want_k), chunk
    for fn in (lambda: rp.biased_ranks(q, table, targets, ids, bias, 500),
               lambda: rp.biased_topk(q, table, ids, bias, 20, 500)):
        n, op, shape = largest_tensor(fn)
        assert n <= max(b * 500, m * d), f"{op} made a {shape} tensor"


def _alternating(n, seed):
    """Sessions a b a b a b of random pairs: every target after the first click re-clicks the
    item before last, which no item-to-item pattern predicts (the pairs are random)."""
    rng = np.random.default_rng(seed)
    pairs = [rng.choice(np.arange(1, 1001), 2, replace=False).tolist() for _ in range(n)]
    return [[a, b] * 3 for a, b in pairs]


def test_mtd_with_repeat_bias_starts_as_without_and_learns_re_clicks():
    torch.manual_seed(3)
    plain = MTD(50, MTDConfig(hidden_size=8, repeat_bias=False))
    torch.manual_seed(3)
    rep = MTD(50, MTDConfig(hidden_size=8))  # the default has the term
    sd = rep.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in plain.state_dict().items())  # same draws, bias at 0
    batch = rep.batch_from_sessions(Sessions.from_lists([[1, 2, 1], [3], [4, 5, 6, 4]]), np.arange(3))
    plain.eval(), rep.eval()
    assert torch.allclose(rep.scores(batch), plain.scores(batch))

    test = _alternating(200, 1)
    xs = [s[:k] for s in test for k in range(1, len(s))]
    ys = [s[k] for s in test for k in range(1, len(s))]
    with pytest.warns(DataWarning, match="never clicked"):  # some pairs' items are new: misses for both
        ds = Dataset("alternating", Sessions.from_lists(_alternating(1500, 0)), Samples.from_lists(xs, ys),
                     n_items=1000)
    kw = dict(epochs=3, quiet=True, hidden_size=16, seed=0, batch_size=128, lr=1e-2)
    base = mtd_fast.train(ds, model="mtd", repeat_bias=False, **kw)
    with_bias = mtd_fast.train(ds, model="mtd", **kw)  # the default has the term
    r = with_bias.model.repeat.recency.detach()
    assert r[1] > 0.5 and r[0] < -0.5  # learned: the item before last comes back, the last one does not
    # 80% of the targets are re-clicks: the bias puts them first far more often
    assert with_bias.metrics["MRR@20"] > base.metrics["MRR@20"] + 8.0
    # the evaluation's ranks are those of the dense biased scores
    m = with_bias.model.eval()
    idx = np.arange(64)
    b = m.batch_from_sessions(ds.test.prefixes, idx)
    targets = torch.from_numpy(ds.test.targets[idx].astype(np.int64))
    from mtd_fast.metrics import batch_ranks

    with torch.no_grad():
        assert batch_ranks(m, b, targets).equal(ranks_from_scores(m.scores(b), targets))


def test_save_and_load_keep_the_repeat_bias(tmp_path):
    ds = mtd_fast.load_dataset("synthetic", n_sessions=300, n_items=60)
    res = mtd_fast.train(ds, model="mtd", epochs=1, quiet=True, hidden_size=8, batch_size=64, repeat_bias=True,
                         lr=1e-2)
    assert res.model.repeat.offset.item() != 0.0
    mtd_fast.save(res.model, tmp_path / "m.pt")
    back = mtd_fast.load(tmp_path / "m.pt")
    assert back.config.repeat_bias and torch.equal(back.repeat.recency, res.model.repeat.recency)
    sessions = [[1, 2, 1], [5, 6]]
    assert torch.equal(back.recommend(sessions, k=10), res.model.recommend(sessions, k=10))


def test_a_model_file_from_before_the_term_loads_without_it(tmp_path):
    """repeat_bias is the default now; a file written before the field existed was a model
    without the term, and loads as one (config.LEGACY_VALUES), not as today's default."""
    from mtd_fast.serialization import state_digest

    ds = mtd_fast.load_dataset("synthetic", n_sessions=300, n_items=60)
    res = mtd_fast.train(ds, model="mtd", epochs=1, quiet=True, hidden_size=8, batch_size=64, repeat_bias=False)
    assert mtd_fast.train(ds, model="mtd", epochs=1, quiet=True, hidden_size=8, batch_size=64,
                          max_steps_per_epoch=1).model.repeat is not None  # the default has the term
    path = tmp_path / "old.pt"
    mtd_fast.save(res.model, path)
    payload = torch.load(path, weights_only=True)
    for key in ("repeat_bias", "repeat_identity"):
        del payload["config"][key]
    payload.pop("digest")
    payload["digest"] = state_digest(payload)
    torch.save(payload, path)
    back = mtd_fast.load(path)
    assert back.config.repeat_bias is False and back.repeat is None
    sessions = [[1, 2, 1], [5, 6]]
    assert torch.equal(back.recommend(sessions, k=10), res.model.recommend(sessions, k=10))


def test_the_reference_backend_takes_the_dense_biased_loss(monkeypatch):
    from mtd_fast.models import base

    batch = {"items": torch.tensor([[1, 2, 1], [3, 0, 0]]), "lengths": torch.tensor([3, 1])}
    targets = torch.tensor([2, 5])
    losses = {}
    for backend in ("reference", None):
        torch.manual_seed(0)
        net = MTD(20, MTDConfig(hidden_size=8, repeat_bias=True), backend=backend)
        with torch.no_grad():
            net.repeat.offset.fill_(1.5)
        losses[backend] = net.loss(batch, targets).item()
        called = []
        real = base.biased_cross_entropy_ref
        monkeypatch.setattr(base, "biased_cross_entropy_ref", lambda *a: called.append(1) or real(*a))
        net.loss(batch, targets)
        monkeypatch.undo()
        assert called == ([1] if backend == "reference" else [])
    assert losses["reference"] == pytest.approx(losses[None], rel=1e-5)


# ---- Triton: the per-row log-sum-exp through the kernels, and the biased loss on them ---------

def _grad_fns(t: torch.Tensor) -> str:
    """The names of every node of t's autograd graph, one string."""
    seen, todo, names = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(fn.name())
        todo += [nxt for nxt, _ in fn.next_functions]
    return " ".join(sorted(names))


@triton_only
@pytest.mark.parametrize("b,m,d,progs", [(5, 37, 20, None), (33, 130, 100, None), (7, 130, 16, 1), (1, 17, 3, None)])
def test_row_logsumexp_triton_is_logsumexp_with_per_row_gradients(b, m, d, progs, monkeypatch):
    from mtd_fast.kernels import linear_cross_entropy as lce

    if progs is not None:  # one program looping over several tiles
        monkeypatch.setattr(lce, "TARGET_PROGRAMS", progs)
    g = torch.Generator().manual_seed(b + m + d)
    q, t = (torch.randn(n, d, generator=g).mul(2.0).to(TRITON_DEVICE) for n in (b, m))
    go = torch.randn(b, generator=g).to(TRITON_DEVICE)  # a different upstream gradient per row

    def run(fn, dtype):
        qa, ta = q.to(dtype).requires_grad_(True), t.to(dtype).requires_grad_(True)
        out = fn(qa, ta)
        return [out, *torch.autograd.grad(out, (qa, ta), go.to(dtype))]

    def eager(a, c):
        return torch.logsumexp(a @ c.t(), 1)

    got = run(lce.row_logsumexp_triton, torch.float32)
    fp32, truth = run(eager, torch.float32), run(eager, torch.float64)
    assert "RowLogSumExpFunction" in got[0].grad_fn.name()
    for name, x, e, w in zip(("lse", "dq", "dT"), got, fp32, truth):
        assert x.shape == w.shape and x.dtype == torch.float32, name
        # logits of sd up to 40 here: against float64, no worse than twice eager fp32's own error
        err, own = ((y.double() - w).abs().max().item() for y in (x, e))
        assert err <= 2 * own + 1e-6, f"{name}: {err:.3g} from float64, eager fp32 {own:.3g}"
    # float64 runs the chunked PyTorch twin; bad shapes raise naming the op
    q64 = q.double().requires_grad_(True)
    out = lce.row_logsumexp_triton(q64, t.double())
    assert "RowLogSumExpFunction" not in out.grad_fn.name()
    torch.testing.assert_close(out, torch.logsumexp(q64 @ t.double().t(), 1), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="row_logsumexp_triton"):
        lce.row_logsumexp_triton(q, t[:, :-1])


@triton_only
def test_biased_loss_on_the_triton_backend_is_the_dense_formula():
    # the op alone, rows with and without re-click targets, a padding-only row
    q, table, ids, bias, targets = _case(seed=2, dtype=torch.float32, scale=3.0)
    args = [x.to(TRITON_DEVICE).requires_grad_(True) for x in (q, table, bias)]
    ids, targets = ids.to(TRITON_DEVICE), targets.to(TRITON_DEVICE)
    got = rp.biased_cross_entropy(args[0], args[1], targets, ids, args[2], triton=True)
    assert "RowLogSumExpFunction" in _grad_fns(got)
    want = rp.biased_cross_entropy_ref(args[0], args[1], targets, ids, args[2])
    for name, x, w in zip(("loss", "dq", "dT", "dbias"), [got, *torch.autograd.grad(got, args)],
                          [want, *torch.autograd.grad(want, args)]):
        assert_close(name, x, w)
    # the model's own path: MTD.loss -> terms_loss -> the kernels, against the reference backend
    batch = {"items": torch.tensor([[1, 2, 1], [3, 0, 0], [4, 5, 4]], device=TRITON_DEVICE),
             "lengths": torch.tensor([3, 1, 3], device=TRITON_DEVICE)}
    targets = torch.tensor([2, 5, 4], device=TRITON_DEVICE)
    results = []
    for backend in ({"linear_cross_entropy": "triton"}, "reference"):
        torch.manual_seed(0)
        net = MTD(30, MTDConfig(hidden_size=8, repeat_bias=True), backend=backend).to(TRITON_DEVICE)
        with torch.no_grad():
            net.repeat.offset.fill_(1.5)
            net.repeat.recency.copy_(torch.linspace(-1.0, 1.0, net.repeat.recency.numel()))
        torch.manual_seed(1)
        loss = net.loss(batch, targets)
        loss.backward()
        results.append((loss.detach(), _grad_fns(loss),
                        {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}))
    (l_t, fns_t, g_t), (l_r, fns_r, g_r) = results
    assert "RowLogSumExpFunction" in fns_t and "RowLogSumExpFunction" not in fns_r
    assert g_r["repeat.offset"].abs().item() > 0  # the bias is in the loss
    atol, rtol = MODEL_TOL["triton"]
    torch.testing.assert_close(l_t, l_r, atol=atol, rtol=rtol)
    assert g_t.keys() == g_r.keys()
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], atol=atol, rtol=rtol, msg=lambda msg: f"{name}: {msg}")


# ---- repeat_identity: re-clicks scored by the item's own embedding, weighed by a learned v ------

def _graph_mtd(identity: bool, score_norm: bool = True, seed: int = 0):
    """A residual-mode MTD with a graph (so T != E) and the repeat bias, on synthetic data."""
    ds = mtd_fast.load_dataset("synthetic", n_sessions=200, n_items=40, seed=seed)
    torch.manual_seed(seed)
    net = mtd_fast.train(ds, model="mtd", epochs=1, quiet=True, hidden_size=8, batch_size=64, seed=seed,
                         repeat_bias=True, repeat_identity=identity, score_norm=score_norm,
                         max_steps_per_epoch=2).model
    batch = {"items": torch.tensor([[1, 2, 1, 7], [3, 0, 0, 0], [5, 6, 9, 6]]), "lengths": torch.tensor([4, 1, 4])}
    return net, batch


@pytest.mark.parametrize("score_norm", [True, False])
def test_repeat_identity_scores_session_items_by_their_own_embedding(score_norm):
    net, batch = _graph_mtd(True, score_norm)
    net.eval()
    with torch.no_grad():
        table = net.item_table()
        assert not torch.allclose(table, net.item_emb.weight)  # the graph moved the rows
        ids = rp.session_items(batch["items"], batch["lengths"])[0]
        scores = {}
        for v in (0.0, 1.0):
            net.repeat.identity.fill_(v)
            q, cand, (ids_, bias) = net.score_terms(batch)
            assert torch.equal(ids_, ids)
            scores[v] = rp.dense_biased_scores(q, cand, ids, bias)
        e = net.item_emb.weight
        e = torch.nn.functional.normalize(e, dim=1) if score_norm else e
        for i, j in ((0, 1), (0, 2), (0, 7), (2, 6), (1, 3)):  # session items: scored by E_j when v = 1
            own = (q[i] * e[j]).sum()
            base = scores[0.0][i, j - 1]
            t = torch.nn.functional.normalize(table[j], dim=0) if score_norm else table[j]
            torch.testing.assert_close(scores[1.0][i, j - 1], base - (q[i] * t).sum() + own, rtol=1e-5, atol=1e-5)
        # items outside the session keep their scores
        outside = torch.ones_like(scores[0.0], dtype=torch.bool)
        for i in range(3):
            outside[i, ids[i][ids[i] > 0] - 1] = False
        assert torch.equal(scores[1.0][outside], scores[0.0][outside])


def test_repeat_identity_is_zero_without_a_graph_and_starts_at_zero():
    # MTD-lo (no graph): T = E, so the term is exactly 0 whatever v
    ds = mtd_fast.load_dataset("synthetic", n_sessions=200, n_items=40, seed=0)
    lo = mtd_fast.train(ds, model="mtd-lo", epochs=1, quiet=True, hidden_size=8, batch_size=64, seed=0,
                        repeat_bias=True, repeat_identity=True, max_steps_per_epoch=2).model.eval()
    batch = {"items": torch.tensor([[1, 2, 1]]), "lengths": torch.tensor([3])}
    with torch.no_grad():
        q, _, (ids, _) = lo.score_terms(batch)
        assert torch.equal(lo.identity_shift(q, lo.item_table(), ids), torch.zeros_like(ids, dtype=q.dtype))
    # a fresh model with the option equals one without it (v starts at 0, no extra RNG draw)
    torch.manual_seed(5)
    a = MTD(30, MTDConfig(hidden_size=8, repeat_bias=True))
    torch.manual_seed(5)
    b = MTD(30, MTDConfig(hidden_size=8, repeat_bias=True, repeat_identity=True))
    assert set(b.state_dict()) - set(a.state_dict()) == {"repeat.identity"}
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    # v learns in residual mode: its gradient is not zero
    net, batch = _graph_mtd(True)
    net.train()
    net.loss(batch, torch.tensor([1, 3, 6])).backward()  # every target a re-click
    assert net.repeat.identity.grad is not None and net.repeat.identity.grad.abs().item() > 0


def test_repeat_identity_needs_the_bias_and_the_residual_table():
    with pytest.raises(ValueError, match="repeat_identity"):
        MTDConfig(repeat_bias=False, repeat_identity=True)
    with pytest.raises(ValueError, match="repeat_identity.*graph_mode='overwrite'"):
        MTDConfig(repeat_bias=True, repeat_identity=True, graph_mode="overwrite")
    with pytest.raises(ValueError, match="identity"):
        rp.RepeatBias(4)(torch.ones(1, 4), torch.ones(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long),
                         torch.ones(1, 1, dtype=torch.long), torch.ones(1, 1))
