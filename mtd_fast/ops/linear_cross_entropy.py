"""The `linear_cross_entropy` op: exact full-softmax cross-entropy over a catalogue without
the (batch, M) logits, with every implementation of it.

    linear_cross_entropy(q, item_table, targets) == F.cross_entropy(q @ item_table.T, targets)

q (batch, dim), item_table (M, dim), targets (batch,) integer class indices in [0, M);
the result is the mean over the batch, a 0-dim tensor of q's dtype. The models pass
`targets - 1` (item ids 1..M, row j of the table is item j + 1; id 0 is the padding id and
never a target). There is no `ignore_index`: every target must be a valid row.

Tests: tests/test_linear_cross_entropy.py. Benches: benches/bench_scoring.py (the op's bench:
CPU and GPU providers; its GPU timings run in benches/gpu_check.py) and
benches/large_catalogue.py (CPU, 1M items).

Backends (registered at the end of this module; `linear_cross_entropy(...)` dispatches):
- `linear_cross_entropy_ref`: the eager formula, the truth of the tests;
- `linear_cross_entropy_chunked` (CPU and CUDA, plain PyTorch), two strategies:
  * "rows" (the fused linear cross-entropy of Liger-Kernel, written here from its idea):
    the forward takes `rows` rows at a time, computes their full-width logits into one
    reused buffer, the softmax in place, the loss and both gradients in the same pass
    (`dq = G @ T`, `dT += G.T @ q`); the backward only scales the stored gradients.
    Three GEMMs of (batch x M x dim), as eager, but no (batch, M) tensor is ever
    allocated, and each chunk is walked while it is in cache.
  * "items": the catalogue in chunks of `cols` items. Forward: each chunk's logits for the
    whole batch, a running max / sum-of-exp per row (online logsumexp), the target
    logits; saves only the (batch,) log-sum-exps. Backward: recomputes each chunk's
    logits, `G = softmax - onehot`, `dq += G @ T_c`, `dT_c = G.T @ q`. Four GEMMs, but
    each table chunk is read from memory twice in all, where "rows" reads the whole table
    three times per row chunk.
- `mtd_fast.kernels.linear_cross_entropy.linear_cross_entropy_triton` (CUDA).

Which strategy (measured on the 2-core Xeon dev VM, 1 thread, CPU time of forward +
backward, batch 512, d = 100, min of 4-7 interleaved runs): at 43k items "rows" 120-135 ms,
"items" 146-148 ms, eager 287 ms; at 65,536 items rows 306-330 ms, items 305 ms; at 100k
rows 455 ms, items 371 ms; at 200k rows 966 ms, items 912 ms; at 1M rows 4.7 s, items
3.9 s. As the table (M x d fp32) outgrows the caches, "rows" pays for re-reading it per
row chunk, so `auto` uses "rows" up to `ROWS_MAX_ITEMS` items and "items" above.

`chunk_size` bounds the working buffer: at most `chunk_size` logits (rows x items) exist
at once (at least one full row or one full item column). When it is None it comes from
`ROWS_BUDGET_BYTES` / `ITEMS_BUDGET_BYTES`. Outside the buffer the extra memory is the
gradients themselves (dq (batch, dim) and dT (M, dim), which autograd needs anyway) and
O(batch) statistics. Half-precision inputs are supported (GEMMs in their dtype, softmax
statistics in fp32); the models train in fp32.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .common import triton_devices, triton_usable
from .dispatch import register, resolve

__all__ = ["linear_cross_entropy", "linear_cross_entropy_ref", "linear_cross_entropy_chunked", "check_inputs",
           "row_logsumexp", "check_lse_inputs", "sparse_biased_cross_entropy",
           "plan_chunks", "ROWS_BUDGET_BYTES", "ITEMS_BUDGET_BYTES", "ROWS_MAX_ITEMS"]

# Working buffer when chunk_size is None, per strategy. Measured at 43k items, batch 512,
# min of 7-8 interleaved runs: rows, 1 thread CPU time: 32-row chunks 137 ms, 64 (11 MB of
# fp32 logits) 120 ms, 129 (22 MB) 118 ms; 2 threads wall (OMP_WAIT_POLICY=PASSIVE): 64 rows
# 157 ms, 128 rows 141 ms, 256 rows 166 ms (eager 303 ms). items, 1 thread: 2,048-4,096-item
# chunks (4-8 MB) 146-148 ms; a 1-thread profile of the GEMMs and passes: 16,384-item chunks
# (32 MB) 1.3x the time of 4,096.
# A chunk that stays in the caches beats a bigger GEMM.
ROWS_BUDGET_BYTES = 24 << 20  # 145 rows at 43k items
ITEMS_BUDGET_BYTES = 8 << 20  # 4,096 items at batch 512
# "rows" up to this catalogue size, "items" above: the measured crossover (module docstring)
ROWS_MAX_ITEMS = 65_536
# fewer rows per chunk re-read the table more often (1 thread at 43k items: 32-row chunks
# 137 ms, 64 rows 120 ms); when a given chunk_size leaves fewer than this, use item chunks
MIN_ROWS = 16

_FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def linear_cross_entropy(q: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                         chunk_size: Optional[int] = None, backend=None) -> torch.Tensor:
    """Exactly `F.cross_entropy(q @ item_table.T, targets)` (the mean over the batch) without
    the full (batch, M) logits.

    q: (batch, dim); item_table: (M, dim), same dtype and device; targets: (batch,) integer
    indices into the table's rows, 0..M-1 (the models pass item id - 1). `chunk_size`: the
    most logits (rows x items) one chunk may hold; None: from a memory budget. Bad input
    (out-of-range targets, empty batch, mismatched dtypes or devices, chunk_size <= 0)
    raises naming the problem. Strategies and measurements: this module's docstring.
    """
    check_inputs(q, item_table, targets, chunk_size)
    fn = resolve("linear_cross_entropy", backend, q.device)
    return fn(q, item_table, targets, chunk_size=chunk_size)


def check_inputs(q: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                 chunk_size: Optional[int] = None) -> None:
    """Raise ValueError / TypeError naming the broken constraint. Target ranges are
    checked on the host for CPU tensors; on CUDA an asynchronous device assert does it
    (no synchronisation per step)."""
    if not isinstance(q, torch.Tensor) or not isinstance(item_table, torch.Tensor) \
            or not isinstance(targets, torch.Tensor):
        raise TypeError("linear_cross_entropy: q, item_table and targets must be tensors")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size <= 0):
        raise ValueError(f"linear_cross_entropy: chunk_size={chunk_size!r} must be a positive int "
                         "(the most logits one chunk may hold) or None")
    if q.dim() != 2 or item_table.dim() != 2:
        raise ValueError(f"linear_cross_entropy: q must be (batch, dim) and item_table (M, dim), got "
                         f"{tuple(q.shape)} and {tuple(item_table.shape)}")
    if q.shape[1] != item_table.shape[1]:
        raise ValueError(f"linear_cross_entropy: q has dim {q.shape[1]} but item_table has dim "
                         f"{item_table.shape[1]}")
    if targets.dim() != 1 or targets.shape[0] != q.shape[0]:
        raise ValueError(f"linear_cross_entropy: targets must be (batch={q.shape[0]},), got {tuple(targets.shape)}")
    if q.shape[0] == 0:
        raise ValueError("linear_cross_entropy: empty batch (batch = 0): the mean over no rows is undefined")
    if item_table.shape[0] == 0:
        raise ValueError("linear_cross_entropy: item_table has no rows (M = 0)")
    if q.dtype not in _FLOATS or item_table.dtype != q.dtype:
        raise TypeError(f"linear_cross_entropy: q and item_table must share one floating dtype, got "
                        f"{q.dtype} and {item_table.dtype}")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"linear_cross_entropy: targets must be integer class indices, got {targets.dtype}")
    if item_table.device != q.device or targets.device != q.device:
        raise ValueError(f"linear_cross_entropy: q, item_table and targets must be on one device, got "
                         f"{q.device}, {item_table.device}, {targets.device}")
    m = item_table.shape[0]
    if targets.device.type == "cpu":
        lo, hi = int(targets.min()), int(targets.max())
        if lo < 0 or hi >= m:
            bad = lo if lo < 0 else hi
            raise ValueError(f"linear_cross_entropy: target {bad} is out of range: targets index the "
                             f"{m} rows of item_table, 0..{m - 1}"
                             + (" (with the models' item ids, -1 is the padding id 0, never a target)"
                                if bad == -1 else ""))
    else:
        torch._assert_async(((targets >= 0) & (targets < m)).all(),
                            f"linear_cross_entropy: targets out of range 0..{m - 1}")


def linear_cross_entropy_ref(q: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                             chunk_size: Optional[int] = None) -> torch.Tensor:
    """The eager formula, with the full (batch, M) logits. `chunk_size` is accepted (and
    ignored) so every backend has one signature."""
    return F.cross_entropy(q @ item_table.t(), targets)


def plan_chunks(batch: int, n_items: int, chunk_size: Optional[int] = None, elem_bytes: int = 4,
                strategy: Optional[str] = None) -> tuple[str, int]:
    """(strategy, rows per chunk for "rows" / items per chunk for "items")."""
    if strategy not in (None, "rows", "items"):
        raise ValueError(f"unknown strategy {strategy!r}: use 'rows' or 'items'")
    rows_budget = chunk_size if chunk_size is not None else max(1, ROWS_BUDGET_BYTES // elem_bytes)
    rows = max(1, min(batch, rows_budget // n_items))
    if strategy is None:
        fits = rows >= min(MIN_ROWS, batch)
        strategy = "rows" if n_items <= ROWS_MAX_ITEMS and fits else "items"
    if strategy == "rows":
        return "rows", rows
    items_budget = chunk_size if chunk_size is not None else max(1, ITEMS_BUDGET_BYTES // elem_bytes)
    return "items", max(1, min(n_items, items_budget // batch))


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    # half types: the softmax statistics in fp32 (as F.cross_entropy's kernels accumulate)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _logits_into(buf: torch.Tensor, a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """buf <- a @ b_t without a new allocation when the dtypes allow it."""
    if buf.dtype == a.dtype:
        return torch.mm(a, b_t, out=buf)
    return buf.copy_(a @ b_t)


def _chunk_ranges(sorted_targets: torch.Tensor, starts: list[int], stops: list[int]) -> list[tuple[int, int]]:
    """For each chunk [start, stop) the slice of the target-sorted row order whose targets fall in it."""
    if not starts:
        return []
    bounds = torch.searchsorted(sorted_targets, torch.tensor(starts + [stops[-1]], device=sorted_targets.device))
    b = bounds.tolist()
    return list(zip(b[:-1], b[1:]))


# --------------------------------------------------------------------------------------------
# "rows": logits, softmax and both gradients in one forward pass
# --------------------------------------------------------------------------------------------
class _RowsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, table, targets, rows, ids=None, bias=None):
        """With `ids` (batch, U) distinct item rows + 1 per row (0 = none) and `bias` (batch, U):
        the logits of those items get the bias before the softmax (`sparse_biased_cross_entropy`)."""
        need_dq, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[5]
        b, m = q.shape[0], table.shape[0]
        wdt = _work_dtype(q.dtype)
        buf = torch.empty((min(rows, b), m), dtype=wdt, device=q.device)
        losses = torch.empty(b, dtype=wdt, device=q.device)
        dq = torch.empty_like(q) if need_dq else None
        dt = torch.zeros_like(table) if need_dt else None
        db = torch.zeros_like(bias) if need_db else None
        ar = torch.arange(min(rows, b), device=q.device)
        scale = 1.0 / b  # the mean; the upstream gradient is applied in backward
        table_t = table.t()
        for r0 in range(0, b, rows):
            r1 = min(b, r0 + rows)
            n = r1 - r0
            qs, tt, logits = q[r0:r1], targets[r0:r1], buf[:n]
            _logits_into(logits, qs, table_t)
            if bias is not None:  # the sparse bias, before anything reads the logits
                valid = ids[r0:r1] > 0
                rr, cc = ar[:n, None].expand_as(valid)[valid], ids[r0:r1][valid] - 1
                logits.index_put_((rr, cc), bias[r0:r1][valid].to(wdt), accumulate=True)
            xt = logits[ar[:n], tt]  # target logits, before the in-place softmax
            mx = logits.amax(1, keepdim=True)
            logits.sub_(mx).exp_()
            s = logits.sum(1, keepdim=True)
            torch.sub((mx + s.log()).squeeze(1), xt, out=losses[r0:r1])  # lse - x_t
            if need_dq or need_dt or need_db:
                g = logits.mul_(scale / s)  # softmax / batch
                g[ar[:n], tt] -= scale
                if need_db:  # d loss / d bias_ij is the gradient at its logit
                    db[r0:r1][valid] = g[rr, cc].to(db.dtype)
                g = g.to(q.dtype)
                if need_dq:
                    _logits_into(dq[r0:r1], g, table)
                if need_dt:
                    dt.addmm_(g.t(), qs)
        # saved, not kept on ctx: autograd releases saved tensors right after this node's
        # backward, so AccumulateGrad can take dT over without a copy (400 MB at 1M items)
        ctx.save_for_backward(dq, dt, db)
        return losses.sum().mul_(scale).to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.saved_tensors
        if not (grad.device.type == "cpu" and float(grad) == 1.0):  # else the usual case: the loss itself
            grads = [None if x is None else x * grad for x in grads]
        dq, dt, db = grads
        return dq, dt, None, None, None, db


# --------------------------------------------------------------------------------------------
# "items": online logsumexp over catalogue chunks, recompute in backward
# --------------------------------------------------------------------------------------------
def _items_pass(q, table, targets, cols, order, ranges, lse=None, grad_scale=None, need=(False, False)):
    """One sweep over the catalogue. Without `lse`: returns (lse, target logits) (batch,).
    With `lse`: returns (dq, dT) of mean-CE times grad_scale (None where not needed)."""
    b, m = q.shape[0], table.shape[0]
    wdt = _work_dtype(q.dtype)
    buf = torch.empty((b, min(cols, m)), dtype=wdt, device=q.device)
    forward = lse is None
    if forward:
        mx = torch.full((b,), -math.inf, dtype=wdt, device=q.device)
        s = torch.zeros(b, dtype=wdt, device=q.device)
        xt = torch.zeros(b, dtype=wdt, device=q.device)
    else:
        need_dq, need_dt = need
        dq_acc = torch.zeros((b, q.shape[1]), dtype=q.dtype, device=q.device) if need_dq else None
        dt = torch.empty_like(table) if need_dt else None
        q_scaled = (q * grad_scale).to(q.dtype) if need_dt else None  # the mean and upstream grad, folded in
        neg_lse = (-lse)[:, None]
    for ci, c0 in enumerate(range(0, m, cols)):
        c1 = min(m, c0 + cols)
        tc = table[c0:c1]
        logits = buf[:, :c1 - c0]
        _logits_into(logits, q, tc.t())
        lo, hi = ranges[ci]
        rows_in = order[lo:hi]  # rows whose target lies in this chunk
        if forward:
            if hi > lo:
                xt[rows_in] = logits[rows_in, targets[rows_in] - c0]
            m_new = torch.maximum(mx, logits.amax(1))
            logits.sub_(m_new[:, None]).exp_()
            s.mul_(torch.exp(mx - m_new)).add_(logits.sum(1))
            mx = m_new
        else:
            g = logits.add_(neg_lse).exp_()  # softmax of the chunk
            if hi > lo:
                g[rows_in, targets[rows_in] - c0] -= 1.0
            g = g.to(q.dtype)
            if need_dq:
                dq_acc.addmm_(g, tc)
            if need_dt:
                torch.mm(g.t(), q_scaled, out=dt[c0:c1])
    if forward:
        return mx + s.log(), xt
    return (dq_acc.mul_(grad_scale) if need_dq else None), dt


class _ItemsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, table, targets, cols):
        order, ranges = _target_ranges(targets, table.shape[0], cols)
        lse, xt = _items_pass(q, table, targets, cols, order, ranges)
        ctx.save_for_backward(q, table, targets, lse)
        ctx.cols, ctx.order, ctx.ranges = cols, order, ranges
        return (lse - xt).mean().to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, table, targets, lse = ctx.saved_tensors
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        if not any(need):
            return None, None, None, None
        scale = grad.to(_work_dtype(q.dtype)) / q.shape[0]
        dq, dt = _items_pass(q, table, targets, ctx.cols, ctx.order, ctx.ranges, lse=lse, grad_scale=scale,
                             need=need)
        return dq, dt, None, None


def _target_ranges(targets: torch.Tensor, m: int, cols: int):
    sorted_t, order = torch.sort(targets)
    starts = list(range(0, m, cols))
    return order, _chunk_ranges(sorted_t, starts, [min(m, c + cols) for c in starts])


def linear_cross_entropy_chunked(q: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                                 chunk_size: Optional[int] = None, strategy: Optional[str] = None) -> torch.Tensor:
    """Mean cross-entropy of the logits q @ item_table.T without materialising them.

    q (batch, dim), item_table (M, dim), targets (batch,) in [0, M). `strategy`: "rows",
    "items" or None (by catalogue size, see `plan_chunks`); tests and benches force it.
    """
    targets = targets.long()
    elem = torch.empty((), dtype=_work_dtype(q.dtype)).element_size()  # the buffer's dtype
    strategy, n = plan_chunks(q.shape[0], item_table.shape[0], chunk_size, elem, strategy)
    if strategy == "rows":
        return _RowsFunction.apply(q, item_table, targets, n)
    return _ItemsFunction.apply(q, item_table, targets, n)


# --------------------------------------------------------------------------------------------
# per-row log-sum-exp, differentiable, without the (batch, M) logits
# --------------------------------------------------------------------------------------------
class _RowLse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, table, cols):
        b, m = q.shape[0], table.shape[0]
        wdt = _work_dtype(q.dtype)
        buf = torch.empty((b, min(cols, m)), dtype=wdt, device=q.device)
        mx = torch.full((b,), -math.inf, dtype=wdt, device=q.device)
        s = torch.zeros(b, dtype=wdt, device=q.device)
        for c0 in range(0, m, cols):
            c1 = min(m, c0 + cols)
            logits = _logits_into(buf[:, :c1 - c0], q, table[c0:c1].t())
            m_new = torch.maximum(mx, logits.amax(1))
            logits.sub_(m_new[:, None]).exp_()
            s.mul_(torch.exp(mx - m_new)).add_(logits.sum(1))
            mx = m_new
        lse = mx + s.log()
        ctx.save_for_backward(q, table, lse)
        ctx.cols = cols
        return lse.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, table, lse = ctx.saved_tensors
        need_dq, need_dt = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        b, m, cols = q.shape[0], table.shape[0], ctx.cols
        wdt = _work_dtype(q.dtype)
        buf = torch.empty((b, min(cols, m)), dtype=wdt, device=q.device)
        dq = torch.zeros_like(q) if need_dq else None
        dt = torch.empty_like(table) if need_dt else None
        neg_lse, g_col = (-lse)[:, None], grad.to(wdt)[:, None]
        for c0 in range(0, m, cols):
            c1 = min(m, c0 + cols)
            tc = table[c0:c1]
            p = _logits_into(buf[:, :c1 - c0], q, tc.t()).add_(neg_lse).exp_().mul_(g_col).to(q.dtype)
            if need_dq:
                dq.addmm_(p, tc)
            if need_dt:
                torch.mm(p.t(), q, out=dt[c0:c1])
        return dq, dt, None


def sparse_biased_cross_entropy(q: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                                ids: torch.Tensor, bias: torch.Tensor,
                                chunk_size: Optional[int] = None) -> Optional[torch.Tensor]:
    """Mean cross-entropy of q @ item_table.T with `bias` (batch, U) added at (row, ids - 1)
    (ids: distinct item ids per row, 0 = padding), in the "rows" strategy's single pass; None
    when the plan is "items" (large catalogues: `models.repeat.biased_cross_entropy` then
    corrects a per-row log-sum-exp instead)."""
    elem = torch.empty((), dtype=_work_dtype(q.dtype)).element_size()
    strategy, n = plan_chunks(q.shape[0], item_table.shape[0], chunk_size, elem)
    if strategy != "rows":
        return None
    return _RowsFunction.apply(q, item_table, targets.long(), n, ids, bias)


def check_lse_inputs(q: torch.Tensor, item_table: torch.Tensor, who: str) -> None:
    """Raise ValueError naming the problem unless q is (batch, dim) and item_table (M >= 1,
    dim), of one dtype on one device."""
    if q.dim() != 2 or item_table.dim() != 2 or q.shape[1] != item_table.shape[1] or item_table.shape[0] == 0:
        raise ValueError(f"{who}: q must be (batch, dim) and item_table (M >= 1, dim), got "
                         f"{tuple(q.shape)} and {tuple(item_table.shape)}")
    if q.dtype != item_table.dtype or q.device != item_table.device:
        raise ValueError(f"{who}: q and item_table must share dtype and device")


def row_logsumexp(q: torch.Tensor, item_table: torch.Tensor, chunk_size: Optional[int] = None) -> torch.Tensor:
    """`torch.logsumexp(q @ item_table.T, dim=1)` (batch,), differentiable in q and the table,
    without the (batch, M) logits: an online log-sum-exp over catalogue chunks, recomputed in
    backward (the "items" strategy's sweeps). `chunk_size`: the most logits one chunk holds
    (None: ITEMS_BUDGET_BYTES). For losses that change a few logits per row (a sparse bias
    on the session's items) and need the rest of the softmax's normaliser exactly."""
    check_lse_inputs(q, item_table, "row_logsumexp")
    elem = torch.empty((), dtype=_work_dtype(q.dtype)).element_size()
    _, cols = plan_chunks(max(1, q.shape[0]), item_table.shape[0], chunk_size, elem, "items")
    return _RowLse.apply(q, item_table, cols)


# ---- backends: rank orders auto's preference (lower first); reference is the fallback -------
register("linear_cross_entropy", "reference", "mtd_fast.ops.linear_cross_entropy:linear_cross_entropy_ref", rank=100)
# chunked beats eager on the CPU at every catalogue size measured (benches/bench_scoring.py)
register("linear_cross_entropy", "chunked", "mtd_fast.ops.linear_cross_entropy:linear_cross_entropy_chunked",
         rank=50, auto_devices=("cpu", "cuda"))
register("linear_cross_entropy", "triton", "mtd_fast.kernels.linear_cross_entropy:linear_cross_entropy_triton",
         rank=0, auto_devices=("cuda",), devices=triton_devices, probe=triton_usable)
