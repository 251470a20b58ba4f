"""Exact full-softmax cross-entropy over an item table, without the (batch, M) logits, in Triton.

    loss = mean_i [ logsumexp_j (q_i . T_j) - q_i . T_{t_i} ]     (= F.cross_entropy(q @ T.T, t))

q (B, D), T (M, D), t (B,) in [0, M). The truth is
`mtd_fast.ops.linear_cross_entropy.linear_cross_entropy_ref`.

Design (no logits in memory at all: each tile lives in registers):
- forward, one launch: a grid of (row blocks of BLOCK_B rows) x (splits of the catalogue,
  TILES tiles of BLOCK_N items each). A program streams its tiles, computes the
  BLOCK_B x BLOCK_N logits (`tl.dot` over the dim in chunks of BLOCK_DK columns) and keeps a
  running max and sum of exp per row (online logsumexp), plus the target logit where the
  target falls in its tiles. It writes these three (B,) partials per split; PyTorch combines
  the splits (a (splits, B) logsumexp) into the per-row log-sum-exps, the only thing saved.
- backward, one launch: a grid over the catalogue, each program owning TILES item tiles.
  Per tile and row block it recomputes the logits, G = (softmax - onehot) * grad / B, and
  adds G^T q into its own rows of dT and G T into its own (B, D) partial of dq, both in
  global memory, one dim chunk at a time (fp32, no atomics: the rows of dT belong to one
  program, the dq partial is private; PyTorch sums the partials). Read-modify-write
  instead of register accumulators because fp32 `tl.dot` in "ieee" layouts costs far more
  registers than mma ones: whole 64 x 128 tiles spilled tens of KB per thread in the
  attention kernels (`aot` reports), dim chunks of 16 do not.
So the kernel does four (B x M x D) products (forward, recomputed logits, dT, dq), like the
"items" strategy of the chunked PyTorch backend, and needs O(B * splits) extra memory
besides the gradients.
- the per-row log-sum-exp (`row_logsumexp_triton`, differentiable): the same two kernels,
  with no targets (-1) and, in backward, one scale per row (ROW_SCALE: G = softmax * grad_i).
  The repeat bias's loss (`models.repeat.biased_cross_entropy`) corrects it for the bias on
  the session's items.

Loops have constexpr trip counts (TILES, ROW_BLOCKS, NUM_DCHUNKS): the interpreter (NumPy 2)
cannot loop to a runtime bound. TILES is a power of two chosen from M, ROW_BLOCKS =
cdiv(B, BLOCK_B): a new batch size or catalogue size compiles one more specialisation.

Numerics: logits, softmax and accumulators in fp32; bf16/fp16 inputs feed `tl.dot` as
they are; fp32 inputs use `input_precision="ieee"` unless
`torch.backends.cuda.matmul.allow_tf32` is set (then "tf32"), the switch that governs
PyTorch's own fp32 matmuls. float64 goes to the chunked PyTorch path (tl.dot has no fp64
path on every GPU); dim > MAX_DIM too.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from mtd_fast.ops.linear_cross_entropy import (
    check_inputs,
    check_lse_inputs,
    linear_cross_entropy_chunked,
    row_logsumexp,
)

from .common import AOT_DTYPES, aot_signature, check_device, dot_precision

__all__ = ["linear_cross_entropy_triton", "LinearCrossEntropyFunction", "RowLogSumExpFunction", "row_logsumexp_triton",
           "linear_cross_entropy_forward",
           "linear_cross_entropy_backward", "MAX_DIM", "TARGET_PROGRAMS", "uses_kernels", "aot_cases"]

MAX_DIM = 1024
# programs to aim for: a few per SM of an H100/H200 (132 SMs), so the splits of a small
# catalogue still fill the GPU (the tests lower it to reach the multi-tile loops on small cases)
TARGET_PROGRAMS = 528


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _lce_logits(Q, T, rows, cols, row_ok, col_ok, stride_qb, stride_qd, stride_tm, stride_td, D,
                BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DCHUNKS: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """logits[rows, cols] = Q[rows] . T[cols] (BLOCK_B x BLOCK_N, fp32), summed over dim chunks;
    zero where a row or column is out of range."""
    acc = tl.zeros([BLOCK_B, BLOCK_N], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_DK)
    for c in range(NUM_DCHUNKS):
        k = c * BLOCK_DK + offs_k
        k_ok = k < D
        qc = tl.load(Q + rows[:, None] * stride_qb + k[None, :] * stride_qd, mask=row_ok[:, None] & k_ok[None, :],
                     other=0.0)
        tc = tl.load(T + cols[:, None].to(tl.int64) * stride_tm + k[None, :] * stride_td,
                     mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc += tl.dot(qc, tl.trans(tc), input_precision=DOT_PRECISION)
    return acc


@triton.jit
def _lce_fwd_kernel(
    Q, T, TGT, M_PART, S_PART, XT_PART,
    stride_qb, stride_qd, stride_tm, stride_td,
    B, M, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DCHUNKS: tl.constexpr,
    TILES: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """Program (row block, split): running max / sum of exp / target logit of its rows over
    the split's TILES tiles. Partials are (splits, B) fp32."""
    pid_b = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
    row_ok = rows < B
    tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
    m_run = tl.full([BLOCK_B], float("-inf"), dtype=tl.float32)
    s_run = tl.zeros([BLOCK_B], dtype=tl.float32)
    xt = tl.zeros([BLOCK_B], dtype=tl.float32)
    for t in range(TILES):
        cols = (split * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        logits = _lce_logits(Q, T, rows, cols, row_ok, col_ok, stride_qb, stride_qd, stride_tm, stride_td, D,
                             BLOCK_B, BLOCK_N, BLOCK_DK, NUM_DCHUNKS, DOT_PRECISION)
        xt += tl.sum(tl.where(cols[None, :] == tgt[:, None], logits, 0.0), axis=1)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_run, tl.max(logits, axis=1))
        # a split's first tile always holds a valid column, so m_new is finite from there on
        # and exp(-inf - m_new) = 0 rescales the empty start
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_run = s_run * tl.exp(m_run - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
        m_run = m_new
    out = split * B + rows
    tl.store(M_PART + out, m_run, mask=row_ok)
    tl.store(S_PART + out, s_run, mask=row_ok)
    tl.store(XT_PART + out, xt, mask=row_ok)


@triton.jit
def _lce_bwd_kernel(
    Q, T, TGT, LSE, SCALE, DT, DQ_PART,
    stride_qb, stride_qd, stride_tm, stride_td,
    B, M, D,
    BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DCHUNKS: tl.constexpr,
    TILES: tl.constexpr, ROW_BLOCKS: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DT: tl.constexpr, ROW_SCALE: tl.constexpr,
):
    """Program p owns item tiles [p * TILES, (p + 1) * TILES). With G = (softmax - onehot) * scale:
    DT[cols] += G^T Q (DT fp32 (M, D), zero-initialised) and DQ_PART[p] += G T[cols]
    (DQ_PART fp32 (programs, B, D), zero-initialised). SCALE: one fp32 scalar (the mean's
    grad_output / B), or with ROW_SCALE one per row (B,) (the gradient of each row's
    log-sum-exp: `row_logsumexp_triton`, whose rows have no target, TGT = -1)."""
    pid = tl.program_id(0)
    if not ROW_SCALE:
        scale = tl.load(SCALE)  # grad_output / B, read on device (no host sync)
    offs_k = tl.arange(0, BLOCK_DK)
    dq_base = DQ_PART + pid.to(tl.int64) * B * D
    for t in range(TILES):
        cols = (pid * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < M
        for r in range(ROW_BLOCKS):
            rows = r * BLOCK_B + tl.arange(0, BLOCK_B)
            row_ok = rows < B
            logits = _lce_logits(Q, T, rows, cols, row_ok, col_ok, stride_qb, stride_qd, stride_tm, stride_td, D,
                                 BLOCK_B, BLOCK_N, BLOCK_DK, NUM_DCHUNKS, DOT_PRECISION)
            lse = tl.load(LSE + rows, mask=row_ok, other=float("inf"))  # padded rows: p = 0
            tgt = tl.load(TGT + rows, mask=row_ok, other=-1)
            p = tl.exp(logits - lse[:, None])
            g = tl.where(cols[None, :] == tgt[:, None], p - 1.0, p)
            if ROW_SCALE:
                g = g * tl.load(SCALE + rows, mask=row_ok, other=0.0)[:, None]
            else:
                g = g * scale
            g = tl.where(col_ok[None, :], g, 0.0)
            gq = g.to(Q.dtype.element_ty)
            for c in range(NUM_DCHUNKS):
                k = c * BLOCK_DK + offs_k
                k_ok = k < D
                if NEED_DT:
                    qc = tl.load(Q + rows[:, None] * stride_qb + k[None, :] * stride_qd,
                                 mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                    dt_ptr = DT + cols[:, None].to(tl.int64) * D + k[None, :]
                    dt_mask = col_ok[:, None] & k_ok[None, :]
                    acc = tl.load(dt_ptr, mask=dt_mask, other=0.0)
                    acc += tl.dot(tl.trans(gq), qc, input_precision=DOT_PRECISION)
                    tl.store(dt_ptr, acc, mask=dt_mask)
                if NEED_DQ:
                    tc = tl.load(T + cols[:, None].to(tl.int64) * stride_tm + k[None, :] * stride_td,
                                 mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    dq_ptr = dq_base + rows[:, None] * D + k[None, :]
                    dq_mask = row_ok[:, None] & k_ok[None, :]
                    acc = tl.load(dq_ptr, mask=dq_mask, other=0.0)
                    acc += tl.dot(gq, tc, input_precision=DOT_PRECISION)
                    tl.store(dq_ptr, acc, mask=dq_mask)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
# Block sizes from `ptxas -v` on sm_90a (`python -m mtd_fast.kernels.aot linear_cross_entropy`),
# not from timings (no GPU was at hand): dim chunks of 16 (fp32) / 32 (bf16), as in the
# attention kernels, keep the "ieee" fp32 dots free of spills.
def _blocks(dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_B, BLOCK_N, BLOCK_DK, NUM_DCHUNKS)."""
    block_dk = min(16 if dtype == torch.float32 else 32, max(16, triton.next_power_of_2(dim)))
    return 32, 64, block_dk, triton.cdiv(dim, block_dk)


def _num_warps(backward: bool = False, dtype: torch.dtype = torch.float32) -> int:
    return 8 if backward and dtype == torch.float32 else 4


def _tiles(n_tiles: int, other_programs: int) -> int:
    """Tiles per program (a power of two, so few specialisations): enough programs to fill
    the GPU (TARGET_PROGRAMS), then longer loops."""
    want = max(1, TARGET_PROGRAMS // max(1, other_programs))
    per = max(1, math.ceil(n_tiles / want))
    return triton.next_power_of_2(per)


def linear_cross_entropy_forward(q: torch.Tensor, table: torch.Tensor, targets: torch.Tensor):
    """Launch the forward kernel. Returns (lse (B,) fp32, target logits (B,) fp32)."""
    b, d = q.shape
    m = table.shape[0]
    bb, bn, bdk, nch = _blocks(d, q.dtype)
    row_blocks = triton.cdiv(b, bb)
    n_tiles = triton.cdiv(m, bn)
    tiles = _tiles(n_tiles, row_blocks)
    splits = triton.cdiv(n_tiles, tiles)
    dev = q.device
    m_part = torch.empty((splits, b), dtype=torch.float32, device=dev)
    s_part = torch.empty((splits, b), dtype=torch.float32, device=dev)
    xt_part = torch.empty((splits, b), dtype=torch.float32, device=dev)
    _lce_fwd_kernel[(row_blocks, splits)](
        q, table, targets, m_part, s_part, xt_part,
        *q.stride(), *table.stride(),
        b, m, d,
        BLOCK_B=bb, BLOCK_N=bn, BLOCK_DK=bdk, NUM_DCHUNKS=nch, TILES=tiles, DOT_PRECISION=dot_precision(q.dtype),
        num_warps=_num_warps(),
    )
    mx = m_part.amax(0)
    lse = mx + torch.log((s_part * torch.exp(m_part - mx[None, :])).sum(0))
    return lse, xt_part.sum(0)


def linear_cross_entropy_backward(grad: torch.Tensor, q: torch.Tensor, table: torch.Tensor, targets: torch.Tensor,
                                  lse: torch.Tensor, need=(True, True), per_row: bool = False):
    """Launch the backward kernel. Returns (dq, dT), None where `need` is False. `grad`: the
    gradient of the mean loss (a scalar), or with `per_row` of each row's log-sum-exp (B,)."""
    need_dq, need_dt = need
    if not (need_dq or need_dt):
        return None, None
    b, d = q.shape
    m = table.shape[0]
    bb, bn, bdk, nch = _blocks(d, q.dtype)
    n_tiles = triton.cdiv(m, bn)
    tiles = _tiles(n_tiles, 1)
    progs = triton.cdiv(n_tiles, tiles)
    dev = q.device
    if per_row:
        scale = grad.detach().to(device=dev, dtype=torch.float32).reshape(b).contiguous()
    else:
        scale = (grad.detach().to(device=dev, dtype=torch.float32) / b).reshape(1)
    dt = torch.zeros((m, d), dtype=torch.float32, device=dev) if need_dt else lse
    dq_part = torch.zeros((progs, b, d), dtype=torch.float32, device=dev) if need_dq else lse
    _lce_bwd_kernel[(progs,)](
        q, table, targets, lse, scale, dt, dq_part,
        *q.stride(), *table.stride(),
        b, m, d,
        BLOCK_B=bb, BLOCK_N=bn, BLOCK_DK=bdk, NUM_DCHUNKS=nch, TILES=tiles, ROW_BLOCKS=triton.cdiv(b, bb),
        DOT_PRECISION=dot_precision(q.dtype), NEED_DQ=need_dq, NEED_DT=need_dt, ROW_SCALE=per_row,
        num_warps=_num_warps(True, q.dtype),
    )
    dq = dq_part.sum(0).to(q.dtype) if need_dq else None
    return dq, (dt.to(table.dtype) if need_dt else None)


# --------------------------------------------------------------------------------------------
# autograd + public entry
# --------------------------------------------------------------------------------------------
class LinearCrossEntropyFunction(torch.autograd.Function):
    """Saves q, the table, the targets (inputs: no new memory) and the (B,) fp32 log-sum-exps."""

    @staticmethod
    def forward(ctx, q, table, targets):
        tgt = targets.to(torch.int64).contiguous()
        lse, xt = linear_cross_entropy_forward(q, table, tgt)
        ctx.save_for_backward(q, table, tgt, lse)
        return (lse - xt).mean().to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, table, tgt, lse = ctx.saved_tensors
        dq, dt = linear_cross_entropy_backward(grad, q, table, tgt, lse,
                                               (ctx.needs_input_grad[0], ctx.needs_input_grad[1]))
        return dq, dt, None


class RowLogSumExpFunction(torch.autograd.Function):
    """logsumexp(q @ T.T, dim=1) through the same kernels: the forward kernel with no targets
    (TGT = -1), the backward kernel with one scale per row (the upstream gradient of each
    row's log-sum-exp: G = softmax * grad_i). Saves q, the table and the (B,) fp32 lse."""

    @staticmethod
    def forward(ctx, q, table):
        tgt = torch.full((q.shape[0],), -1, dtype=torch.int64, device=q.device)
        lse, _ = linear_cross_entropy_forward(q, table, tgt)
        ctx.save_for_backward(q, table, tgt, lse)
        return lse.to(q.dtype)

    @staticmethod
    def backward(ctx, grad):
        q, table, tgt, lse = ctx.saved_tensors
        return linear_cross_entropy_backward(grad, q, table, tgt, lse,
                                             (ctx.needs_input_grad[0], ctx.needs_input_grad[1]), per_row=True)


def row_logsumexp_triton(q: torch.Tensor, item_table: torch.Tensor) -> torch.Tensor:
    """`torch.logsumexp(q @ item_table.T, dim=1)` (batch,), differentiable in both, without
    the (batch, M) logits: the Triton twin of `ops.linear_cross_entropy.row_logsumexp`, which
    runs instead for float64 and dim > MAX_DIM. The repeat bias's loss on this backend
    (`models.repeat.biased_cross_entropy`) corrects it for the session items' bias."""
    check_lse_inputs(q, item_table, "row_logsumexp_triton")
    check_device(q, "row_logsumexp_triton", "chunked")
    if not uses_kernels(q):
        return row_logsumexp(q, item_table)
    return RowLogSumExpFunction.apply(q, item_table)


def uses_kernels(q: torch.Tensor) -> bool:
    """False where the chunked PyTorch path runs instead: float64, dim > MAX_DIM."""
    return q.dtype != torch.float64 and q.shape[1] <= MAX_DIM


def linear_cross_entropy_triton(q: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                                chunk_size: Optional[int] = None) -> torch.Tensor:
    """Mean cross-entropy of q @ item_table.T; same signature and semantics as
    `linear_cross_entropy_ref`. q (batch, dim), item_table (M, dim), targets (batch,) in
    [0, M). `chunk_size` bounds only the chunked fallback's buffer: the kernels hold no
    logits in memory."""
    check_inputs(q, item_table, targets, chunk_size)
    check_device(q, "linear_cross_entropy_triton", "chunked")
    if not uses_kernels(q):
        return linear_cross_entropy_chunked(q, item_table, targets, chunk_size)
    return LinearCrossEntropyFunction.apply(q, item_table, targets)


def aot_cases(quick: bool = False):
    """The specialisations `mtd_fast.kernels.aot` compiles: (name, kernel, signature, constexprs, warps)."""
    f32 = ("M_PART", "S_PART", "XT_PART", "LSE", "SCALE", "DT", "DQ_PART")
    # (batch, M, dim): Diginetica at batch 512 (and its last, smaller batch), 1M items, odd dims
    shapes = ((512, 43097, 100),) if quick else ((512, 43097, 100), (217, 43097, 100), (512, 1_000_000, 100),
                                                 (512, 43097, 64), (64, 5000, 256), (3, 17, 8))
    for dt in ("fp32", "bf16"):
        tdt = AOT_DTYPES[dt]
        for b, m, d in shapes:
            bb, bn, bdk, nch = _blocks(d, tdt)
            n_tiles = triton.cdiv(m, bn)
            for bwd in (False, True):
                fn = _lce_bwd_kernel if bwd else _lce_fwd_kernel
                sig = aot_signature(fn, {"Q": f"*{dt}", "T": f"*{dt}", "TGT": "*i64", "B": "i32", "M": "i32",
                                      "D": "i32", **{a: "*fp32" for a in f32}})
                tiles = _tiles(n_tiles, 1 if bwd else triton.cdiv(b, bb))
                cx = {"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_DK": bdk, "NUM_DCHUNKS": nch, "TILES": tiles,
                      "DOT_PRECISION": os.environ.get("AOT_PREC", "ieee") if dt == "fp32" else "ieee"}
                name = f"lce_{'bwd' if bwd else 'fwd'} {dt} B={b} M={m} d={d}"
                if not bwd:
                    yield name, fn, sig, cx, _num_warps(bwd, tdt)
                    continue
                cx.update({"ROW_BLOCKS": triton.cdiv(b, bb), "NEED_DQ": True, "NEED_DT": True})
                # ROW_SCALE: the backward of row_logsumexp_triton (the repeat bias's loss), first shape only
                for row_scale in ((False, True) if (b, m, d) == shapes[0] else (False,)):
                    yield (name + (" row-scale" if row_scale else ""), fn, sig, {**cx, "ROW_SCALE": row_scale},
                           _num_warps(bwd, tdt))
