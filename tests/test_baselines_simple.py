"""The paper's simple baselines on the shared pipeline: POP, S-POP, ItemKNN (non-neural)
and GRU4Rec, NARM, STAMP (neural).

- one epoch on the default synthetic data: every model but POP / S-POP beats POP;
- hand-computed POP / S-POP / ItemKNN scores on a tiny handmade dataset;
- padding invariance on ragged batches, shapes, recommend();
- save / load round trip (non-neural state lives in buffers too).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import mtd_fast
from mtd_fast.config import MTDConfig
from mtd_fast.data.dataset import Dataset
from mtd_fast.data.store import Samples, Sessions
from mtd_fast.models import model_class
from mtd_fast.models import spop as spop_module

NON_NEURAL = ["pop", "spop", "itemknn"]
NEURAL = ["gru4rec", "narm", "stamp"]
ALL = NON_NEURAL + NEURAL


# ---- fixtures ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(synthetic):
    """One epoch of every baseline on the default synthetic data (trained once per module).

    One torch thread: on a shared 2-core machine two threads ran these 8-20x slower
    (measured: NARM 3.4 s with one thread, 54 s with two under load); the results match."""
    threads = torch.get_num_threads()
    try:
        yield {name: mtd_fast.train(synthetic, model=name, epochs=1, quiet=True, num_threads=1) for name in ALL}
    finally:
        torch.set_num_threads(threads)


TINY_SESSIONS = [[1, 2, 3], [2, 3, 4], [1, 2], [3, 3, 5], [2, 4]]


def tiny_dataset(extra_valid: list[int] | None = None) -> Dataset:
    """Six items; item 6 never clicked in training. With `extra_valid`, one more session is
    appended and becomes the validation split (it must not count)."""
    seqs = TINY_SESSIONS + ([extra_valid] if extra_valid else [])
    valid_fraction = 1.0 / len(seqs) + 1e-9 if extra_valid else 0.0
    test = Samples.from_lists([[1], [2, 3]], [2, 4])
    ds = Dataset("tiny", Sessions.from_lists(seqs), test, n_items=6, valid_fraction=valid_fraction)
    assert len(ds.train_sessions) == len(TINY_SESSIONS)
    return ds


def fitted(name: str, ds: Dataset, **cfg) -> torch.nn.Module:
    model = model_class(name)(ds.n_items, MTDConfig(**cfg))
    model.fit(ds)
    return model.eval()


def scores_of(model, seqs: list[list[int]]) -> torch.Tensor:
    batch = model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(len(seqs)))
    with torch.no_grad():
        return model.scores(batch).double()


def assert_order(row: torch.Tensor, groups: list[list[int]]) -> None:
    """Scores (M,) of item ids 1..M: equal inside each group, strictly decreasing across groups."""
    vals = [[float(row[i - 1]) for i in g] for g in groups]
    for g, v in zip(groups, vals):
        assert max(v) == min(v), f"items {g} should tie, got {v}"
    for a, b, ga, gb in zip(vals, vals[1:], groups, groups[1:]):
        assert min(a) > max(b), f"items {ga} ({a}) should rank above {gb} ({b})"


# ---- learning ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["itemknn", *NEURAL])
def test_one_epoch_beats_pop(trained, name):
    pop = trained["pop"].metrics["P@20"]
    got = trained[name].metrics["P@20"]
    assert got > pop + 3.0, f"{name}: P@20 {got:.2f} after one epoch does not beat POP's {pop:.2f}"


def test_one_epoch_results_are_sane(trained):
    for name, res in trained.items():
        assert 0.0 <= res.metrics["MRR@20"] <= res.metrics["P@20"] <= 100.0, name
        assert len(res.history) == 1
    assert trained["spop"].metrics["P@20"] > trained["pop"].metrics["P@20"]  # sessions revisit items


# ---- hand-computed expectations -------------------------------------------------------------

def test_pop_counts_training_clicks_only():
    ds = tiny_dataset(extra_valid=[6, 6, 6])
    model = fitted("pop", ds)
    # clicks: 1 x2, 2 x4, 3 x4, 4 x2, 5 x1, 6 only in validation
    assert model.counts.tolist() == [2, 4, 4, 2, 1, 0]
    sc = scores_of(model, [[5], [6, 1, 1, 1]])
    assert torch.equal(sc[0], sc[1])  # the session does not matter
    assert_order(sc[0], [[2, 3], [1, 4], [5], [6]])
    top = model.recommend([[1], [4, 5]], k=2)
    assert top.shape == (2, 2) and set(top[0].tolist()) == {2, 3} == set(top[1].tolist())


def test_spop_session_counts_then_popularity():
    model = fitted("spop", tiny_dataset())
    sc = scores_of(model, [[5, 1, 5], [5, 4], [6], [1, 6, 6, 1, 5]])
    # 5 twice, 1 once; then global popularity: {2,3} (4 clicks) > 4 (2) > 6 (0)
    assert_order(sc[0], [[5], [1], [2, 3], [4], [6]])
    # both once in the session: popularity breaks the tie (4 has 2 clicks, 5 has 1)
    assert_order(sc[1], [[4], [5], [2, 3], [1], [6]])
    # an item never clicked in training still comes first when it is in the session
    assert_order(sc[2], [[6], [2, 3], [1, 4], [5]])
    # 1 and 6 both twice: popularity puts 1 (2 clicks) before 6 (none)
    assert_order(sc[3], [[1], [6], [5], [2, 3], [4]])


def test_spop_matches_a_lexicographic_reference(synthetic, monkeypatch):
    model = fitted("spop", synthetic)
    glob = np.bincount(synthetic.train_sessions.items, minlength=synthetic.n_items + 1)[1:]
    seqs = [s.tolist() for s in synthetic.test.prefixes.select(np.arange(0, 400, 40))]
    for exact_limit in (spop_module.FLOAT32_EXACT, 1):  # float32 path, then the float64 fallback
        monkeypatch.setattr(spop_module, "FLOAT32_EXACT", exact_limit)
        sc = scores_of(model, seqs).numpy()
        for row, s in zip(sc, seqs):
            key = np.bincount(s, minlength=synthetic.n_items + 1)[1:].astype(np.int64) * (glob.max() + 1) + glob
            want = np.sign(key[:, None] - key[None, :])
            got = np.sign(row[:, None] - row[None, :])
            assert np.array_equal(got, want)


def _sim(c: int, ni: int, nj: int, shrink: float) -> float:
    return c / (math.sqrt(ni) * math.sqrt(nj) + shrink)


@pytest.mark.parametrize("shrink", [0.0, 20.0])
def test_itemknn_hand_computed(shrink):
    ds = tiny_dataset()
    model = model_class("itemknn")(ds.n_items, MTDConfig(knn_shrink=shrink))
    model.fit(ds)
    model.eval()
    # sessions containing each item (binary: s4 clicks 3 twice): n1=2, n2=4, n3=3, n4=2, n5=1
    # co-occurring sessions: c12=2, c13=1, c23=2, c24=2, c34=1, c35=1
    sc = scores_of(model, [[5, 1, 2], [2], [4, 3], [6]])
    want_last2 = [_sim(2, 2, 4, shrink), 0.0, _sim(2, 4, 3, shrink), _sim(2, 4, 2, shrink), 0.0, 0.0]
    want_last3 = [_sim(1, 3, 2, shrink), _sim(2, 3, 4, shrink), 0.0, _sim(1, 3, 2, shrink),
                  _sim(1, 3, 1, shrink), 0.0]
    np.testing.assert_allclose(sc[0].numpy(), want_last2, rtol=1e-6, atol=0)
    assert torch.equal(sc[0], sc[1])  # only the last item counts
    np.testing.assert_allclose(sc[2].numpy(), want_last3, rtol=1e-6, atol=0)
    assert torch.count_nonzero(sc[3]) == 0  # an item never seen in training has no neighbours


def test_itemknn_keeps_top_k_neighbours():
    ds = tiny_dataset()
    model = model_class("itemknn")(ds.n_items, MTDConfig(knn_neighbors=2, knn_shrink=0.0))
    model.fit(ds)
    assert tuple(model.neighbours.shape) == (7, 2)
    # neighbours of 2: 1 and 4 (2/sqrt(8)) beat 3 (2/sqrt(12)), which is dropped
    assert sorted(model.neighbours[2].tolist()) == [1, 4]
    sc = scores_of(model.eval(), [[2]])[0]
    assert sc[2] == 0.0 and sc[0] == sc[3] == pytest.approx(2 / math.sqrt(8))
    # neighbours of 3: 2 (2/sqrt(12)) and 5 (1/sqrt(3), the same value) beat 1 and 4 (1/sqrt(6))
    assert sorted(model.neighbours[3].tolist()) == [2, 5]


def test_itemknn_is_sparse_for_a_huge_catalogue():
    # 300k items: a dense M x M similarity (7e11 bytes) would not fit; the sparse build takes ms
    n_items = 300_000
    sessions = Sessions.from_lists([[1, 2, 3], [2, 3], [299_999, 300_000, 2]])
    ds = Dataset("huge", sessions, Samples.from_lists([[1]], [2]), n_items=n_items, valid_fraction=0.0)
    model = fitted("itemknn", ds, knn_neighbors=3)
    top = model.recommend([[300_000]], k=2)[0].tolist()
    assert sorted(top) == [2, 299_999]


# ---- padding, shapes, recommend ---------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_padding_invariance(name, synthetic):
    cls = model_class(name)
    model = cls(synthetic.n_items, MTDConfig(hidden_size=24), dropout=0.3)
    if not model.neural:
        model.fit(synthetic)
    model.eval()
    short = [[7, 3, 9], [42], [5, 5, 17, 3]]
    long = [list(range(1, 31)), [8, 9, 10, 11, 12, 13, 14], list(range(100, 119))]
    alone = torch.cat([scores_of(model, [s]) for s in short])
    # ragged batch: the short sessions interleaved with longer ones (padded to 30)
    mixed = scores_of(model, [long[0], short[0], long[1], short[1], short[2], long[2]])[[1, 3, 4]]
    assert alone.shape == (3, synthetic.n_items)
    torch.testing.assert_close(mixed, alone, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(alone).all()
    # and the scores do depend on the session (they are not constant across sessions), except POP
    if name != "pop":
        assert not torch.equal(alone[0], alone[1])


@pytest.mark.parametrize("name", ["gru4rec", "narm", "stamp"])
def test_packed_models_equal_the_per_session_formula(name):
    """GRU4Rec, NARM (`layers.rnn_batch`) and STAMP (`layers.Packing`) run on the batch's
    packed clicks: each row is the model's formula (the paper's, written here) over that
    session alone, with nothing padded."""
    torch.manual_seed(0)
    model = model_class(name)(20, MTDConfig(hidden_size=6), dropout=0.0).eval()
    sessions = [[1, 2, 3], [4], [5, 6, 7, 8, 9, 10, 2], [3, 3], [7, 1]]
    batch = model.batch_from_sessions(Sessions.from_lists(sessions), np.arange(len(sessions)))
    with torch.no_grad():
        got = model(batch)
        for i, s in enumerate(sessions):
            if name == "stamp":  # m_s the mean, x_t the last click, alpha unnormalised (STAMP eqs. 7-9)
                x = model.item_emb(torch.tensor(s))
                x_t, m_s = x[-1], x.mean(0)
                alpha = model.w0(torch.sigmoid(model.w1(x) + model.w2(x_t) + model.w3(m_s)))  # (len, 1)
                ref = torch.tanh(model.mlp_s((alpha * x).sum(0))) * torch.tanh(model.mlp_t(x_t))
                torch.testing.assert_close(got[i], ref, atol=2e-6, rtol=1e-5)
                continue
            out, h = model.gru(model.item_emb(torch.tensor(s))[None])
            c_g, states = h[-1, 0], out[0]  # (d,), (len, d)
            if name == "gru4rec":
                ref = c_g
            else:
                alpha = model.v(torch.sigmoid(model.a1(c_g) + model.a2(states)))  # (len, 1), no softmax
                ref = model.bilinear(torch.cat([c_g, (alpha * states).sum(0)]))
            torch.testing.assert_close(got[i], ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("name", NEURAL)
def test_neural_dropout_and_gradients(name, synthetic):
    model = model_class(name)(synthetic.n_items, MTDConfig(hidden_size=16), dropout=0.5)
    batch = model.batch_from_sessions(synthetic.train.prefixes, np.arange(64))
    model.train()
    a, b = model.scores(batch), model.scores(batch)
    assert a.shape == (64, synthetic.n_items)
    assert not torch.equal(a, b)  # dropout active in training mode
    targets = torch.from_numpy(synthetic.train.targets[:64].astype(np.int64))
    model.loss(batch, targets).backward()
    grads = [p.grad for p in model.rec_parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    model.eval()
    assert torch.equal(model.scores(batch), model.scores(batch))


@pytest.mark.parametrize("name", ALL)
def test_recommend_shapes_and_ids(name, trained):
    model = trained[name].model
    m = model.n_items
    top = model.recommend([[1], [m, 3, m], list(range(1, 41))], k=20)
    assert top.dtype == torch.long and top.shape == (3, 20)
    assert int(top.min()) >= 1 and int(top.max()) <= m
    assert all(len(set(row)) == 20 for row in top.tolist())
    assert model.recommend([[2]], k=m).shape == (1, m)
    assert model.neural == (name in NEURAL)
    if not model.neural:
        assert model.rec_parameters() == []


# ---- save / load --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL)
def test_save_load_round_trip(name, trained, synthetic, tmp_path):
    model = trained[name].model.eval()
    path = tmp_path / f"{name}.pt"
    mtd_fast.save(model, path)
    loaded = mtd_fast.load(path)
    assert type(loaded) is type(model) and loaded.name == name
    idx = np.arange(0, len(synthetic.test), 7)
    want = model.scores(model.batch_from_sessions(synthetic.test.prefixes, idx))
    got = loaded.scores(loaded.batch_from_sessions(synthetic.test.prefixes, idx))
    assert torch.equal(got, want)
    if not model.neural:  # the fitted state really travelled (a fresh model scores all zeros)
        assert torch.count_nonzero(got) > 0
    assert mtd_fast.evaluate(loaded, synthetic) == pytest.approx(mtd_fast.evaluate(model, synthetic))
