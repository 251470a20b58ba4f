"""C++ backend of the `spmm` op: torch custom ops over the pybind11 extension `mtd_fast._spmm_cpp`.

The extension takes NumPy buffers (no torch at build time); tensors cross as zero-copy
`.numpy()` views of CPU tensors, and the output is allocated by torch and written in place.

Public functions (CPU tensors only):

- `spmm_cpp(indptr, indices, values, degrees, x, norm="sym", symmetric=False)`:
  `Y = A_hat @ X` for the normalized adjacency of the unnormalized square CSR `A + I`
  (the `GlobalGraph` layout): "sym" `D^-1/2 A D^-1/2`, "mean" `D^-1 A`, "none" `A`.
  The normalization is applied inside the product; no normalized value array is made.
- `csr_spmm_cpp(indptr, indices, values, x)`: `Y = A @ X` for any valued (or binary,
  `values=None`) CSR of shape `(N, x.shape[0])`.
- `csr_transpose_cpp(indptr, indices, values, n_cols)`: the transpose as CSR tensors.

Shapes: indptr `(N + 1,)` int32/int64, indices `(nnz,)` int32/int64 sorted or not,
values `(nnz,)` float32/float64 or None, degrees `(N,)` float32/float64 row sums,
x `(N, dim)` (`(n_cols, dim)` for `csr_spmm_cpp`) float32/float64 -> `(N, dim)` of x's dtype.

Autograd: the gradient flows to `x` only. `values` and `degrees` are constants of the
graph (MTD never learns them); passing a `values` or `degrees` that requires grad with
grad mode on raises instead of silently returning no gradient (use `backend="reference"`
for that). The backward of `A_hat @ X` is `A_hat^T @ G`, the same kernel:
- symmetric graph (`symmetric=True`: the stored matrix equals its transpose), norm "sym"
  or "none": `A_hat^T = A_hat`, the same CSR as is;
- symmetric graph, norm "mean": `(D^-1 A)^T = A D^-1`, the same CSR with the scaling
  moved to the columns: still no transpose;
- directed graphs (`symmetric=False`) and `csr_spmm_cpp`: the CSR transpose, built on the
  first backward and cached (see `clear_transpose_cache`). The cache is keyed on the
  tensors' data pointer, size, dtype and version counter, and holds references to them so
  their memory cannot be reused under the same key; it keeps the last 8 graphs. In-place
  changes made through the tensors bump their version and miss the cache; changes made
  behind torch's back (writing into the NumPy arrays a tensor was made from) do not:
  call `clear_transpose_cache()` after such writes.
The backward ops are differentiable too (double backward works).

Threads: every call runs on `torch.get_num_threads()` OpenMP threads, so
`torch.set_num_threads` governs this backend like torch's own ops. Extension built
against libgomp shares torch's OpenMP runtime (torch's wheel ships `libgomp.so.1` and
is imported first), so there is one thread pool in the process.

Inputs are checked in C++ (dtype, contiguity, shapes, index range, monotone indptr,
positive degrees where divided by): bad input raises TypeError or ValueError naming the
broken constraint. `x` (and the upstream gradient) may be non-contiguous: it is copied
to a contiguous tensor first; the graph arrays must already be contiguous.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Optional

import torch

try:
    from .. import _spmm_cpp as _C
except ImportError as exc:  # the dispatcher then lists "cpp" as unavailable
    raise ImportError(
        "the C++ extension mtd_fast._spmm_cpp is not built: reinstall with cmake (>= 3.18), pybind11 and a "
        "C++ compiler present and MTD_FAST_NO_EXT unset (MTD_FAST_REQUIRE_EXT=1 makes a failed build an "
        f"error); the 'spmm' op falls back to its reference meanwhile ({exc})"
    ) from exc

__all__ = ["spmm_cpp", "csr_spmm_cpp", "csr_transpose_cpp", "clear_transpose_cache", "transpose_cache_stats",
           "extension_info"]

Tensor = torch.Tensor
_NORMS = ("sym", "mean", "none")


def extension_info() -> dict:
    """What the extension was built with and runs here (for logs and benches)."""
    return {"isa": _C.isa(), "isas": list(_C.isas()), "openmp": bool(_C.has_openmp()),
            "threads": torch.get_num_threads()}


def _np(t: Tensor):
    return t.detach().numpy()


def _np_opt(t: Optional[Tensor]):
    return None if t is None else t.detach().numpy()


def _threads() -> int:
    return torch.get_num_threads()


# ---------------------------------------------------------------- transpose cache ----

_CACHE_MAX = 8
_cache: "OrderedDict[tuple, tuple]" = OrderedDict()
_cache_lock = threading.Lock()
_stats = {"hits": 0, "builds": 0}


def _version(t: Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors have no version counter
        return None


def _key(t: Optional[Tensor]):
    if t is None:
        return None
    return (t.data_ptr(), t.numel(), t.dtype, _version(t))


def clear_transpose_cache() -> None:
    """Drop every cached transpose (and the references it holds to graph tensors); zero the counters."""
    with _cache_lock:
        _cache.clear()
        _stats.update(hits=0, builds=0)


def transpose_cache_stats() -> dict:
    """{"hits", "builds", "size"}: how often backward found or built a transpose since the last clear."""
    with _cache_lock:
        return {**_stats, "size": len(_cache)}


def csr_transpose_cpp(indptr: Tensor, indices: Tensor, values: Optional[Tensor],
                      n_cols: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """Transpose of the CSR (indptr (N+1,), indices (nnz,), values (nnz,) | None) with n_cols columns.

    Returns (indptr int64 (n_cols + 1,), indices (nnz,) of the input index dtype, sorted
    within each row, values (nnz,) of the input dtype or None). Not cached; see `spmm_cpp`.
    """
    _check_cpu("csr_transpose", indptr=indptr, indices=indices, values=values)
    tp, ti, tv = _C.csr_transpose(_np(indptr), _np(indices), _np_opt(values), int(n_cols))
    return torch.from_numpy(tp), torch.from_numpy(ti), None if tv is None else torch.from_numpy(tv)


def _cached_transpose(indptr: Tensor, indices: Tensor, values: Optional[Tensor], n_cols: int):
    key = (int(n_cols), _key(indptr), _key(indices), _key(values))
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            _cache.move_to_end(key)
            _stats["hits"] += 1
            return hit[1]
    result = csr_transpose_cpp(indptr, indices, values, n_cols)
    with _cache_lock:
        # the entry holds the source tensors so their memory (and data_ptr) stays theirs
        _cache[key] = ((indptr, indices, values), result)
        _cache.move_to_end(key)
        while len(_cache) > _CACHE_MAX:
            _cache.popitem(last=False)
        _stats["builds"] += 1
    return result


# ------------------------------------------------------------------- custom ops ----

def _values_as(values: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    # the kernel takes values in x's dtype; GlobalGraph stores float32 (float64 x: tests)
    return values if values is None or values.dtype == dtype else values.to(dtype)


@torch.library.custom_op("mtd_fast::spmm", mutates_args=(), device_types="cpu")
def _spmm_op(indptr: Tensor, indices: Tensor, values: Optional[Tensor], degrees: Tensor, x: Tensor, norm: str,
             symmetric: bool) -> Tensor:
    out = torch.empty((max(indptr.shape[0] - 1, 0), x.shape[1]), dtype=x.dtype)  # C++ rejects a bad indptr
    _C.spmm_norm(_np(indptr), _np(indices), _np_opt(_values_as(values, x.dtype)), _np(degrees), _np(x), _np(out),
                 norm, False, _threads())
    return out


@torch.library.custom_op("mtd_fast::spmm_t", mutates_args=(), device_types="cpu")
def _spmm_t_op(indptr: Tensor, indices: Tensor, values: Optional[Tensor], degrees: Tensor, g: Tensor, norm: str,
               symmetric: bool) -> Tensor:
    """A_hat^T @ g for the A_hat of `mtd_fast::spmm` (its backward)."""
    n = max(indptr.shape[0] - 1, 0)
    out = torch.empty((n, g.shape[1]), dtype=g.dtype)
    if symmetric:
        # A^T == A: sym and none are self-adjoint; mean's transpose scales columns instead
        _C.spmm_norm(_np(indptr), _np(indices), _np_opt(_values_as(values, g.dtype)), _np(degrees), _np(g), _np(out),
                     norm, norm == "mean", _threads())
    else:
        tp, ti, tv = _cached_transpose(indptr, indices, values, n)
        _C.spmm_norm(_np(tp), _np(ti), _np_opt(_values_as(tv, g.dtype)), _np(degrees), _np(g), _np(out),
                     norm, True, _threads())
    return out


@_spmm_op.register_fake
def _spmm_fake(indptr, indices, values, degrees, x, norm, symmetric):
    return x.new_empty((indptr.shape[0] - 1, x.shape[1]))


@_spmm_t_op.register_fake
def _spmm_t_fake(indptr, indices, values, degrees, g, norm, symmetric):
    return g.new_empty((indptr.shape[0] - 1, g.shape[1]))


def _spmm_setup(ctx, inputs, output):
    indptr, indices, values, degrees, _, norm, symmetric = inputs
    ctx.save_for_backward(indptr, indices, values, degrees)
    ctx.norm, ctx.symmetric = norm, symmetric


def _spmm_backward(ctx, grad):
    indptr, indices, values, degrees = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[4]:
        gx = _spmm_t_op(indptr, indices, values, degrees, grad.contiguous(), ctx.norm, ctx.symmetric)
    return None, None, None, None, gx, None, None


def _spmm_t_backward(ctx, grad):
    indptr, indices, values, degrees = ctx.saved_tensors
    gg = None
    if ctx.needs_input_grad[4]:
        gg = _spmm_op(indptr, indices, values, degrees, grad.contiguous(), ctx.norm, ctx.symmetric)
    return None, None, None, None, gg, None, None


_spmm_op.register_autograd(_spmm_backward, setup_context=_spmm_setup)
_spmm_t_op.register_autograd(_spmm_t_backward, setup_context=_spmm_setup)


@torch.library.custom_op("mtd_fast::csr_spmm", mutates_args=(), device_types="cpu")
def _csr_spmm_op(indptr: Tensor, indices: Tensor, values: Optional[Tensor], x: Tensor) -> Tensor:
    out = torch.empty((max(indptr.shape[0] - 1, 0), x.shape[1]), dtype=x.dtype)
    _C.csr_spmm(_np(indptr), _np(indices), _np_opt(_values_as(values, x.dtype)), _np(x), _np(out), _threads())
    return out


@torch.library.custom_op("mtd_fast::csr_spmm_t", mutates_args=(), device_types="cpu")
def _csr_spmm_t_op(indptr: Tensor, indices: Tensor, values: Optional[Tensor], g: Tensor, n_cols: int) -> Tensor:
    """A^T @ g, (n_cols, dim), for the CSR A of `mtd_fast::csr_spmm` (its backward)."""
    tp, ti, tv = _cached_transpose(indptr, indices, values, n_cols)
    out = torch.empty((n_cols, g.shape[1]), dtype=g.dtype)
    _C.csr_spmm(_np(tp), _np(ti), _np_opt(_values_as(tv, g.dtype)), _np(g), _np(out), _threads())
    return out


@_csr_spmm_op.register_fake
def _csr_spmm_fake(indptr, indices, values, x):
    return x.new_empty((indptr.shape[0] - 1, x.shape[1]))


@_csr_spmm_t_op.register_fake
def _csr_spmm_t_fake(indptr, indices, values, g, n_cols):
    return g.new_empty((n_cols, g.shape[1]))


def _csr_setup(ctx, inputs, output):
    indptr, indices, values, x = inputs
    ctx.save_for_backward(indptr, indices, values)
    ctx.n_cols = x.shape[0]


def _csr_backward(ctx, grad):
    indptr, indices, values = ctx.saved_tensors
    gx = None
    if ctx.needs_input_grad[3]:
        gx = _csr_spmm_t_op(indptr, indices, values, grad.contiguous(), ctx.n_cols)
    return None, None, None, gx


def _csr_t_setup(ctx, inputs, output):
    indptr, indices, values, _, _ = inputs
    ctx.save_for_backward(indptr, indices, values)


def _csr_t_backward(ctx, grad):
    indptr, indices, values = ctx.saved_tensors
    gg = None
    if ctx.needs_input_grad[3]:
        gg = _csr_spmm_op(indptr, indices, values, grad.contiguous())
    return None, None, None, gg, None


_csr_spmm_op.register_autograd(_csr_backward, setup_context=_csr_setup)
_csr_spmm_t_op.register_autograd(_csr_t_backward, setup_context=_csr_t_setup)


# ------------------------------------------------------------- public wrappers ----

def _check_cpu(op: str, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device.type != "cpu":
            raise ValueError(f"{op}: the cpp backend runs on CPU tensors; {name} is on {t.device}")
        if t.layout != torch.strided:
            raise ValueError(f"{op}: {name} must be a dense (strided) tensor, got layout {t.layout}")


def _check_x(op: str, x: Tensor) -> Tensor:
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{op}: x must be float32 or float64, got {x.dtype}")
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be 2-D (n, dim), got shape {tuple(x.shape)}")
    return x.contiguous()


def _check_constant(op: str, **tensors: Optional[Tensor]) -> None:
    if not torch.is_grad_enabled():
        return
    for name, t in tensors.items():
        if t is not None and t.requires_grad:
            raise RuntimeError(f"{op}: the cpp backend differentiates with respect to x only, but {name} requires "
                               f"grad; detach it, or use backend='reference' to learn {name}")


def spmm_cpp(indptr: Tensor, indices: Tensor, values: Optional[Tensor], degrees: Tensor, x: Tensor,
             norm: str = "sym", symmetric: bool = False) -> Tensor:
    """Y (N, dim) = A_hat @ X (N, dim) for the unnormalized square CSR `A + I` and its row sums `degrees`.

    norm: "sym" `D^-1/2 A D^-1/2`, "mean" `D^-1 A`, "none" `A`. `symmetric`: the stored
    matrix equals its transpose (undirected graph); backward then needs no transpose.
    Differentiable in x only (see the module docstring).
    """
    if norm not in _NORMS:
        raise ValueError(f"spmm: unknown norm {norm!r}: use 'sym', 'mean' or 'none'")
    _check_cpu("spmm", indptr=indptr, indices=indices, values=values, degrees=degrees, x=x)
    x = _check_x("spmm", x)
    _check_constant("spmm", values=values, degrees=degrees)
    return _spmm_op(indptr, indices, values, degrees, x, norm, bool(symmetric))


def csr_spmm_cpp(indptr: Tensor, indices: Tensor, values: Optional[Tensor], x: Tensor) -> Tensor:
    """Y (N, dim) = A @ X (n_cols, dim) for a CSR A of shape (N, n_cols = x.shape[0]).

    values None means every stored entry is 1. Differentiable in x only; its backward uses
    the cached transpose.
    """
    _check_cpu("csr_spmm", indptr=indptr, indices=indices, values=values, x=x)
    x = _check_x("csr_spmm", x)
    _check_constant("csr_spmm", values=values)
    return _csr_spmm_op(indptr, indices, values, x)
