"""A learned bias on the scores of the items already in the session (MTDConfig.repeat_bias).

In session data a large share of targets re-click an item of their own prefix (Diginetica
test 21%, Yoochoose 1/64 27%; `mtd-fast compare --by-repeat` splits any two runs' paired
difference this way), and a model that scores every item by its similarity to one session
vector ranks those re-clicks worse than S-POP does (MTD on Diginetica: P@20 82.8 on them,
S-POP 99.98). RepeatNet (Ren et al., AAAI 2019) mixes a repeat and an explore
distribution; here the repeat side is an additive term on the logits of the session's
distinct items j:

    score_ij = s_ij + b_ij,   b_ij = w . q_i/|q_i| + c + r[min(recency_ij, R - 1)] + u * log(count_ij)

with s_ij the model's score, q_i the session vector, recency 0 for the last click, and
w, c, r (R values), u learned, all zero at the start (the model starts as it was). Items
outside the session keep their scores, so the loss stays a full softmax over the catalogue
and is exact without the (batch, M) logits:

    lse'_i = lse_i + log1p(sum_j exp(s_ij - lse_i) * expm1(b_ij)),    loss_i = lse'_i - score_i,target

(`biased_cross_entropy`: up to `ops.linear_cross_entropy.ROWS_MAX_ITEMS` items the bias goes into
the logits inside that op's fused "rows" pass, `sparse_biased_cross_entropy`, one pass as without
it; above, this correction of a chunked, differentiable lse_i, `row_logsumexp`; on the Triton backend
the same correction of the kernels' lse_i, `row_logsumexp_triton`). Ranking and top-k walk
the catalogue in column chunks as without it, each chunk's scores getting the entries of the session items in
its columns (`metrics.biased_ranks`, `metrics.biased_topk`).
`biased_cross_entropy_ref` and `metrics.dense_biased_scores` are the dense formulas the tests hold them to.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..metrics import biased_ranks, biased_topk, check_session_terms, dense_biased_scores
from ..ops.linear_cross_entropy import row_logsumexp, sparse_biased_cross_entropy

__all__ = ["RECENCY_BUCKETS", "session_items", "session_scores", "RepeatBias", "biased_cross_entropy",
           "corrected_cross_entropy", "biased_cross_entropy_ref",
           "dense_biased_scores", "biased_ranks", "biased_topk"]

RECENCY_BUCKETS = 10  # clicks since the item's last click: 0 (the last click), 1, ..., 9 and more


def session_items(items: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct items of each padded session (B, L) (left-aligned, 0 = padding):
    (ids (B, U), recency (B, U), count (B, U)), U the most distinct items of a row, rows
    padded with id 0 (recency 0, count 0). recency: clicks after the item's last click
    (0 = the last click); count: its clicks in the session. Rows list their items in
    increasing id order."""
    b, L = items.shape
    dev = items.device
    if b == 0 or L == 0:
        z = torch.zeros((b, 0), dtype=torch.long, device=dev)
        return z, z.clone(), z.clone()
    pos = torch.arange(L, device=dev)
    valid = (pos[None, :] < lengths[:, None]) & (items > 0)
    rows = torch.arange(b, device=dev)[:, None].expand(b, L)[valid]
    ids = items.long()[valid]
    rec = (lengths[:, None] - 1 - pos[None, :]).expand(b, L)[valid]
    key = rows * (int(ids.max()) + 1 if ids.numel() else 1) + ids
    uniq, inv, cnt = torch.unique(key, sorted=True, return_inverse=True, return_counts=True)
    n = uniq.numel()
    u_rec = torch.full((n,), L, dtype=torch.long, device=dev).scatter_reduce(0, inv, rec, reduce="amin")
    u_row = torch.zeros(n, dtype=torch.long, device=dev).scatter_reduce(0, inv, rows, reduce="amax",
                                                                        include_self=False)
    u_id = torch.zeros(n, dtype=torch.long, device=dev).scatter_reduce(0, inv, ids, reduce="amax", include_self=False)
    per_row = torch.bincount(u_row, minlength=b)
    width = int(per_row.max()) if n else 0
    start = torch.cumsum(per_row, 0) - per_row
    col = torch.arange(n, device=dev) - start[u_row]  # keys are sorted by row, then id
    out_id = torch.zeros((b, width), dtype=torch.long, device=dev)
    out_rec = torch.zeros_like(out_id)
    out_cnt = torch.zeros_like(out_id)
    out_id[u_row, col], out_rec[u_row, col], out_cnt[u_row, col] = u_id, u_rec, cnt
    return out_id, out_rec, out_cnt


class RepeatBias(nn.Module):
    """b_ij = w . q_i/|q_i| + c + r[min(recency_ij, R-1)] + u * log(count_ij) on the session's
    distinct items (0 on padding); every parameter starts at 0. With `identity` a learned weight
    v on a given per-item term z_ij (MTD's identity correction, `MTDConfig.repeat_identity`):
    b_ij + v * z_ij."""

    def __init__(self, dim: int, buckets: int = RECENCY_BUCKETS, identity: bool = False) -> None:
        super().__init__()
        # plain zero tensors, no nn.Linear: building one would draw from the RNG and shift the
        # initialisation of every later module against the same model without the bias
        self.gate = nn.Parameter(torch.zeros(dim))
        self.offset = nn.Parameter(torch.zeros(()))
        self.recency = nn.Parameter(torch.zeros(buckets))
        self.log_count = nn.Parameter(torch.zeros(()))
        # absent without the option, so models saved before it load unchanged
        self.identity = nn.Parameter(torch.zeros(())) if identity else None

    def reset_parameters(self) -> None:
        for p in self.parameters():
            nn.init.zeros_(p)

    def forward(self, q: torch.Tensor, ids: torch.Tensor, recency: torch.Tensor, count: torch.Tensor,
                z: Optional[torch.Tensor] = None) -> torch.Tensor:
        g = F.normalize(q, dim=1) @ self.gate + self.offset  # (B,)
        b = g[:, None] + self.recency[recency.clamp_max(self.recency.numel() - 1)] \
            + self.log_count * torch.log(count.clamp_min(1).to(q.dtype))
        if (z is None) != (self.identity is None):
            raise ValueError("RepeatBias: give the identity term z exactly when the bias was built with "
                             "identity=True")
        if z is not None:
            b = b + self.identity * z
        return torch.where(ids > 0, b, torch.zeros_like(b))


def session_scores(q: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """s_ij = q_i . table[ids_ij - 1] (B, U); padding columns read row 0 (masked by callers)."""
    return torch.einsum("bd,bud->bu", q, table[(ids - 1).clamp_min(0)])


def corrected_cross_entropy(lse: torch.Tensor, s: torch.Tensor, target: torch.Tensor, targets: torch.Tensor,
                            ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """Mean biased cross-entropy from the unbiased terms: lse (B,) over the catalogue, s (B, U)
    the session items' scores (`session_scores`), target (B,) the target's score; targets
    (B,) in 0..M-1, ids (B, U) distinct item ids (0 = padding), bias (B, U)."""
    valid = ids > 0
    p = torch.where(valid, torch.exp(s - lse[:, None]), torch.zeros_like(s))
    shift = (p * torch.expm1(bias)).sum(1)
    # shift > -sum(p) >= -1; the clamp only guards rounding when the session holds all the mass
    lse_b = lse + torch.log1p(shift.clamp_min(-1.0 + torch.finfo(lse.dtype).eps))
    hit = valid & (ids == (targets.long() + 1)[:, None])
    return (lse_b - target - (bias * hit).sum(1)).mean()


def biased_cross_entropy(q: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
                         bias: torch.Tensor, chunk_size: Optional[int] = None, triton: bool = False) -> torch.Tensor:
    """Mean cross-entropy of the logits q @ table.T plus `bias` at (row, ids - 1), exactly,
    without the (batch, M) logits. targets (batch,) in 0..M-1 (item id - 1); ids (batch, U)
    distinct item ids per row, 0 = padding; bias (batch, U). `triton`: the per-row
    log-sum-exp from the Triton kernels (`kernels.linear_cross_entropy.row_logsumexp_triton`,
    CUDA or the interpreter), corrected here, at every catalogue size."""
    check_session_terms(q, table, ids, bias)
    if triton:
        from ..kernels.linear_cross_entropy import row_logsumexp_triton

        lse = row_logsumexp_triton(q, table)
    else:
        fused = sparse_biased_cross_entropy(q, table, targets, ids, bias, chunk_size)
        if fused is not None:  # catalogues up to ROWS_MAX_ITEMS: the bias added inside the fused pass
            return fused
        lse = row_logsumexp(q, table, chunk_size)
    target = (q * table[targets.long()]).sum(1)
    return corrected_cross_entropy(lse, session_scores(q, table, ids), target, targets, ids, bias)


def biased_cross_entropy_ref(q: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor,
                             bias: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """The dense formula: `F.cross_entropy` of `dense_biased_scores`."""
    check_session_terms(q, table, ids, bias)
    return F.cross_entropy(dense_biased_scores(q, table, ids, bias), targets.long())
