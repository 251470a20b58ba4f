"""Table 4 of the MTD paper: seconds per training epoch of MTD and every neural baseline,
on Yoochoose 1/64, Diginetica and Retailrocket, batch 512, d = 100, one machine, one run;
plus RecBole 1.2.1's implementations of the same models as a real peer, side by side.

What is timed (per dataset, every model on the SAME batches in the same order):
- our models (mtd, gru4rec, narm, stamp, sasrec, srgnn, csrm, cosan): the trainer's own
  training step (`mtd_fast.train.rec_epoch`'s body: `net.batch_from_sessions`, loss +
  l2, backward, Adam step, loss read back) on full-size batches over the full catalogue;
- the peer (gru4rec, narm, stamp, sasrec, srgnn of RecBole 1.2.1): RecBole's dataloader
  batch, `model.calculate_loss`, backward, Adam step, in its own venv, run by
  `benches/peers/recbole_peer.py` on OUR training samples converted to its
  session-benchmark files;
- MTD's graph side apart: seconds per DGI step (`net.dgi_loss(graph)` + l2 + backward +
  Adam on `net.graph_parameters()`), one real graph phase (`mtd_fast.train.graph_phase`,
  patience 10, bounded by graph_steps = 1000), and that phase amortised over the
  dataset's rec_frequency f (Yoochoose 1, Diginetica 4, Retailrocket 6).

By default seconds per epoch are ESTIMATED: ceil(train samples / 512) x the median of
10 timed steps after one checked step and 1 warm-up step (the output says so; the mean-
based figure is in the JSON beside it); `MTD_T4_EPOCHS=N` times N whole epochs per model
instead (hours on a CPU). 10 steps keep the whole study near 15 minutes on a quiet
2-core machine: Retailrocket's prefixes reach 284 clicks and RecBole pads every batch
to that, so its SASRec step alone took 12 s here (1 thread, busy machine).
Correctness comes first: every model's first step is checked (finite loss, finite and
nonzero gradients, finite weights); MTD's default backends are compared with
backend="reference" on the same batch and weights (loss and gradients, dropout off and
on with one seed; the DGI loss with one corruption permutation), tolerances in
`benches/table4/steps.py` (LOSS_RTOL, LOSS_ATOL, GRAD_RTOL) with their reasons.

Options (environment variables):
  MTD_BENCH_SMOKE=1            tiny synthetic data, batch 128, one timed step each (CI)
  MTD_T4_DATASETS=a,b          yoochoose1_64, diginetica, retailrocket (default: the three),
                               yoochoose1_64_mtd, synthetic; 'all'
  MTD_T4_MODELS=a,b            mtd gru4rec narm stamp sasrec srgnn csrm cosan (default all)
  MTD_T4_PEERS=a,b             RecBole rows: gru4rec narm stamp sasrec srgnn (default), 'none'
  MTD_BENCH_RECBOLE_PYTHON=P   python of the RecBole venv; unset: peer rows skipped, with why
  MTD_T4_DEVICE=cpu|cuda       (default cpu; cuda skips when CUDA is absent)
  MTD_T4_STEPS=10              timed training steps per model (estimate mode)
  MTD_T4_WARMUP=1              untimed steps after the checked one
  MTD_T4_EPOCHS=0              N > 0: time N whole epochs per model instead of estimating
  MTD_T4_DGI_STEPS=10          timed DGI steps
  MTD_T4_GRAPH_STEPS=1000      bound of the measured graph phase (the trainer's graph_steps)
  MTD_T4_GRAPH_PATIENCE=10     the trainer's graph_patience
  MTD_T4_THREADS=N             torch threads here and in the peer (default: torch's choice;
                               smoke: 1). On a busy machine use 1: two threads on two shared
                               cores made small steps 20-50x slower here (OpenMP waits)
  MTD_T4_RESULTS=DIR           where table4.{md,json,png} go (default benches/results/;
                               smoke runs write table4_smoke.*)
  MTD_T4_SEED=0, MTD_T4_BATCH=512, MTD_T4_HIDDEN=100, MTD_T4_PEER_TIMEOUT=900 (s per request)
  MTD_FAST_DATA=DIR            data root (default ../shared/data beside the project)

Run:
  MTD_BENCH_SMOKE=1 pytest benches/bench_table4.py                      (CI; seconds)
  MTD_BENCH_RECBOLE_PYTHON=/work/venv-recbole/bin/python pytest benches/bench_table4.py \\
      --benchmark-json=benches/results/table4_pytest_benchmark.json     (the study, ~15 min quiet)
The session ends with the table printed; files: DIR/table4.md, table4.json, table4.png,
and the peer's log DIR/table4_recbole_<dataset>.log.

The RecBole venv (kept apart: RecBole 1.2.1 needs numpy < 2):
  python3 -m venv /work/venv-recbole
  /work/venv-recbole/bin/pip install torch==2.13.0
  /work/venv-recbole/bin/pip install --no-deps recbole==1.2.1
  /work/venv-recbole/bin/pip install "numpy<2" "pandas<3" scipy "tqdm>=4.48.2" "colorlog==4.7.2" \\
      "colorama==0.4.4" "scikit-learn>=0.23.2" "pyyaml>=5.1.0" "tensorboard>=2.5.0" \\
      "thop>=0.1.1.post2207130030" "tabulate>=0.8.10" "plotly>=4.0.0" "texttable>=0.9.0" \\
      "psutil>=5.9.0" "ray>=1.13.0,<=2.6.3"
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from mtd_fast import ops
from mtd_fast.config import PHASE_MODES, MTDConfig, TrainConfig
from mtd_fast.data import load_dataset
from mtd_fast.train import build_model, dgi_step, graph_phase, graph_side, rec_epoch, train_step

import table4 as t4  # the study's helpers, benches/table4/ (benches/ is on sys.path, as for harness)
from harness import data_dir, data_dir_or_skip

PROJECT = Path(__file__).resolve().parents[1]
PEER_SCRIPT = Path(__file__).resolve().parent / "peers" / "recbole_peer.py"
SET = t4.settings_from_env(os.environ, PROJECT)
REPORT = t4.Report(t4.settings_dict(SET), {})


def _train_config(**kw) -> TrainConfig:
    return TrainConfig(batch_size=SET.batch_size, device=SET.device, **kw)


def _model_config() -> MTDConfig:
    return MTDConfig(hidden_size=SET.hidden)


def _per_step_graph() -> bool:
    """The default graph_mode trains the graph inside every training step (no phases)."""
    return _model_config().graph_mode not in PHASE_MODES


def _graph(data):
    """The dataset's global graph, built once (and timed) per dataset."""
    if "graph" not in data:
        mcfg = _model_config()
        t0 = time.perf_counter()
        data["graph"] = ops.global_graph(data["ds"].train_sessions, data["ds"].n_items, directed=mcfg.graph_directed,
                                         weighted=mcfg.graph_weighted, backend="auto")
        data["graph_build_s"] = time.perf_counter() - t0
    return data["graph"]


# --------------------------------------------------------------------------- session plumbing
class _Printer:
    """pytest plugin registered at run time: prints the table when the session ends
    (`pytest -s` is not needed; the files are written at module teardown)."""

    def __init__(self):
        self.paths: dict = {}

    def pytest_terminal_summary(self, terminalreporter):
        if not (REPORT.rows or REPORT.graph):
            return
        tr = terminalreporter
        tr.section("Table 4 (bench_table4)")
        for line in REPORT.markdown().splitlines():
            tr.write_line(line)
        for what, p in self.paths.items():
            tr.write_line(f"{what}: {p}")


_PRINTER = _Printer()


@pytest.fixture(scope="module", autouse=True)
def _session(request):
    old_threads = torch.get_num_threads()
    if SET.threads:
        torch.set_num_threads(SET.threads)
    if SET.device.startswith("cuda") and not torch.cuda.is_available():
        pytest.skip(f"MTD_T4_DEVICE={SET.device} but CUDA is not available here")
    pm = request.config.pluginmanager
    if not pm.is_registered(_PRINTER):
        pm.register(_PRINTER, "mtd_table4_printer")
    REPORT.meta.update(t4.machine_info(SET.device))
    REPORT.meta["backends"] = {op: ops.describe(op, "auto", torch.device(SET.device)) for op in ops.OPS}
    yield
    torch.set_num_threads(old_threads)
    if REPORT.rows or REPORT.graph:
        _PRINTER.paths = REPORT.write(SET.results, SET.prefix)


def _load(key: str):
    if key == "synthetic":
        return load_dataset("synthetic", n_sessions=SET.synthetic_sessions, n_items=300, seed=SET.seed)
    root = data_dir(key)
    if not root.exists():
        REPORT.add_dataset(key, status="skipped", reason=f"data not found at {root}")
        data_dir_or_skip(key)
    return load_dataset(key, root=root)


def _n_batches() -> int:
    # batch 0: the checked step; then warm-up; then the timed steps
    return 1 + SET.warmup + (SET.steps if SET.epochs == 0 else 0)


@pytest.fixture(scope="module", params=SET.datasets, ids=lambda k: k)
def data(request):
    key = request.param
    t0 = time.perf_counter()
    ds = _load(key)
    load_s = time.perf_counter() - t0
    samples = ds.train
    batches = t4.plan_batches(len(samples), SET.batch_size, _n_batches(), SET.seed)
    steps = math.ceil(len(samples) / SET.batch_size)
    REPORT.add_dataset(key, status="ok", train_samples=len(samples), n_items=ds.n_items, steps_per_epoch=steps,
                       rec_frequency=ds.rec_frequency, load_s=load_s,
                       max_prefix=int(samples.prefixes.lengths.max()),
                       timed_batch_widths=[int(samples.prefixes.lengths[b].max()) for b in batches])
    ctx = {"key": key, "ds": ds, "samples": samples, "batches": batches, "steps_per_epoch": steps, "peer": None,
           "peer_skip": None, "tmp": tempfile.TemporaryDirectory(prefix=f"mtd-t4-{key}-")}
    yield ctx
    if ctx["peer"] is not None:
        ctx["peer"].close()
    ctx["tmp"].cleanup()


def _group(key: str, what: str) -> str:
    return f"table4 {key}: {what}"


@contextlib.contextmanager
def _recorded(row: str, key: str):
    """Any error that the test did not record itself goes into the report as 'failed'."""
    try:
        yield
    except (pytest.skip.Exception, pytest.fail.Exception):
        raise
    except BaseException as exc:
        reason = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if row == "mtd:graph":
            if REPORT.graph.get(key, {}).get("status") != "failed":
                REPORT.add_graph(key, "failed", reason=reason)
        elif (REPORT.row(row, key) or {}).get("status") != "failed":
            REPORT.add_row(row, key, "failed", reason=reason)
        raise


# --------------------------------------------------------------------------- our models
@pytest.mark.parametrize("model", SET.models)
def test_train_step(benchmark, data, model):
    """Correctness first (checked step; MTD vs reference backends), then time steps/epochs."""
    with _recorded(model, data["key"]):
        _train_step(benchmark, data, model)


def _train_step(benchmark, data, model):
    key, ds, samples, batches = data["key"], data["ds"], data["samples"], data["batches"]
    benchmark.group = _group(key, "one training step" if SET.epochs == 0 else "one training epoch")
    mcfg, tcfg = _model_config(), _train_config()
    torch.manual_seed(SET.seed)
    net = build_model(model, ds.n_items, mcfg, tcfg, ops.validate_spec("auto"))
    entry = {"label": t4.MODEL_LABELS[model], "kind": "ours", "steps_per_epoch": data["steps_per_epoch"]}
    every_step = None
    if model == "mtd" and _per_step_graph():  # the GCN (+ DGI term) runs in every step: time it there
        _, every_step = graph_side(net, _graph(data), tcfg, seed=SET.seed)
        entry["graph_mode"] = mcfg.graph_mode
    if model == "mtd":  # the default (fast) backends against the reference, same batch and weights
        ref = build_model(model, ds.n_items, mcfg, tcfg, ops.validate_spec("reference"))
        ref.load_state_dict(net.state_dict())
        if every_step is not None:
            ref.set_graph(_graph(data))  # the propagated item table: the SpMM is compared too
        cmp_ = t4.compare_rec_backends(net, ref, samples, batches[0], SET.seed)
        entry["backend_check"] = cmp_
        entry["backends"] = {op: ops.describe(op, "auto", net.device) for op in ("session_attention", "aggregate")}
        del ref
        if not cmp_["ok"]:
            REPORT.add_row(model, key, "failed", reason="fast backends differ from the reference", **entry)
            pytest.fail(f"MTD default backends differ from backend='reference' on {key}: {cmp_}")
    params = net.rec_parameters()
    opt = torch.optim.Adam(params, lr=tcfg.lr)
    check = t4.checked_train_step(net, samples, batches[0], opt, params, tcfg.l2, graph=every_step)
    entry["check"] = check
    if not check["ok"]:
        REPORT.add_row(model, key, "failed", reason="training step check failed", **entry)
        pytest.fail(f"{model} on {key}: the checked training step failed: {check}")
    for idx in batches[1:1 + SET.warmup]:
        train_step(net, samples, idx, opt, params, tcfg.l2, graph=every_step)
    sink: list[float] = []
    if SET.epochs == 0:
        timed_batches = iter(batches[1 + SET.warmup:])
        benchmark.pedantic(t4.timed(lambda: train_step(net, samples, next(timed_batches), opt, params, tcfg.l2,
                                                       graph=every_step), sink),
                           rounds=SET.steps, iterations=1, warmup_rounds=0)
        entry.update(t4.epoch_estimate(sink, len(samples), SET.batch_size), method="estimate", step_seconds=sink)
    else:
        rng = np.random.default_rng(SET.seed)
        epoch = iter(range(1, SET.epochs + 1))
        benchmark.pedantic(t4.timed(lambda: rec_epoch(net, samples, opt, params, tcfg, rng, True, next(epoch),
                                                       every_step), sink),
                           rounds=SET.epochs, iterations=1, warmup_rounds=0)
        entry.update(t4.measured_epochs(sink, data["steps_per_epoch"]), method="epochs")
    benchmark.extra_info.update({k: v for k, v in entry.items() if k not in ("check", "backend_check")})
    REPORT.add_row(model, key, "ok", **entry)


# --------------------------------------------------------------------------- the RecBole peer
def _peer(data):
    """The dataset's RecBole process (started on first use), or skip with the reason."""
    if data["peer"] is not None:
        return data["peer"]
    if data["peer_skip"]:
        pytest.skip(data["peer_skip"])
    why = None
    if not SET.recbole_python:
        why = ("RecBole peer rows skipped: MTD_BENCH_RECBOLE_PYTHON is not set (the python of a separate venv with "
               "recbole==1.2.1; setup at the top of benches/bench_table4.py)")
    if why is None:
        tmp = Path(data["tmp"].name)
        npz = tmp / "samples.npz"
        if SET.epochs == 0:  # exactly our batches, in our order (the peer keeps the order)
            info = t4.write_peer_samples(npz, data["samples"], data["batches"], data["ds"].n_items)
        else:  # every training sample; the peer reshuffles each epoch like a real run
            info = t4.write_peer_samples(npz, data["samples"], [np.arange(len(data["samples"]))], data["ds"].n_items)
        SET.results.mkdir(parents=True, exist_ok=True)
        try:
            data["peer"] = t4.PeerProcess(
                SET.recbole_python, PEER_SCRIPT, npz, threads=torch.get_num_threads(), device=SET.device,
                batch=SET.batch_size, hidden=SET.hidden, seed=SET.seed, shuffle=SET.epochs > 0,
                log_path=SET.results / f"{SET.prefix}_recbole_{data['key']}.log", timeout_s=SET.peer_timeout_s,
                blocks=_model_config().num_blocks, heads=_model_config().num_heads,
                gnn_steps=_model_config().gnn_steps)
            data["peer_info"] = info
            REPORT.meta["recbole"] = {k: data["peer"].hello.get(k) for k in ("recbole", "torch", "numpy", "python",
                                                                            "threads")}
        except t4.PeerUnavailable as exc:
            why = f"RecBole peer rows skipped: {exc}"
    if why:
        data["peer_skip"] = why
        pytest.skip(why)
    return data["peer"]


@pytest.mark.parametrize("model", SET.peers)
def test_peer_step(benchmark, data, model):
    with _recorded(f"recbole:{model}", data["key"]):
        _peer_step(benchmark, data, model)


def _peer_step(benchmark, data, model):
    key = data["key"]
    row = f"recbole:{model}"
    benchmark.group = _group(key, "one training step" if SET.epochs == 0 else "one training epoch")
    entry = {"label": f"RecBole {t4.MODEL_LABELS[model]}", "kind": "peer", "steps_per_epoch": data["steps_per_epoch"]}
    try:
        peer = _peer(data)
    except pytest.skip.Exception as exc:
        REPORT.add_row(row, key, "skipped", reason=str(exc.msg), **entry)
        raise
    setup = peer.request("setup", model=model)
    entry["setup"] = setup
    # the same data as ours: same catalogue size, same padded width as a full epoch
    assert setup["catalogue"] == data["ds"].n_items, setup
    assert setup["pad_width"] == int(data["samples"].prefixes.lengths.max()), setup
    check = peer.request("check")
    entry["check"] = check  # the peer refuses (ok=false -> PeerError) a non-finite loss or gradient
    for _ in range(SET.warmup):
        peer.request("step")
    inproc: list[float] = []
    if SET.epochs == 0:
        def step():
            inproc.append(peer.request("step")["seconds"])
        benchmark.pedantic(step, rounds=SET.steps, iterations=1, warmup_rounds=0)
        # the peer's own perf_counter around its step: the same definition as ours (the
        # benchmark's figures add the pipe round trip, about 0.1 ms)
        entry.update(t4.epoch_estimate(inproc, len(data["samples"]), SET.batch_size), method="estimate",
                     step_seconds=inproc)
    else:
        def epoch():
            rep = peer.request("epoch")
            inproc.append(rep["seconds"])
            entry["peer_steps_per_epoch"] = rep["steps"]
        benchmark.pedantic(epoch, rounds=SET.epochs, iterations=1, warmup_rounds=0)
        entry.update(t4.measured_epochs(inproc, data["steps_per_epoch"]), method="epochs")
    benchmark.extra_info.update({k: v for k, v in entry.items() if k not in ("check", "setup")})
    REPORT.add_row(row, key, "ok", **entry)


# --------------------------------------------------------------------------- MTD's graph phases
def test_mtd_graph_phase(benchmark, data):
    with _recorded("mtd:graph", data["key"]):
        _mtd_graph_phase(benchmark, data)


def _mtd_graph_phase(benchmark, data):
    key, ds = data["key"], data["ds"]
    benchmark.group = _group(key, "one MTD DGI step")
    if "mtd" not in SET.models:
        REPORT.add_graph(key, "skipped", reason="mtd not among MTD_T4_MODELS")
        pytest.skip("mtd not among MTD_T4_MODELS")
    mcfg = _model_config()
    tcfg = _train_config(graph_steps=SET.graph_steps, graph_patience=SET.graph_patience)
    graph = _graph(data)
    entry = {"graph_build_s": data["graph_build_s"], "graph_nodes": graph.num_nodes, "graph_nnz": graph.nnz,
             "rec_frequency": ds.rec_frequency, "graph_backend": ops.describe("global_graph", "auto", "cpu"),
             "backends": {"spmm": ops.describe("spmm", "auto", torch.device(SET.device))}}
    torch.manual_seed(SET.seed)
    net = build_model("mtd", ds.n_items, mcfg, tcfg, ops.validate_spec("auto"))
    ref = build_model("mtd", ds.n_items, mcfg, tcfg, ops.validate_spec("reference"))
    ref.load_state_dict(net.state_dict())
    cmp_ = t4.compare_dgi_backends(net, ref, graph, SET.seed)
    entry["backend_check"] = cmp_
    del ref
    if not cmp_["ok"]:
        REPORT.add_graph(key, "failed", reason="DGI: fast backends differ from the reference", **entry)
        pytest.fail(f"MTD DGI on {key}: default backends differ from backend='reference': {cmp_}")
    init_state = copy.deepcopy(net.state_dict())
    params = net.graph_parameters()
    opt = torch.optim.Adam(params, lr=tcfg.lr)
    nodes = graph.torch_tensors(net.device).nodes
    h0 = net.item_emb.weight.detach()[nodes]  # E frozen during a phase, as in the trainer
    value, _ = dgi_step(net, graph, h0, opt, params, tcfg.l2)  # checked: finite loss ...
    rep = t4.grad_report(params)  # ... and the gradients of that step
    if not (math.isfinite(value) and rep["grads_finite"] and rep["grad_norm"] > 0):
        REPORT.add_graph(key, "failed", reason="DGI step check failed", **entry)
        pytest.fail(f"MTD DGI on {key}: loss {value}, {rep}")
    entry["check"] = {"loss": value, **rep}
    for _ in range(SET.warmup):
        dgi_step(net, graph, h0, opt, params, tcfg.l2)
    sink: list[float] = []
    benchmark.pedantic(t4.timed(lambda: dgi_step(net, graph, h0, opt, params, tcfg.l2), sink),
                       rounds=SET.dgi_steps, iterations=1, warmup_rounds=0)
    a = np.asarray(sink)
    entry.update(timed_steps=int(a.size), median_step_s=float(np.median(a)), mean_step_s=float(a.mean()),
                 step_seconds=sink)
    if _per_step_graph():  # no phases: the graph side's cost is inside every training step (MTD's row)
        entry.update(phase_steps="–", phase_s=None, stopped_by=f"graph_mode={mcfg.graph_mode!r}: no phase",
                     amortised_s=0.0, per_step=True)
        benchmark.extra_info.update({k: v for k, v in entry.items() if k != "backend_check"})
        REPORT.add_graph(key, "ok", **entry)
        return
    # one real phase, as the trainer runs it at epoch 1: fresh optimizer, initial weights
    net.load_state_dict(init_state)
    opt_g = torch.optim.Adam(net.graph_parameters(), lr=tcfg.lr)
    best, steps, phase_s = graph_phase(net, graph, opt_g, tcfg, True, 1)
    stopped = "patience" if steps < tcfg.graph_steps else "bound"
    entry.update(phase_steps=steps, phase_s=phase_s, phase_best_loss=best, stopped_by=stopped,
                 graph_steps_bound=tcfg.graph_steps, graph_patience=tcfg.graph_patience,
                 amortised_s=t4.amortised(phase_s, ds.rec_frequency))
    if stopped == "bound" and tcfg.graph_steps < TrainConfig().graph_steps:
        REPORT.notes.append(f"{key}: the measured graph phase hit MTD_T4_GRAPH_STEPS={tcfg.graph_steps} before "
                            f"its patience; the trainer would allow up to {TrainConfig().graph_steps} steps.")
    benchmark.extra_info.update({k: v for k, v in entry.items() if k != "backend_check"})
    REPORT.add_graph(key, "ok", **entry)
