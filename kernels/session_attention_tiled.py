"""Tiled session attention in Triton (sessions longer than `MAX_FUSED_LEN` = 128): forward and
backward kernels and their launchers. `mtd_fast.kernels.session_attention` (the op's entry
point, `session_attention_triton`) sends batches wider than 128 here.

Flash-attention style: one program per (session, head, query tile of 16 rows) with an
online softmax over key tiles, skipping tiles past the session or above the diagonal (a
short session in a long batch costs one tile), and a backward split in a dK/dV kernel (per
key tile) and a dQ kernel (per query tile), no atomics; the forward also stores the row
log-sum-exps (batch, heads, seq_len) fp32, and delta = rowsum(dO * O) is computed in
PyTorch. Retailrocket batches pad to about 164, Yoochoose 1/64 sometimes to 145.
Numerics as in the whole-row kernels (module docstring of `session_attention`).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from .common import (
    AOT_DTYPES,
    LOG2E,
    aot_signature,
    attention_arg_types,
    dot_precision,
    dropout_ptrs,
    load_rows,
    mask_args,
)

__all__ = ["session_attention_forward_tiled", "session_attention_backward_tiled", "tiled_blocks", "aot_cases"]


@triton.jit
def _session_attention_fwd_tiled_kernel(
    Q, K, V, LENS, DMASK, O, LSE,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    stride_ob, stride_ol, stride_od,
    L, HEAD_DIM, NUM_HEADS, qk_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_KTILES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = one (session, head, query tile); an online softmax over the key tiles
    that hold an allowed key (j <= i < seq_len): tiles past the session or above the
    diagonal are skipped, so a short session in a long batch costs one tile. Also stores
    the row log-sum-exp (log2 domain, 0 on padded rows) for the backward."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    m0 = tl.program_id(2) * BLOCK_M
    seq_len = tl.minimum(tl.load(LENS + pid_b).to(tl.int32), L)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col = pid_h * HEAD_DIM + offs_d
    col_ok = offs_d < HEAD_DIM
    row_valid = offs_m < seq_len
    q = load_rows(Q, pid_b, stride_qb, stride_ql, stride_qd, offs_m, col, row_valid[:, None] & col_ok[None, :])
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # constexpr trip count (the interpreter cannot loop to a runtime bound); the branch skips
    for t in range(NUM_KTILES):
        n0 = t * BLOCK_N
        if (n0 < seq_len) & (n0 < m0 + BLOCK_M):
            offs_n = n0 + offs_n0
            kv_ld = (offs_n < seq_len)[:, None] & col_ok[None, :]
            k = load_rows(K, pid_b, stride_kb, stride_kl, stride_kd, offs_n, col, kv_ld)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
            allowed = (offs_n[None, :] <= offs_m[:, None]) & row_valid[:, None]
            s = tl.where(allowed, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing allowed yet
            corr = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * corr + tl.sum(p, axis=1)
            if HAS_DROPOUT:
                dm_ptrs = dropout_ptrs(DMASK, pid_b, pid_h, offs_m, offs_n, stride_mb, stride_mh, stride_mi, stride_mj)
                p = p * tl.load(dm_ptrs, mask=allowed, other=0.0).to(tl.float32)
            v = load_rows(V, pid_b, stride_vb, stride_vl, stride_vd, offs_n, col, kv_ld)
            acc = acc * corr[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new
    has = l_i > 0.0  # valid rows (key 0 is always allowed for them)
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + pid_b * stride_ob + offs_m[:, None] * stride_ol + col[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=(offs_m < L)[:, None] & col_ok[None, :])
    lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), 0.0)
    tl.store(LSE + (pid_b * NUM_HEADS + pid_h) * L + offs_m, lse, mask=offs_m < L)


@triton.jit
def _session_attention_tile_grads(q, k, v, do, lse, delta, offs_m, offs_n, seq_len, mask_ptrs, qk_scale, sm_scale,
                                  HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """For one (query tile, key tile): Pd = P * M and dS = P * (dP - delta) * scale."""
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    allowed = (offs_n[None, :] <= offs_m[:, None]) & (offs_m[:, None] < seq_len)
    p = tl.exp2(tl.where(allowed, s - lse[:, None], float("-inf")))  # masked before exp2: no overflow
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
    if HAS_DROPOUT:
        m = tl.load(mask_ptrs, mask=allowed, other=0.0).to(tl.float32)
        pd = p * m
        dp = dp * m
    else:
        pd = p
    ds = p * (dp - delta[:, None]) * sm_scale
    return pd, ds


@triton.jit
def _session_attention_bwd_dkdv_tiled_kernel(
    Q, K, V, LENS, DMASK, DO, LSE, DELTA, DK, DV,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    stride_dob, stride_dol, stride_dod,
    stride_gb, stride_gl, stride_gd,
    L, HEAD_DIM, NUM_HEADS, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_QTILES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr, NEED_DK: tl.constexpr, NEED_DV: tl.constexpr,
):
    """One program = one (session, head, key tile): dV = sum_i Pd^T dO, dK = sum_i dS^T Q over
    the query tiles at or below the diagonal and inside the session."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    n0 = tl.program_id(2) * BLOCK_N
    seq_len = tl.minimum(tl.load(LENS + pid_b).to(tl.int32), L)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col = pid_h * HEAD_DIM + offs_d
    col_ok = offs_d < HEAD_DIM
    kv_ld = (offs_n < seq_len)[:, None] & col_ok[None, :]
    k = load_rows(K, pid_b, stride_kb, stride_kl, stride_kd, offs_n, col, kv_ld)
    v = load_rows(V, pid_b, stride_vb, stride_vl, stride_vd, offs_n, col, kv_ld)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    row_base = (pid_b * NUM_HEADS + pid_h) * L
    for t in range(NUM_QTILES):
        m0 = t * BLOCK_M
        if (n0 < seq_len) & (m0 < seq_len) & (m0 + BLOCK_M > n0):
            offs_m = m0 + offs_m0
            q_ld = (offs_m < seq_len)[:, None] & col_ok[None, :]
            q = load_rows(Q, pid_b, stride_qb, stride_ql, stride_qd, offs_m, col, q_ld)
            do = load_rows(DO, pid_b, stride_dob, stride_dol, stride_dod, offs_m, col, q_ld)
            lse = tl.load(LSE + row_base + offs_m, mask=offs_m < L, other=0.0)
            delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < L, other=0.0)
            mask_ptrs = dropout_ptrs(DMASK, pid_b, pid_h, offs_m, offs_n, stride_mb, stride_mh, stride_mi, stride_mj)
            pd, ds = _session_attention_tile_grads(q, k, v, do, lse, delta, offs_m, offs_n, seq_len, mask_ptrs,
                                                   qk_scale, sm_scale, HAS_DROPOUT, DOT_PRECISION)
            if NEED_DV:
                dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=DOT_PRECISION)
            if NEED_DK:
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PRECISION)
    st = (offs_n < L)[:, None] & col_ok[None, :]
    g_off = pid_b * stride_gb + offs_n[:, None] * stride_gl + col[None, :] * stride_gd
    if NEED_DK:
        tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=st)
    if NEED_DV:
        tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=st)


@triton.jit
def _session_attention_bwd_dq_tiled_kernel(
    Q, K, V, LENS, DMASK, DO, LSE, DELTA, DQ,
    stride_qb, stride_ql, stride_qd,
    stride_kb, stride_kl, stride_kd,
    stride_vb, stride_vl, stride_vd,
    stride_mb, stride_mh, stride_mi, stride_mj,
    stride_dob, stride_dol, stride_dod,
    stride_gb, stride_gl, stride_gd,
    L, HEAD_DIM, NUM_HEADS, qk_scale, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_KTILES: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One program = one (session, head, query tile): dQ = sum_j dS K (no atomics: the key
    loop is repeated here rather than sharing the dK/dV kernel's)."""
    pid_b = tl.program_id(0).to(tl.int64)
    pid_h = tl.program_id(1).to(tl.int64)
    m0 = tl.program_id(2) * BLOCK_M
    seq_len = tl.minimum(tl.load(LENS + pid_b).to(tl.int32), L)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col = pid_h * HEAD_DIM + offs_d
    col_ok = offs_d < HEAD_DIM
    q_ld = (offs_m < seq_len)[:, None] & col_ok[None, :]
    q = load_rows(Q, pid_b, stride_qb, stride_ql, stride_qd, offs_m, col, q_ld)
    do = load_rows(DO, pid_b, stride_dob, stride_dol, stride_dod, offs_m, col, q_ld)
    row_base = (pid_b * NUM_HEADS + pid_h) * L
    lse = tl.load(LSE + row_base + offs_m, mask=offs_m < L, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=offs_m < L, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for t in range(NUM_KTILES):
        n0 = t * BLOCK_N
        if (n0 < seq_len) & (m0 < seq_len) & (n0 < m0 + BLOCK_M):
            offs_n = n0 + offs_n0
            kv_ld = (offs_n < seq_len)[:, None] & col_ok[None, :]
            k = load_rows(K, pid_b, stride_kb, stride_kl, stride_kd, offs_n, col, kv_ld)
            v = load_rows(V, pid_b, stride_vb, stride_vl, stride_vd, offs_n, col, kv_ld)
            mask_ptrs = dropout_ptrs(DMASK, pid_b, pid_h, offs_m, offs_n, stride_mb, stride_mh, stride_mi, stride_mj)
            pd, ds = _session_attention_tile_grads(q, k, v, do, lse, delta, offs_m, offs_n, seq_len, mask_ptrs,
                                                   qk_scale, sm_scale, HAS_DROPOUT, DOT_PRECISION)
            dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PRECISION)
    tl.store(DQ + pid_b * stride_gb + offs_m[:, None] * stride_gl + col[None, :] * stride_gd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m < L)[:, None] & col_ok[None, :])


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def tiled_blocks(seq_len: int, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M = BLOCK_N, BLOCK_D, tiles in the loop, warps) of the tiled path.

    Tiles of 16 rows at 4 warps: `ptxas -v` on sm_90a, head dim 100 (BLOCK_D 128), dropout:
    no spill in any of the three kernels, fp32 (185-255 regs) or bf16 (233-255); tiles of
    32 spilled in bf16 (dK/dV kernel 7.8 KB at 4 warps, 44 B at 8). Small tiles also skip
    the most work: sessions average 4-7 items. The loop's trip count is
    cdiv(next_pow2(seq_len), 16): one compiled specialisation per power of two of the width
    (129-256, 257-512, ...), not one per width; skipped tiles cost a branch."""
    block = 16
    block_d = max(16, triton.next_power_of_2(head_dim))
    return block, block_d, triton.cdiv(triton.next_power_of_2(seq_len), block), 4


def session_attention_forward_tiled(q, k, v, lengths, num_heads, dropout_mask):
    """Launch the tiled forward. q, k, v: (batch, seq_len, dim); lengths int32 on q's device.
    Returns (out (batch, seq_len, dim), lse (batch, heads, seq_len) fp32)."""
    b, L, d = q.shape
    hd = d // num_heads
    out = torch.empty((b, L, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, num_heads, L), dtype=torch.float32, device=q.device)
    block, block_d, n_tiles, warps = tiled_blocks(L, hd, q.dtype)
    m, ms = mask_args(dropout_mask, b, num_heads, L, q)
    sm_scale = 1.0 / math.sqrt(hd)
    _session_attention_fwd_tiled_kernel[(b, num_heads, triton.cdiv(L, block))](
        q, k, v, lengths, m, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *ms, *out.stride(),
        L, hd, num_heads, sm_scale * LOG2E,
        BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, NUM_KTILES=n_tiles,
        HAS_DROPOUT=dropout_mask is not None, DOT_PRECISION=dot_precision(q.dtype), num_warps=warps,
    )
    return out, lse


def session_attention_backward_tiled(dout, q, k, v, lengths, num_heads, dropout_mask, out, lse, need):
    """Launch the tiled backward: (dq, dk, dv), None where `need` says so."""
    b, L, d = q.shape
    hd = d // num_heads
    grads = [torch.empty((b, L, d), dtype=t.dtype, device=q.device) if n else None for t, n in zip((q, k, v), need)]
    if not any(need):
        return tuple(grads)
    # delta_i = rowsum(dO_i * O_i) per head (= rowsum(P * dP): the softmax Jacobian's rank-1 term)
    delta = (dout.float() * out.float()).reshape(b, L, num_heads, hd).sum(-1).transpose(1, 2).contiguous()
    block, block_d, n_tiles, warps = tiled_blocks(L, hd, q.dtype)
    m, ms = mask_args(dropout_mask, b, num_heads, L, q)
    sm_scale = 1.0 / math.sqrt(hd)
    dummy = next(g for g in grads if g is not None)
    dq, dk, dv = (g if g is not None else dummy for g in grads)
    common = dict(BLOCK_M=block, BLOCK_N=block, BLOCK_D=block_d, HAS_DROPOUT=dropout_mask is not None,
                  DOT_PRECISION=dot_precision(q.dtype), num_warps=warps)
    args = (*q.stride(), *k.stride(), *v.stride(), *ms, *dout.stride(), *dummy.stride(),
            L, hd, num_heads, sm_scale * LOG2E, sm_scale)
    grid = (b, num_heads, triton.cdiv(L, block))
    if need[1] or need[2]:
        _session_attention_bwd_dkdv_tiled_kernel[grid](
            q, k, v, lengths, m, dout, lse, delta, dk, dv, *args,
            NUM_QTILES=n_tiles, NEED_DK=need[1], NEED_DV=need[2], **common)
    if need[0]:
        _session_attention_bwd_dq_tiled_kernel[grid](
            q, k, v, lengths, m, dout, lse, delta, dq, *args, NUM_KTILES=n_tiles, **common)
    return tuple(grads)


def aot_cases(quick: bool = False):
    """The specialisations `mtd_fast.kernels.aot` compiles: (name, kernel, signature, constexprs, warps)."""
    shapes = ((164, 100),) if quick else ((164, 100), (300, 100), (150, 25))
    kernels = (("fwd", _session_attention_fwd_tiled_kernel, "NUM_KTILES"),
               ("bwd_dkdv", _session_attention_bwd_dkdv_tiled_kernel, "NUM_QTILES"),
               ("bwd_dq", _session_attention_bwd_dq_tiled_kernel, "NUM_KTILES"))
    for dt in ("fp32", "bf16"):
        tdt = AOT_DTYPES[dt]
        for seq, hd in shapes:
            block, block_d, n_tiles, warps = tiled_blocks(seq, hd, tdt)
            for kname, fn, tiles_arg in kernels:
                types = {**attention_arg_types(dt), "LSE": "*fp32", "DELTA": "*fp32", "NUM_HEADS": "i32"}
                sig = aot_signature(fn, types)
                cx = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, tiles_arg: n_tiles,
                      "HAS_DROPOUT": True, "DOT_PRECISION": os.environ.get("AOT_PREC", "ieee")}
                if kname == "bwd_dkdv":
                    cx.update({"NEED_DK": True, "NEED_DV": True})
                yield f"attn_tiled_{kname} {dt} L={seq} hd={hd} drop=True", fn, sig, cx, warps
