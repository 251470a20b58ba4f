"""Length-bucketed ("packed") PyTorch backends of `session_attention` and `aggregate`.

Why: a batch is padded to its longest session, but session data is short (Diginetica
sessions average 4.85 items, its training prefixes about 4): at batch 512 padded to 50,
over 90 % of the rows the reference touches are padding, and of the attention's L x L
tiles even more. These backends compute only on the valid part and give the same function
as the reference (`reference.py`), up to float summation order.

- `session_attention_packed`: sessions are grouped by width w = the next power of two
  >= length, at least _MIN_WIDTH (4), at most seq_len (`length_buckets`); each group is
  gathered as (n, w, dim) and attended with plain batched matmuls; one custom autograd
  Function with a hand-written backward, so the only
  full-size (batch, seq_len, dim) traffic is one zero-filled output and one zero-filled
  gradient per input (slicing under autograd instead materialised a full-size zero
  gradient per slice and was slower than the reference). Dropout masks are supported
  exactly (the mask's slice is gathered with its group), unlike an SDPA route.
- `aggregate_packed`: the valid rows (sum of lengths of them) are gathered into one
  (N, dim) matrix and the two masked softmaxes become segment softmaxes (scatter max /
  index_add); plain autograd.

Small inputs (SMALL_ATTENTION, SMALL_AGGREGATE) go to the reference: there the per-group
overhead costs more than the padding saves. Measured in `benches/bench_cpu_ops.py` (batch
512, Diginetica lengths, d 100, fwd+bwd, one thread): attention 2.1x (padded 20) and 6.0x
(padded 50) faster than the reference, with or without a dropout mask; aggregate 2.1x and
3.9x; SDPA 0.87-1.05x and torch.compile 1.06-1.31x were not worth a backend.
Registered as backend "packed", picked by `auto` on the CPU. Works on any device (on a
GPU it syncs to read the lengths; `auto` never picks it there).
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .reference import aggregate_ref, session_attention_ref

__all__ = ["session_attention_packed", "aggregate_packed", "length_buckets"]

# Smallest group width. Interleaved A/B at batch 512, one thread (ms fwd+bwd, min/median):
# padded 20: min width 1 5.5/10.0, 4 5.5/9.7, 8 7.4/12.4; padded 50: 8.9/13.6, 8.1/12.8,
# 11.2/17.5 (the reference: 13.7/21.7 and 78/100).
_MIN_WIDTH = 4
# Below these sizes the per-group overhead outweighs the padding saved and the reference
# runs instead (same function). One thread, Diginetica lengths, d 100, fwd+bwd ms,
# reference vs packed: attention B x L = 16 x 8: 0.42 vs 0.74, 64 x 10: 1.05 vs 1.25,
# 64 x 20: 1.87 vs 1.79, 128 x 20: 3.8 vs 2.8; aggregate 64 x 10: 0.52 vs 0.55,
# 64 x 20: 1.03 vs 0.73.
SMALL_ATTENTION = 16384  # batch * seq_len**2
SMALL_AGGREGATE = 1024  # batch * seq_len


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
    @staticmethod
    def forward(ctx, q, k, v, lengths, num_heads, dropout_mask):
        b, L, d = q.shape
        h = num_heads
        dh = d // h
        scale = 1.0 / math.sqrt(dh)
        lengths = lengths.to(q.device)
        out = q.new_zeros(b, L, d)
        mask_full = None if dropout_mask is None else dropout_mask.expand(b, h, L, L)
        groups = []
        for idx, w in length_buckets(lengths, L, _MIN_WIDTH):
            n = idx.numel()

            def gather(t):  # (n, h, w, dh), a copy of the group's first w rows only
                return t[:, :w].index_select(0, idx).view(n, w, h, dh).transpose(1, 2)

            qb, kb, vb = gather(q), gather(k), gather(v)
            lens_b = lengths.index_select(0, idx)
            ar = torch.arange(w, device=q.device)
            valid = ar[None, :] < lens_b[:, None]  # (n, w) valid query rows
            # causal; a padded query row may see key 0 so no row is fully masked (no NaN);
            # its weights are then zeroed, as the reference's rows of padded queries
            allowed = (ar[None, :] <= ar[:, None])[None] & (valid[:, :, None] | (ar == 0)[None, None, :])
            s = (qb @ kb.transpose(-1, -2)) * scale  # (n, h, w, w)
            s = s.masked_fill(~allowed[:, None], float("-inf"))
            p = torch.softmax(s, dim=-1) * valid[:, None, :, None].to(s.dtype)
            m = None if mask_full is None else mask_full[:, :, :w, :w].index_select(0, idx).to(p.dtype)
            pd = p if m is None else p * m
            o = pd @ vb  # (n, h, w, dh)
            out[:, :w].index_copy_(0, idx, o.transpose(1, 2).reshape(n, w, d))
            groups.append((idx, w, qb, kb, vb, p, m))
        # group copies are intermediates (not inputs/outputs), kept on ctx; together they are
        # about the size of the valid part of q, k, v
        ctx.groups = groups
        ctx.shape = (b, L, d, h, dh, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        b, L, d, h, dh, scale = ctx.shape
        need_q, need_k, need_v = ctx.needs_input_grad[:3]
        dq = dout.new_zeros(b, L, d) if need_q else None
        dk = dout.new_zeros(b, L, d) if need_k else None
        dv = dout.new_zeros(b, L, d) if need_v else None
        for idx, w, qb, kb, vb, p, m in ctx.groups:
            n = idx.numel()
            do = dout[:, :w].index_select(0, idx).view(n, w, h, dh).transpose(1, 2)
            if need_v:
                pd = p if m is None else p * m
                dv[:, :w].index_copy_(0, idx, (pd.transpose(-1, -2) @ do).transpose(1, 2).reshape(n, w, d))
            if need_q or need_k:
                dp = do @ vb.transpose(-1, -2)
                if m is not None:
                    dp = dp * m
                ds = p * (dp - (p * dp).sum(-1, keepdim=True)) * scale
                if need_q:
                    dq[:, :w].index_copy_(0, idx, (ds @ kb).transpose(1, 2).reshape(n, w, d))
                if need_k:
                    dk[:, :w].index_copy_(0, idx, (ds.transpose(-1, -2) @ qb).transpose(1, 2).reshape(n, w, d))
        return dq, dk, dv, None, None, None


def session_attention_packed(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
                             num_heads: int = 1, dropout_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Same signature and function as `session_attention_ref`, computed per length group.

    q, k, v: (batch, seq_len, dim); lengths: (batch,) >= 1; dropout_mask: optional
    (batch, num_heads, seq_len, seq_len) scaled keep-mask. Returns (batch, seq_len, dim),
    zero on padded query rows. No gradient for dropout_mask (a sampled constant).
    """
    b, L, d = q.shape
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
    if b * L * L < SMALL_ATTENTION:
        return session_attention_ref(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask)
    return _PackedAttention.apply(q, k, v, lengths, num_heads, dropout_mask)


def aggregate_packed(h: torch.Tensor, hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor,
                     gamma: Union[float, torch.Tensor] = 0.75, mode: str = "additive"):
    """Same signature and function as `aggregate_ref`, computed on the valid rows only.

    h, hp: (batch, seq_len, dim); a: (batch, dim); g: (dim,); lengths: (batch,) >= 1;
    gamma: float or 0-dim tensor. Returns x_s, p_s (batch, dim).
    """
    if mode not in ("additive", "product"):
        raise ValueError(f"unknown aggregation mode {mode!r}: use 'additive' or 'product'")
    b, L, d = h.shape
    if b * L < SMALL_AGGREGATE:
        return aggregate_ref(h, hp, a, g, lengths, gamma=gamma, mode=mode)
    lengths = lengths.to(h.device)
    valid = torch.arange(L, device=h.device)[None, :] < lengths[:, None]  # (B, L)
    bidx, pidx = valid.nonzero(as_tuple=True)  # (N,) valid rows, grouped by session
    flat = bidx * L + pidx
    # row gathers (index_select: contiguous row copies; backward is one index_add)
    hv = h.reshape(b * L, d).index_select(0, flat)  # (N, d)
    hpv = hp.reshape(b * L, d).index_select(0, flat)
    av = a.index_select(0, bidx)
    act = torch.sigmoid(av + hpv) if mode == "additive" else torch.sigmoid(av * hpv)
    e = act @ g  # (N,)

    def segment_softmax(logits):
        # the shift is a constant for the gradient (softmax is shift-invariant)
        mx = torch.full((b,), float("-inf"), dtype=logits.dtype, device=logits.device)
        mx = mx.scatter_reduce(0, bidx, logits.detach(), "amax", include_self=True)
        w = torch.exp(logits - mx.index_select(0, bidx))
        den = torch.zeros(b, dtype=w.dtype, device=w.device).index_add(0, bidx, w)
        return w / den.index_select(0, bidx)

    alpha = segment_softmax(e)
    pos = (lengths.index_select(0, bidx) - pidx).to(h.dtype)  # reversed position, 1 = most recent
    beta = segment_softmax(-gamma * pos)
    x_s = torch.zeros(b, d, dtype=h.dtype, device=h.device).index_add(0, bidx, alpha[:, None] * hv)
    p_s = torch.zeros(b, d, dtype=h.dtype, device=h.device).index_add(0, bidx, beta[:, None] * hv)
    return x_s, p_s
