"""One whole DGI step of MTD's graph phase (`MTD_SPEC.md` section 3-4), measured with the
fast SpMM (`backend="cpp"`) and with the pure-PyTorch reference, on the real Diginetica
item graph (42,884 nodes, d = 100).

A step is what `mtd_fast.train.graph_phase` does: GCN on H^0 and on the row-permuted
H^0, readout, discriminator, BCE + L2, backward, Adam step on the graph parameters.
Before timing, both backends are run on the same weights and the same permutation and
must give the same loss and the same parameter gradients (fp32 tolerance below).

Run:  pytest benches/bench_dgi.py              (full Diginetica)
      MTD_BENCH_SMOKE=1 pytest benches/bench_dgi.py   (synthetic graph, one round)
      pytest benches/bench_dgi.py --benchmark-disable (each step once, as a plain test)
"""
from __future__ import annotations

import copy
import os
import time

import pytest
import torch

import mtd_fast
from mtd_fast import MTD, MTDConfig, ops

from harness import data_dir_or_skip

SMOKE = os.environ.get("MTD_BENCH_SMOKE") == "1"
ROUNDS = 1 if SMOKE else 10
L2 = 1e-6
# fp32, sums over ~43k rows: loss to 1e-5 relative, gradients to 1e-4 relative of their scale
LOSS_RTOL, GRAD_RTOL = 1e-5, 1e-4
RESULTS: dict[str, float] = {}

needs_cpp = pytest.mark.skipif("cpp" not in mtd_fast.available_backends()["spmm"],
                               reason="C++ extension not built: nothing to compare against the reference")


@pytest.fixture(scope="module")
def setup():
    if SMOKE:
        ds = mtd_fast.load_dataset("synthetic", n_sessions=2000, n_items=300)
    else:
        ds = mtd_fast.load_dataset("diginetica", root=data_dir_or_skip("diginetica"))
    graph = ops.global_graph(ds.train_sessions, ds.n_items)
    torch.manual_seed(0)
    model = MTD(ds.n_items, MTDConfig())
    return model, graph


def _step(model: MTD, graph, opt, perm=None) -> torch.Tensor:
    loss, _ = model.dgi_loss(graph, perm=perm)
    total = loss + L2 * model.l2_penalty(model.graph_parameters())
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    return total.detach()


def _clone(model: MTD, backend: str):
    m = copy.deepcopy(model)
    m.backend = backend
    for layer in m.gnn:
        layer.backend = backend
    return m, torch.optim.Adam(m.graph_parameters(), lr=1e-3)


@needs_cpp
def test_dgi_step_same_result_both_ways(setup):
    model, graph = setup
    perm = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(1))
    out = {}
    for backend in ("cpp", "reference"):
        m, opt = _clone(model, backend)
        loss = _step(m, graph, opt, perm)
        grads = [p.grad.clone() for p in m.graph_parameters()]
        out[backend] = (loss, grads)
    (l_fast, g_fast), (l_ref, g_ref) = out["cpp"], out["reference"]
    assert torch.allclose(l_fast, l_ref, rtol=LOSS_RTOL, atol=0), (l_fast, l_ref)
    for gf, gr in zip(g_fast, g_ref):
        assert torch.allclose(gf, gr, rtol=GRAD_RTOL, atol=GRAD_RTOL * gr.abs().max()), (gf - gr).abs().max()


@pytest.mark.parametrize("backend", ["cpp", "reference"])
def test_dgi_step_time(benchmark, setup, backend):
    if backend == "cpp" and "cpp" not in mtd_fast.available_backends()["spmm"]:
        pytest.skip("C++ extension not built")
    model, graph = setup
    m, opt = _clone(model, backend)
    _step(m, graph, opt)  # warm-up
    benchmark.extra_info.update(nodes=graph.num_nodes, nnz=graph.nnz, threads=torch.get_num_threads())
    benchmark.pedantic(_step, args=(m, graph, opt), rounds=ROUNDS, iterations=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, as a plain test
        return
    RESULTS[backend] = benchmark.stats.stats.median
    if len(RESULTS) == 2:  # the ratio of this run (printed with -s; both medians are in the JSON)
        print(f"\nDGI step (median): cpp {RESULTS['cpp'] * 1e3:.1f} ms, reference {RESULTS['reference'] * 1e3:.1f} ms, "
              f"speed-up {RESULTS['reference'] / RESULTS['cpp']:.2f}x ({torch.get_num_threads()} threads, "
              f"{time.strftime('%Y-%m-%d')})")
