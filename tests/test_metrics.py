"""Metrics on hand-made rankings (MTD_SPEC.md section 6)."""
from __future__ import annotations

import math

import pytest
import torch

from mtd_fast.metrics import METRIC_KEYS, MetricAccumulator, better, ranks_from_scores


def test_ranks_by_hand():
    # 5 items (ids 1..5 -> columns 0..4)
    scores = torch.tensor([
        [0.1, 0.9, 0.3, 0.2, 0.0],  # target 2 has the top score -> rank 1
        [0.5, 0.5, 0.5, 0.1, 0.9],  # target 3 ties with ids 1, 2 (smaller ids rank first) and 5 > -> 1+1+2 = 4
        [0.5, 0.5, 0.5, 0.1, 0.9],  # target 1: 1 greater, ties with larger ids only -> 2
        [0.0, 0.0, 0.0, 0.0, 0.0],  # constant scorer, target 5: worst rank its id allows -> 5
    ])
    targets = torch.tensor([2, 3, 1, 5])
    assert ranks_from_scores(scores, targets).tolist() == [1, 4, 2, 5]


def test_metric_values_by_hand():
    acc = MetricAccumulator()
    acc.add(torch.tensor([1, 4, 7, 15, 30]))
    m = acc.result()
    assert set(m) == set(METRIC_KEYS)
    assert m["P@5"] == pytest.approx(100 * 2 / 5)
    assert m["P@10"] == pytest.approx(100 * 3 / 5)
    assert m["P@20"] == pytest.approx(100 * 4 / 5)
    assert m["MRR@5"] == pytest.approx(100 * (1 + 1 / 4) / 5)
    assert m["MRR@20"] == pytest.approx(100 * (1 + 1 / 4 + 1 / 7 + 1 / 15) / 5)
    assert m["NDCG@10"] == pytest.approx(100 * (1 + 1 / math.log2(5) + 1 / math.log2(8)) / 5)


def test_accumulates_over_batches():
    a = MetricAccumulator()
    a.add(torch.tensor([1, 2]))
    a.add(torch.tensor([30]))
    b = MetricAccumulator()
    b.add(torch.tensor([1, 2, 30]))
    assert a.result() == b.result()
    with pytest.raises(ValueError):
        MetricAccumulator().result()


def test_selection_order():
    assert better({"P@20": 50, "MRR@20": 10}, None)
    assert better({"P@20": 50, "MRR@20": 11}, {"P@20": 50, "MRR@20": 10})
    assert not better({"P@20": 49, "MRR@20": 30}, {"P@20": 50, "MRR@20": 10})


def test_nan_never_flatters():
    nan = float("nan")
    scores = torch.tensor([
        [nan, 1.0, 2.0, 3.0],  # target 1 scored NaN: worst rank, M = 4
        [nan, nan, nan, nan],  # a diverged model
        [0.5, nan, 0.1, 0.2],  # target 1 is the best finite score, but the NaN item counts above it
    ])
    assert ranks_from_scores(scores, torch.tensor([1, 3, 1])).tolist() == [4, 4, 2]
