"""Full-ranking metrics of `MTD_SPEC.md` section 6, computed batch-wise on the score matrix.

rank = 1 + #(score > s_target) + #(score == s_target and id < target): ties never
flatter a model (a constant scorer gets the worst rank its id allows, not the best).
NaN never flatters either: a NaN item counts as ranked above the target, and a target
whose own score is NaN gets the worst rank, M (a diverged model scores 0, not 100).
P@K is the hit rate, MRR@K = 1/rank if rank <= K, NDCG@K = 1/log2(rank+1) if rank <= K;
all reported x100.
"""
from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["KS", "METRIC_KEYS", "ranks_from_scores", "MetricAccumulator", "better"]

KS = (5, 10, 20)
METRIC_KEYS = tuple(f"{m}@{k}" for m in ("P", "MRR", "NDCG") for k in KS)


def ranks_from_scores(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """scores (batch, M) for item ids 1..M (column j is item j+1); targets (batch,) ids in 1..M.
    Returns int64 ranks (batch,), 1 = best."""
    col = (targets - 1).long()
    s_t = scores.gather(1, col[:, None])
    greater = (~(scores <= s_t)).sum(1)  # NaN items count as above the target
    ids = torch.arange(scores.shape[1], device=scores.device)
    ties = ((scores == s_t) & (ids[None, :] < col[:, None])).sum(1)
    return (1 + greater + ties).clamp_max(scores.shape[1])


class MetricAccumulator:
    """Sums P/MRR/NDCG over batches of ranks without a Python loop per sample."""

    def __init__(self, ks: Iterable[int] = KS) -> None:
        self.ks = tuple(ks)
        self.n = 0
        self.sums = {f"{m}@{k}": 0.0 for m in ("P", "MRR", "NDCG") for k in self.ks}

    def add(self, ranks: torch.Tensor) -> None:
        r = ranks.double().cpu()
        self.n += r.numel()
        for k in self.ks:
            hit = r <= k
            self.sums[f"P@{k}"] += hit.sum().item()
            self.sums[f"MRR@{k}"] += torch.where(hit, 1.0 / r, torch.zeros_like(r)).sum().item()
            self.sums[f"NDCG@{k}"] += torch.where(hit, 1.0 / torch.log2(r + 1.0), torch.zeros_like(r)).sum().item()

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise ValueError("no samples were evaluated")
        return {key: 100.0 * v / self.n for key, v in self.sums.items()}


def better(a: dict[str, float], b: dict[str, float] | None) -> bool:
    """Model selection order: validation P@20, ties broken by MRR@20."""
    if b is None:
        return True
    return (a["P@20"], a["MRR@20"]) > (b["P@20"], b["MRR@20"])
