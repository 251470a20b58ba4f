"""The `spmm` op: Y = A_hat @ X for the normalized adjacency of the global item graph (the
GCN's propagation, MTD_SPEC.md section 3), with every implementation of it.

- `spmm(graph, x, ...)`: the public op, dispatched by `backend=` (`mtd_fast.ops.dispatch`);
- `spmm_ref`: the pure-PyTorch reference (gather / scale / index_add);
- backend "cpp" (`auto` on the CPU): `mtd_fast.ops.spmm_cpp`, torch custom ops over the
  C++/pybind11 extension `mtd_fast._spmm_cpp` (sources in csrc/).

Tests: tests/test_spmm.py. Bench: benches/bench_spmm.py.
"""
from __future__ import annotations

from typing import Optional

import torch

from .dispatch import register, resolve

__all__ = ["spmm", "spmm_ref", "NORMS"]

NORMS = ("sym", "mean", "none")


def spmm(graph, x: torch.Tensor, norm: str = "sym", backend=None) -> torch.Tensor:
    """Y = A_hat @ X for the normalized adjacency of `graph` (a `GlobalGraph`), X (N, dim)."""
    if norm not in NORMS:
        raise ValueError(f"unknown norm {norm!r}: use 'sym', 'mean' or 'none'")
    if x.dim() != 2 or x.shape[0] != graph.num_nodes:
        raise ValueError(f"spmm: x must be (num_nodes={graph.num_nodes}, dim), got {tuple(x.shape)}")
    t = graph.torch_tensors(x.device)
    fn = resolve("spmm", backend, x.device)
    return fn(t.indptr, t.indices, t.values, t.degrees, x, norm=norm, symmetric=graph.symmetric)


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


# ---- backends: rank orders auto's preference (lower first); reference is the fallback -------
register("spmm", "reference", "mtd_fast.ops.spmm:spmm_ref", rank=100)
register("spmm", "cpp", "mtd_fast.ops.spmm_cpp:spmm_cpp", rank=0, auto_devices=("cpu",), devices=lambda: ("cpu",))
