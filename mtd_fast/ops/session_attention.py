"""The `session_attention` op: causal, key-padded self-attention over left-aligned sessions
(MTD_SPEC.md section 2, step 2), with every implementation of it.

- `session_attention(...)`: the public op, dispatched by `backend=` (`mtd_fast.ops.dispatch`);
- `session_attention_ref`: the pure-PyTorch reference, the truth every backend is tested against;
- `session_attention_packed` (backend "packed", `auto` on the CPU): length-bucketed, valid
  rows only (below);
- `session_attention_sdpa`: through `F.scaled_dot_product_attention`, a peer for the benches,
  not a backend (below);
- backend "triton" (`auto` on CUDA): `mtd_fast.kernels.session_attention` (whole rows) and
  `mtd_fast.kernels.session_attention_tiled` (sessions longer than 128).

Tests: tests/test_session_attention.py. Bench: benches/bench_session_attention.py (CPU and
GPU providers; its GPU timings run in benches/gpu_check.py).

The packed backend
------------------
Why: a batch is padded to its longest session, but session data is short (Diginetica
sessions average 4.85 items, its training prefixes about 4): at batch 512 padded to 50,
over 90 % of the rows the reference touches are padding, and of the attention's L x L
tiles even more. The packed backends (this one and `aggregate_packed`) compute only on the
valid part and give the same function as the reference, up to float summation order.

Sessions are grouped by width w = the next power of two >= length, at least _MIN_WIDTH
(4), at most seq_len (`length_buckets`); each group is gathered as (n, w, dim) and
attended with plain batched matmuls; one custom autograd Function with a hand-written
backward, so the only full-size (batch, seq_len, dim) traffic is one zero-filled output
and one zero-filled gradient per input (slicing under autograd instead materialised a
full-size zero gradient per slice and was slower than the reference). In the rows layout
((N, dim): the valid clicks only, what the models pass) there is no full-size tensor at
all: on Retailrocket, whose batches of 512 pad to ~150-250 clicks against ~9 per session,
MTD's step CPU time fell by about a tenth with it (README, "The rows layout"). Dropout masks are
supported exactly (the mask's slice is gathered with its group), unlike an SDPA route.

Small inputs (SMALL_ATTENTION) go to the reference: there the per-group overhead costs
more than the padding saves. Measured with `benches/bench_cpu_ops.py`, now `bench_session_attention.py` (batch 512,
Diginetica lengths, d 100, fwd+bwd, one thread): 2.1x (padded 20) and 6.0x (padded 50)
faster than the reference, with or without a dropout mask; SDPA 0.87-1.05x and
torch.compile 1.06-1.31x were not worth a backend. Works on any device (on a GPU it syncs
to read the lengths; `auto` never picks it there).

The SDPA peer
-------------
Not registered as a backend: on the CPU it measured no faster than the reference
(0.9-1.05x at batch 512, padded 20 / 50, d 100, one thread), while the length-bucketed
"packed" backend gained 2-7x. Kept so the CPU and GPU benches time the same SDPA route
against the kernels. SDPA cannot apply an external dropout mask (MTD_SPEC: masks are
drawn by PyTorch and passed in), so with `dropout_mask` given it runs the reference.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from .common import check_lengths, check_rows, padded_to_rows, rows_to_padded, triton_devices, triton_usable
from .dispatch import register, resolve

__all__ = ["session_attention", "session_attention_ref", "session_attention_packed", "session_attention_sdpa",
           "attention_mask", "length_buckets", "SMALL_ATTENTION"]


def session_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, num_heads: int = 1,
                      dropout_mask: Optional[torch.Tensor] = None, backend=None,
                      width: Optional[int] = None) -> torch.Tensor:
    """Causal key-padded attention over left-aligned sessions.

    q, k, v: (batch, seq_len, dim), or the rows layout (N, dim): the valid clicks of the
    sessions one after the other, N = sum(lengths), with `width` the padded length the
    dropout mask is laid out for (default: the mask's, else the longest session). lengths:
    (batch,) >= 1; dropout_mask: optional (batch, num_heads, seq_len, seq_len) scaled
    keep-mask. Returns the input's layout: (batch, seq_len, dim), zero on padded query
    rows, or (N, dim). See `session_attention_ref`. The packed backend reads rows as they
    are; the others see them padded (and give them back as rows).
    """
    if q.dim() == 2:
        if width is None:
            width = dropout_mask.shape[-1] if dropout_mask is not None else int(lengths.max()) if lengths.numel() else 1
        check_rows(q, lengths, width, "session_attention")
        fn = resolve("session_attention", backend, q.device)
        if fn is session_attention_packed:
            return fn(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask, width=width)
        q, k, v = (rows_to_padded(t, lengths, width) for t in (q, k, v))
        return padded_to_rows(fn(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask), lengths)
    check_lengths(lengths, q.shape[1], "session_attention")
    fn = resolve("session_attention", backend, q.device)
    return fn(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask)


# ---- reference ------------------------------------------------------------------------------
def attention_mask(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(B, L, L) bool: query i may attend key j iff i is a valid position and j <= i."""
    ar = torch.arange(width, device=lengths.device)
    causal = ar[None, :] <= ar[:, None]  # (L, L): j <= i
    valid_q = ar[None, :] < lengths[:, None]  # (B, L)
    return causal[None, :, :] & valid_q[:, :, None]


def session_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                          num_heads: int = 1, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Causal, key-padded scaled dot-product attention over left-aligned sessions.

    q, k, v: (batch, seq_len, dim); heads split the last dimension (dim % num_heads == 0).
    lengths: (batch,) valid lengths >= 1 (positions >= length are padding).
    dropout_mask: optional (batch, num_heads, seq_len, seq_len), already scaled by
        1/(1-p), multiplied into the attention weights after the softmax.
    Returns (batch, seq_len, dim); rows of padded queries are exactly zero.
    """
    b, L, d = q.shape
    h = num_heads
    dh = d // h
    qh = q.reshape(b, L, h, dh).transpose(1, 2)  # (B, h, L, dh)
    kh = k.reshape(b, L, h, dh).transpose(1, 2)
    vh = v.reshape(b, L, h, dh).transpose(1, 2)
    scores = qh @ kh.transpose(-1, -2) / math.sqrt(dh)  # (B, h, L, L)
    allowed = attention_mask(lengths, L)[:, None]  # (B, 1, L, L)
    # fully masked rows (padded queries) get scores 0 before the softmax and weight 0 after
    scores = scores.masked_fill(~allowed, float("-inf"))
    row_valid = allowed.any(-1, keepdim=True)
    scores = torch.where(row_valid, scores, torch.zeros_like(scores))
    attn = torch.softmax(scores, dim=-1) * row_valid
    if dropout_mask is not None:
        attn = attn * dropout_mask
    out = attn @ vh  # (B, h, L, dh)
    return out.transpose(1, 2).reshape(b, L, d)


# ---- packed (CPU) ---------------------------------------------------------------------------
# Smallest group width. Interleaved A/B at batch 512, one thread (ms fwd+bwd, min/median):
# padded 20: min width 1 5.5/10.0, 4 5.5/9.7, 8 7.4/12.4; padded 50: 8.9/13.6, 8.1/12.8,
# 11.2/17.5 (the reference: 13.7/21.7 and 78/100).
_MIN_WIDTH = 4
# Below this size the per-group overhead outweighs the padding saved and the reference
# runs instead (same function). One thread, Diginetica lengths, d 100, fwd+bwd ms,
# reference vs packed: B x L = 16 x 8: 0.42 vs 0.74, 64 x 10: 1.05 vs 1.25,
# 64 x 20: 1.87 vs 1.79, 128 x 20: 3.8 vs 2.8 (aggregate: SMALL_AGGREGATE in aggregate.py).
SMALL_ATTENTION = 16384  # batch * seq_len**2


def length_buckets(lengths: torch.Tensor, width: int, min_width: int = _MIN_WIDTH) -> list[tuple[torch.Tensor, int]]:
    """Group sessions by w = min(width, max(min_width, next power of two >= length)).

    Returns [(indices (n,) int64, w)], widths increasing; every session is in one group.
    At most log2(width / min_width) + 2 groups, so the per-group overhead stays bounded;
    `min_width` folds the many sessions of 1-4 items into one group (their tiles are tiny
    either way, and each group costs about 30 small ops forward and backward).
    """
    n = lengths.clamp(1, width).to(torch.float64)
    w = torch.exp2(torch.ceil(torch.log2(n))).to(torch.int64).clamp(min=min(min_width, width), max=width)
    out = []
    for wv in torch.unique(w).tolist():
        out.append(((w == wv).nonzero().squeeze(1), int(wv)))
    return out


class _PackedAttention(torch.autograd.Function):
    """Length-bucketed attention on padded (B, L, d) or rows (N, d) inputs; the output and
    the gradients have the input's layout. Each group gathers its sessions' first w rows
    through one (n, w) row index (rows layout: positions past a session's end read an
    appended zero row), and writes back the valid rows only."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, num_heads, dropout_mask, width):
        rows = q.dim() == 2
        d = q.shape[-1]
        b, L = (lengths.numel(), width) if rows else q.shape[:2]
        h = num_heads
        dh = d // h
        scale = 1.0 / math.sqrt(dh)
        lengths = lengths.to(q.device)
        n_rows = q.shape[0] if rows else b * L
        starts = torch.cumsum(lengths, 0) - lengths if rows else None

        def flat(t):  # (rows + 1 zero row) or the padded batch as (B * L, d)
            return torch.cat([t, t.new_zeros(1, d)]) if rows else t.reshape(b * L, d)

        qf, kf, vf = flat(q), flat(k), flat(v)
        out = q.new_empty(n_rows, d) if rows else q.new_zeros(n_rows, d)
        mask_full = None if dropout_mask is None else dropout_mask.expand(b, h, L, L)
        groups = []
        for idx, w in length_buckets(lengths, L, _MIN_WIDTH):
            n = idx.numel()
            ar = torch.arange(w, device=q.device)
            lens_b = lengths.index_select(0, idx)
            valid = ar[None, :] < lens_b[:, None]  # (n, w) valid query rows
            if rows:
                index = torch.where(valid, starts.index_select(0, idx)[:, None] + ar, n_rows).reshape(-1)
            else:
                index = (idx[:, None] * L + ar).reshape(-1)
            live = valid.reshape(-1).nonzero().squeeze(1)  # (m,) the group's valid rows in (n * w)
            dst = index.index_select(0, live)  # where they go

            def gather(t):  # (n, h, w, dh)
                return t.index_select(0, index).view(n, w, h, dh).transpose(1, 2)

            qb, kb, vb = gather(qf), gather(kf), gather(vf)
            # causal; a padded query row may see key 0 so no row is fully masked (no NaN);
            # its weights are then zeroed, as the reference's rows of padded queries
            allowed = (ar[None, :] <= ar[:, None])[None] & (valid[:, :, None] | (ar == 0)[None, None, :])
            s = (qb @ kb.transpose(-1, -2)) * scale  # (n, h, w, w)
            s = s.masked_fill(~allowed[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1) * valid[:, None, :, None].to(s.dtype)
            m = None if mask_full is None else mask_full[:, :, :w, :w].index_select(0, idx).to(p.dtype)
            pd = p if m is None else p * m
            o = (pd @ vb).transpose(1, 2).reshape(n * w, d)  # (n * w, d)
            out.index_copy_(0, dst, o.index_select(0, live))
            groups.append((index, live, dst, n, w, qb, kb, vb, p, m))
        # group copies are intermediates (not inputs/outputs), kept on ctx; together they are
        # about the size of the valid part of q, k, v
        ctx.groups = groups
        ctx.shape = (rows, n_rows, b, L, d, h, dh, scale)
        return out if rows else out.view(b, L, d)

    @staticmethod
    def backward(ctx, dout):
        rows, n_rows, b, L, d, h, dh, scale = ctx.shape
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dflat = torch.cat([dout, dout.new_zeros(1, d)]) if rows else dout.reshape(b * L, d)

        def grad_buffer():  # rows: every row is written by its group; padded: zero on padding
            return (dout.new_empty(n_rows, d) if rows else dout.new_zeros(n_rows, d))

        dq = grad_buffer() if need_q else None
        dk = grad_buffer() if need_k else None
        dv = grad_buffer() if need_v else None

        def put(buf, x, live, dst, n, w):  # x (n, h, w, dh) -> the group's valid rows of buf
            buf.index_copy_(0, dst, x.transpose(1, 2).reshape(n * w, d).index_select(0, live))

        for index, live, dst, n, w, qb, kb, vb, p, m in ctx.groups:
            do = dflat.index_select(0, index).view(n, w, h, dh).transpose(1, 2)
            if need_v:
                pd = p if m is None else p * m
                put(dv, pd.transpose(-1, -2) @ do, live, dst, n, w)
            if need_q or need_k:
                dp = do @ vb.transpose(-1, -2)
                if m is not None:
                    dp = dp * m
                ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
                if need_q:
                    put(dq, ds @ kb, live, dst, n, w)
                if need_k:
                    put(dk, ds.transpose(-1, -2) @ qb, live, dst, n, w)
        if not rows:
            dq, dk, dv = (None if t is None else t.view(b, L, d) for t in (dq, dk, dv))
        return dq, dk, dv, None, None, None, None


def session_attention_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                             num_heads: int = 1, dropout_mask: Optional[torch.Tensor] = None,
                             width: Optional[int] = None) -> torch.Tensor:
    """Same signature and function as `session_attention_ref`, computed per length group.

    q, k, v: (batch, seq_len, dim), or rows (N, dim) with `width` (see `session_attention`);
    lengths: (batch,) >= 1; dropout_mask: optional (batch, num_heads, seq_len, seq_len)
    scaled keep-mask. Returns the input's layout, zero on padded query rows. No gradient for
    dropout_mask (a sampled constant).
    """
    rows = q.dim() == 2
    d = q.shape[-1]
    if rows:
        b, L = lengths.numel(), (width if width is not None else int(lengths.max()) if lengths.numel() else 1)
    else:
        b, L = q.shape[:2]
    if k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"session_attention: q, k, v must share one shape, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if num_heads < 1 or d % num_heads:
        raise ValueError(f"session_attention: num_heads={num_heads} must divide dim={d}")
    if lengths.shape != (b,):
        raise ValueError(f"session_attention: lengths must be (batch={b},), got {tuple(lengths.shape)}")
    if dropout_mask is not None and dropout_mask.dim() != 4:
        raise ValueError(f"session_attention: dropout_mask must be (batch, num_heads, seq_len, seq_len), "
                         f"got {tuple(dropout_mask.shape)}")
    if rows:
        check_rows(q, lengths, L, "session_attention")
    if b * L * L < SMALL_ATTENTION:
        if not rows:
            return session_attention_ref(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask)
        q, k, v = (rows_to_padded(t, lengths, L) for t in (q, k, v))
        out = session_attention_ref(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask)
        return padded_to_rows(out, lengths)
    return _PackedAttention.apply(q, k, v, lengths, num_heads, dropout_mask, L)


# ---- SDPA (a peer for the benches) ----------------------------------------------------------
def session_attention_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                           num_heads: int = 1, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same signature and function as `session_attention_ref`. q, k, v: (batch, seq_len, dim).

    Padded query rows may attend key 0 (so no row is fully masked: fully masked rows gave
    NaN in older torch releases) and are zeroed afterwards, as in the reference.
    """
    if dropout_mask is not None:
        return session_attention_ref(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask)
    b, L, d = q.shape
    h = num_heads
    qh, kh, vh = (t.reshape(b, L, h, d // h).transpose(1, 2) for t in (q, k, v))
    lengths = lengths.to(q.device)
    ar = torch.arange(L, device=q.device)
    valid = ar[None, :] < lengths[:, None]  # (B, L)
    allowed = attention_mask(lengths, L) | ((ar == 0)[None, None, :] & ~valid[:, :, None])
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=allowed[:, None])
    return out.transpose(1, 2).reshape(b, L, d) * valid[:, :, None].to(q.dtype)


# ---- backends: rank orders auto's preference (lower first); reference is the fallback -------
register("session_attention", "reference", "mtd_fast.ops.session_attention:session_attention_ref", rank=100)
register("session_attention", "packed", "mtd_fast.ops.session_attention:session_attention_packed", rank=50,
         auto_devices=("cpu",))
register("session_attention", "triton", "mtd_fast.kernels.session_attention:session_attention_triton", rank=0,
         auto_devices=("cuda",), devices=triton_devices, probe=triton_usable)
