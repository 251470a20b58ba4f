"""Layers shared by more than one model, so that no model imports another model's file.

- `SelfAttentionBlock` (with `dropout_mask`, `LN_EPS` and `init_attention_encoder`): MTD's
  position-aware self-attention encoder, reused by CoSAN; SASRec takes its LayerNorm
  epsilon and dropout masks;
- `Packing`: a padded batch's valid tokens in row-major order (MTD, SASRec, STAMP, CoSAN);
- `FifoMemory`: the ring memory of recent sessions of CSRM, reused by CoSAN;
- `rnn_batch`, `run_gru`: the packed-click GRU plumbing of GRU4Rec, NARM and CSRM;
- `segment_softmax`, `segment_sum` (from `ops.common`, re-exported): softmax and sums over
  each session's packed rows (NARM, CSRM, SASRec, STAMP, CoSAN, SR-GNN).

The hot ops go through `mtd_fast.ops`, as in the models.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from .. import ops
from ..ops.common import check_lengths, segment_softmax, segment_sum
from .base import Batch, SessionModel

__all__ = ["LN_EPS", "dropout_mask", "attention_dropout_mask", "Packing", "SelfAttentionBlock",
           "init_attention_encoder", "FifoMemory", "rnn_batch", "run_gru", "segment_softmax", "segment_sum"]


LN_EPS = 1e-8  # the authors' TF `normalize` epsilon


def dropout_mask(shape: tuple[int, ...], p: float, like: torch.Tensor) -> torch.Tensor:
    """Inverted-dropout keep mask scaled by 1/(1-p), drawn from torch's RNG."""
    return (torch.rand(shape, device=like.device) >= p).to(like.dtype) / (1.0 - p)


def attention_dropout_mask(lengths: torch.Tensor, num_heads: int, width: int, p: float,
                           like: torch.Tensor) -> torch.Tensor:
    """The (B, h, L, L) keep mask of dropout on the attention weights of a padded batch:
    random (`dropout_mask`) in each session's first w x w block, w its length bucket of
    `ops.session_attention` (w >= its length), and 1 elsewhere, where the weights are 0
    anyway. The random draws scale with the sessions' own lengths, not with the batch's
    width squared: a Retailrocket batch of 512 pads to ~250 clicks, and drawing all 512 x
    250 x 250 numbers took ~150 ms of a ~1.1 s MTD step at 1 thread."""
    from ..ops.session_attention import length_buckets

    mask = like.new_ones((lengths.numel(), num_heads, width, width))
    for idx, w in length_buckets(lengths, width):
        mask[idx, :, :w, :w] = dropout_mask((idx.numel(), num_heads, w, w), p, like)
    return mask


class Packing:
    """The valid positions of a left-aligned, 0-padded batch, in row-major order.

    Row-wise layers (projections, LayerNorm, FFN, dropout) run on the N = sum(lengths)
    valid tokens only: a batch is padded to its longest session (Yoochoose 1/64 batches of
    512 pad to 84 clicks on average while prefixes average 5.1), so on the padded tensor
    ~95 % of that work was padding. Only the ops that need the (batch, seq_len) layout see
    dense tensors. Lengths must be in 1..width (checked on CPU tensors: a wrong one would
    shift every later session's rows).
    """

    def __init__(self, lengths: torch.Tensor, width: int) -> None:
        check_lengths(lengths, width, "Packing")  # a 0 or too long length would shift every later row
        self.batch, self.width = lengths.numel(), width
        valid = torch.arange(width, device=lengths.device)[None, :] < lengths[:, None]
        self.index = valid.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions in B * L
        self.last = torch.cumsum(lengths, 0) - 1  # (B,) packed index of each session's last click

    @property
    def session(self) -> torch.Tensor:
        """(N,) the batch row of each packed token."""
        return torch.div(self.index, self.width, rounding_mode="floor")

    def pack(self, dense: torch.Tensor) -> torch.Tensor:
        """(B, L, ...) -> (N, ...)"""
        return dense.reshape(self.batch * self.width, *dense.shape[2:])[self.index]

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(N, d) -> (B, L, d), zeros on padding."""
        out = x.new_zeros(self.batch * self.width, x.shape[-1]).index_copy(0, self.index, x)
        return out.view(self.batch, self.width, x.shape[-1])


def rows_self_attention(block: nn.Module, x: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Causal self-attention of a block with projections wq, wk, wv (no biases), `num_heads`,
    attention dropout `p` and `backend`, over the batch's valid tokens x (N, d) (the rows
    layout of `ops.session_attention`; `width` the padded length) -> (N, d)."""
    mask = None
    if block.training and block.p > 0:
        mask = attention_dropout_mask(lengths, block.num_heads, width, block.p, x)
    q, k, v = (w(x) for w in (block.wq, block.wk, block.wv))  # (N, d) each
    return ops.session_attention(q, k, v, lengths, num_heads=block.num_heads, dropout_mask=mask,
                                 backend=block.backend, width=width)


class SelfAttentionBlock(nn.Module):
    """Post-LN transformer block of the spec (no Q/K/V biases, no output projection)."""

    def __init__(self, d: int, num_heads: int, dropout: float, backend: Any) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.p = dropout
        self.backend = backend
        self.wq = nn.Linear(d, d, bias=False)
        self.wk = nn.Linear(d, d, bias=False)
        self.wv = nn.Linear(d, d, bias=False)
        self.ln1 = nn.LayerNorm(d, eps=LN_EPS)
        self.w1 = nn.Linear(d, d)
        self.w2 = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d, eps=LN_EPS)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor, packing: Optional[Packing] = None) -> torch.Tensor:
        """x: (N, d) valid tokens when `packing` is given, else a padded (B, L, d) batch
        (returned padded, zeros on padding)."""
        dense_in = packing is None
        if dense_in:
            packing = Packing(lengths, x.shape[1])
            x = packing.pack(x)
        h1 = self.ln1(x + rows_self_attention(self, x, lengths, packing.width))  # (N, d)
        ff = self.w2(F.dropout(F.relu(self.w1(h1)), self.p, self.training))
        out = self.ln2(h1 + F.dropout(ff, self.p, self.training))
        return packing.unpack(out) if dense_in else out


def uniform_init_(model: nn.Module, item_emb: nn.Embedding, d: int) -> None:
    """Every parameter of `model` ~ U(-1/sqrt(d), 1/sqrt(d)) in registration order, then the
    padding row of `item_emb` zeroed: the reference initialization of SR-GNN and CSRM."""
    bound = 1.0 / math.sqrt(d)
    for p in model.parameters():
        nn.init.uniform_(p, -bound, bound)
    with torch.no_grad():
        item_emb.weight[0].zero_()


def init_attention_encoder(item_emb: nn.Embedding, pos_emb: nn.Embedding, blocks, d: int) -> None:
    """The spec's initialisation of an embedding + self-attention encoder: E, P, Wq, Wk, Wv
    ~ U(-1/sqrt(d), 1/sqrt(d)) with padding rows zero; FFN weights Glorot-uniform, biases 0
    (LayerNorms keep PyTorch's weight 1, bias 0)."""
    bound = 1.0 / math.sqrt(d)
    uniform = [item_emb.weight, pos_emb.weight]
    for blk in blocks:
        uniform += [blk.wq.weight, blk.wk.weight, blk.wv.weight]
    for w in uniform:
        nn.init.uniform_(w, -bound, bound)
    with torch.no_grad():
        item_emb.weight[0].zero_()
        pos_emb.weight[0].zero_()
    for blk in blocks:
        nn.init.xavier_uniform_(blk.w1.weight)
        nn.init.xavier_uniform_(blk.w2.weight)
        nn.init.zeros_(blk.w1.bias)
        nn.init.zeros_(blk.w2.bias)


class FifoMemory(nn.Module):
    """A ring of `size` detached vectors of dimension `dim`, in persistent buffers.

    `topk_cosine` finds the k filled slots most similar (cosine) to each query and
    `aggregate` sums them with given weights;
    `write` puts rows in the next slots, overwriting the oldest. Shapes are fixed by the
    constructor so `load_state_dict` restores the memory exactly.
    """

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.dim = dim
        self.register_buffer("memory", torch.zeros(size, dim))
        self.register_buffer("mem_ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("mem_count", torch.zeros((), dtype=torch.long))
        # set by the trainer under data parallelism (`Dist.all_gather_rows`): each process then
        # writes the whole global batch's rows, so every copy of the memory stays the same
        self.gather: Optional[Callable[[torch.Tensor], torch.Tensor]] = None

    def filled(self) -> torch.Tensor:
        """(n, dim) the filled slots (slot order; order does not matter to readers)."""
        return self.memory[: int(self.mem_count)]

    def topk_cosine(self, query: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """query (Q, dim) -> (cosine similarities (Q, k'), slot indices (Q, k')), k' = min(k, filled).

        The similarities are differentiable in the query (the memory is detached).
        """
        mem = self.filled()
        kk = min(k, mem.shape[0])
        if kk == 0:
            return query.new_zeros(query.shape[0], 0), torch.zeros(query.shape[0], 0, dtype=torch.long,
                                                                  device=query.device)
        sim = F.normalize(query, dim=-1) @ F.normalize(mem, dim=-1).t()  # (Q, n)
        return sim.topk(kk, dim=-1)  # (Q, k'), (Q, k')

    def aggregate(self, weights: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """sum_j weights[q, j] * memory[idx[q, j]] -> (Q, dim).

        Scattered into a dense (Q, n) matrix and multiplied by the memory instead of
        gathering a (Q, k, dim) tensor: ~11x faster on the CPU (Q = n = k = 512, dim 100,
        forward + backward: 0.53-0.59 s gathered, 0.044-0.052 s dense; one thread, shared
        machine) and it never materialises Q * k rows.
        """
        mem = self.filled()
        dense = weights.new_zeros(weights.shape[0], mem.shape[0]).scatter(1, idx, weights)  # (Q, n)
        return dense @ mem

    @torch.no_grad()
    def write(self, rows: torch.Tensor) -> None:
        """Write rows (n, dim), detached, into the next slots (FIFO)."""
        rows = rows.detach().to(self.memory.dtype)
        if self.gather is not None:
            rows = self.gather(rows)
        if rows.shape[0] > self.size:
            rows = rows[-self.size:]
        n = rows.shape[0]
        if n == 0:
            return
        idx = (self.mem_ptr + torch.arange(n, device=rows.device)) % self.size
        # out of place: a tensor read from the memory in this step may still be needed by autograd
        self.memory = self.memory.index_copy(0, idx, rows)
        self.mem_ptr = (self.mem_ptr + n) % self.size
        self.mem_count = torch.clamp(self.mem_count + n, max=self.size)


def rnn_batch(model: SessionModel, items: np.ndarray, lengths: np.ndarray) -> Batch:
    """`prepare_batch` of the RNN models: the padded batch plus its valid clicks packed in
    the time-major order of a `PackedSequence` (what `nn.GRU` reads), built here in NumPy,
    so the models embed, drop out and attend over the N = sum(lengths) clicks only and no
    (B, L, d) tensor is made (a batch of 512 pads to its longest prefix: on average 84
    clicks on Yoochoose 1/64 and 176 on Retailrocket, against means of 5.1 and 9.1).

    click_ids (N,): the item of each packed click; click_session (N,): its batch row;
    batch_sizes (longest length,) on the CPU (how many sessions have a click at step t);
    sorted_indices / unsorted_indices (B,): the PackedSequence's order (longest first, ties
    by batch row) and its inverse.
    """
    dev = model.device
    items = np.ascontiguousarray(items)
    lengths = np.asarray(lengths, dtype=np.int64)
    check_lengths(torch.from_numpy(lengths), items.shape[1], "rnn_batch")
    if not lengths.size:
        raise ValueError("rnn_batch: an empty batch (no sessions)")
    order = np.argsort(-lengths, kind="stable")
    width = int(lengths.max())
    valid = np.arange(width)[:, None] < lengths[order][None, :]  # (L, B) in packed order
    ids = items[order, :width].T[valid]
    session = np.broadcast_to(order, valid.shape)[valid]
    unsorted = np.empty_like(order)
    unsorted[order] = np.arange(order.size)
    as_t = torch.from_numpy
    return {"items": as_t(items).to(dev), "lengths": as_t(lengths).to(dev),
            "click_ids": as_t(np.ascontiguousarray(ids, dtype=np.int64)).to(dev),
            "click_session": as_t(np.ascontiguousarray(session)).to(dev),
            "batch_sizes": as_t(valid.sum(1).astype(np.int64)),
            "sorted_indices": as_t(order).to(dev), "unsorted_indices": as_t(unsorted).to(dev)}


def run_gru(gru: nn.GRU, x: torch.Tensor, batch: Batch, outputs: bool = False):
    """Run a batch_first GRU over the valid clicks only.

    x: (N, d_in), one row per packed click of `rnn_batch` (e.g. `emb(batch["click_ids"])`);
    returns the state after each session's last click (B, d) in the batch's order and,
    with `outputs`, the state after every click (N, d), row for row with x (its session
    is `batch["click_session"]`).
    """
    packed = PackedSequence(x, batch["batch_sizes"], batch["sorted_indices"], batch["unsorted_indices"])
    out, h_n = gru(packed)
    last = h_n[-1]  # (B, d), back in the batch's order
    return (last, out.data) if outputs else last
