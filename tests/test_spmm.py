"""The C++ SpMM backend (`mtd_fast.ops.spmm_cpp`, extension `mtd_fast._spmm_cpp`) against the
reference `spmm_ref`, `torch.sparse.mm` and a dense product.

Covers every norm, binary and weighted, directed and undirected graphs, float32/float64,
int32/int64 indptr and indices, empty rows, nnz = 0, isolated nodes, float64 gradcheck,
the transpose cache, thread-count and kernel-variant invariance, the input checks (each
error must name the broken constraint, and garbage input must raise, never crash),
dispatch, the install without the extension, and a torch.compile trace (slow).
Everything but the no-extension test skips with a reason when the extension is not built.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import mtd_fast.ops as ops
from mtd_fast.data import Sessions
from mtd_fast.graph import global_graph_ref
from mtd_fast.ops import spmm_ref

try:
    # isort: off
    from mtd_fast.ops import spmm_cpp as cppmod  # first: its ImportError says why and what to do
    from mtd_fast import _spmm_cpp as C
    from mtd_fast.ops.spmm_cpp import (clear_transpose_cache, csr_spmm_cpp, csr_transpose_cpp, spmm_cpp,
                                       transpose_cache_stats)
    # isort: on

    _WHY = ""
except ImportError as exc:  # not built: MTD_FAST_NO_EXT, no cmake/pybind11/compiler
    C = cppmod = None
    _WHY = f"C++ extension not built ({exc})"

needs_ext = pytest.mark.skipif(C is None, reason=_WHY or "C++ extension not built")
PROJECT = Path(__file__).resolve().parents[1]
NORMS = ("sym", "mean", "none")

# (dtype) -> (atol, rtol) against a float64 reference. float32: sums of <= ~50 terms of
# magnitude <= ~5 accumulated in a different order than the reference (and with FMA):
# a few ulps of the result. float64: same reasoning at double precision.
TOL = {torch.float32: (2e-5, 1e-5), torch.float64: (1e-12, 1e-12)}


def assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    atol, rtol = TOL[actual.dtype]
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "non-finite output"
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# --------------------------------------------------------------------------- graphs
HAND = [[1, 2, 3, 2], [3, 4], [5, 1, 2], [6, 6], [7], [2, 5, 5, 1]]  # self-transitions, a lone click


def random_sessions(n_sessions: int, n_items: int, seed: int) -> Sessions:
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(n_sessions):
        length = int(rng.integers(1, 8))
        # a skewed item distribution gives hubs (long rows) and leaves (short rows)
        seqs.append((rng.zipf(1.6, size=length) % n_items + 1).tolist())
    return Sessions.from_lists(seqs)


def make_graph(kind: str, directed: bool, weighted: bool):
    sessions = Sessions.from_lists(HAND) if kind == "hand" else random_sessions(300, 120, seed=7)
    n_items = 7 if kind == "hand" else 120
    return global_graph_ref(sessions, n_items, directed=directed, weighted=weighted)


def graph_tensors(g, index_dtype=(torch.int64, torch.int32)):
    indptr, indices, values, degrees, _ = g.torch_tensors()
    return indptr.to(index_dtype[0]), indices.to(index_dtype[1]), values, degrees


def dense_of(g, norm: str) -> torch.Tensor:
    return torch.from_numpy(g.to_scipy(norm).toarray())


def torch_csr_of(g, norm: str) -> torch.Tensor:
    s = g.to_scipy(norm)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return torch.sparse_csr_tensor(torch.from_numpy(s.indptr.astype(np.int64)),
                                       torch.from_numpy(s.indices.astype(np.int64)), torch.from_numpy(s.data), s.shape,
                                       check_invariants=True)


# ---------------------------------------------------------------- forward / backward
@needs_ext
@pytest.mark.parametrize("kind", ["hand", "random"])
@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_backward_match_reference_sparse_and_dense(kind, directed, weighted, norm, dtype):
    g = make_graph(kind, directed, weighted)
    assert g.directed == directed and (g.values is not None) == weighted
    indptr, indices, values, degrees = graph_tensors(g)
    gen = torch.Generator().manual_seed(1)
    x64 = torch.randn(g.num_nodes, 19, dtype=torch.float64, generator=gen)  # prime width: vector remainders
    gy64 = torch.randn(g.num_nodes, 19, dtype=torch.float64, generator=gen)
    x = x64.to(dtype).requires_grad_()
    y = spmm_cpp(indptr, indices, values, degrees, x, norm=norm, symmetric=g.symmetric)
    assert y.dtype == dtype and y.shape == (g.num_nodes, 19)
    (gx,) = torch.autograd.grad(y, x, gy64.to(dtype))

    # the reference in float64 on the same (rounded) input
    xr = x.detach().double().requires_grad_()
    yr = spmm_ref(indptr, indices, values, degrees, xr, norm=norm)
    (gr,) = torch.autograd.grad(yr, xr, gy64.to(dtype).double())
    assert_close(y.detach(), yr.detach())
    assert_close(gx, gr)

    # torch's CSR product and a dense product of the normalized matrix
    xd = x.detach().double()
    assert_close(y.detach(), torch.sparse.mm(torch_csr_of(g, norm), xd))
    dense = dense_of(g, norm)
    assert_close(y.detach(), dense @ xd)
    assert_close(gx, dense.T @ gy64.to(dtype).double())


@needs_ext
@pytest.mark.parametrize("index_dtype", [(torch.int64, torch.int32), (torch.int32, torch.int32),
                                         (torch.int64, torch.int64), (torch.int32, torch.int64)],
                         ids=["ptr64-idx32", "ptr32-idx32", "ptr64-idx64", "ptr32-idx64"])
@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
def test_index_dtypes(index_dtype, directed):
    g = make_graph("random", directed, weighted=True)
    indptr, indices, values, degrees = graph_tensors(g, index_dtype)
    assert indptr.dtype == index_dtype[0] and indices.dtype == index_dtype[1]
    x = torch.randn(g.num_nodes, 8, dtype=torch.float64, requires_grad=True)
    for norm in NORMS:
        y = spmm_cpp(indptr, indices, values, degrees, x, norm=norm, symmetric=g.symmetric)
        gy = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, gy)
        yr = spmm_ref(indptr.long(), indices.long(), values, degrees, x, norm=norm)
        (gr,) = torch.autograd.grad(yr, x, gy)
        assert_close(y.detach(), yr.detach())
        assert_close(gx, gr)


@needs_ext
@pytest.mark.parametrize("directed", [False, True], ids=["undirected", "directed"])
@pytest.mark.parametrize("weighted", [False, True], ids=["binary", "weighted"])
@pytest.mark.parametrize("norm", NORMS)
def test_gradcheck_float64(directed, weighted, norm):
    g = make_graph("hand", directed, weighted)
    indptr, indices, values, degrees = graph_tensors(g)
    x = torch.randn(g.num_nodes, 3, dtype=torch.float64, requires_grad=True)
    fn = lambda x: spmm_cpp(indptr, indices, values, degrees, x, norm=norm, symmetric=g.symmetric)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x,))
    assert torch.autograd.gradgradcheck(fn, (x,))


@needs_ext
def test_symmetric_flag_is_only_a_shortcut():
    # an undirected graph told symmetric=False takes the transpose path: same gradients
    g = make_graph("random", directed=False, weighted=True)
    indptr, indices, values, degrees = graph_tensors(g)
    x = torch.randn(g.num_nodes, 5, dtype=torch.float64, requires_grad=True)
    for norm in NORMS:
        grads = []
        for sym in (True, False):
            y = spmm_cpp(indptr, indices, values, degrees, x, norm=norm, symmetric=sym)
            grads.append(torch.autograd.grad(y, x, torch.ones_like(y))[0])
        assert_close(grads[0], grads[1])


@needs_ext
def test_large_random_graph_uses_threads_and_matches():
    # big enough for the threaded path and for prefetches that cross rows
    g = global_graph_ref(random_sessions(6000, 2500, seed=3), 2500)
    indptr, indices, values, degrees = graph_tensors(g)
    x = torch.randn(g.num_nodes, 37, dtype=torch.float32)
    old = torch.get_num_threads()
    try:
        outs = []
        for nt in (1, 2, 3):
            torch.set_num_threads(nt)
            outs.append(spmm_cpp(indptr, indices, values, degrees, x, norm="sym", symmetric=True))
    finally:
        torch.set_num_threads(old)
    # each row is summed by one thread in a fixed order: bitwise identical for any count
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert_close(outs[0], spmm_ref(indptr, indices, values, degrees, x.double(), norm="sym"))


@needs_ext
def test_every_kernel_variant_agrees():
    g = make_graph("random", directed=True, weighted=True)
    indptr, indices, values, degrees = graph_tensors(g)
    x = torch.randn(g.num_nodes, 21, dtype=torch.float32)
    ref = spmm_ref(indptr, indices, values, degrees, x.double(), norm="mean")
    assert "baseline" in C.isas()
    try:
        for isa in C.isas():
            C.set_isa(isa)
            assert C.isa() == isa
            assert_close(spmm_cpp(indptr, indices, values, degrees, x, norm="mean"), ref)
    finally:
        C.set_isa("auto")
    with pytest.raises(ValueError, match="not usable"):
        C.set_isa("sse9000")


# -------------------------------------------------------------- awkward shapes
@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_empty_rows_isolated_nodes_and_zero_degrees(dtype):
    # a hand-made CSR (no self-loops): node 1 has no entries and degree 0 (isolated),
    # rows 3 and 4 are empty too; zero degrees are fine wherever nothing divides by them
    indptr = torch.tensor([0, 2, 2, 4, 4, 4, 5])
    indices = torch.tensor([0, 2, 0, 5, 2], dtype=torch.int32)
    values = torch.tensor([1.0, 2.0, 3.0, 0.5, 4.0])
    degrees = torch.tensor([3.0, 0.0, 3.5, 0.0, 0.0, 4.0])
    x = torch.randn(6, 4, dtype=dtype, requires_grad=True)
    for norm in NORMS:
        y = spmm_cpp(indptr, indices, values, degrees, x, norm=norm)
        yr = spmm_ref(indptr, indices, values, degrees, x.detach().double(), norm=norm)
        assert_close(y.detach(), yr)
        assert torch.all(y.detach()[[1, 3, 4]] == 0)
        (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        xr = x.detach().double().requires_grad_()
        (gr,) = torch.autograd.grad(spmm_ref(indptr, indices, values, degrees, xr, norm=norm), xr,
                                    torch.ones(6, 4, dtype=torch.float64))
        assert_close(gx, gr)


@needs_ext
def test_nnz_zero_and_empty_graph():
    # four nodes, no entries at all
    indptr = torch.zeros(5, dtype=torch.int64)
    indices = torch.zeros(0, dtype=torch.int32)
    degrees = torch.zeros(4)
    x = torch.randn(4, 3, requires_grad=True)
    for norm in NORMS:
        y = spmm_cpp(indptr, indices, None, degrees, x, norm=norm)
        assert torch.equal(y, torch.zeros(4, 3))
        y.sum().backward()
        assert torch.equal(x.grad, torch.zeros(4, 3))
        x.grad = None
    y = csr_spmm_cpp(indptr, indices, None, x)
    assert torch.equal(y, torch.zeros(4, 3))
    # sessions without a single transition: a graph of zero nodes
    g = global_graph_ref(Sessions.from_lists([[1], [2, 2]]), 2)
    assert g.num_nodes == 0
    ip, ix, v, deg = graph_tensors(g)
    y = spmm_cpp(ip, ix, v, deg, torch.zeros(0, 5), norm="sym", symmetric=True)
    assert y.shape == (0, 5)


@needs_ext
@pytest.mark.parametrize("dim", [0, 1, 2, 3, 16, 100, 129])
def test_feature_widths(dim):
    g = make_graph("random", directed=True, weighted=False)
    indptr, indices, values, degrees = graph_tensors(g)
    x = torch.randn(g.num_nodes, dim, dtype=torch.float32, requires_grad=True)
    y = spmm_cpp(indptr, indices, values, degrees, x, norm="sym")
    assert y.shape == (g.num_nodes, dim)
    assert_close(y.detach(), spmm_ref(indptr, indices, values, degrees, x.detach().double(), norm="sym"))
    y.sum().backward()
    assert x.grad.shape == x.shape


@needs_ext
def test_non_contiguous_x_is_copied():
    g = make_graph("hand", directed=True, weighted=True)
    indptr, indices, values, degrees = graph_tensors(g)
    xt = torch.randn(7, g.num_nodes, dtype=torch.float64)
    x = xt.T  # (N, 7), column-major
    assert not x.is_contiguous()
    y = spmm_cpp(indptr, indices, values, degrees, x, norm="mean")
    assert_close(y, spmm_ref(indptr, indices, values, degrees, x, norm="mean"))


# ------------------------------------------------------ general CSR and transpose
def random_csr(n_rows: int, n_cols: int, nnz: int, seed: int, sort: bool = True):
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.integers(0, n_rows, size=nnz))
    cols = rng.integers(0, n_cols, size=nnz)  # duplicates allowed: a CSR may hold them
    if sort:
        order = np.lexsort((cols, rows))
        rows, cols = rows[order], cols[order]
    vals = rng.standard_normal(nnz)
    indptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=n_rows), out=indptr[1:])
    return indptr, cols.astype(np.int32), vals


@needs_ext
@pytest.mark.parametrize("binary", [False, True], ids=["valued", "binary"])
@pytest.mark.parametrize("sort", [True, False], ids=["sorted", "unsorted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_csr_spmm_rectangular(binary, sort, dtype):
    import scipy.sparse as sp

    indptr, cols, vals = random_csr(53, 31, 400, seed=5, sort=sort)
    s = sp.csr_matrix((np.ones(400) if binary else vals, cols, indptr), shape=(53, 31))
    ip, ix = torch.from_numpy(indptr), torch.from_numpy(cols)
    v = None if binary else torch.from_numpy(vals).to(dtype)
    x = torch.randn(31, 6, dtype=torch.float64).to(dtype).requires_grad_()
    y = csr_spmm_cpp(ip, ix, v, x)
    assert y.shape == (53, 6)
    dense = torch.from_numpy(s.toarray())
    assert_close(y.detach(), dense @ x.detach().double())
    gy = torch.randn(53, 6, dtype=dtype)
    (gx,) = torch.autograd.grad(y, x, gy)
    assert gx.shape == (31, 6)
    assert_close(gx, dense.T @ gy.double())
    if dtype == torch.float64:
        xg = x.detach().requires_grad_()
        assert torch.autograd.gradcheck(lambda x: csr_spmm_cpp(ip, ix, v, x), (xg,))
        assert torch.autograd.gradgradcheck(lambda x: csr_spmm_cpp(ip, ix, v, x), (xg,))


@needs_ext
@pytest.mark.parametrize("with_values", [True, False])
@pytest.mark.parametrize("idx_dtype", [torch.int32, torch.int64])
def test_csr_transpose_matches_scipy(with_values, idx_dtype):
    import scipy.sparse as sp

    indptr, cols, vals = random_csr(40, 25, 300, seed=9)
    tp, ti, tv = csr_transpose_cpp(torch.from_numpy(indptr), torch.from_numpy(cols).to(idx_dtype),
                                   torch.from_numpy(vals) if with_values else None, 25)
    assert tp.dtype == torch.int64 and ti.dtype == idx_dtype and tp.shape == (26,)
    assert (tv is None) != with_values
    st = sp.csr_matrix((vals, cols, indptr), shape=(40, 25)).T.tocsr()
    np.testing.assert_array_equal(tp.numpy(), st.indptr)
    for r in range(25):  # sorted within each row (stable: duplicates keep their order)
        seg = ti[tp[r]:tp[r + 1]].numpy()
        assert np.all(np.diff(seg) >= 0)
    if with_values:
        back = sp.csr_matrix((tv.numpy(), ti.numpy(), tp.numpy()), shape=(25, 40))
        np.testing.assert_allclose(back.toarray(), st.toarray(), rtol=0, atol=0)


@needs_ext
def test_transpose_cache_built_once_and_invalidated_by_inplace_change():
    g = make_graph("random", directed=True, weighted=True)
    indptr, indices, _, degrees = graph_tensors(g)
    values = torch.from_numpy(g.values.copy())  # our own copy: modified in place below
    clear_transpose_cache()
    x = torch.randn(g.num_nodes, 4, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        spmm_cpp(indptr, indices, values, degrees, x, norm="mean").sum().backward()
    st = transpose_cache_stats()
    assert st["builds"] == 1 and st["hits"] == 2, st
    # symmetric graphs never build one
    gu = make_graph("random", directed=False, weighted=True)
    ipu, ixu, vu, du = graph_tensors(gu)
    xu = torch.randn(gu.num_nodes, 4, dtype=torch.float64, requires_grad=True)
    for norm in NORMS:
        spmm_cpp(ipu, ixu, vu, du, xu, norm=norm, symmetric=True).sum().backward()
    assert transpose_cache_stats()["builds"] == 1
    # an in-place change bumps the version: rebuilt, and the gradient follows the new values
    values.mul_(2.0)
    x.grad = None
    spmm_cpp(indptr, indices, values, degrees, x, norm="none").sum().backward()
    assert transpose_cache_stats()["builds"] == 2
    xr = x.detach().requires_grad_()
    spmm_ref(indptr, indices, values, degrees, xr, norm="none").sum().backward()
    assert_close(x.grad, xr.grad)
    clear_transpose_cache()
    assert transpose_cache_stats()["size"] == 0


@needs_ext
def test_needs_input_grad_is_honoured():
    g = make_graph("hand", directed=True, weighted=False)
    indptr, indices, values, degrees = graph_tensors(g)
    clear_transpose_cache()
    x = torch.randn(g.num_nodes, 3)  # no grad wanted: no backward, no transpose
    w = torch.randn(3, 3, requires_grad=True)
    spmm_cpp(indptr, indices, values, degrees, x, norm="mean").matmul(w).sum().backward()
    assert w.grad is not None
    assert transpose_cache_stats()["builds"] == 0


# ---------------------------------------------------------------------- errors
def _small():
    g = make_graph("hand", directed=True, weighted=True)
    ip, ix, v, deg = graph_tensors(g)
    return g, ip, ix, v, deg, torch.randn(g.num_nodes, 3)


@needs_ext
def test_errors_through_the_torch_op():
    g, ip, ix, v, deg, x = _small()
    n = g.num_nodes
    with pytest.raises(TypeError, match="x must be float32 or float64, got torch.int64"):
        spmm_cpp(ip, ix, v, deg, torch.ones(n, 3, dtype=torch.int64))
    with pytest.raises(TypeError, match="x must be float32 or float64, got torch.bfloat16"):
        spmm_cpp(ip, ix, v, deg, x.bfloat16())
    with pytest.raises(TypeError, match="indices must be int32 or int64, got float32"):
        spmm_cpp(ip, ix.float(), v, deg, x)
    with pytest.raises(TypeError, match="indptr must be int32 or int64, got int16"):
        spmm_cpp(ip.short(), ix, v, deg, x)
    with pytest.raises(TypeError, match="degrees must be float32 or float64, got int64"):
        spmm_cpp(ip, ix, v, deg.long(), x)
    with pytest.raises(ValueError, match="x must be 2-D"):
        spmm_cpp(ip, ix, v, deg, x[:, 0])
    with pytest.raises(ValueError, match=r"x must have shape \(n_cols, dim\) = \(%d, dim\)" % n):
        spmm_cpp(ip, ix, v, deg, torch.randn(n + 1, 3))
    with pytest.raises(ValueError, match=r"values must have shape \(nnz,\)"):
        spmm_cpp(ip, ix, v[:-1].contiguous(), deg, x)
    with pytest.raises(ValueError, match=r"degrees must have shape \(n_rows,\)"):
        spmm_cpp(ip, ix, v, deg[:-1].contiguous(), x)
    with pytest.raises(ValueError, match="indices must be C-contiguous"):
        spmm_cpp(ip, torch.stack([ix, ix], 1)[:, 0], v, deg, x)
    with pytest.raises(ValueError, match="values must be C-contiguous"):
        spmm_cpp(ip, ix, torch.stack([v, v], 1)[:, 0], deg, x)
    with pytest.raises(ValueError, match="unknown norm 'max'"):
        spmm_cpp(ip, ix, v, deg, x, norm="max")
    with pytest.raises(RuntimeError, match="differentiates with respect to x only, but values requires grad"):
        spmm_cpp(ip, ix, v.clone().requires_grad_(), deg, x)
    with pytest.raises(TypeError, match="indices must be a torch.Tensor"):
        spmm_cpp(ip, ix.numpy(), v, deg, x)
    bad = ix.clone()
    bad[3] = n
    with pytest.raises(ValueError, match=rf"indices out of range: indices\[3\] = {n} is not in \[0, {n}\)"):
        spmm_cpp(ip, bad, v, deg, x)
    bad[3] = -1
    with pytest.raises(ValueError, match=r"indices out of range: indices\[3\] = -1"):
        spmm_cpp(ip, bad, v, deg, x)
    with pytest.raises(ValueError, match="indices out of range"):
        csr_spmm_cpp(ip, ix, v, torch.randn(2, 3))  # n_cols = x rows = 2


@needs_ext
def test_errors_structure_and_degrees():
    g, ip, ix, v, deg, x = _small()
    p = ip.clone()
    p[2] = ip[3] + 1  # a step down from indptr[2] to indptr[3]
    with pytest.raises(ValueError, match=r"indptr must be non-decreasing \(monotone\), but indptr\[2\]"):
        spmm_cpp(p, ix, v, deg, x)
    p = ip.clone()
    p[0] = 1
    with pytest.raises(ValueError, match="indptr\\[0\\] must be 0, got 1"):
        spmm_cpp(p, ix, v, deg, x)
    p = ip.clone()
    p[-1] -= 1
    with pytest.raises(ValueError, match=r"indptr\[-1\] = \d+ must equal nnz = len\(indices\) = %d" % ix.numel()):
        spmm_cpp(p, ix, v, deg, x)
    with pytest.raises(ValueError, match="indptr must have n_rows \\+ 1 >= 1 entries"):
        spmm_cpp(ip[:0], ix[:0], None, deg[:0], torch.zeros(0, 3))
    for bad_value in (0.0, -1.0, float("nan")):
        d = deg.clone()
        d[2] = bad_value
        for norm in ("sym", "mean"):
            with pytest.raises(ValueError, match=rf"degrees\[2\] = \S+ must be > 0: norm='{norm}' divides"):
                spmm_cpp(ip, ix, v, d, x, norm=norm)
        spmm_cpp(ip, ix, v, d, x, norm="none")  # nothing divides: fine


@needs_ext
def test_errors_in_the_extension_itself():
    g, ip, ix, v, deg, x = _small()
    ipn, ixn, vn, degn, xn = ip.numpy(), ix.numpy(), v.numpy(), deg.numpy(), x.numpy()
    with pytest.raises(ValueError, match=r"x must be C-contiguous .* byte strides"):
        C.spmm_norm(ipn, ixn, vn, degn, np.asfortranarray(xn))
    with pytest.raises(TypeError, match="x must be float32 or float64, got float16"):
        C.spmm_norm(ipn, ixn, vn, degn, xn.astype(np.float16))
    with pytest.raises(TypeError, match=r"values must have the dtype of x \(float64\), got float32"):
        C.spmm_norm(ipn, ixn, vn, degn, xn.astype(np.float64))
    with pytest.raises(TypeError, match="indices must be int32 or int64, got >i4"):
        C.spmm_norm(ipn, ixn.astype(">i4"), vn, degn, xn)  # non-native byte order
    with pytest.raises(TypeError, match="x must be a NumPy array, got list"):
        C.spmm_norm(ipn, ixn, vn, degn, xn.tolist())
    with pytest.raises(ValueError, match="x must be 2-D, got shape"):
        C.spmm_norm(ipn, ixn, vn, degn, xn[None])
    with pytest.raises(ValueError, match="degrees is required for norm='sym'"):
        C.spmm_norm(ipn, ixn, vn, None, xn)
    out = np.empty_like(xn)
    with pytest.raises(ValueError, match="out must not overlap x"):
        C.spmm_norm(ipn, ixn, vn, degn, xn, out=xn)
    with pytest.raises(ValueError, match=r"out must have shape \(n_rows, dim\)"):
        C.spmm_norm(ipn, ixn, vn, degn, xn, out=out[:-1])
    with pytest.raises(TypeError, match="out must have the dtype of x"):
        C.spmm_norm(ipn, ixn, vn, degn, xn, out=out.astype(np.float64))
    ro = out.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable"):
        C.spmm_norm(ipn, ixn, vn, degn, xn, out=ro)
    with pytest.raises(ValueError, match="n_cols must be >= 0"):
        C.csr_transpose(ipn, ixn, vn, -1)
    with pytest.raises(ValueError, match="indices out of range"):
        C.csr_transpose(ipn, ixn, vn, 2)
    # a preallocated out is filled and returned
    r = C.spmm_norm(ipn, ixn, vn, degn, xn, out=out, norm="mean")
    assert r is out or np.shares_memory(r, out)
    np.testing.assert_allclose(out, spmm_ref(ip, ix, v, deg, x.double(), norm="mean").numpy(), atol=2e-5, rtol=1e-5)


@needs_ext
def test_garbage_input_raises_never_crashes():
    # random structure errors (wild indices, broken indptr, mismatched sizes): each call
    # must either raise TypeError/ValueError or, when it happens to be valid, match the
    # reference; a crash would take the test process down
    rng = np.random.default_rng(0)
    n_raised = 0
    for trial in range(300):
        n = int(rng.integers(0, 6))
        nnz = int(rng.integers(0, 10))
        indptr = np.sort(rng.integers(0, nnz + 1, size=n + 1)).astype(np.int64)
        if rng.random() < 0.5:
            indptr = rng.integers(-3, nnz + 3, size=n + 1).astype(np.int64)
        if n >= 0 and rng.random() < 0.7:
            indptr[0], indptr[-1] = 0, nnz
        indices = rng.integers(-2, n + 2, size=nnz).astype(np.int32 if trial % 2 else np.int64)
        degrees = rng.integers(-1, 4, size=n + int(rng.integers(-1, 2)) if n else n).astype(np.float32)
        x = rng.standard_normal((n + int(rng.random() < 0.1), 3)).astype(np.float32)
        values = None if trial % 3 else rng.standard_normal(nnz + int(rng.random() < 0.1)).astype(np.float32)
        norm = NORMS[trial % 3]
        try:
            y = C.spmm_norm(indptr, indices, values, degrees, x, norm=norm)
        except (TypeError, ValueError):
            n_raised += 1
            continue
        ref = spmm_ref(torch.from_numpy(indptr), torch.from_numpy(indices), None if values is None else
                       torch.from_numpy(values), torch.from_numpy(degrees), torch.from_numpy(x).double(), norm=norm)
        np.testing.assert_allclose(y, ref.numpy(), atol=2e-5, rtol=1e-5)
    assert n_raised > 200  # most garbage is caught


# -------------------------------------------------------------------- dispatch
@needs_ext
def test_dispatch_lists_cpp_first_and_runs_it():
    import mtd_fast

    assert mtd_fast.available_backends()["spmm"][0] == "cpp"
    assert ops.describe("spmm", None, torch.device("cpu")) == "cpp"  # auto picks it on the CPU
    g = make_graph("random", directed=True, weighted=True)
    x = torch.randn(g.num_nodes, 10, dtype=torch.float64)
    for norm in NORMS:
        y = ops.spmm(g, x, norm=norm, backend="cpp")
        assert_close(y, ops.spmm(g, x, norm=norm, backend="reference"))
        assert_close(ops.spmm(g, x, norm=norm, backend={"spmm": "cpp"}), y)


def test_import_and_spmm_work_without_the_extension():
    # a fresh interpreter in which importing the extension fails, as on an install
    # built with MTD_FAST_NO_EXT=1 or without cmake/pybind11
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "mtd_fast._spmm_cpp":
                    raise ImportError("blocked for the test")
                return None
        sys.meta_path.insert(0, Block())
        import torch, mtd_fast
        from mtd_fast.data import Sessions
        from mtd_fast.graph import global_graph_ref
        from mtd_fast.ops import BackendError, spmm, spmm_ref
        assert mtd_fast.available_backends()["spmm"] == ["reference"], mtd_fast.available_backends()
        g = global_graph_ref(Sessions.from_lists([[1, 2, 3], [3, 1]]), 3)
        x = torch.randn(g.num_nodes, 4)
        ip, ix, v, deg, _ = g.torch_tensors()
        ref = spmm_ref(ip, ix, v, deg, x)
        assert torch.equal(spmm(g, x), ref) and torch.equal(spmm(g, x, backend="cpp"), ref)
        try:
            spmm(g, x, backend={"spmm": "cpp"})
        except BackendError as exc:
            assert "is not built" in str(exc), str(exc)
        else:
            raise AssertionError("a strict request for cpp must raise")
        print("OK")
    """)
    env = {**os.environ, "PYTHONPATH": str(PROJECT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr


# ----------------------------------------------------------- torch.library / compile
@needs_ext
def test_opcheck_custom_ops():
    g = make_graph("hand", directed=True, weighted=True)
    indptr, indices, values, degrees = graph_tensors(g)
    x = torch.randn(g.num_nodes, 3, dtype=torch.float64, requires_grad=True)
    for norm in ("sym", "mean"):
        torch.library.opcheck(torch.ops.mtd_fast.spmm.default, (indptr, indices, values, degrees, x, norm, False))
        torch.library.opcheck(torch.ops.mtd_fast.spmm_t.default, (indptr, indices, values, degrees, x, norm, False))
    torch.library.opcheck(torch.ops.mtd_fast.csr_spmm.default, (indptr, indices, values, x))
    torch.library.opcheck(torch.ops.mtd_fast.csr_spmm_t.default, (indptr, indices, values, x, g.num_nodes))


@needs_ext
@pytest.mark.slow
def test_torch_compile_traces_the_op_without_graph_breaks():
    torch._dynamo.reset()
    g = make_graph("random", directed=True, weighted=False)
    indptr, indices, values, degrees = graph_tensors(g)
    w = torch.randn(8, 8, dtype=torch.float64, requires_grad=True)

    def layer(h):
        return torch.tanh(spmm_cpp(indptr, indices, values, degrees, h, norm="mean", symmetric=False) @ w)

    compiled = torch.compile(layer, fullgraph=True, backend="inductor")
    x = torch.randn(g.num_nodes, 8, dtype=torch.float64, requires_grad=True)
    y = compiled(x)
    y.square().sum().backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    ye = layer(x)
    ye.square().sum().backward()
    assert_close(y.detach(), ye.detach())
    assert_close(gx, x.grad)
    assert_close(gw, w.grad)


@pytest.mark.skipif(os.environ.get("MTD_FAST_REQUIRE_EXT") != "1", reason="only where the build is required (CI)")
def test_extension_built_where_required():
    # CI sets MTD_FAST_REQUIRE_EXT=1: the cpp tests above must have run, not skipped
    import mtd_fast

    assert "cpp" in mtd_fast.available_backends()["spmm"]
