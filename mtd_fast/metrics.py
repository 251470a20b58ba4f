"""Full-ranking metrics of `MTD_SPEC.md` section 6, computed batch-wise on the score matrix.

rank = 1 + #(score > s_target) + #(score == s_target and id < target): ties never
flatter a model (a constant scorer gets the worst rank its id allows, not the best).
NaN never flatters either: a NaN item counts as ranked above the target, and a target
whose own score is NaN gets the worst rank, M (a diverged model scores 0, not 100).
P@K is the hit rate, MRR@K = 1/rank if rank <= K, NDCG@K = 1/log2(rank+1) if rank <= K;
all reported x100.

Models that score by a dot product (`score_parts`: queries q (B, d), table (M, d)) are
ranked without a (batch, M) score matrix: `ranks_from_parts` and `topk_from_parts` walk
the catalogue in chunks of columns and give the same integers as `ranks_from_scores` and
`topk_from_scores` on `q @ table.T`, bit for bit, ties included: a chunk's `q @ T_c.T`
holds exactly the bits of those columns of the full product (the GEMM's sum over d does
not depend on how many columns are asked for; checked by tests/test_ranking.py for
batches of 2 and more. One row is a matrix-vector product, whose bits already depend on
how many threads split the catalogue: with 2 threads 1 of 43,097 scores differs in its
last bit between the full product and its chunks, as it does between 1 and 2 threads).
A model with a term on its session's items (`MTDConfig.repeat_bias`) is ranked the same
way (`session=(ids, bias)`, `biased_ranks`, `biased_topk`): each chunk's scores get the
entries whose items fall in its columns, as `dense_biased_scores` adds them to the full
matrix.

Top-k order (`topk_from_scores`, `recommend`): NaN items first (as `torch.topk` puts
them), then score descending, ties by the smaller id, so position r of a recommendation
is the item whose rank above is r + 1 (finite scores). `torch.topk` alone breaks ties
arbitrarily (k = 1 over 50 equal scores returned id 34 on this CPU), so this order is
new, but deterministic: the same for every chunk size and batch composition.
"""
from __future__ import annotations

from typing import Iterable, Optional

import torch

__all__ = ["KS", "METRIC_KEYS", "ranks_from_scores", "ranks_from_parts", "topk_from_scores", "topk_from_parts",
           "batch_ranks", "MetricAccumulator", "better", "RANK_BUDGET_BYTES", "TOPK_BUDGET_BYTES",
           "dense_biased_scores", "biased_ranks", "biased_topk", "check_session_terms"]

# Score columns per chunk: this many bytes of fp32 scores. Measured at 43k items, 1 thread,
# CPU time: ranking a batch of 1024 took 196 / 202 / 548 / 613 ms with chunks of 4 / 8 / 16 /
# 32 MB (the full matrix: 767 ms); top-k of a batch of 512 took 126 ms with 4 MB chunks and
# 78 ms with 16 MB (fewer merges; `torch.topk` on the full scores: 112 ms).
RANK_BUDGET_BYTES = 8 << 20
TOPK_BUDGET_BYTES = 16 << 20

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


def _chunk_cols(batch: int, n_items: int, chunk_size: Optional[int], budget: int) -> int:
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0):
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (score columns per chunk) or None")
    cols = chunk_size if chunk_size is not None else budget // (4 * max(1, batch))
    return max(1, min(n_items, cols))


def _check_parts(q: torch.Tensor, table: torch.Tensor) -> None:
    if q.dim() != 2 or table.dim() != 2 or q.shape[1] != table.shape[1]:
        raise ValueError(f"q must be (batch, dim) and table (M, dim) with one dim, got {tuple(q.shape)} and "
                         f"{tuple(table.shape)}")
    if q.dtype != table.dtype or q.device != table.device:
        raise ValueError(f"q and table must share dtype and device, got {q.dtype}/{q.device} and "
                         f"{table.dtype}/{table.device}")
    if table.shape[0] == 0:
        raise ValueError("the table has no rows (M = 0)")


def _same(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Elementwise a == b, NaN equal to NaN."""
    return (a == b) | (torch.isnan(a) & torch.isnan(b))


def ranks_from_parts(q: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                     chunk_size: Optional[int] = None, session: Optional[tuple] = None) -> torch.Tensor:
    """`ranks_from_scores(q @ table.T, targets)` without the (batch, M) scores.

    q (batch, dim), table (M, dim), targets (batch,) ids in 1..M; chunk_size: score columns
    per chunk (None: from RANK_BUDGET_BYTES). Returns int64 ranks (batch,). One pass over the
    catalogue; the target's own score is taken from a (batch x batch) product of the same
    GEMM and checked against the pass's exact value when the pass reaches it; rows where
    the two differ in any bit (none seen for batches >= 2) are counted again in a second
    pass with the exact value.

    session: optional (ids, bias), both (batch, U): a sparse term added to the scores of
    each row's session items (ids 1..M, 0 = padding), as `dense_biased_scores` adds it;
    each chunk gets the entries that fall in its columns, so the ranks are those of the
    biased scores, still without a (batch, M) tensor.
    """
    _check_parts(q, table)
    b, m = q.shape[0], table.shape[0]
    col = (targets - 1).long()
    if b == 0:
        return torch.zeros(0, dtype=torch.long, device=q.device)
    if q.device.type == "cpu" and (int(col.min()) < 0 or int(col.max()) >= m):
        raise ValueError(f"targets must be item ids in 1..{m}, got {int(col.min()) + 1}..{int(col.max()) + 1}")
    entries = _session_entries(q, table, session)
    cols = _chunk_cols(b, m, chunk_size, RANK_BUDGET_BYTES)
    s_t = _target_scores(q, table, col)
    if session is not None:  # an estimate like the unbiased one: checked against the pass
        ids, bias = session
        s_t = s_t + torch.where(ids == targets[:, None], bias.to(s_t.dtype), 0).sum(1)
    exact = s_t.clone()
    greater, ties = _count_pass(q, table, col, s_t, cols, exact, entries)
    redo = ~_same(exact, s_t)
    if bool(redo.any()):
        g2, t2 = _count_pass(q, table, col, exact, cols, None, entries)
        greater = torch.where(redo, g2, greater)
        ties = torch.where(redo, t2, ties)
    return (1 + greater + ties).clamp_max(m)


def _session_entries(q: torch.Tensor, table: torch.Tensor, session: Optional[tuple]):
    """The sparse term of `session` = (ids, bias) as (rows, columns, values) sorted by column
    (stably: entries of one (row, item) keep their order), or None."""
    if session is None:
        return None
    ids, bias = session
    check_session_terms(q, table, ids, bias)
    rows, pos = (ids > 0).nonzero(as_tuple=True)
    cols = ids[rows, pos].long() - 1
    cols, order = torch.sort(cols, stable=True)
    return rows[order], cols, bias[rows, pos][order].to(q.dtype)


def _mm_chunk(q, table, c0, c1, buf, entries):
    """Scores of columns c0..c1-1 into buf, with the session entries of those columns added."""
    sc = torch.mm(q, table[c0:c1].t(), out=buf[:, :c1 - c0])
    if entries is not None:
        rows, cols, vals = entries
        lo, hi = torch.searchsorted(cols, torch.tensor([c0, c1], device=cols.device)).tolist()
        if hi > lo:
            sc.index_put_((rows[lo:hi], cols[lo:hi] - c0), vals[lo:hi], accumulate=True)
    return sc


def _count_pass(q, table, col, s_t, cols, exact_out, entries=None):
    """Per row: #(score > s_t or NaN), #(score == s_t and id < target). With `exact_out`,
    also writes each target's score as the pass computes it."""
    b, m = q.shape[0], table.shape[0]
    buf = torch.empty((b, cols), dtype=q.dtype, device=q.device)
    greater = torch.zeros(b, dtype=torch.long, device=q.device)
    ties = torch.zeros(b, dtype=torch.long, device=q.device)
    st = s_t[:, None]
    for c0 in range(0, m, cols):
        c1 = min(m, c0 + cols)
        sc = _mm_chunk(q, table, c0, c1, buf, entries)
        # counts summed in int32 (a chunk has < 2**31 columns): a bool sum defaults to int64,
        # a cast of the whole chunk that took longer than the comparison itself
        greater += (c1 - c0) - (sc <= st).sum(1, dtype=torch.int32)  # NaN scores are not <= anything: above
        eq = sc == st
        # ids below the target: the whole chunk for targets past it, a prefix where it straddles
        ties += torch.where(col >= c1, eq.sum(1, dtype=torch.int32), 0)
        inside = ((col >= c0) & (col < c1)).nonzero().squeeze(1)
        if inside.numel():
            rel = col[inside] - c0
            ids = torch.arange(c1 - c0, device=q.device)
            ties[inside] += (eq[inside] & (ids[None, :] < rel[:, None])).sum(1)
            if exact_out is not None:
                exact_out[inside] = sc[inside, rel]
    return greater, ties


def _target_scores(q: torch.Tensor, table: torch.Tensor, col: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """q_i . table[col_i] (batch,) as the diagonal of (rows x rows) GEMMs, blocks of at most
    `block` rows (the last one overlapping the previous so it never shrinks to one row,
    where a dot product would round differently from the GEMM)."""
    b = q.shape[0]
    out = torch.empty(b, dtype=q.dtype, device=q.device)
    for r0 in range(0, b, block):
        r0 = max(0, min(r0, b - block))
        r1 = min(b, r0 + block)
        out[r0:r1] = (q[r0:r1] @ table[col[r0:r1]].t()).diagonal()
    return out


def topk_from_scores(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Column indices (batch, k) of the k best scores, best first: NaN first, then score
    descending, ties by the smaller column (see the module docstring)."""
    return _topk_sorted(scores, k, 0)[1]


def topk_from_parts(q: torch.Tensor, table: torch.Tensor, k: int, chunk_size: Optional[int] = None,
                    session: Optional[tuple] = None) -> torch.Tensor:
    """`topk_from_scores(q @ table.T, k)` without the (batch, M) scores: a running top-k
    merged across chunks of columns. Returns int64 column indices (batch, k). session:
    optional (ids, bias) added to the session items' scores (`ranks_from_parts`)."""
    _check_parts(q, table)
    entries = _session_entries(q, table, session)
    b, m = q.shape[0], table.shape[0]
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= m:
        raise ValueError(f"k={k!r} must be an int in [1, M={m}]")
    cols = max(_chunk_cols(b, m, chunk_size, TOPK_BUDGET_BYTES), min(k, m))
    buf = torch.empty((b, cols), dtype=q.dtype, device=q.device)
    best_v = best_i = None
    for c0 in range(0, m, cols):
        c1 = min(m, c0 + cols)
        sc = _mm_chunk(q, table, c0, c1, buf, entries)
        v, i = _topk_sorted(sc, k, c0)
        if best_v is None:
            best_v, best_i = v, i
            continue
        # every running id is smaller than every id of this chunk, so a stable sort of
        # [running, chunk] keeps "smaller id first" among equal scores
        v = torch.cat([best_v, v], 1)
        i = torch.cat([best_i, i], 1)
        v, order = torch.sort(v, dim=1, descending=True, stable=True)
        best_v, best_i = v[:, :k], i.gather(1, order[:, :k])
    return best_i


# Columns per group of the top-k prefilter: the k best columns lie in the k groups with the
# best maxima whenever the k-th group maximum is strictly above the (k+1)-th, so topk runs
# over n / 16 group maxima and k * 16 candidates instead of n columns. Measured (1 thread,
# batch 512, a chunk of 8,192 columns, k = 20): plain topk 15.1 ms; group maxima 3.3 +
# their topk 3.3 + the candidates' exact top-k 2.3 ms.
_GROUP = 16


def _topk_sorted(sc: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The min(k, n) best of sc (batch, n), as (values, offset + column), in the top-k order."""
    b, n = sc.shape
    kk = min(k, n)
    if kk == n:
        v, i = sc, torch.arange(n, device=sc.device).expand(b, n)
    else:
        v, i = None, None
        ng = n // _GROUP
        if ng >= 4 * (kk + 1) and sc.is_floating_point():  # (max_pool1d has no integer kernels)
            # (B, ng) group maxima, NaN where a member is NaN; max_pool1d: 3.3 ms where amax
            # over a trailing dim of 16 took 6.3 (1 thread, 512 x 8192)
            gm = torch.nn.functional.max_pool1d(sc[:, :ng * _GROUP].unsqueeze(1), _GROUP).squeeze(1)
            gv, gi = gm.topk(kk + 1, dim=1)
            cols = (gi[:, :kk, None] * _GROUP + torch.arange(_GROUP, device=sc.device)).reshape(b, kk * _GROUP)
            cols = torch.cat([cols, torch.arange(ng * _GROUP, n, device=sc.device).expand(b, n - ng * _GROUP)], 1)
            v, i = _exact_topk(sc.gather(1, cols), cols, kk)
            loose = _same(gv[:, kk], gv[:, kk - 1])  # a tie of group maxima at the cut: no guarantee
            if bool(loose.any()):
                rows = loose.nonzero().flatten()
                v[rows], i[rows] = _exact_topk(sc[rows], None, kk)
        else:
            v, i = _exact_topk(sc, None, kk)
    # order: column ascending, then a stable sort by value descending (NaN first)
    i, o = torch.sort(i, dim=1)
    v = v.gather(1, o)
    v, o = torch.sort(v, dim=1, descending=True, stable=True)
    return v, i.gather(1, o) + offset


def _exact_topk(vals: torch.Tensor, ids: Optional[torch.Tensor], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k best of vals (batch, n > k) under the top-k order, as (values, ids) unordered;
    ids (batch, n) are the columns' ids (None: 0..n-1)."""
    # k + 1 values: where the (k+1)-th equals the k-th, a tie crosses the cut and topk may
    # have kept any of the tied columns; those rows are redone by the smaller-id rule
    tv, tp = vals.topk(k + 1, dim=1)
    cross = _same(tv[:, k], tv[:, k - 1])
    v, p = tv[:, :k].clone(), tp[:, :k]
    i = p.clone() if ids is None else ids.gather(1, p)
    for r in cross.nonzero().flatten().tolist():
        row_ids = ids[r] if ids is not None else torch.arange(vals.shape[1], device=vals.device)
        v[r], i[r] = _row_topk_ties(vals[r], row_ids, v[r, k - 1], k)
    return v, i


def _row_topk_ties(row: torch.Tensor, ids: torch.Tensor, thr: torch.Tensor,
                   k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of one row whose k-th value `thr` is tied beyond the cut: everything
    strictly better than thr, then the tied entries with the smallest ids."""
    tied = _same(row, thr.expand_as(row))
    better = (~tied & ~(row <= thr) & ~torch.isnan(thr)).nonzero().flatten()  # strictly above thr (NaN above)
    tied_pos = tied.nonzero().flatten()
    tied_pos = tied_pos[torch.argsort(ids[tied_pos])][:k - better.numel()]
    pos = torch.cat([better, tied_pos])
    return row[pos], ids[pos]


def batch_ranks(model, batch, targets: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """Ranks (batch,) of `targets` (ids 1..M) under `model` for one prepared batch: through
    `score_parts` in chunks when the model has it, else on its full `scores`."""
    if getattr(model, "has_score_parts", False):
        q, table, extra = model.score_terms(batch)
        if extra is not None:
            return biased_ranks(q, table, targets, *extra)
        return ranks_from_parts(q, table, targets, chunk_size)
    return ranks_from_scores(model.scores(batch), targets)


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


# ---- scores plus a sparse term on each row's session items (MTDConfig.repeat_bias) ----------
def check_session_terms(q: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> None:
    """(batch, U) session item ids (0 = padding, else 1..M) and a bias of the same shape."""
    if ids.shape != bias.shape or ids.dim() != 2 or ids.shape[0] != q.shape[0]:
        raise ValueError(f"session ids and bias must both be (batch={q.shape[0]}, U), got {tuple(ids.shape)} "
                         f"and {tuple(bias.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > table.shape[0]):
        raise ValueError(f"session ids must be item ids 1..{table.shape[0]} or 0 (padding)")


def dense_biased_scores(q: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """The (batch, M) scores q @ table.T with `bias` (batch, U) added at (row, ids - 1): the
    scores of a model with a sparse term on the session's items (`models.repeat`)."""
    scores = q @ table.t()
    valid = ids > 0
    rows = torch.arange(q.shape[0], device=q.device)[:, None].expand_as(ids)
    return scores.index_put((rows[valid], ids[valid] - 1), bias[valid].to(scores.dtype), accumulate=True)


def biased_ranks(q: torch.Tensor, table: torch.Tensor, targets: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor,
                 chunk_size: Optional[int] = None) -> torch.Tensor:
    """`ranks_from_scores(dense_biased_scores(...), targets)` (targets are item ids 1..M) in
    chunks of `chunk_size` columns (None: RANK_BUDGET_BYTES of scores): `ranks_from_parts`
    with the session term."""
    return ranks_from_parts(q, table, targets, chunk_size, session=(ids, bias))


def biased_topk(q: torch.Tensor, table: torch.Tensor, ids: torch.Tensor, bias: torch.Tensor, k: int,
                chunk_size: Optional[int] = None) -> torch.Tensor:
    """`topk_from_scores(dense_biased_scores(...), k)` in chunks of `chunk_size` columns."""
    return topk_from_parts(q, table, k, chunk_size, session=(ids, bias))
