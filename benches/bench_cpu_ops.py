"""CPU: which implementation should `auto` use for session_attention and aggregate?

Forward + backward at batch 512, Diginetica-like lengths padded to 20 and to 50, d = 100,
float32. Candidates, each checked against the reference (outputs and every input
gradient) before it is timed:

- session_attention: `reference` (eager), `sdpa` (torch.nn.functional.scaled_dot_product_attention
  with a boolean mask; it cannot take an external dropout mask, so a backend built on it
  would fall back to the reference whenever one is given), `compile` (torch.compile of the
  reference, dynamic=False, warm; compile time reported apart), `packed` (the length-
  bucketed backend of `mtd_fast.ops.session_attention`), and reference / packed with a dropout mask;
- aggregate: `reference`, `compile`, `packed`.

Two ways to run it:

    python benches/bench_cpu_ops.py [--threads N] [--rounds R] [--json PATH]
        interleaved rounds (every candidate once per round, so load from other processes
        hits all alike), prints min / median ms and the ratio reference / candidate;
    pytest benches/bench_cpu_ops.py --benchmark-only [--benchmark-group-by=group]
        the same cases under pytest-benchmark (one group per op and padded length).

MTD_BENCH_SMOKE=1 shrinks everything (batch 48, length 24, d 16, no torch.compile) to a
seconds-long CI check that the candidates run and agree.

Measured 2026-11-29 on the 2-core shared dev VM (load 2-4 from other jobs), torch 2.13 CPU,
lengths from the Diginetica test prefixes (mean 3.9), ms fwd+bwd median of 20 interleaved
rounds, speed-up over the reference in brackets:

| op, padded L        | threads          | reference | sdpa        | compile     | packed       |
| attention, 20       | 1                | 13.9      | 16.0 (0.87) | 13.1 (1.06) | 6.6 (2.12)   |
| attention, 50       | 1                | 56.7      | 56.2 (1.01) | 47.3 (1.20) | 9.4 (6.02)   |
| attention+mask, 50  | 1                | 58.6      | -           | -           | 9.6 (6.10)   |
| aggregate, 20       | 1                | 5.8       | -           | 4.5 (1.31)  | 2.8 (2.10)   |
| aggregate, 50       | 1                | 15.4      | -           | 12.1 (1.28) | 3.9 (3.94)   |
| attention, 20 / 50  | 2, OMP passive   | 14.3 / 56.1 | 16.0 / 53.7 (0.89 / 1.05) | - | 7.1 / 10.1 (2.00 / 5.56) |
| aggregate, 20 / 50  | 2, OMP passive   | 6.1 / 14.2 | -          | -           | 3.9 / 4.3 (1.57 / 3.34) |

With 2 threads and OpenMP's default (active) waiting, the loaded VM made every candidate
bimodal (medians 2-40x the minimum; packed, with more small parallel regions, suffered
most: medians from 0.4x to 5.6x of the reference across runs, minima always 1.5-5.9x
faster); OMP_WAIT_POLICY=PASSIVE removes that. torch.compile: 2.5-3.4 s to compile per
shape (cached), then 1.06-1.31x. Commands:

    python benches/bench_cpu_ops.py --threads 1 --json cpu_t1.json
    OMP_WAIT_POLICY=PASSIVE python benches/bench_cpu_ops.py --json cpu_t2.json

Lengths: drawn from the Diginetica test prefixes (`../shared/data/diginetica/test.txt`,
read with a restricted unpickler) when present, else geometric with mean 4.85 (the
published Diginetica average); clipped to the padded length, one session at full length.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from mtd_fast.ops.aggregate import aggregate_packed, aggregate_ref
from mtd_fast.ops.session_attention import session_attention_packed, session_attention_ref, session_attention_sdpa

SMOKE = os.environ.get("MTD_BENCH_SMOKE") == "1"
BATCH = 48 if SMOKE else 512  # smoke: just above the packed size guards
DIM = 16 if SMOKE else 100
WIDTHS = (24,) if SMOKE else (20, 50)
ROOT = Path(__file__).resolve().parents[1]
DIGI_TEST = ROOT.parent / "shared" / "data" / "diginetica" / "test.txt"
ATOL, RTOL = 1e-4, 1e-4  # fp32, B x L reductions (dg sums 25,600 terms); measured <= 4e-5


# ------------------------------------------------------------------------------------------
# inputs
# ------------------------------------------------------------------------------------------
class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):  # the SR-GNN pickles hold only lists, tuples and ints
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


def _length_pool() -> tuple[torch.Tensor, str]:
    if DIGI_TEST.exists():
        with open(DIGI_TEST, "rb") as f:
            data = _NoGlobals(f).load()
        return torch.tensor([len(x) for x in data[0]]), f"Diginetica test prefixes ({DIGI_TEST.name})"
    geo = torch.distributions.Geometric(probs=torch.tensor(1 / 4.85))
    torch.manual_seed(0)
    return geo.sample((100_000,)).long() + 1, "geometric, mean 4.85 (Diginetica file absent)"


_POOL = None


def lengths_for(width: int, seed: int = 0) -> torch.Tensor:
    global _POOL
    if _POOL is None:
        _POOL = _length_pool()
    pool = _POOL[0]
    gen = torch.Generator().manual_seed(seed + width)
    lens = pool[torch.randint(0, pool.numel(), (BATCH,), generator=gen)].clamp(1, width)
    lens[-1] = width
    return lens


# ------------------------------------------------------------------------------------------
# candidates
# ------------------------------------------------------------------------------------------
_COMPILED: dict = {}


def _compiled(fn: Callable) -> Callable:
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False)
    return _COMPILED[fn]


def attention_cases(width: int):
    """name -> (step(inputs) -> None, inputs factory); steps run forward + backward."""
    gen = torch.Generator().manual_seed(1)
    lens = lengths_for(width)
    q, k, v = (torch.randn(BATCH, width, DIM, generator=gen) for _ in range(3))
    go = torch.randn(BATCH, width, DIM, generator=gen)
    keep = 0.7
    mask = (torch.rand(BATCH, 1, width, width, generator=gen) < keep).float() / keep

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (q, k, v)]

    def make(fn, m=None):
        def run(ins):
            out = fn(*ins, lens, num_heads=1, dropout_mask=m)
            out.backward(go)
            return out, [t.grad for t in ins]
        return run

    cases = {
        "reference": make(session_attention_ref),
        "sdpa": make(session_attention_sdpa),
        "packed": make(session_attention_packed),
        "reference+dropout": make(session_attention_ref, mask),
        "packed+dropout": make(session_attention_packed, mask),
    }
    if not SMOKE:
        cases["compile"] = make(_compiled(session_attention_ref))
    refs = {"reference+dropout": "reference+dropout", "packed+dropout": "reference+dropout"}
    return cases, leaves, refs, lens


def aggregate_cases(width: int):
    gen = torch.Generator().manual_seed(2)
    lens = lengths_for(width)
    h, hp = torch.randn(BATCH, width, DIM, generator=gen), torch.randn(BATCH, width, DIM, generator=gen)
    a, g = torch.randn(BATCH, DIM, generator=gen), torch.randn(DIM, generator=gen)
    gx, gp = torch.randn(BATCH, DIM, generator=gen), torch.randn(BATCH, DIM, generator=gen)

    def leaves():
        return [t.detach().clone().requires_grad_(True) for t in (h, hp, a, g)]

    def make(fn):
        def run(ins):
            xs, ps = fn(*ins, lens, gamma=0.75, mode="additive")
            torch.autograd.backward((xs, ps), (gx, gp))
            return torch.cat([xs, ps], 1), [t.grad for t in ins]
        return run

    cases = {"reference": make(aggregate_ref), "packed": make(aggregate_packed)}
    if not SMOKE:
        cases["compile"] = make(_compiled(aggregate_ref))
    return cases, leaves, {}, lens


OPS = {"session_attention": attention_cases, "aggregate": aggregate_cases}


def check(cases, leaves, refs) -> dict:
    """Every candidate against its reference on the output and every input gradient.
    Returns the first-call seconds (compile time for torch.compile)."""
    first = {}
    results = {}
    for name, run in cases.items():
        t0 = time.perf_counter()
        results[name] = run(leaves())
        first[name] = time.perf_counter() - t0
    for name, (out, grads) in results.items():
        ref_out, ref_grads = results[refs.get(name, "reference")]
        torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} output: {m}")
        for i, (x, y) in enumerate(zip(grads, ref_grads)):
            torch.testing.assert_close(x, y, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name} grad {i}: {m}")
    return first


# ------------------------------------------------------------------------------------------
# pytest-benchmark
# ------------------------------------------------------------------------------------------
try:
    import pytest
except ImportError:  # script use without pytest
    pytest = None

if pytest is not None:
    _PARAMS = [(op, w, name) for op in OPS for w in WIDTHS
               for name in ("reference", "sdpa", "packed", "reference+dropout", "packed+dropout", "compile")
               if not (op == "aggregate" and ("sdpa" in name or "dropout" in name))
               and not (SMOKE and name == "compile")]

    @pytest.mark.parametrize("op,width,name", _PARAMS, ids=[f"{o}-L{w}-{n}" for o, w, n in _PARAMS])
    def test_cpu_op(benchmark, op, width, name):
        cases, leaves, refs, _ = OPS[op](width)
        check({k: cases[k] for k in {name, refs.get(name, "reference")}}, leaves, refs)
        benchmark.group = f"{op} L={width} B={BATCH} d={DIM}"
        run = cases[name]
        benchmark.pedantic(run, setup=lambda: ((leaves(),), {}), rounds=3 if SMOKE else 15,
                           warmup_rounds=1 if SMOKE else 2)


# ------------------------------------------------------------------------------------------
# script: interleaved rounds and a ratio table
# ------------------------------------------------------------------------------------------
def run_interleaved(rounds: int) -> list[dict]:
    rows = []
    for op, factory in OPS.items():
        for width in WIDTHS:
            cases, leaves, refs, lens = factory(width)
            first = check(cases, leaves, refs)
            times = {name: [] for name in cases}
            for _ in range(rounds):
                for name, run in cases.items():
                    ins = leaves()
                    t0 = time.perf_counter()
                    run(ins)
                    times[name].append(time.perf_counter() - t0)
            for name, ts in times.items():
                base = statistics.median(times[refs.get(name, "reference")])
                rows.append({"op": op, "width": width, "candidate": name, "min_ms": 1e3 * min(ts),
                             "median_ms": 1e3 * statistics.median(ts), "first_call_s": first[name],
                             "speedup_vs_reference_median": base / statistics.median(ts),
                             "mean_length": float(lens.float().mean())})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=3 if SMOKE else 20)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run_interleaved(args.rounds)
    src = _POOL[1] if _POOL else "?"
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__} threads={torch.get_num_threads()} batch={BATCH} d={DIM} "
          f"rounds={args.rounds} lengths: {src}")
    print(f"{'op':<18} {'L':>3} {'mean len':>8} {'candidate':<18} {'min ms':>8} {'median ms':>9} "
          f"{'x ref (median)':>14} {'first call s':>12}")
    for r in rows:
        print(f"{r['op']:<18} {r['width']:>3} {r['mean_length']:>8.2f} {r['candidate']:<18} {r['min_ms']:>8.2f} "
              f"{r['median_ms']:>9.2f} {r['speedup_vs_reference_median']:>14.2f} {r['first_call_s']:>12.2f}")
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "batch": BATCH, "dim": DIM, "lengths": src,
                "machine": platform.machine(), "python": sys.version.split()[0]}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
