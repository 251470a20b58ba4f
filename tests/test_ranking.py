"""Chunked ranking and top-k (`mtd_fast.metrics`): the same integers as on the full score
matrix, bit for bit, ties and NaN included; no (batch, M) tensor; the models' evaluation
and `recommend` on it.

- `ranks_from_parts(q, T, targets)` == `ranks_from_scores(q @ T.T, targets)` for every chunk
  size, on random fp32 scores (batch >= 2: the chunk GEMMs hold the full product's bits),
  on integer-valued scores full of exact ties, with duplicated table rows, NaN items, NaN
  queries;
- `topk_from_scores` against a brute-force sort (NaN first, score descending, smaller id
  first); `topk_from_parts` == `topk_from_scores(q @ T.T)` for every chunk size;
- position r of a recommendation is the item whose rank is r + 1 (finite scores);
- `evaluate_samples` and `recommend` of a model with `score_parts` equal the full-scores path.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from _memcheck import largest_tensor

import mtd_fast
from mtd_fast.data.store import Samples
from mtd_fast.metrics import batch_ranks, ranks_from_parts, ranks_from_scores, topk_from_parts, topk_from_scores
from mtd_fast.train import evaluate_samples

CHUNKS = (1, 2, 3, 7, 64, None)


def _brute_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    out = []
    for row in scores.tolist():
        key = lambda j: (0, 0.0, j) if row[j] != row[j] else (1, -row[j], j)  # noqa: E731  (NaN first)
        out.append(sorted(range(len(row)), key=key)[:k])
    return torch.tensor(out)


def _tied_parts(b, m, d, seed, nan_items=False, nan_query=False):
    """Small-integer q and T: their products are exact, so scores tie often."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (b, d), generator=gen).float()
    t = torch.randint(-2, 3, (m, d), generator=gen).float()
    if nan_items:
        t[torch.randint(0, m, (2,), generator=gen)] = float("nan")
    if nan_query:
        q[0] = float("nan")
    y = torch.randint(1, m + 1, (b,), generator=gen)
    return q, t, y


@pytest.mark.parametrize("seed", range(40))
def test_ties_and_nan_bit_for_bit(seed):
    gen = torch.Generator().manual_seed(1000 + seed)
    b, m, d = (int(torch.randint(lo, hi, (), generator=gen)) for lo, hi in ((1, 9), (1, 60), (1, 6)))
    q, t, y = _tied_parts(b, m, d, seed, nan_items=seed % 4 == 0, nan_query=seed % 7 == 0)
    scores = q @ t.t()
    want = ranks_from_scores(scores, y)
    k = int(torch.randint(1, m + 1, (), generator=gen))
    want_top = _brute_topk(scores, k)
    assert torch.equal(topk_from_scores(scores, k), want_top)
    for cs in CHUNKS:
        assert torch.equal(ranks_from_parts(q, t, y, chunk_size=cs), want), cs
        assert torch.equal(topk_from_parts(q, t, k, chunk_size=cs), want_top), (cs, k)


@pytest.mark.parametrize("b", [2, 5, 64, 300])
def test_random_fp32_bit_for_bit(b):
    # real-valued scores, plus exact duplicates of some table rows (equal scores, tied ranks)
    gen = torch.Generator().manual_seed(b)
    m, d = 5003, 100
    q = torch.randn(b, d, generator=gen)
    t = torch.randn(m, d, generator=gen) * 0.1
    t[4000:4010] = t[17]  # ten items tied with item 18
    y = torch.randint(1, m + 1, (b,), generator=gen)
    y[0] = 18
    y[1] = 4005
    scores = q @ t.t()
    want = ranks_from_scores(scores, y)
    want_top = topk_from_scores(scores, 20)
    for cs in (1000, 4096, None):
        assert torch.equal(ranks_from_parts(q, t, y, chunk_size=cs), want), cs
        assert torch.equal(topk_from_parts(q, t, 20, chunk_size=cs), want_top), cs


@pytest.mark.parametrize("k", [1, 5, 20, 50])
def test_wide_chunks_with_ties_bit_for_bit(k):
    # chunks wide enough for the top-k group prefilter (>= 64 (k + 1) columns), with scores
    # full of exact ties and a few NaN items: group maxima tie at the cut in many rows
    q, t, y = _tied_parts(9, 6000, 3, seed=k, nan_items=True)
    scores = q @ t.t()
    want_top = _brute_topk(scores, k)
    assert torch.equal(topk_from_scores(scores, k), want_top)
    for cs in (64 * (k + 1), 4000, None):
        assert torch.equal(topk_from_parts(q, t, k, chunk_size=cs), want_top), cs
    assert torch.equal(ranks_from_parts(q, t, y), ranks_from_scores(scores, y))


def test_topk_of_integer_and_expanded_scores():
    # pop-like scores: one row of counts expanded over the batch (stride 0), many ties;
    # and the same as integers (no group prefilter there)
    gen = torch.Generator().manual_seed(11)
    counts = torch.randint(0, 5, (3000,), generator=gen).float()
    scores = counts.unsqueeze(0).expand(4, -1)
    want = _brute_topk(scores[:1], 25).expand(4, -1)
    assert torch.equal(topk_from_scores(scores, 25), want)
    assert torch.equal(topk_from_scores(scores.long(), 25), want)


def test_recommendation_positions_are_ranks():
    q, t, _ = _tied_parts(6, 40, 3, seed=5)
    top = topk_from_parts(q, t, 40, chunk_size=7) + 1
    for r in range(40):
        assert torch.equal(ranks_from_parts(q, t, top[:, r]), torch.full((6,), r + 1)), r


def test_no_batch_by_items_tensor():
    b, m, d = 64, 5000, 16
    gen = torch.Generator().manual_seed(3)
    q, t = torch.randn(b, d, generator=gen), torch.randn(m, d, generator=gen)
    y = torch.randint(1, m + 1, (b,), generator=gen)
    for fn in (lambda: ranks_from_parts(q, t, y, chunk_size=500), lambda: topk_from_parts(q, t, 20, chunk_size=500)):
        n, op, shape = largest_tensor(fn)
        assert n <= max(b * 500, m * d), f"{op} made a {shape} tensor"


def test_bad_input():
    q, t, y = _tied_parts(3, 10, 2, seed=1)
    with pytest.raises(ValueError, match="item ids in 1..10"):
        ranks_from_parts(q, t, torch.tensor([1, 0, 3]))
    with pytest.raises(ValueError, match="chunk_size"):
        ranks_from_parts(q, t, y, chunk_size=0)
    with pytest.raises(ValueError, match="k=11"):
        topk_from_parts(q, t, 11)
    with pytest.raises(ValueError, match="one dim"):
        ranks_from_parts(q, t[:, :1], y)


# ---- models ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_models():
    ds = mtd_fast.load_dataset("synthetic", n_sessions=400, n_items=60, seed=2)
    threads = torch.get_num_threads()
    try:
        return ds, {name: mtd_fast.train(ds, model=name, epochs=1, quiet=True, hidden_size=16, num_threads=1).model
                    for name in ("mtd", "gru4rec", "csrm")}
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("name", ["mtd", "gru4rec", "csrm"])
def test_model_evaluation_and_recommend_equal_the_full_path(trained_models, name, monkeypatch):
    ds, model = trained_models[0], trained_models[1][name]
    assert model.has_score_parts
    chunked = evaluate_samples(model, ds.test, batch_size=37)
    sessions = [[1, 2, 3], [5], [7, 7, 7, 9], [60, 1]]
    top = model.recommend(sessions, k=20)
    # the same through the full (batch, M) scores
    monkeypatch.setattr(type(model), "has_score_parts", property(lambda self: False))
    assert evaluate_samples(model, ds.test, batch_size=37) == chunked
    assert torch.equal(model.recommend(sessions, k=20), top)
    # and batch-wise ranks, integer for integer
    model.eval()
    with torch.no_grad():
        batch = model.batch_from_sessions(ds.test.prefixes, np.arange(37))
        targets = torch.from_numpy(ds.test.targets[:37].astype(np.int64))
        full = batch_ranks(model, batch, targets)
    monkeypatch.undo()
    with torch.no_grad():
        assert torch.equal(batch_ranks(model, batch, targets), full)


def test_recommend_ties_go_to_the_smaller_id():
    # an MTD whose item table has identical rows: the tied items come out smaller id first,
    # the same for any batch composition and chunk size
    from mtd_fast import MTD, MTDConfig

    torch.manual_seed(0)
    model = MTD(30, MTDConfig(hidden_size=8))
    with torch.no_grad():
        model.item_emb.weight[1:] = model.item_emb.weight[5]  # every item scores the same
    top = model.recommend([[1, 2], [3]], k=30)
    assert torch.equal(top, torch.arange(1, 31).expand(2, 30))
    assert torch.equal(model.recommend([[3]], k=5, batch_size=1), top[1:, :5])


def test_non_parts_models_rank_on_full_scores():
    ds = mtd_fast.load_dataset("synthetic", n_sessions=200, n_items=30, seed=3)
    pop = mtd_fast.train(ds, model="pop", epochs=1, quiet=True).model
    assert not pop.has_score_parts
    top = pop.recommend([[1], [2, 3]], k=30)
    counts = pop.counts.tolist()
    order = sorted(range(30), key=lambda j: (-counts[j], j))  # popularity, ties by smaller id
    assert top[0].tolist() == [j + 1 for j in order] == top[1].tolist()
    m = evaluate_samples(pop, Samples.from_lists([[1], [4]], [order[0] + 1, order[1] + 1]))
    assert m["MRR@5"] == pytest.approx(100 * (1 + 1 / 2) / 2)  # ranks 1 and 2
