"""Full-catalogue scoring without (batch, M) logits: training step, evaluation, recommend.

The bench of the op `linear_cross_entropy` (the training step below: its providers, checked
and timed; `gpu_timings` is what benches/gpu_check.py calls for the op's GPU timings) and of
its inference side (ranking and top-k over the catalogue in chunks, `mtd_fast.metrics`).

d = 100, batch 512, synthetic catalogues of 43,097 (Diginetica), 1,000,000 and 5,000,000
items (q ~ N(0, 1), table ~ N(0, 0.1^2): logits ~ N(0, 1); targets uniform). Cases, each
checked for correctness before it is timed:

1. training step = forward + backward of the mean cross-entropy of q @ T.T (q and T leaves):
   `eager` (`linear_cross_entropy_ref`: F.cross_entropy on the full logits), `chunked` (the
   op's CPU auto backend; its strategy by catalogue size), `chunked-rows` / `chunked-items`
   (the strategy auto does not pick at that size: the study behind ROWS_MAX_ITEMS), and the
   GPU provider `triton` (skipped without CUDA; on CPU tensors under TRITON_INTERPRET=1 with
   MTD_BENCH_SMOKE=1, at the smallest catalogue). With CUDA every case runs on the GPU.
   Correctness: on the first 32 rows against float64 (computed in catalogue chunks), the
   error of each must be at most twice eager fp32's own (+1e-7).
   Peak memory: each (case, M) once in a fresh subprocess, peak RSS of the step above the
   RSS before it (inputs allocated; Linux VmHWM reset through /proc/self/clear_refs); it
   includes the table gradient (M x d fp32, 381 MB at 1M items), which any method
   produces. Eager at 5M would need three (512 x 5M) fp32 matrices, 29 GB: skipped.
   Every size also gets 1 thread CPU times where cheap (immune to other processes' load).
2. the same-run ratio at 43k items (the issue's goal: chunked <= 0.6 x eager): interleaved
   rounds, 2 threads wall time and 1 thread CPU time of the calling thread (immune to
   other processes' load).
3. evaluation: ranks of a batch of 1024 (the trainer's eval batch): `full`
   (`ranks_from_scores(q @ T.T)`) against `chunked` (`ranks_from_parts`), equal integer
   for integer first; samples per second. With a term on 10 session items a row
   (`MTDConfig.repeat_bias`): `biased-chunked` (`biased_ranks`, equal to the full biased
   matrix's ranks first) against `biased-rows` (the dense row chunks used before; its
   mismatches with the full matrix are counted, not asserted).
4. recommend: top-20 for batches of 1, 64, 512 at 43k and 1M items: `today` (`(q @ T.T).topk`,
   the previous code), `chunked` (`topk_from_parts`, equal to `topk_from_scores` of the full
   scores, checked first); plus `MTD.recommend` end to end at 43k items, batch 512.

Run (the numbers in README come from this):
    OMP_WAIT_POLICY=PASSIVE pytest benches/bench_scoring.py -s          (12-21 min here)
    MTD_BENCH_SMOKE=1 pytest benches/bench_scoring.py                   (CI: tiny sizes, seconds)
    pytest benches/bench_scoring.py --benchmark-disable                 (checks + one timing each)
OMP_WAIT_POLICY=PASSIVE: with OpenMP's default busy waiting, two threads on this shared
2-core VM timed every case 1.5-2x slower and bimodal (eager 628 ms, chunked 456 ms at 43k
against 303 / 141 ms passive). MTD_SCORING_SIZES=43097,1000000 restricts the catalogues.
The report test prints the tables and writes benches/results/bench_scoring.json.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mtd_fast.metrics import (
    RANK_BUDGET_BYTES,
    biased_ranks,
    dense_biased_scores,
    ranks_from_parts,
    ranks_from_scores,
    topk_from_parts,
    topk_from_scores,
)
from mtd_fast.ops import describe, linear_cross_entropy
from mtd_fast.ops.linear_cross_entropy import linear_cross_entropy_chunked, linear_cross_entropy_ref, plan_chunks

from harness import (
    CUDA,
    SMOKE,
    add_ratios,
    benchmark_median,
    cuda_ms,
    dtype_name,
    gpu_skip_reason,
    interleaved,
    measure,
    pytest,
)

BATCH = 48 if SMOKE else 512
EVAL_BATCH = 64 if SMOKE else 1024
DIM = 16 if SMOKE else 100
DIGI = 3_000 if SMOKE else 43_097
_DEFAULT_SIZES = (DIGI, 20_000) if SMOKE else (43_097, 1_000_000, 5_000_000)
SIZES = tuple(int(x) for x in os.environ["MTD_SCORING_SIZES"].split(",")) if os.environ.get(
    "MTD_SCORING_SIZES") else _DEFAULT_SIZES
LARGE = max(SIZES)
CHECK_ROWS = 32
EAGER_MAX_BYTES = 12 << 30  # eager holds ~3 (batch x M) fp32 matrices at its peak
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RESULTS: dict = {"step": {}, "memory": {}, "ratio": {}, "eval": {}, "recommend": {}}
DEVICE = "cuda" if CUDA else "cpu"


def _rounds(m: int) -> int:
    if SMOKE:
        return 1
    return 10 if m <= 100_000 else (3 if m <= 1_000_000 else 2)


# ---------------------------------------------------------------------------------- inputs
_INPUTS: dict = {}


def make_inputs(batch: int, m: int, dim: int, seed: int, device=DEVICE):
    """q (batch, dim) ~ N(0, 1), table (m, dim) ~ N(0, 0.1^2) (logits ~ N(0, 1)), targets
    (batch,) uniform in [0, m), on `device`."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, dim, generator=gen)
    table = torch.randn(m, dim, generator=gen).mul_(0.1)
    y = torch.randint(0, m, (batch,), generator=gen)
    return tuple(t.to(device) for t in (q, table, y))


def inputs(m: int):
    """(q (BATCH, DIM), table (m, DIM), targets (BATCH,)), generated once per size."""
    if m not in _INPUTS:
        _INPUTS.clear()  # one catalogue at a time: 5M x 100 fp32 is 2 GB
        _INPUTS[m] = make_inputs(BATCH, m, DIM, m)
    return _INPUTS[m]


def eager_bytes(m: int, batch: int = BATCH) -> int:
    return 3 * batch * m * 4


def step_fn(name: str) -> Callable:
    if name == "eager":
        return linear_cross_entropy_ref
    if name == "chunked":
        return lambda q, t, y: linear_cross_entropy(q, t, y, backend={"linear_cross_entropy": "chunked"})
    if name in ("chunked-rows", "chunked-items"):
        strategy = name.split("-")[1]
        return lambda q, t, y: linear_cross_entropy_chunked(q, t, y, strategy=strategy)
    if name == "triton":
        return lambda q, t, y: linear_cross_entropy(q, t, y, backend={"linear_cross_entropy": "triton"})
    raise ValueError(name)


def make_step(name: str, m: int) -> Callable[[], None]:
    q0, t0, y = inputs(m)
    q, t = q0.clone().requires_grad_(), t0.clone().requires_grad_()
    fn = step_fn(name)

    def step():
        q.grad = t.grad = None
        fn(q, t, y).backward()
        if CUDA:
            torch.cuda.synchronize()
    return step


def _grads(fn, q, t, y):
    qa, ta = (x.detach().requires_grad_() for x in (q, t))  # new leaves on the same storage
    loss = fn(qa, ta, y)
    loss.backward()
    return loss.detach(), qa.grad, ta.grad


@torch.no_grad()
def _errors_vs_fp64(q, t, y, results: dict, cols: int = 65_536) -> dict:
    """Max errors of each result (loss, dq, dT) against the float64 truth, computed here in
    catalogue chunks (a float64 copy of a 5M-item table and its gradient would take 8 GB):
    lse per row, then softmax - onehot chunk by chunk, dT compared chunk by chunk."""
    b, m = q.shape[0], t.shape[0]
    q64 = q.double()
    lse = torch.full((b,), -float("inf"), dtype=torch.float64, device=q.device)
    for c0 in range(0, m, cols):
        lse = torch.logaddexp(lse, torch.logsumexp(q64 @ t[c0:c0 + cols].double().t(), 1))
    xt = (q64 * t[y].double()).sum(1)
    loss = (lse - xt).mean()
    dq = torch.zeros_like(q64)
    errs = {k: {"loss": abs(float(r[0]) - loss.item()), "dT": 0.0} for k, r in results.items()}
    for c0 in range(0, m, cols):
        tc = t[c0:c0 + cols].double()
        g = torch.exp(q64 @ tc.t() - lse[:, None])
        inside = ((y >= c0) & (y < c0 + tc.shape[0])).nonzero().flatten()
        g[inside, y[inside] - c0] -= 1.0
        g /= b
        dq += g @ tc
        dt = g.t() @ q64
        for k, r in results.items():
            errs[k]["dT"] = max(errs[k]["dT"], (r[2][c0:c0 + cols].double() - dt).abs().max().item())
    for k, r in results.items():
        errs[k]["dq"] = (r[1].double() - dq).abs().max().item()
    return errs


def check_step(name: str, m: int) -> dict:
    """On the first CHECK_ROWS rows, against float64: the candidate's max error in the loss,
    dq and dT must be at most twice eager fp32's own (+1e-7), flash-attention's rule."""
    q, t, y = inputs(m)
    q, y = q[:CHECK_ROWS], y[:CHECK_ROWS]
    runs = {"eager": _grads(step_fn("eager"), q, t, y)}
    if name != "eager":
        runs[name] = _grads(step_fn(name), q, t, y)
    errs = _errors_vs_fp64(q, t, y, runs)
    for key in ("loss", "dq", "dT"):
        err, err_eager = errs[name][key], errs["eager"][key]
        assert err <= 2 * err_eager + 1e-7, f"{name} at M={m}: {key} error {err:.3g} > 2 x eager's {err_eager:.3g}"
    return errs


# ---------------------------------------------------------------------------------- timing
def _timed(benchmark, fn: Callable, rounds: int) -> float:
    """pytest-benchmark's median seconds (own timing when benchmarking is disabled)."""
    return benchmark_median(benchmark, fn, rounds, warmup=0 if SMOKE else 1)


def _interleaved(fns: dict, rounds: int, clock=time.perf_counter) -> dict:
    """Per name: (min, median) seconds, calls alternating so load changes hit all alike."""
    return {k: (min(v), statistics.median(v)) for k, v in interleaved(fns, rounds, clock).items()}


# ------------------------------------------------------------------------ 1. training step
STEP_NAMES = ["eager", "chunked", "chunked-rows", "chunked-items", "triton"]


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("name", STEP_NAMES)
def test_step(benchmark, name, m):
    if name == "triton" and gpu_skip_reason(name):
        pytest.skip(gpu_skip_reason(name))
    if name == "triton" and not CUDA and m != DIGI:
        pytest.skip("the Triton interpreter runs the smallest catalogue only (seconds per call above)")
    if name == "eager" and eager_bytes(m) > EAGER_MAX_BYTES:
        pytest.skip(f"eager at {m:,} items needs ~{eager_bytes(m) / 2**30:.0f} GB of logits (3 x batch x M fp32)")
    if name.startswith("chunked-") and plan_chunks(BATCH, m)[0] == name.split("-")[1]:
        pytest.skip(f"{name} is what auto runs at {m:,} items: the 'chunked' row")
    if name == "chunked-rows" and m > 1_000_000:
        pytest.skip("the row strategy above 1M items: slower than items from 100k up (measured), minutes per step")
    benchmark.group = f"scoring step fwd+bwd, M={m:,}, batch {BATCH}, d {DIM}"
    check = check_step(name, m)
    step = make_step(name, m)
    median = _timed(benchmark, step, _rounds(m))
    res = {"median_s": median, "check": check, "threads": torch.get_num_threads(),
           "backend": describe("linear_cross_entropy", {"linear_cross_entropy": "chunked"}, DEVICE)}
    benchmark.extra_info.update({"median_s": median})
    RESULTS["step"][f"{name}/{m}"] = res


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(name: str, m: int) -> dict:
    """Run one step in this (fresh) process; peak RSS during it above the RSS before it."""
    step = make_step(name, m)
    before = _rss_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    t0 = time.perf_counter()
    step()
    seconds = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return {"extra_bytes": (peak - before) * 1024, "table_grad_bytes": m * DIM * 4, "seconds": seconds}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc (peak RSS reset)")
@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("name", ["eager", "chunked"])
def test_step_peak_memory(name, m):
    if CUDA:
        pytest.skip("peak RSS is a CPU measure; benches/gpu_check.py reports CUDA memory")
    if name == "eager" and eager_bytes(m) > EAGER_MAX_BYTES:
        pytest.skip(f"eager at {m:,} items needs ~{eager_bytes(m) / 2**30:.0f} GB")
    env = dict(os.environ, MTD_BENCH_SMOKE="1" if SMOKE else "0")
    res = subprocess.run([sys.executable, __file__, "--peak", name, str(m)], capture_output=True, text=True,
                         env=env, timeout=1800, cwd=Path(__file__).resolve().parent)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    RESULTS["memory"][f"{name}/{m}"] = out
    if name == "chunked" and m == 1_000_000:
        # the goal, asserted: memory does not depend on the load of the machine
        assert out["extra_bytes"] < 1 << 30, f"chunked step at 1M items: {out['extra_bytes'] / 2**20:.0f} MB extra"


def gpu_timings(dev, batch: int, dim: int, sizes, dtypes, timer: Callable[[Callable], float] = cuda_ms) -> list[dict]:
    """The op's GPU timings (benches/gpu_check.py's `lce_timings`): forward + backward of the
    scoring loss, `triton`, the `chunked` PyTorch backend and the eager `reference`, per
    catalogue size and dtype; `timer` ms (CUDA events), the first call and, on CUDA, the peak
    memory of a step above what was allocated before it (inputs and their gradients' first
    allocation excluded: set_to_none)."""
    rows = []
    impls = {"triton": step_fn("triton"), "chunked": step_fn("chunked"), "reference": step_fn("eager")}
    for m in sizes:
        for dtype in dtypes:
            q0, t0, y = make_inputs(batch, m, dim, m, dev)
            q, table = q0.to(dtype).requires_grad_(True), t0.to(dtype).requires_grad_(True)
            for name, fn in impls.items():
                def step(fn=fn):
                    q.grad = table.grad = None
                    fn(q, table, y).backward()
                row = {"op": "linear_cross_entropy", "dtype": dtype_name(dtype), "M": m, "impl": name}
                if CUDA:
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                row.update(measure(step, timer))
                if CUDA:
                    row["peak_extra_MB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
                rows.append(row)
    return add_ratios(rows, ("M", "dtype"), batch)


# ------------------------------------------------------------------ 2. same-run ratio at 43k
def test_step_ratio_diginetica():
    fns = {"eager": make_step("eager", DIGI), "chunked": make_step("chunked", DIGI)}
    rounds = 2 if SMOKE else 12
    wall = _interleaved(fns, rounds)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cpu1 = _interleaved(fns, max(1, rounds // 2), clock=time.thread_time)
    finally:
        torch.set_num_threads(old)
    RESULTS["ratio"] = {
        "m": DIGI, "threads": old, "rounds": rounds,
        "wall_ms": {k: [v[0] * 1e3, v[1] * 1e3] for k, v in wall.items()},
        "cpu1_ms": {k: [v[0] * 1e3, v[1] * 1e3] for k, v in cpu1.items()},
        "ratio_wall_min": wall["chunked"][0] / wall["eager"][0],
        "ratio_wall_median": wall["chunked"][1] / wall["eager"][1],
        "ratio_cpu1_min": cpu1["chunked"][0] / cpu1["eager"][0],
    }


# ------------------------------------------------------------------------- 3. evaluation
EVAL_SIZES = tuple(m for m in SIZES if m <= 1_000_000)


@pytest.mark.parametrize("m", EVAL_SIZES)
@pytest.mark.parametrize("name", ["full", "chunked"])
def test_eval_throughput(benchmark, name, m):
    benchmark.group = f"ranking a batch of {EVAL_BATCH}, M={m:,}"
    _, table, _ = inputs(m)
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(EVAL_BATCH, DIM, generator=gen).to(DEVICE)
    y = torch.randint(1, m + 1, (EVAL_BATCH,), generator=gen).to(DEVICE)
    full = lambda: ranks_from_scores(q @ table.t(), y)  # noqa: E731
    chunked = lambda: ranks_from_parts(q, table, y)  # noqa: E731
    fn = full if name == "full" else chunked
    if name == "chunked":
        assert torch.equal(chunked(), full()), "chunked ranks differ from the full-matrix ranks"
    median = _timed(benchmark, fn, _rounds(m))
    cpu1 = _cpu1(fn, 2 if SMOKE else 5) if m <= 100_000 else None
    RESULTS["eval"][f"{name}/{m}"] = {"median_s": median, "samples_per_s": EVAL_BATCH / median,
                                      "cpu1_s": cpu1, "samples_per_s_cpu1": EVAL_BATCH / cpu1 if cpu1 else None}


def _rows_biased_ranks(q, table, y, ids, bias):
    """The previous code for a model with a session term (`MTDConfig.repeat_bias`): the dense
    biased scores of row chunks of RANK_BUDGET_BYTES each (2 rows a chunk at 1M items)."""
    rows = max(1, RANK_BUDGET_BYTES // (4 * table.shape[0]))
    return torch.cat([ranks_from_scores(dense_biased_scores(q[r:r + rows], table, ids[r:r + rows], bias[r:r + rows]),
                                        y[r:r + rows]) for r in range(0, q.shape[0], rows)])


@pytest.mark.parametrize("m", EVAL_SIZES)
@pytest.mark.parametrize("name", ["biased-rows", "biased-chunked"])
def test_eval_throughput_biased(benchmark, name, m):
    """Ranking with a term on 10 session items a row (`biased_ranks`: column chunks, each
    with the session items among its columns) against the previous row chunks; the chunked
    ranks must equal the full biased matrix's, bit for bit; the row chunks' mismatches are
    counted (their 2-row GEMMs round differently from the full product's)."""
    benchmark.group = f"ranking a batch of {EVAL_BATCH} with a session term, M={m:,}"
    _, table, _ = inputs(m)
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(EVAL_BATCH, DIM, generator=gen).to(DEVICE)
    ids = torch.randint(0, m + 1, (EVAL_BATCH, 10), generator=gen).to(DEVICE)
    bias = torch.randn(EVAL_BATCH, 10, generator=gen).to(DEVICE)
    y = torch.randint(1, m + 1, (EVAL_BATCH,), generator=gen).to(DEVICE)
    y[::2] = ids[::2, 0].clamp_min(1)  # half the targets are re-clicks
    fn = {"biased-rows": lambda: _rows_biased_ranks(q, table, y, ids, bias),
          "biased-chunked": lambda: biased_ranks(q, table, y, ids, bias)}[name]
    want = ranks_from_scores(dense_biased_scores(q, table, ids, bias), y)
    mismatches = int((fn() != want).sum())
    if name == "biased-chunked":
        assert mismatches == 0, "chunked biased ranks differ from the full biased matrix's"
    median = _timed(benchmark, fn, _rounds(m))
    RESULTS["eval"][f"{name}/{m}"] = {"median_s": median, "samples_per_s": EVAL_BATCH / median,
                                      "cpu1_s": _cpu1(fn, 2 if SMOKE else 3), "samples_per_s_cpu1": None,
                                      "mismatches_vs_full": mismatches}


# -------------------------------------------------------------------------- 4. recommend
REC_SIZES = tuple(m for m in SIZES if m <= 1_000_000)
REC_BATCHES = (1, 8) if SMOKE else (1, 64, 512)


@pytest.mark.parametrize("m", REC_SIZES)
@pytest.mark.parametrize("b", REC_BATCHES)
@pytest.mark.parametrize("name", ["today", "chunked"])
def test_recommend_latency(benchmark, name, b, m):
    benchmark.group = f"top-20 of a batch of {b}, M={m:,}"
    _, table, _ = inputs(m)
    q = torch.randn(b, DIM, generator=torch.Generator().manual_seed(b)).to(DEVICE)
    today = lambda: (q @ table.t()).topk(20, dim=1).indices  # noqa: E731
    chunked = lambda: topk_from_parts(q, table, 20)  # noqa: E731
    if name == "chunked":
        got = chunked()
        assert torch.equal(got, topk_from_scores(q @ table.t(), 20))
        assert torch.equal(got, today())  # random scores: no ties, so the old order too
    fn = today if name == "today" else chunked
    median = _timed(benchmark, fn, 3 if SMOKE else (20 if m < 10**6 else 5))
    RESULTS["recommend"][f"{name}/{b}/{m}"] = {"median_s": median, "cpu1_s": _cpu1(fn) if m <= 100_000 else None}


def _cpu1(fn, rounds: int = 2 if SMOKE else 7) -> float:
    """Min CPU seconds of the calling thread at 1 torch thread: immune to other processes' load."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _interleaved({"f": fn}, rounds, clock=time.thread_time)["f"][0]
    finally:
        torch.set_num_threads(old)


def test_mtd_recommend_end_to_end(benchmark):
    """MTD.recommend (sessions -> encoder -> chunked top-20) at Diginetica's catalogue, batch 512."""
    import numpy as np

    from mtd_fast import MTD, MTDConfig

    torch.manual_seed(0)
    model = MTD(DIGI, MTDConfig(hidden_size=DIM))
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(1 / 4.85, size=BATCH), 50)  # Diginetica-like, mean 4.85
    sessions = [rng.integers(1, DIGI + 1, size=n).tolist() for n in lengths]
    benchmark.group = f"MTD.recommend, batch {BATCH}, M={DIGI:,}"
    top = model.recommend(sessions, k=20)
    assert top.shape == (BATCH, 20)
    rec = lambda: model.recommend(sessions, k=20)  # noqa: E731
    median = _timed(benchmark, rec, 3 if SMOKE else 10)
    RESULTS["recommend"][f"mtd.recommend/{BATCH}/{DIGI}"] = {"median_s": median, "cpu1_s": _cpu1(rec)}


# ---------------------------------------------------------------------------------- report
def _fmt_ms(s):
    return f"{s * 1e3:,.1f}" if s is not None else "-"


def test_zz_report(capsys):
    lines = [f"\n== bench_scoring ({'SMOKE' if SMOKE else 'full'}) {datetime.datetime.now():%Y-%m-%d %H:%M} "
             f"torch {torch.__version__} {platform.machine()} cpus {os.cpu_count()} threads "
             f"{torch.get_num_threads()} OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')} "
             f"batch {BATCH} d {DIM}"]
    lines.append("training step (fwd+bwd), median ms | peak extra memory MB (incl. the table gradient)")
    for m in SIZES:
        for name in STEP_NAMES:
            st = RESULTS["step"].get(f"{name}/{m}")
            mem = RESULTS["memory"].get(f"{name}/{m}")
            if st or mem:
                mem_s = (f"{mem['extra_bytes'] / 2**20:8,.0f} MB (table grad {mem['table_grad_bytes'] / 2**20:,.0f})"
                         if mem else "")
                lines.append(f"  M={m:>9,} {name:14s} {_fmt_ms(st['median_s'] if st else None):>10} ms   {mem_s}")
    r = RESULTS.get("ratio")
    if r:
        lines.append(f"same run, M={r['m']:,}: chunked / eager = {r['ratio_wall_min']:.2f} (min) / "
                     f"{r['ratio_wall_median']:.2f} (median), {r['threads']} threads wall; "
                     f"{r['ratio_cpu1_min']:.2f} at 1 thread CPU time (goal <= 0.6); ms (min, median) {r['wall_ms']}; "
                     f"1 thread {r['cpu1_ms']}")
    lines.append("evaluation (ranking a batch): median ms, samples/s | 1 thread CPU ms")
    for key, v in sorted(RESULTS["eval"].items()):
        mism = f" | {v['mismatches_vs_full']} ranks differ from the full matrix's" if "mismatches_vs_full" in v else ""
        lines.append(f"  eval {key:24s} {_fmt_ms(v['median_s']):>10} ms  {v['samples_per_s']:10,.0f} samples/s | "
                     f"{_fmt_ms(v['cpu1_s'])} ms{mism}")
    lines.append("recommend (top-20): median ms | 1 thread CPU ms")
    for key, v in sorted(RESULTS["recommend"].items()):
        lines.append(f"  recommend {key:26s} {_fmt_ms(v['median_s']):>10} ms | {_fmt_ms(v.get('cpu1_s'))} ms")
    with capsys.disabled():
        print("\n".join(lines))
    if not SMOKE:
        RESULTS_DIR.mkdir(exist_ok=True)
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                "machine": platform.machine(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
                "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "batch": BATCH, "dim": DIM}
        (RESULTS_DIR / "bench_scoring.json").write_text(json.dumps({"meta": meta, **RESULTS}, indent=1))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--peak":
        print(json.dumps(peak_extra_bytes(sys.argv[2], int(sys.argv[3]))))
    else:
        print(__doc__)
