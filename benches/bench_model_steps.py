"""Every neural model's training step with the eager full-softmax loss against the chunked
`ops.linear_cross_entropy`, in the same run: what the chunked op buys each model.

For each model: two copies with the same weights, one whose loss runs on
`{"linear_cross_entropy": "reference"}` (eager `F.cross_entropy(q @ T.T, t)`, the (batch, M)
logits materialised: the code before the op) and one on the default backends. Correctness
first: on the first batch, dropout off, the two losses agree within 1e-5 relative and every
gradient within 1e-3 x max|g_eager| of its parameter (the Table 4 bench's fast-vs-reference rule:
fp32 sums in another order; CSRM's memory gate gets gradients of ~1e-9 whose last digits move).
Then the trainer's own step
(`mtd_fast.train.train_step`: batch building, forward, loss + l2, backward, Adam; MTD with its
per-step graph side) is timed on the same batches, alternating the two copies step by step,
as CPU seconds of the calling thread at 1 thread (immune to other processes' load on this
shared machine); the figure is the median over the timed steps, and the ratio chunked / eager.

Data: full Diginetica training samples (43,097 items, batch 512, d = 100) when the shared data
is there; MTD_BENCH_SMOKE=1: synthetic, 400 items, batch 64, d = 16.

Run:
    pytest benches/bench_model_steps.py -s                   (3 minutes here; loading Diginetica is most of it)
    MTD_BENCH_SMOKE=1 pytest benches/bench_model_steps.py    (CI)
writes benches/results/model_steps.json and prints the table.
"""
from __future__ import annotations

import json
import statistics
import time

import numpy as np
import pytest
import torch

import mtd_fast
from mtd_fast.config import MTDConfig, TrainConfig
from mtd_fast.train import build_model, graph_side, train_step

from harness import DATA, ROOT, SMOKE, data_dir

MODELS = ("mtd", "gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan")
BATCH = 64 if SMOKE else 512
HIDDEN = 16 if SMOKE else 100
STEPS = 2 if SMOKE else 6  # timed steps per copy
SEED = 0
EAGER = {"linear_cross_entropy": "reference"}
RESULTS: dict = {}


@pytest.fixture(scope="module")
def dataset():
    if SMOKE or not data_dir("diginetica").is_dir():
        if not SMOKE:
            pytest.skip(f"diginetica not found under {DATA} (MTD_BENCH_SMOKE=1 runs on synthetic data)")
        return mtd_fast.load_dataset("synthetic", n_sessions=1500, n_items=400, seed=SEED)
    return mtd_fast.load_dataset("diginetica", root=data_dir("diginetica"))


def _pair(model: str, ds):
    mcfg, tcfg = MTDConfig(hidden_size=HIDDEN), TrainConfig(batch_size=BATCH, dropout=0.0)
    torch.manual_seed(SEED)
    fast = build_model(model, ds.n_items, mcfg, tcfg, None)
    eager = build_model(model, ds.n_items, mcfg, tcfg, EAGER)
    eager.load_state_dict(fast.state_dict())
    nets = {"eager": eager, "chunked": fast}
    out = {}
    for name, net in nets.items():
        graph = None
        if model == "mtd":
            _, graph = graph_side(net, ops_graph(ds, mcfg), tcfg, seed=SEED)
        params = net.rec_parameters()
        out[name] = (net, torch.optim.Adam(params, lr=tcfg.lr), params, graph, tcfg)
    return out


_GRAPHS: dict = {}


def ops_graph(ds, mcfg: MTDConfig):
    if ds.name not in _GRAPHS:
        _GRAPHS[ds.name] = mtd_fast.ops.global_graph(ds.train_sessions, ds.n_items, directed=mcfg.graph_directed,
                                                     weighted=mcfg.graph_weighted)
    return _GRAPHS[ds.name]


def _loss_and_grads(net, params, graph, samples, idx) -> tuple[float, list[torch.Tensor]]:
    net.zero_grad(set_to_none=True)
    batch = net.batch_from_sessions(samples.prefixes, idx)
    targets = torch.from_numpy(samples.targets[idx].astype(np.int64))
    if graph is not None:  # the same DGI corruption for both copies
        loss, _ = net.multitask_loss(batch, targets, graph.weight, perm=graph.corruption(net.graph.num_nodes, "cpu"))
    else:
        loss = net.loss(batch, targets)
    loss.backward()
    return float(loss.detach()), [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


@pytest.mark.parametrize("model", MODELS)
def test_model_step(dataset, model):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pair = _pair(model, dataset)
        samples = dataset.train
        rng = np.random.default_rng(SEED)
        batches = [rng.choice(len(samples), size=min(BATCH, len(samples)), replace=False) for _ in range(STEPS + 2)]
        # correctness first: same weights, same batch, dropout off
        (le, ge), (lf, gf) = (_loss_and_grads(pair[k][0], pair[k][2], pair[k][3], samples, batches[0])
                              for k in ("eager", "chunked"))
        assert abs(lf - le) <= 1e-5 * abs(le), (model, lf, le)
        for a, b in zip(gf, ge):
            assert float((a - b).abs().max()) <= 1e-3 * max(float(b.abs().max()), 1e-12), model
        times: dict[str, list[float]] = {"eager": [], "chunked": []}
        for i, idx in enumerate(batches[1:]):
            for name in ("eager", "chunked") if i % 2 == 0 else ("chunked", "eager"):
                net, opt, params, graph, tcfg = pair[name]
                t0 = time.thread_time()
                train_step(net, samples, idx, opt, params, tcfg.l2, graph=graph)
                if i > 0:  # the first round warms both up
                    times[name].append(time.thread_time() - t0)
        e, c = statistics.median(times["eager"]), statistics.median(times["chunked"])
        RESULTS[model] = {"eager_s": e, "chunked_s": c, "ratio": c / e, "loss_eager": le, "loss_chunked": lf,
                          "steps": len(times["eager"])}
        assert c > 0 and e > 0
    finally:
        torch.set_num_threads(threads)


def test_zz_report(dataset):
    if not RESULTS:
        pytest.skip("no model timed")
    rows = [f"| {m} | {r['eager_s'] * 1e3:.0f} | {r['chunked_s'] * 1e3:.0f} | {r['ratio']:.2f} |"
            for m, r in RESULTS.items()]
    text = "\n".join([f"{dataset.name}: {dataset.n_items} items, batch {BATCH}, d {HIDDEN}, 1 thread CPU time, "
                      f"median of {STEPS} steps", "", "| model | eager ms | chunked ms | chunked / eager |",
                      "| --- | ---: | ---: | ---: |", *rows])
    print("\n" + text)
    path = ROOT / "benches" / "results" / ("model_steps_smoke.json" if SMOKE else "model_steps.json")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"dataset": dataset.name, "n_items": dataset.n_items, "batch": BATCH,
                                "hidden": HIDDEN, "steps": STEPS, "torch": torch.__version__,
                                "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "models": RESULTS}, indent=1))
