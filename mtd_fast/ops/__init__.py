"""The hot ops of MTD, one public function each, with a `backend=` argument.

Backends (see `dispatch.py` for the selection rules):
- session_attention: reference | packed (CPU auto: length-bucketed, valid rows only) | triton (CUDA auto)
- aggregate:         reference | packed (CPU auto)                                  | triton (CUDA auto)
- spmm:              reference | cpp
- global_graph:      reference | numba
- session_graphs:    reference | numba
- linear_cross_entropy: reference (eager) | chunked (CPU auto; CUDA) | triton (CUDA auto)
"""
from __future__ import annotations

import os
from typing import Optional, Union

import numpy as np
import torch

from .dispatch import OPS, BackendError, available_backends, describe, register, resolve, validate_spec
from .linear_cross_entropy import check_inputs as _lce_check_inputs
from .linear_cross_entropy import linear_cross_entropy_ref
from .reference import aggregate_ref, session_attention_ref, spmm_ref

__all__ = ["session_attention", "aggregate", "spmm", "global_graph", "session_graphs", "available_backends",
           "BackendError", "OPS", "session_attention_ref", "aggregate_ref", "spmm_ref", "describe",
           "validate_spec", "linear_cross_entropy", "linear_cross_entropy_ref"]


def _triton_devices() -> tuple[str, ...]:
    # the interpreter runs kernels on CPU tensors (tests only); auto never picks it there
    return ("cuda", "cpu") if os.environ.get("TRITON_INTERPRET") == "1" else ("cuda",)


def _triton_usable() -> bool:
    """Triton counts as available where it can run: a CUDA device, or the interpreter."""
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# ---- registry: rank orders auto's preference (lower first); reference is the fallback ----
register("session_attention", "reference", "mtd_fast.ops.reference:session_attention_ref", rank=100)
register("session_attention", "triton", "mtd_fast.kernels.session_attention:session_attention_triton", rank=0,
         auto_devices=("cuda",), devices=_triton_devices, probe=_triton_usable)
register("session_attention", "packed", "mtd_fast.ops.packed:session_attention_packed", rank=50,
         auto_devices=("cpu",))
register("aggregate", "reference", "mtd_fast.ops.reference:aggregate_ref", rank=100)
register("aggregate", "triton", "mtd_fast.kernels.aggregate:aggregate_triton", rank=0,
         auto_devices=("cuda",), devices=_triton_devices, probe=_triton_usable)
register("aggregate", "packed", "mtd_fast.ops.packed:aggregate_packed", rank=50, auto_devices=("cpu",))
register("spmm", "reference", "mtd_fast.ops.reference:spmm_ref", rank=100)
register("spmm", "cpp", "mtd_fast.ops.cpp:spmm_cpp", rank=0, auto_devices=("cpu",), devices=lambda: ("cpu",))
register("global_graph", "reference", "mtd_fast.graph.reference:global_graph_ref", rank=100)
register("global_graph", "numba", "mtd_fast.graph.numba:global_graph_numba", rank=0,
         auto_devices=("cpu", "cuda"))
register("session_graphs", "reference", "mtd_fast.graph.reference:session_graphs_ref", rank=100)
register("session_graphs", "numba", "mtd_fast.graph.numba:session_graphs_numba", rank=0,
         auto_devices=("cpu", "cuda"))
register("linear_cross_entropy", "reference", "mtd_fast.ops.linear_cross_entropy:linear_cross_entropy_ref", rank=100)
# chunked beats eager on the CPU at every catalogue size measured (benches/bench_scoring.py)
register("linear_cross_entropy", "chunked", "mtd_fast.ops.linear_cross_entropy:linear_cross_entropy_chunked",
         rank=50, auto_devices=("cpu", "cuda"))
register("linear_cross_entropy", "triton", "mtd_fast.kernels.linear_cross_entropy:linear_cross_entropy_triton",
         rank=0, auto_devices=("cuda",), devices=_triton_devices, probe=_triton_usable)


def _check_lengths(lengths: torch.Tensor, width: int, op: str) -> None:
    """Empty sessions are an input error (MTD_SPEC section 2), never a zero row. Checked on
    CPU tensors; on a GPU this would force a device sync per call, and the model's inputs
    come from `recommend` / the loaders, which reject empty sessions first."""
    if lengths.device.type == "cpu" and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > width:
            raise ValueError(f"{op}: session lengths must be in 1..{width} (the padded width), got {lo}..{hi}"
                             + ("; an empty session is an input error" if lo < 1 else ""))


def session_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor, num_heads: int = 1,
                      dropout_mask: Optional[torch.Tensor] = None, backend=None) -> torch.Tensor:
    """Causal key-padded attention over left-aligned sessions.

    q, k, v: (batch, seq_len, dim); lengths: (batch,) >= 1; dropout_mask: optional
    (batch, num_heads, seq_len, seq_len) scaled keep-mask. Returns (batch, seq_len, dim),
    zero on padded query rows. See `reference.session_attention_ref`.
    """
    _check_lengths(lengths, q.shape[1], "session_attention")
    fn = resolve("session_attention", backend, q.device)
    return fn(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask)


def aggregate(h: torch.Tensor, hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor,
              gamma: Union[float, torch.Tensor] = 0.75, mode: str = "additive",
              backend=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attentive aggregation x_s and position-decay aggregation p_s, each (batch, dim).

    h, hp: (batch, seq_len, dim); a: (batch, dim); g: (dim,). See `reference.aggregate_ref`.
    """
    _check_lengths(lengths, h.shape[1], "aggregate")
    fn = resolve("aggregate", backend, h.device)
    return fn(h, hp, a, g, lengths, gamma=gamma, mode=mode)


def spmm(graph, x: torch.Tensor, norm: str = "sym", backend=None) -> torch.Tensor:
    """Y = A_hat @ X for the normalized adjacency of `graph` (a `GlobalGraph`), X (N, dim)."""
    if norm not in ("sym", "mean", "none"):
        raise ValueError(f"unknown norm {norm!r}: use 'sym', 'mean' or 'none'")
    if x.dim() != 2 or x.shape[0] != graph.num_nodes:
        raise ValueError(f"spmm: x must be (num_nodes={graph.num_nodes}, dim), got {tuple(x.shape)}")
    indptr, indices, values, degrees, _ = graph.torch_tensors(x.device)
    fn = resolve("spmm", backend, x.device)
    return fn(indptr, indices, values, degrees, x, norm=norm, symmetric=graph.symmetric)


def global_graph(sessions, n_items: int, directed: bool = False, weighted: bool = False, backend=None):
    """Unnormalized CSR of `A + I` of the training sessions (`GlobalGraph`)."""
    return resolve("global_graph", backend, "cpu")(sessions, n_items, directed=directed, weighted=weighted)


def session_graphs(items: np.ndarray, lengths: np.ndarray, backend=None):
    """Per-session SR-GNN graphs of a padded batch (`SessionGraphs`)."""
    return resolve("session_graphs", backend, "cpu")(np.asarray(items), np.asarray(lengths))


def linear_cross_entropy(q: torch.Tensor, item_table: torch.Tensor, targets: torch.Tensor,
                         chunk_size: Optional[int] = None, backend=None) -> torch.Tensor:
    """Exactly `F.cross_entropy(q @ item_table.T, targets)` (the mean over the batch) without
    the full (batch, M) logits.

    q: (batch, dim); item_table: (M, dim), same dtype and device; targets: (batch,) integer
    indices into the table's rows, 0..M-1 (the models pass item id - 1). `chunk_size`: the
    most logits (rows x items) one chunk may hold; None: from a memory budget. Bad input
    (out-of-range targets, empty batch, mismatched dtypes or devices, chunk_size <= 0)
    raises naming the problem. See `mtd_fast.ops.linear_cross_entropy`.
    """
    _lce_check_inputs(q, item_table, targets, chunk_size)
    fn = resolve("linear_cross_entropy", backend, q.device)
    return fn(q, item_table, targets, chunk_size=chunk_size)
