"""The `aggregate` op: attentive aggregation and position decay of a session (MTD_SPEC.md
section 2, steps 4-5), with every implementation of it.

- `aggregate(...)`: the public op, dispatched by `backend=` (`mtd_fast.ops.dispatch`);
- `aggregate_ref`: the pure-PyTorch reference;
- `aggregate_packed` (backend "packed", `auto` on the CPU; why packing pays: the docstring
  of `mtd_fast.ops.session_attention`): the valid rows (sum of the lengths) gathered into
  one (N, dim) matrix, the two masked softmaxes computed as segment softmaxes (scatter max
  / index_add), plain autograd. Below SMALL_AGGREGATE it runs the reference (same
  function). Measured with benches/bench_cpu_ops.py, now bench_aggregate.py (batch 512, Diginetica lengths, d 100,
  fwd+bwd, one thread): 2.1x (padded 20) and 3.9x (padded 50) faster than the reference;
- backend "triton" (`auto` on CUDA): `mtd_fast.kernels.aggregate`.

Tests: tests/test_aggregate.py. Bench: benches/bench_aggregate.py (CPU and GPU providers; its GPU
timings run in benches/gpu_check.py).
"""
from __future__ import annotations

from typing import Union

import torch

from .common import (
    check_lengths,
    check_rows,
    position_index,
    rows_to_padded,
    segment_softmax,
    segment_sum,
    triton_devices,
    triton_usable,
)
from .dispatch import register, resolve

__all__ = ["aggregate", "aggregate_ref", "aggregate_packed", "SMALL_AGGREGATE"]


def aggregate(h: torch.Tensor, hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor,
              gamma: Union[float, torch.Tensor] = 0.75, mode: str = "additive",
              backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attentive aggregation x_s and position-decay aggregation p_s, each (batch, dim).

    h, hp: (batch, seq_len, dim), or the rows layout (N, dim): the valid clicks of the
    sessions one after the other, N = sum(lengths) (the packed backend reads them as they
    are, the others padded); a: (batch, dim); g: (dim,). See `aggregate_ref`.
    """
    fn = resolve("aggregate", backend, h.device)
    if h.dim() == 2:
        width = int(lengths.max()) if lengths.numel() else 1
        check_rows(h, lengths, width, "aggregate")
        if hp.shape != h.shape:
            raise ValueError(f"aggregate: h and hp must share one shape, got {tuple(h.shape)} and {tuple(hp.shape)}")
        if fn is not aggregate_packed:
            h, hp = rows_to_padded(h, lengths, width), rows_to_padded(hp, lengths, width)
        return fn(h, hp, a, g, lengths, gamma=gamma, mode=mode)
    check_lengths(lengths, h.shape[1], "aggregate")
    return fn(h, hp, a, g, lengths, gamma=gamma, mode=mode)


# ---- reference ------------------------------------------------------------------------------
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


# ---- packed (CPU) ---------------------------------------------------------------------------
# Below this size (batch * seq_len) the per-op overhead outweighs the padding saved and the
# reference runs instead (same function). One thread, Diginetica lengths, d 100, fwd+bwd ms,
# reference vs packed: 64 x 10: 0.52 vs 0.55, 64 x 20: 1.03 vs 0.73.
SMALL_AGGREGATE = 1024


def aggregate_packed(h: torch.Tensor, hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor,
                     gamma: Union[float, torch.Tensor] = 0.75, mode: str = "additive"):
    """Same signature and function as `aggregate_ref`, computed on the valid rows only.

    h, hp: (batch, seq_len, dim), or rows (N, dim) (see `aggregate`); a: (batch, dim);
    g: (dim,); lengths: (batch,) >= 1; gamma: float or 0-dim tensor. Returns x_s, p_s
    (batch, dim).
    """
    if mode not in ("additive", "product"):
        raise ValueError(f"unknown aggregation mode {mode!r}: use 'additive' or 'product'")
    lengths = lengths.to(h.device)
    b = lengths.numel()
    if h.dim() == 2:  # rows: already the valid clicks, session by session
        bidx = torch.repeat_interleave(torch.arange(b, device=h.device), lengths)  # (N,)
        pidx = torch.arange(h.shape[0], device=h.device) - (torch.cumsum(lengths, 0) - lengths).index_select(0, bidx)
        hv, hpv = h, hp
    else:
        _, L, d = h.shape
        if b * L < SMALL_AGGREGATE:
            return aggregate_ref(h, hp, a, g, lengths, gamma=gamma, mode=mode)
        valid = torch.arange(L, device=h.device)[None, :] < lengths[:, None]  # (B, L)
        bidx, pidx = valid.nonzero(as_tuple=True)  # (N,) valid rows, grouped by session
        flat = bidx * L + pidx
        # row gathers (index_select: contiguous row copies; backward is one index_add)
        hv = h.reshape(b * L, d).index_select(0, flat)  # (N, d)
        hpv = hp.reshape(b * L, d).index_select(0, flat)
    av = a.index_select(0, bidx)
    act = torch.sigmoid(av + hpv) if mode == "additive" else torch.sigmoid(av * hpv)
    e = act @ g  # (N,)

    alpha = segment_softmax(e, bidx, b)
    pos = (lengths.index_select(0, bidx) - pidx).to(h.dtype)  # reversed position, 1 = most recent
    beta = segment_softmax(-gamma * pos, bidx, b)
    return segment_sum(alpha[:, None] * hv, bidx, b), segment_sum(beta[:, None] * hv, bidx, b)


# ---- backends: rank orders auto's preference (lower first); reference is the fallback -------
register("aggregate", "reference", "mtd_fast.ops.aggregate:aggregate_ref", rank=100)
register("aggregate", "packed", "mtd_fast.ops.aggregate:aggregate_packed", rank=50, auto_devices=("cpu",))
register("aggregate", "triton", "mtd_fast.kernels.aggregate:aggregate_triton", rank=0,
         auto_devices=("cuda",), devices=triton_devices, probe=triton_usable)
