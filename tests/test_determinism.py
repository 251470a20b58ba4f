"""Determinism (README "Determinism"): the SpMM backends at any thread count, and whole
training runs in separate processes, bit for bit (torch.equal / byte comparison)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mtd_fast
from mtd_fast import ops
from mtd_fast.ops.spmm import spmm_ref

from test_resume import DRIVER, assert_same_run

THREADS = (1, 2, 3, 4, 8)  # more threads than this machine's cores on purpose: races show up more


@pytest.fixture(scope="module")
def graph_and_x():
    ds = mtd_fast.load_dataset("synthetic", n_sessions=3000, n_items=1500, seed=4)
    g = ops.global_graph(ds.train_sessions, ds.n_items, weighted=True, directed=True)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(g.num_nodes, 100, generator=gen, dtype=torch.float32)
    up = torch.randn(g.num_nodes, 100, generator=gen, dtype=torch.float32)
    return g, x, up


def _product_and_grads(fn, g, x, up, norm):
    ip, ix, vals, deg, _ = g.torch_tensors("cpu")
    xx = x.clone().requires_grad_(True)
    y = fn(ip, ix, vals, deg, xx, norm=norm, symmetric=g.symmetric)
    y.backward(up)
    return y.detach(), xx.grad


def _backends():
    out = [("reference", spmm_ref)]
    if "cpp" in mtd_fast.available_backends()["spmm"]:
        from mtd_fast.ops.spmm_cpp import spmm_cpp

        out.append(("cpp", spmm_cpp))
    return out


@pytest.mark.parametrize("norm", ["sym", "mean"])
@pytest.mark.parametrize("name,fn", _backends(), ids=[n for n, _ in _backends()])
def test_spmm_bit_identical_at_any_thread_count(graph_and_x, name, fn, norm):
    """Forward and backward (a directed, weighted graph: the backward runs on the transpose)
    repeated and across 1-8 threads. The reference was not: its gather's backward
    (`index_put_(accumulate=True)`) adds with atomics on > 1 thread."""
    g, x, up = graph_and_x
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y0, g0 = _product_and_grads(fn, g, x, up, norm)
        for t in THREADS:
            torch.set_num_threads(t)
            for _ in range(3):
                y, gx = _product_and_grads(fn, g, x, up, norm)
                assert torch.equal(y, y0), (name, t)
                assert torch.equal(gx, g0), (name, t)
    finally:
        torch.set_num_threads(before)


def _run(out: Path, *args: str) -> None:
    r = subprocess.run([sys.executable, str(DRIVER), str(out), *args], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("backend,mode", [("reference", "overwrite"), ("auto", "residual")])
def test_same_seed_two_processes_bit_identical(tmp_path, backend, mode):
    """Two processes, 2 threads each, same seed and backend: the same metrics, history and
    weights, byte for byte (default `deterministic=None`: torch's deterministic algorithms
    on for CPU runs). Graph phases or the per-step graph side, dropout, both optimizers.
    Without the deterministic mode, the auto backend's run differed between processes in
    the last bits of every weight (the embedding gather's backward adds with atomics)."""
    opts = ["--threads", "2", "--option", f"backend={backend}", "--option", f"graph_mode={mode}",
            "--option", "epochs=2"]
    _run(tmp_path / "a.json", *opts)
    _run(tmp_path / "b.json", *opts)
    assert_same_run(tmp_path / "a.json", tmp_path / "b.json")


def test_deterministic_flag_is_scoped_to_the_run(synthetic):
    """train() switches torch's deterministic algorithms for its own duration only."""
    assert not torch.are_deterministic_algorithms_enabled()
    seen = {}
    tr = sys.modules["mtd_fast.train"]
    real = tr.train_step

    def spy(*a, **k):
        seen["on"] = torch.are_deterministic_algorithms_enabled()
        return real(*a, **k)

    tr.train_step = spy
    try:
        for flag, want in ((None, True), (True, True), (False, False)):
            mtd_fast.train(synthetic, epochs=1, quiet=True, graph_phases=0, max_steps_per_epoch=1,
                           eval_test_each_epoch=False, deterministic=flag)
            assert seen["on"] is want, flag
            assert not torch.are_deterministic_algorithms_enabled()
    finally:
        tr.train_step = real
    with pytest.raises(ValueError, match="deterministic='yes' is invalid"):
        mtd_fast.train(synthetic, epochs=1, deterministic="yes")
