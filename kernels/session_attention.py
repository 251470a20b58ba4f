"""Fused session self-attention (MTD_SPEC.md section 2, step 2) in Triton: forward and backward.

The op: causal, key-padded scaled dot-product attention over left-aligned sessions,
heads splitting the last dimension, scale 1/sqrt(dim/num_heads), rows of padded queries
exactly zero, and an optional external dropout mask (batch, heads, seq_len, seq_len),
already scaled by 1/(1-p), multiplied into the weights after the softmax. The truth is
`mtd_fast.ops.session_attention.session_attention_ref`; this file computes the same function.

Design (whole rows on chip, seq_len <= MAX_FUSED_LEN = 128): one program per (session,
head) holds the session's whole BLOCK_L x BLOCK_L score matrix (BLOCK_L = next power of two
>= seq_len, at least 16), so the softmax is exact in one pass and the backward is one
kernel with neither atomics nor a second pass. Q, K, V, dO are streamed through the head
dimension in chunks of BLOCK_DK columns (16 for fp32, 32 for bf16/fp16; head dim 100 ->
7 x 16 or 4 x 32), so only one chunk of each is live: whole 64 x 128 fp32 tiles spilled
tens of KB per thread on sm_90 (see _blocks). Rows past the session are never loaded.
Diginetica batches pad to 20-70, so this covers every batch of the paper's main data.

Longer sessions (seq_len > MAX_FUSED_LEN = 128; Retailrocket batches pad to about 164,
Yoochoose 1/64 sometimes to 145) run the tiled kernels of `session_attention_tiled`
(flash-attention style); `session_attention_triton` here is the entry point of both.
Sent to the reference path (plain PyTorch autograd, same function):
- head_dim > MAX_FUSED_HEAD_DIM (128) (MTD uses 100 / heads);
- float64 inputs (tl.dot has no fp64 path on every GPU; gradcheck uses this route).

Numerics: logits and softmax in fp32 (exp2 with log2(e) folded into the scale); bf16/fp16
inputs feed tl.dot as they are, with fp32 accumulation; the softmax weights and dS are
cast to the input dtype before their dots (as flash-attention does). fp32 inputs use
`input_precision="ieee"` unless `torch.backends.cuda.matmul.allow_tf32` is set (then
"tf32"): the kernels follow the switch that governs PyTorch's own fp32 matmuls.

What backward saves: q, k, v, lengths and the dropout mask (all inputs, no new memory);
the softmax is recomputed (one extra QK^T per program, cheaper than storing B*h*L*L
weights or reading them back). The tiled path also keeps the output and the log-sum-exps
(batch, heads, seq_len) fp32, and computes delta = rowsum(dO * O) in PyTorch. No gradient
is produced for `dropout_mask` (it is a sampled constant) nor `lengths`.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from mtd_fast.ops.session_attention import session_attention_ref

from .common import (
    AOT_DTYPES,
    LOG2E,
    aot_signature,
    attention_arg_types,
    check_device,
    dot_precision,
    dropout_ptrs,
    lengths_i32,
    mask_args,
)
from .session_attention_tiled import session_attention_backward_tiled, session_attention_forward_tiled

__all__ = ["session_attention_triton", "SessionAttentionFunction", "session_attention_forward",
           "session_attention_backward", "MAX_FUSED_LEN", "MAX_FUSED_HEAD_DIM", "uses_fused_path", "aot_cases"]

MAX_FUSED_LEN = 128
MAX_FUSED_HEAD_DIM = 128


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _session_attention_scores(Q, K, q_off, k_off, offs_l, offs_c, seq_len, HEAD_DIM,
                              stride_ql, stride_qd, stride_kl, stride_kd,
                              BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DCHUNKS: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    """S = Q K^T (BLOCK_L x BLOCK_L, fp32) summed over head-dim chunks of BLOCK_DK columns:
    only one Q and one K chunk is live at a time (whole 64 x 128 fp32 tiles spilled on sm_90)."""
    row_ok = offs_l[:, None] < seq_len
    s = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    for c in range(NUM_DCHUNKS):
        cols = c * BLOCK_DK + offs_c
        ld = row_ok & (cols < HEAD_DIM)[None, :]
        q = tl.load(Q + q_off + offs_l[:, None] * stride_ql + cols[None, :] * stride_qd, mask=ld, other=0.0)
        k = tl.load(K + k_off + offs_l[:, None] * stride_kl + cols[None, :] * stride_kd, mask=ld, other=0.0)
        s += tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    return s


@triton.jit
def _session_attention_probs(s, seq_len, offs_l, dm_ptrs, qk_scale, HAS_DROPOUT: tl.constexpr):
    """Softmax weights P (fp32, zero on masked entries and padded query rows), P * mask, mask."""
    s = s * qk_scale  # log2 domain
    # query i may see key j iff j <= i < seq_len (left-aligned, so j < seq_len follows)
    allowed = (offs_l[None, :] <= offs_l[:, None]) & (offs_l[:, None] < seq_len)
    s = tl.where(allowed, s, float("-inf"))
    row_max = tl.max(s, axis=1)
    row_valid = offs_l < seq_len
    row_max = tl.where(row_valid, row_max, 0.0)  # padded rows: avoid -inf - -inf
    p = tl.where(allowed, tl.exp2(s - row_max[:, None]), 0.0)
    denom = tl.sum(p, axis=1)
    inv = tl.where(row_valid, 1.0 / tl.where(row_valid, denom, 1.0), 0.0)
    p = p * inv[:, None]
    if HAS_DROPOUT:
        dm = tl.load(dm_ptrs, mask=allowed, other=0.0).to(tl.float32)
        p_drop = p * dm
    else:
        dm = p  # unused
        p_drop = p
    return p, p_drop, dm


@triton.jit
def _session_attention_fwd_kernel(
    Q, K, V, LENS, DMASK, O,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    stride_ob, stride_ol, stride_od,
    L, HEAD_DIM, qk_scale,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DCHUNKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = one (session, head): O[b, :, head] = (softmax(mask(Q K^T * scale)) * M) V."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    seq_len = tl.minimum(tl.load(LENS + pid_b).to(tl.int32), L)
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_DK)
    head = pid_h * HEAD_DIM
    # only the session's own rows are read: padded rows never influence valid ones
    s = _session_attention_scores(Q, K, pid_b * stride_qb + head * stride_qd, pid_b * stride_kb + head * stride_kd,
                                  offs_l, offs_c, seq_len, HEAD_DIM, stride_ql, stride_qd, stride_kl, stride_kd,
                                  BLOCK_L, BLOCK_DK, NUM_DCHUNKS, DOT_PRECISION)
    dm_ptrs = dropout_ptrs(DMASK, pid_b, pid_h, offs_l, offs_l, stride_mb, stride_mh, stride_mi, stride_mj)
    p, p_drop, dm = _session_attention_probs(s, seq_len, offs_l, dm_ptrs, qk_scale, HAS_DROPOUT)
    p_drop = p_drop.to(V.dtype.element_ty)
    v_base = V + pid_b * stride_vb + head * stride_vd
    o_base = O + pid_b * stride_ob + head * stride_od
    for c in range(NUM_DCHUNKS):
        cols = c * BLOCK_DK + offs_c
        col_ok = (cols < HEAD_DIM)[None, :]
        v = tl.load(v_base + offs_l[:, None] * stride_vl + cols[None, :] * stride_vd,
                    mask=(offs_l[:, None] < seq_len) & col_ok, other=0.0)
        o = tl.dot(p_drop, v, input_precision=DOT_PRECISION)  # zero on padded query rows
        tl.store(o_base + offs_l[:, None] * stride_ol + cols[None, :] * stride_od, o.to(O.dtype.element_ty),
                 mask=(offs_l[:, None] < L) & col_ok)


@triton.jit
def _session_attention_bwd_kernel(
    Q, K, V, LENS, DMASK, DO, DQ, DK, DV,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    stride_dob, stride_dol, stride_dod,
    stride_gb, stride_gl, stride_gd,  # shared by DQ, DK, DV (allocated alike)
    L, HEAD_DIM, qk_scale, sm_scale,
    BLOCK_L: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DCHUNKS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    NEED_DQ: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    """One program = one (session, head). With P the softmax weights and Pd = P * M:
    dV = Pd^T dO; dP = (dO V^T) * M; dS = P * (dP - rowsum(P * dP)) * scale; dQ = dS K; dK = dS^T Q.
    Rows >= seq_len of dQ, dK, dV are written as zeros."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    seq_len = tl.minimum(tl.load(LENS + pid_b).to(tl.int32), L)
    offs_l = tl.arange(0, BLOCK_L)
    offs_c = tl.arange(0, BLOCK_DK)
    head = pid_h * HEAD_DIM
    row_ld = offs_l[:, None] < seq_len
    row_st = offs_l[:, None] < L
    s = _session_attention_scores(Q, K, pid_b * stride_qb + head * stride_qd, pid_b * stride_kb + head * stride_kd,
                                  offs_l, offs_c, seq_len, HEAD_DIM, stride_ql, stride_qd, stride_kl, stride_kd,
                                  BLOCK_L, BLOCK_DK, NUM_DCHUNKS, DOT_PRECISION)
    dm_ptrs = dropout_ptrs(DMASK, pid_b, pid_h, offs_l, offs_l, stride_mb, stride_mh, stride_mi, stride_mj)
    p, p_drop, dm = _session_attention_probs(s, seq_len, offs_l, dm_ptrs, qk_scale, HAS_DROPOUT)
    p_drop_t = tl.trans(p_drop.to(DO.dtype.element_ty))
    do_base = DO + pid_b * stride_dob + head * stride_dod
    v_base = V + pid_b * stride_vb + head * stride_vd
    g_base = pid_b * stride_gb + head * stride_gd
    # pass 1 over head-dim chunks: dV chunk by chunk, and dPd = dO V^T accumulated
    dp = tl.zeros([BLOCK_L, BLOCK_L], dtype=tl.float32)
    for c in range(NUM_DCHUNKS):
        cols = c * BLOCK_DK + offs_c
        col_ok = (cols < HEAD_DIM)[None, :]
        do = tl.load(do_base + offs_l[:, None] * stride_dol + cols[None, :] * stride_dod, mask=row_ld & col_ok,
                     other=0.0)
        if NEED_DV:
            dv = tl.dot(p_drop_t, do, input_precision=DOT_PRECISION)
            tl.store(DV + g_base + offs_l[:, None] * stride_gl + cols[None, :] * stride_gd,
                     dv.to(DV.dtype.element_ty), mask=row_st & col_ok)
        if NEED_DQ or NEED_DK:
            v = tl.load(v_base + offs_l[:, None] * stride_vl + cols[None, :] * stride_vd, mask=row_ld & col_ok,
                        other=0.0)
            dp += tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if NEED_DQ or NEED_DK:
        if HAS_DROPOUT:
            dp = dp * dm  # (re-reading the mask here instead measured more spills, not fewer)
        delta = tl.sum(p * dp, axis=1)  # = rowsum(dO * O): the softmax Jacobian's rank-1 term
        ds = (p * (dp - delta[:, None]) * sm_scale).to(Q.dtype.element_ty)  # zero off the mask
        ds_t = tl.trans(ds)
        q_base = Q + pid_b * stride_qb + head * stride_qd
        k_base = K + pid_b * stride_kb + head * stride_kd
        # pass 2: dQ = dS K and dK = dS^T Q, chunk by chunk
        for c in range(NUM_DCHUNKS):
            cols = c * BLOCK_DK + offs_c
            col_ok = (cols < HEAD_DIM)[None, :]
            g_ptr = g_base + offs_l[:, None] * stride_gl + cols[None, :] * stride_gd
            if NEED_DQ:
                k = tl.load(k_base + offs_l[:, None] * stride_kl + cols[None, :] * stride_kd, mask=row_ld & col_ok,
                            other=0.0)
                dq = tl.dot(ds, k, input_precision=DOT_PRECISION)
                tl.store(DQ + g_ptr, dq.to(DQ.dtype.element_ty), mask=row_st & col_ok)
            if NEED_DK:
                q = tl.load(q_base + offs_l[:, None] * stride_ql + cols[None, :] * stride_qd, mask=row_ld & col_ok,
                            other=0.0)
                dk = tl.dot(ds_t, q, input_precision=DOT_PRECISION)
                tl.store(DK + g_ptr, dk.to(DK.dtype.element_ty), mask=row_st & col_ok)


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
# Block sizes and warps come from `ptxas -v` on sm_90a (`python -m mtd_fast.kernels.aot`),
# not from timings (no GPU was at hand). Not autotuned: @triton.autotune with several
# configs fails under the interpreter the tests use. Measured (L = 50, head dim 100, dropout):
# - fp32 runs tl.dot in "ieee" (FMA) layouts, which cost far more registers than mma:
#   whole 64 x 128 Q/K/V tiles spilled 30-80 KB per thread; head-dim chunks of 32 cut the
#   backward to 300 B of spill at 8 warps, chunks of 16 to 16-32 B (forward: none).
# - bf16 / fp16 with chunks of 32: no spill (forward 4 warps 122 regs, backward 8 warps 138).
# - L = 128 (the whole-row limit): fp32 backward still spills about 2 KB per thread at 16
#   warps; bf16 backward 48 B at 8 warps. Correct, just slower; longer sessions are tiled.
def _blocks(seq_len: int, head_dim: int, dtype: torch.dtype = torch.float32) -> tuple[int, int, int]:
    """(BLOCK_L, BLOCK_DK, NUM_DCHUNKS): tl.dot needs every dimension >= 16 and blocks are
    powers of two; the head dim is walked in chunks of BLOCK_DK (fp32 100 -> 7 x 16, bf16 4 x 32)."""
    block_l = max(16, triton.next_power_of_2(seq_len))
    cap = 16 if dtype == torch.float32 else 32
    block_dk = min(cap, max(16, triton.next_power_of_2(head_dim)))
    return block_l, block_dk, triton.cdiv(head_dim, block_dk)


def _num_warps(block_l: int, backward: bool, dtype: torch.dtype = torch.float32) -> int:
    fp32 = dtype == torch.float32
    if block_l <= 32:
        return 8 if (backward and fp32) else 4
    if block_l <= 64:
        return 8 if (backward or fp32) else 4
    return 16 if fp32 else 8


def session_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                              num_heads: int = 1, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Launch the forward kernel. q, k, v: (batch, seq_len, dim) of one dtype, any strides;
    lengths: (batch,) int on q's device; dropout_mask: None or broadcastable to
    (batch, num_heads, seq_len, seq_len). Returns a new contiguous (batch, seq_len, dim)."""
    b, L, d = q.shape
    hd = d // num_heads
    out = torch.empty((b, L, d), dtype=q.dtype, device=q.device)
    if b == 0 or L == 0:
        return out.zero_()
    block_l, block_dk, n_chunks = _blocks(L, hd, q.dtype)
    m, ms = mask_args(dropout_mask, b, num_heads, L, q)
    sm_scale = 1.0 / math.sqrt(hd)
    _session_attention_fwd_kernel[(b, num_heads)](
        q, k, v, lengths, m, out,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        L, hd, sm_scale * LOG2E,
        BLOCK_L=block_l, BLOCK_DK=block_dk, NUM_DCHUNKS=n_chunks, HAS_DROPOUT=dropout_mask is not None,
        DOT_PRECISION=dot_precision(q.dtype), num_warps=_num_warps(block_l, False, q.dtype),
    )
    return out


def session_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               lengths: torch.Tensor, num_heads: int = 1, dropout_mask: Optional[torch.Tensor] = None,
                               need: tuple[bool, bool, bool] = (True, True, True)):
    """Launch the backward kernel: (dq, dk, dv), each (batch, seq_len, dim) or None where
    `need` says so. dout: (batch, seq_len, dim), any strides."""
    b, L, d = q.shape
    hd = d // num_heads
    grads = [torch.empty((b, L, d), dtype=t.dtype, device=q.device) if n else None for t, n in zip((q, k, v), need)]
    if not any(need):
        return tuple(grads)
    if b == 0 or L == 0:
        return tuple(g.zero_() if g is not None else None for g in grads)
    block_l, block_dk, n_chunks = _blocks(L, hd, q.dtype)
    m, ms = mask_args(dropout_mask, b, num_heads, L, q)
    dummy = next(g for g in grads if g is not None)
    dq, dk, dv = (g if g is not None else dummy for g in grads)
    sm_scale = 1.0 / math.sqrt(hd)
    _session_attention_bwd_kernel[(b, num_heads)](
        q, k, v, lengths, m, dout, dq, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride(), *dummy.stride(),
        L, hd, sm_scale * LOG2E, sm_scale,
        BLOCK_L=block_l, BLOCK_DK=block_dk, NUM_DCHUNKS=n_chunks, HAS_DROPOUT=dropout_mask is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        NEED_DQ=need[0], NEED_DK=need[1], NEED_DV=need[2],
        num_warps=_num_warps(block_l, True, q.dtype),
    )
    return tuple(grads)


# --------------------------------------------------------------------------------------------
# autograd + public entry
# --------------------------------------------------------------------------------------------
class SessionAttentionFunction(torch.autograd.Function):
    """Autograd wrapper. Whole-row path (seq_len <= 128): saves q, k, v, lengths, mask and
    recomputes the softmax. Tiled path: also saves the output and the row log-sum-exps
    (batch, heads, seq_len) fp32, as flash-attention does."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, num_heads, dropout_mask):
        lens = lengths_i32(lengths, q.device)
        ctx.tiled = q.shape[1] > MAX_FUSED_LEN
        ctx.num_heads = num_heads
        if ctx.tiled:
            out, lse = session_attention_forward_tiled(q, k, v, lens, num_heads, dropout_mask)
            ctx.save_for_backward(q, k, v, lens, dropout_mask, out, lse)
        else:
            out = session_attention_forward(q, k, v, lens, num_heads, dropout_mask)
            ctx.save_for_backward(q, k, v, lens, dropout_mask)
        return out

    @staticmethod
    def backward(ctx, dout):
        need = tuple(ctx.needs_input_grad[:3])
        if ctx.tiled:
            q, k, v, lens, dropout_mask, out, lse = ctx.saved_tensors
            dq, dk, dv = session_attention_backward_tiled(dout, q, k, v, lens, ctx.num_heads, dropout_mask,
                                                           out, lse, need)
        else:
            q, k, v, lens, dropout_mask = ctx.saved_tensors
            dq, dk, dv = session_attention_backward(dout, q, k, v, lens, ctx.num_heads, dropout_mask, need)
        return dq, dk, dv, None, None, None


def uses_fused_path(q: torch.Tensor, num_heads: int = 1) -> bool:
    """True when `session_attention_triton` runs a kernel for this input (else the reference):
    whole rows for seq_len <= MAX_FUSED_LEN, key/query tiles beyond."""
    _, L, d = q.shape
    return d // num_heads <= MAX_FUSED_HEAD_DIM and q.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _check(q, k, v, lengths, num_heads, dropout_mask):
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"session_attention: q, k, v must share one (batch, seq_len, dim) shape, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"session_attention: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError("session_attention: q, k, v must be on one device")
    b, L, d = q.shape
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"session_attention: num_heads={num_heads} must divide dim={d}")
    if lengths.shape != (b,):
        raise ValueError(f"session_attention: lengths must be (batch={b},), got {tuple(lengths.shape)}")
    if dropout_mask is not None:
        try:
            torch.broadcast_shapes(dropout_mask.shape, (b, num_heads, L, L))
            ok = dropout_mask.dim() == 4
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"session_attention: dropout_mask must be (batch, num_heads, seq_len, seq_len) = "
                             f"{(b, num_heads, L, L)}, got {tuple(dropout_mask.shape)}")
        if dropout_mask.device != q.device:
            raise ValueError("session_attention: dropout_mask must be on q's device")
    check_device(q, "session_attention_triton", "packed")


def session_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                             num_heads: int = 1, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused causal key-padded session attention; same signature and semantics as
    `session_attention_ref`. q, k, v: (batch, seq_len, dim); lengths: (batch,) >= 1;
    dropout_mask: optional (batch, num_heads, seq_len, seq_len). Returns (batch, seq_len, dim).
    seq_len > 128 runs the tiled kernels; head_dim > 128 or float64 the reference path."""
    _check(q, k, v, lengths, num_heads, dropout_mask)
    if not uses_fused_path(q, num_heads):
        return session_attention_ref(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask)
    if dropout_mask is not None and dropout_mask.dtype == torch.bool:
        dropout_mask = dropout_mask.to(q.dtype)
    return SessionAttentionFunction.apply(q, k, v, lengths, num_heads, dropout_mask)


def aot_cases(quick: bool = False):
    """The specialisations `mtd_fast.kernels.aot` compiles: (name, kernel, signature, constexprs, warps)."""
    shapes = ((50, 100),) if quick else ((50, 100), (20, 100), (128, 128), (50, 25), (16, 8), (1, 100))
    for dt in ("fp32", "bf16"):
        tdt = AOT_DTYPES[dt]
        for seq, hd in shapes:
            bl, bdk, nch = _blocks(seq, hd, tdt)
            for bwd in (False, True):
                fn = _session_attention_bwd_kernel if bwd else _session_attention_fwd_kernel
                sig = aot_signature(fn, attention_arg_types(dt))
                for drop in ((True,) if quick else (False, True)):
                    cx = {"BLOCK_L": bl, "BLOCK_DK": bdk, "NUM_DCHUNKS": nch, "HAS_DROPOUT": drop,
                          "DOT_PRECISION": os.environ.get("AOT_PREC", "ieee")}
                    if bwd:
                        cx.update({"NEED_DQ": True, "NEED_DK": True, "NEED_DV": True})
                    name = f"attn_{'bwd' if bwd else 'fwd'} {dt} L={seq} hd={hd} drop={drop}"
                    yield name, fn, sig, cx, _num_warps(bl, bwd, tdt)
