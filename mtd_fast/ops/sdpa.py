"""Session attention through `torch.nn.functional.scaled_dot_product_attention` (a peer).

Not registered as a backend: on the CPU it measured no faster than the reference
(0.9-1.05x at batch 512, padded 20 / 50, d 100, one thread; `benches/bench_cpu_ops.py`),
while the length-bucketed "packed" backend gained 2-7x. Kept as a library function so the
CPU and GPU benches time the same SDPA route against the kernels.

SDPA cannot apply an external dropout mask (MTD_SPEC: masks are drawn by PyTorch and
passed in), so with `dropout_mask` given this falls back to the reference path.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .reference import attention_mask, session_attention_ref

__all__ = ["session_attention_sdpa"]


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
