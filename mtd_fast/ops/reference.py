"""Pure-PyTorch reference implementations of the hot ops: readable, autograd-native,
the truth every fast backend is tested against. Tests and benches import these
(`*_ref`) so that the reference used in both never drifts.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

__all__ = ["session_attention_ref", "aggregate_ref", "spmm_ref", "attention_mask", "position_index"]


def position_index(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Reversed positions (B, L): pos[b, i] = lengths[b] - i for valid i (1 = most recent), 0 on padding."""
    ar = torch.arange(width, device=lengths.device)
    pos = lengths[:, None] - ar[None, :]
    return pos.clamp_min(0)


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


def aggregate_ref(h: torch.Tensor, hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor,
                  gamma: Union[float, torch.Tensor] = 0.75,
                  mode: str = "additive") -> tuple[torch.Tensor, torch.Tensor]:
    """Attentive aggregation and position decay of `MTD_SPEC.md` section 2 steps 4-5.

    h:  (batch, seq_len, dim) block output H.
    hp: (batch, seq_len, dim) projected items: W4 h_i (additive) or W h_i (product).
    a:  (batch, dim) projected last-item state: W3 x_t (additive) or W x_t (product).
    g:  (dim,) scoring vector (g of the paper, w of the code).
    lengths: (batch,) >= 1. gamma: position-decay rate (float or 0-dim tensor).
    Returns x_s (batch, dim) = sum_i alpha_i h_i with alpha = softmax_i(g . sigmoid(a + hp_i))
    (additive) or softmax_i(g . sigmoid(a * hp_i)) (product), and p_s (batch, dim) =
    sum_i beta_i h_i with beta = softmax_i(-gamma * pos_i), both over valid i only.
    """
    b, L, _ = h.shape
    if mode == "additive":
        act = torch.sigmoid(a[:, None, :] + hp)
    elif mode == "product":
        act = torch.sigmoid(a[:, None, :] * hp)
    else:
        raise ValueError(f"unknown aggregation mode {mode!r}: use 'additive' or 'product'")
    e = act @ g  # (B, L)
    valid = torch.arange(L, device=h.device)[None, :] < lengths[:, None]
    alpha = torch.softmax(e.masked_fill(~valid, float("-inf")), dim=-1)
    x_s = (alpha[:, :, None] * h).sum(1)
    pos = position_index(lengths, L).to(h.dtype)
    beta = torch.softmax((-gamma * pos).masked_fill(~valid, float("-inf")), dim=-1)
    p_s = (beta[:, :, None] * h).sum(1)
    return x_s, p_s


def spmm_ref(indptr: torch.Tensor, indices: torch.Tensor, values: Optional[torch.Tensor], degrees: torch.Tensor,
             x: torch.Tensor, norm: str = "sym", symmetric: bool = False) -> torch.Tensor:
    """Y = A_hat @ X for the normalized adjacency of an unnormalized CSR `A + I`.

    indptr (N+1,), indices (nnz,), values (nnz,) or None (binary), degrees (N,) row sums.
    norm: "sym" D^-1/2 A D^-1/2, "mean" D^-1 A, "none" A.  x: (N, dim) -> (N, dim).
    Gather / scale / index_add: differentiable in x (and in values) by plain autograd.
    `symmetric` (the stored matrix equals its transpose) is unused here; fast backends
    use it to skip building the transpose for backward.

    Deterministic on the CPU at any thread count: every gather is `index_select`, whose
    backward is `index_add_` (serial over the index on the CPU). Advanced indexing
    (`x[cols]`) would be the same function, but its backward is `index_put_(accumulate=True)`,
    which torch runs with unordered atomic float adds on > 1 thread, so two identical calls
    gave gradients differing in the last bits (README "Determinism"). On CUDA `index_add_`
    uses atomics unless `torch.use_deterministic_algorithms(True)` (`deterministic=True`).
    """
    n = indptr.numel() - 1
    counts = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(n, device=x.device), counts)
    cols = indices.long()
    w = torch.ones(cols.numel(), dtype=x.dtype, device=x.device) if values is None else values.to(x.dtype)
    deg = degrees.to(x.dtype)
    if norm == "sym":
        inv = deg.rsqrt()
        w = w * inv.index_select(0, rows) * inv.index_select(0, cols)
    elif norm == "mean":
        w = w / deg.index_select(0, rows)
    elif norm != "none":
        raise ValueError(f"unknown norm {norm!r}: use 'sym', 'mean' or 'none'")
    out = torch.zeros((n, x.shape[1]), dtype=x.dtype, device=x.device)
    return out.index_add_(0, rows, w[:, None] * x.index_select(0, cols))
