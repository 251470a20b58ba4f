"""SpMM benchmarks (pytest-benchmark): one GCN propagation `Y = A_hat @ X`, forward and
backward, on the real Diginetica item graph (`MTD_SPEC.md` section 3: 42,884 nodes,
762,502 nonzeros of `A + I`, d = 100, float32).

Contenders, each checked against the float64 reference `spmm_ref` (output and input
gradient, same upstream gradient) before it is timed:
- cpp:        `mtd_fast.ops.spmm_cpp.spmm_cpp` (binary CSR + degree vector, normalization in
              the product; symmetric graph, so backward is the same kernel, no transpose)
- torch_csr:  `torch.sparse.mm` on a float32 CSR tensor of the normalized matrix
              (values precomputed once, not timed) with autograd for the backward
- scipy:      `csr @ X` forward and `(A^T as CSR, precomputed) @ G` for the backward
              (scipy has no autograd: the two products a backward needs)
- reference:  `spmm_ref` (gather / scale / index_add, autograd)
plus the directed graph with norm="mean" (backward through the transpose, which the cpp
backend builds once and caches) for cpp and torch_csr, and forward alone for cpp and torch.

Run:  pytest benches/bench_spmm.py              (full Diginetica, about a minute here)
      MTD_BENCH_SMOKE=1 pytest benches/bench_spmm.py   (tiny synthetic graph, one round)
The last test prints the ratios of this run; it also times cpp and torch_csr interleaved
(alternating calls, min of each), which is the fairest ratio on a shared, noisy machine.
"""
from __future__ import annotations

import os
import platform
import time
import warnings
from typing import Callable

import numpy as np
import pytest
import torch

from mtd_fast.data import Sessions, load_dataset
from mtd_fast.graph import global_graph_ref
from mtd_fast.ops import spmm_ref

from harness import SMOKE, benchmark_median, data_dir_or_skip, interleaved

try:
    from mtd_fast.ops.spmm_cpp import clear_transpose_cache, extension_info, spmm_cpp, transpose_cache_stats

    _WHY = ""
except ImportError as exc:
    spmm_cpp = None
    _WHY = f"C++ extension not built ({exc})"

DIM = 16 if SMOKE else 100
ROUNDS = 1 if SMOKE else 15
REF_ROUNDS = 1 if SMOKE else 3
WARMUP = 0 if SMOKE else 1
RESULTS: dict[str, dict] = {}

needs_ext = pytest.mark.skipif(spmm_cpp is None, reason=_WHY or "C++ extension not built")


# --------------------------------------------------------------------------- data
def _smoke_sessions() -> tuple[Sessions, int]:
    rng = np.random.default_rng(0)
    seqs = [(rng.zipf(1.7, size=int(rng.integers(2, 7))) % 300 + 1).tolist() for _ in range(800)]
    return Sessions.from_lists(seqs), 300


@pytest.fixture(scope="module")
def sessions():
    if SMOKE:
        return _smoke_sessions()
    ds = load_dataset("diginetica", root=data_dir_or_skip("diginetica"))
    return ds.train_sessions, ds.n_items


class Case:
    """A graph, its tensors, the contenders' prepared matrices and the float64 reference."""

    def __init__(self, sessions: Sessions, n_items: int, directed: bool, norm: str):
        self.graph = g = global_graph_ref(sessions, n_items, directed=directed)
        self.norm = norm
        self.indptr, self.indices, self.values, self.degrees, _ = g.torch_tensors()
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(g.num_nodes, DIM, generator=gen)
        self.gy = torch.randn(g.num_nodes, DIM, generator=gen)
        s = g.to_scipy(norm).astype(np.float32)
        self.scipy = s
        self.scipy_t = s.T.tocsr()  # precomputed once, like the torch matrix below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
            self.torch_csr = torch.sparse_csr_tensor(torch.from_numpy(s.indptr.astype(np.int64)),
                                                     torch.from_numpy(s.indices.astype(np.int64)),
                                                     torch.from_numpy(s.data), s.shape)
        xr = self.x.double().requires_grad_()
        yr = spmm_ref(self.indptr, self.indices, self.values, self.degrees, xr, norm=norm)
        (gr,) = torch.autograd.grad(yr, xr, self.gy.double())
        self.y_ref, self.gx_ref = yr.detach(), gr

    @property
    def nnz(self) -> int:
        return self.graph.nnz


@pytest.fixture(scope="module")
def und(sessions):
    return Case(*sessions, directed=False, norm="sym")


@pytest.fixture(scope="module")
def directed(sessions):
    return Case(*sessions, directed=True, norm="mean")


# -------------------------------------------------------------------- contenders
def fwd_bwd_fn(case: Case, name: str) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """A closure running one forward + backward; returns (Y, dL/dX) as arrays."""
    sym = case.graph.symmetric
    if name == "cpp":
        def run():
            x = case.x.detach().requires_grad_()
            y = spmm_cpp(case.indptr, case.indices, case.values, case.degrees, x, norm=case.norm, symmetric=sym)
            y.backward(case.gy)
            return y, x.grad
    elif name == "torch_csr":
        def run():
            x = case.x.detach().requires_grad_()
            y = torch.sparse.mm(case.torch_csr, x)
            y.backward(case.gy)
            return y, x.grad
    elif name == "scipy":
        xn, gn = case.x.numpy(), case.gy.numpy()

        def run():
            return case.scipy @ xn, case.scipy_t @ gn
    elif name == "reference":
        def run():
            x = case.x.detach().requires_grad_()
            y = spmm_ref(case.indptr, case.indices, case.values, case.degrees, x, norm=case.norm)
            y.backward(case.gy)
            return y, x.grad
    else:
        raise ValueError(name)
    return run


def fwd_fn(case: Case, name: str) -> Callable:
    if name == "cpp":
        return lambda: spmm_cpp(case.indptr, case.indices, case.values, case.degrees, case.x, norm=case.norm,
                                symmetric=case.graph.symmetric)
    if name == "torch_csr":
        return lambda: torch.sparse.mm(case.torch_csr, case.x)
    if name == "scipy":
        xn = case.x.numpy()
        return lambda: case.scipy @ xn
    raise ValueError(name)


def _arr(t) -> np.ndarray:
    return t.detach().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)


def check(case: Case, y, gx=None) -> None:
    # float32 results against the float64 reference: rows sum <= ~300 terms (hubs), each
    # a few ulps off depending on the order; 1e-4 absolute is far below any real bug
    np.testing.assert_allclose(_arr(y), case.y_ref.numpy(), atol=1e-4, rtol=1e-4)
    if gx is not None:
        np.testing.assert_allclose(_arr(gx), case.gx_ref.numpy(), atol=1e-4, rtol=1e-4)


def _timed(benchmark, fn: Callable, rounds: int) -> float:
    return benchmark_median(benchmark, fn, rounds, WARMUP)


def _record(benchmark, key: str, case: Case, median: float, passes: int) -> None:
    # each pass gathers nnz rows of d float32 values: the bytes that bound this product
    gathered = passes * case.nnz * DIM * 4
    res = {"median_s": median, "gather_GB_per_s": gathered / median / 1e9, "nodes": case.graph.num_nodes,
           "nnz": case.nnz, "dim": DIM, "threads": torch.get_num_threads()}
    benchmark.extra_info.update(res)
    RESULTS[key] = res


# ------------------------------------------------------------------------ benches
@pytest.mark.parametrize("name", ["cpp", "torch_csr", "scipy", "reference"])
def test_gcn_fwd_bwd_sym_undirected(benchmark, und, name):
    if name == "cpp" and spmm_cpp is None:
        pytest.skip(_WHY)
    benchmark.group = f"spmm fwd+bwd sym undirected ({'smoke' if SMOKE else 'Diginetica'}, d={DIM})"
    run = fwd_bwd_fn(und, name)
    check(und, *run())  # correctness before timing
    median = _timed(benchmark, run, REF_ROUNDS if name == "reference" else ROUNDS)
    _record(benchmark, f"sym/{name}", und, median, passes=2)


@pytest.mark.parametrize("name", ["cpp", "torch_csr"])
def test_gcn_fwd_bwd_mean_directed(benchmark, directed, name):
    if name == "cpp" and spmm_cpp is None:
        pytest.skip(_WHY)
    benchmark.group = f"spmm fwd+bwd mean directed ({'smoke' if SMOKE else 'Diginetica'}, d={DIM})"
    run = fwd_bwd_fn(directed, name)
    if name == "cpp":
        clear_transpose_cache()
    check(directed, *run())
    median = _timed(benchmark, run, ROUNDS)
    if name == "cpp":  # the transpose was built by the check above and reused by every timed round
        st = transpose_cache_stats()
        assert st["builds"] == 1, st
        benchmark.extra_info["transpose_cache"] = st
    _record(benchmark, f"mean_directed/{name}", directed, median, passes=2)


@pytest.mark.parametrize("name", ["cpp", "torch_csr", "scipy"])
def test_gcn_fwd_only(benchmark, und, name):
    if name == "cpp" and spmm_cpp is None:
        pytest.skip(_WHY)
    benchmark.group = f"spmm forward sym undirected ({'smoke' if SMOKE else 'Diginetica'}, d={DIM})"
    run = fwd_fn(und, name)
    check(und, run())
    median = _timed(benchmark, run, ROUNDS)
    _record(benchmark, f"fwd/{name}", und, median, passes=1)


# ------------------------------------------------------------------------- report
def _interleaved(fns: dict[str, Callable], rounds: int,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Min seconds of each fn, calls alternating, so load changes hit all of them alike."""
    return {k: min(v) for k, v in interleaved(fns, rounds, clock).items()}


@needs_ext
def test_zz_report(capsys, und):
    """Print what this run measured, as ratios (same run, same machine)."""
    import scipy

    info = extension_info()
    lines = [f"\n== bench_spmm ({'SMOKE' if SMOKE else 'full Diginetica'}) {time.strftime('%Y-%m-%d %H:%M')} "
             f"python {platform.python_version()} torch {torch.__version__} numpy {np.__version__} "
             f"scipy {scipy.__version__} {platform.machine()} cpus {os.cpu_count()} torch threads "
             f"{torch.get_num_threads()} kernel {info['isa']} openmp {info['openmp']}",
             f"graph: {und.graph.num_nodes} nodes, {und.nnz} nonzeros (A + I), d = {DIM}, float32"]
    for key in ("sym/cpp", "sym/torch_csr", "sym/scipy", "sym/reference", "mean_directed/cpp",
                "mean_directed/torch_csr", "fwd/cpp", "fwd/torch_csr", "fwd/scipy"):
        r = RESULTS.get(key)
        if r:
            lines.append(f"{key:24s} median {r['median_s'] * 1e3:9.2f} ms   gather {r['gather_GB_per_s']:6.1f} GB/s")
    for group in ("sym", "mean_directed", "fwd"):
        c = RESULTS.get(f"{group}/cpp")
        for other in ("torch_csr", "scipy", "reference"):
            o = RESULTS.get(f"{group}/{other}")
            if c and o:
                lines.append(f"  {group}: cpp is {o['median_s'] / c['median_s']:.2f}x faster than {other} (medians)")
    # the same ratio measured interleaved: the robust number on a shared machine
    fns = {"cpp": fwd_bwd_fn(und, "cpp"), "torch_csr": fwd_bwd_fn(und, "torch_csr")}
    rounds = 1 if SMOKE else 15
    best = _interleaved(fns, rounds)
    ratio = best["torch_csr"] / best["cpp"]
    lines.append(f"interleaved fwd+bwd, {torch.get_num_threads()} threads, wall (min of {rounds}): cpp "
                 f"{best['cpp'] * 1e3:.2f} ms, torch_csr {best['torch_csr'] * 1e3:.2f} ms -> "
                 f"torch_csr / cpp = {ratio:.2f} "
                 f"(goal >= 3x)")
    RESULTS["interleaved"] = {"cpp_s": best["cpp"], "torch_csr_s": best["torch_csr"], "ratio": ratio}
    # one thread: both run in the calling thread, so its CPU time is immune to other
    # processes' load (the number to trust on a shared machine)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        best1 = _interleaved(fns, rounds, clock=time.thread_time)
    finally:
        torch.set_num_threads(old)
    ratio1 = best1["torch_csr"] / best1["cpp"]
    lines.append(f"interleaved fwd+bwd, 1 thread, thread CPU time (min of {rounds}): cpp {best1['cpp'] * 1e3:.2f} ms, "
                 f"torch_csr {best1['torch_csr'] * 1e3:.2f} ms -> torch_csr / cpp = {ratio1:.2f}")
    RESULTS["interleaved_1thread"] = {"cpp_s": best1["cpp"], "torch_csr_s": best1["torch_csr"], "ratio": ratio1}
    with capsys.disabled():
        print("\n".join(lines))
    assert RESULTS, "no benchmark ran"
