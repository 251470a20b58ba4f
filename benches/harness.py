"""What the benches and the bench scripts share (imported by name: `benches/` is on sys.path
under pytest and when a script in it runs).

- real data: `DATA` (`mtd_fast.data.data_root`: $MTD_FAST_DATA, else ../shared/data beside
  the project), `data_dir(name)` and, for pytest benches, `data_dir_or_skip(name)`;
- `SMOKE` (MTD_BENCH_SMOKE=1: every bench at tiny scale, correctness checks included);
- devices: `CUDA`, `INTERPRET`, `triton_device()` / `gpu_skip_reason()` (where the GPU
  providers of an op bench run, or why they skip);
- session lengths: `diginetica_lengths` (drawn from the Diginetica test prefixes) and
  `geometric_lengths` (geometric, mean 4.85);
- correctness: `compare_rows` (fp32 tolerance, bf16 rule; one row per tensor);
- timing: `interleaved` (CPU, calls alternating), `benchmark_median` (pytest-benchmark),
  `cuda_ms` (CUDA events), `measure` (first call and steady state), `add_ratios`;
- `OpBench`: the providers of one op (session_attention, aggregate) checked against the
  reference, then timed on the CPU (interleaved rounds, pytest-benchmark) or on the GPU
  (CUDA events; what benches/gpu_check.py calls for its timing half);
- `pytest`: pytest, or a stand-in whose decorators do nothing where it is not installed
  (gpu_check.py imports the op benches on a lent GPU that may lack it).
"""
from __future__ import annotations

import math
import os
import pickle
import statistics
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Optional

import torch

from mtd_fast.data import data_root, dataset_dir

ROOT = Path(__file__).resolve().parents[1]
DATA = data_root(ROOT)
SMOKE = os.environ.get("MTD_BENCH_SMOKE") == "1"
CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FP32_TOL = (1e-4, 1e-4)  # fp32, B x L reductions (dg sums 25,600 terms); measured <= 4e-5 on the CPU
BF16_FLOOR = 1e-5
# the shapes of the session-encoder op benches (session_attention, aggregate): batch 512 (smoke: 48, just
# above the packed size guards; on the GPU 7, the interpreter costs 2-9 ms per program instance), d 100,
# Diginetica-like lengths padded to 20 / 50 (GPU: also 164, a Retailrocket-like batch)
ENCODER = SimpleNamespace(batch=48 if SMOKE else 512, gpu_batch=7 if SMOKE else 512, dim=16 if SMOKE else 100,
                          widths=(24,) if SMOKE else (20, 50), gpu_widths=(24,) if SMOKE else (50, 20, 164))
GPU_DTYPES = (torch.float32, torch.bfloat16)


def data_dir(name: str) -> Path:
    """The folder of shared dataset `name` (a key of `mtd_fast.data.DATASETS`)."""
    return dataset_dir(name, ROOT)


def data_dir_or_skip(name: str) -> Path:
    """`data_dir(name)`, or skip the calling pytest bench with where it looked."""
    import pytest

    path = data_dir(name)
    if not path.is_dir():
        pytest.skip(f"{name}: real data not found at {path} (benches read $MTD_FAST_DATA, else ../shared/data; "
                    "MTD_BENCH_SMOKE=1 runs on synthetic data)")
    return path


try:
    import pytest
except ImportError:  # a script on a machine without pytest (gpu_check.py on a lent GPU)
    class _NoPytest:
        """`pytest.mark.x(...)(f)` returns f, `pytest.param(...)` a placeholder: the module imports;
        its tests are never collected where pytest is absent."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self

    pytest = _NoPytest()


# ---- devices ------------------------------------------------------------------------------
def triton_device() -> Optional[str]:
    """Where the Triton providers run: CUDA, else CPU tensors under the interpreter in smoke
    mode (tiny shapes: 2-9 ms per program instance), else nowhere (None)."""
    if CUDA:
        return "cuda"
    return "cpu" if INTERPRET and SMOKE else None


def gpu_skip_reason(provider: str, dtype=torch.float32, bf16_interpreted: bool = False) -> Optional[str]:
    """Why a GPU provider cannot run here (None: it runs, on `gpu_device(provider)`).
    bf16_interpreted: the op's kernels give right bf16 results under the interpreter (no tl.dot)."""
    if provider.startswith("triton"):
        if triton_device() is None:
            return ("GPU provider: no CUDA device (the Triton ones also run on CPU tensors with TRITON_INTERPRET=1 "
                    "and MTD_BENCH_SMOKE=1)")
        if not CUDA and dtype == torch.bfloat16 and not bf16_interpreted:
            return "bf16 tl.dot is wrong under the Triton interpreter (known upstream problem): GPU only"
        return None
    return None if CUDA else "GPU provider: no CUDA device"


def gpu_device(provider: str) -> str:
    return triton_device() if provider.startswith("triton") and not CUDA else "cuda"


# ---- session lengths ----------------------------------------------------------------------
class _NoGlobals(pickle.Unpickler):
    def find_class(self, module, name):  # the SR-GNN pickles hold only lists, tuples and ints
        raise pickle.UnpicklingError(f"refusing global {module}.{name}")


_POOL: list = []


def length_pool() -> tuple[torch.Tensor, str]:
    """(lengths, where they come from): the Diginetica test prefixes (read with a restricted
    unpickler) when present, else 100,000 geometric draws with mean 4.85 (the published
    Diginetica average)."""
    if not _POOL:
        test = data_dir("diginetica") / "test.txt"
        if test.exists():
            with open(test, "rb") as f:
                data = _NoGlobals(f).load()
            _POOL.append((torch.tensor([len(x) for x in data[0]]), f"Diginetica test prefixes ({test.name})"))
        else:
            geo = torch.distributions.Geometric(probs=torch.tensor(1 / 4.85))
            torch.manual_seed(0)
            _POOL.append((geo.sample((100_000,)).long() + 1, "geometric, mean 4.85 (Diginetica file absent)"))
    return _POOL[0]


def diginetica_lengths(batch: int, width: int, seed: int = 0) -> torch.Tensor:
    """(batch,) lengths drawn from `length_pool()`, clipped to width, the last one full."""
    pool = length_pool()[0]
    gen = torch.Generator().manual_seed(seed + width)
    lens = pool[torch.randint(0, pool.numel(), (batch,), generator=gen)].clamp(1, width)
    lens[-1] = width
    return lens


def geometric_lengths(b: int, width: int, seed: int, device="cpu") -> torch.Tensor:
    """Diginetica-like lengths (geometric, mean 4.85), clipped to width; first 1, last full."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(b, generator=gen).clamp_min(1e-12)
    lens = (torch.log(u) / math.log(1 - 1 / 4.85)).floor().long() + 1
    lens = lens.clamp(1, width)
    lens[0], lens[-1] = 1, width
    return lens.to(device)


# ---- correctness --------------------------------------------------------------------------
def compare_rows(case: str, names, fast, ref32, ref16=None) -> list[dict]:
    """One row per tensor. fp32 (`ref16` None): |fast - ref| <= atol + rtol |ref| with FP32_TOL;
    bf16: max |fast - ref32| <= 2 max |ref16 - ref32| + BF16_FLOOR (flash-attention's rule)."""
    rows = []
    atol, rtol = FP32_TOL
    for i, (n, f, r) in enumerate(zip(names, fast, ref32)):
        err = (f.float() - r.float()).abs()
        finite = bool(torch.isfinite(f).all())
        if ref16 is None:
            rows.append({"case": case, "tensor": n, "dtype": "fp32", "max_err": err.max().item(), "finite": finite,
                         "ok": bool((err <= atol + rtol * r.float().abs()).all()) and finite})
        else:
            e_fast = err.max().item()
            e_ref = (ref16[i].float() - r.float()).abs().max().item()
            rows.append({"case": case, "tensor": n, "dtype": "bf16", "max_err": e_fast, "ref_bf16_err": e_ref,
                         "finite": finite, "ok": e_fast <= 2 * e_ref + BF16_FLOOR and finite})
    return rows


def assert_rows_ok(rows: list[dict]) -> None:
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "; ".join(f"{r['case']} {r['tensor']} {r['dtype']}: max error {r['max_err']:.3g}"
                              + (f" (bf16 reference {r['ref_bf16_err']:.3g})" if "ref_bf16_err" in r else "")
                              for r in bad)


# ---- timing -------------------------------------------------------------------------------
def interleaved(fns: dict, rounds: int, clock: Callable[[], float] = time.perf_counter,
                setup: Optional[Callable] = None) -> dict[str, list[float]]:
    """Seconds of every call of each fn, calls alternating (one of each per round), so load
    changes from other processes hit all of them alike. With `setup`, each call is
    `f(setup())`, setup untimed (fresh inputs per call)."""
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, f in fns.items():
            args = () if setup is None else (setup(),)
            t0 = clock()
            f(*args)
            times[k].append(clock() - t0)
    return times


def benchmark_median(benchmark, fn: Callable, rounds: int, warmup: int) -> float:
    """Run `fn` under pytest-benchmark; median seconds (own timing when benchmarking is disabled)."""
    t0 = time.perf_counter()
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=warmup)
    stats = getattr(benchmark, "stats", None)
    if stats is not None and getattr(stats, "stats", None) is not None:
        return float(stats.stats.median)
    return (time.perf_counter() - t0) / max(rounds + warmup, 1)


def cuda_ms(step: Callable, warmup: int = 10, iters: int = 50) -> float:
    """Median ms of `step` by CUDA events after `warmup` calls; without CUDA (Triton
    interpreter runs on CPU tensors) the median wall clock instead."""
    for _ in range(warmup):
        step()
    if not CUDA:
        return 1e3 * statistics.median(interleaved({"s": step}, max(iters, 1))["s"])
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def measure(step: Callable, timer: Callable[[Callable], float] = cuda_ms) -> dict:
    """First call (compilation included) and steady-state ms; an error is recorded, not raised."""
    try:
        t0 = time.perf_counter()
        step()
        if CUDA:
            torch.cuda.synchronize()
        first = time.perf_counter() - t0
        return {"ms": timer(step), "first_call_s": first}
    except Exception as exc:
        return {"ms": float("nan"), "first_call_s": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:500]}


def add_ratios(rows: list[dict], keys: tuple[str, ...], batch: int) -> list[dict]:
    """speedup_vs_reference (the row with impl "reference" and the same `keys`) and samples/s."""
    for r in rows:
        ref = next(x for x in rows if x["impl"] == "reference" and all(x[k] == r[k] for k in keys))
        r["speedup_vs_reference"] = ref["ms"] / r["ms"]
        r["samples_per_s"] = batch / (r["ms"] / 1e3)
    return rows


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).split(".")[-1]


# ---- one op's providers -------------------------------------------------------------------
def label(provider: str, dropout: bool) -> str:
    return provider + ("+dropout" if dropout else "")


class CaseBase:
    """What the op benches' input cases share: the fixed tensors (upstream gradients, masks)
    cast to a dtype once, not inside every timed call."""

    def cast(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        cache = self.__dict__.setdefault("_casts", {})
        if (name, dtype) not in cache:
            cache[name, dtype] = getattr(self, name).to(dtype)
        return cache[name, dtype]


class OpBench:
    """The providers of one op and how to check and time them.

    `make_case(width, device, batch, dim, seed)` returns inputs with `names` (outputs then
    gradients), `lens`, `leaves(dtype)` (fresh leaf copies) and `run(fn, ins, dropout)`
    (forward + backward; returns outputs + input gradients). `providers`: name -> zero-argument
    factory of the function (lazy: torch.compile and Triton are built on first use only).
    A candidate is (provider, dropout); each is checked against ("reference", dropout)."""

    def __init__(self, op: str, make_case: Callable, providers: dict[str, Callable],
                 gpu_skip: Optional[Callable[[str, int], Optional[str]]] = None):
        self.op, self.make_case, self.providers = op, make_case, providers
        self.gpu_skip = gpu_skip or (lambda provider, width: None)
        self._fns: dict = {}

    def fn(self, provider: str) -> Callable:
        if provider not in self._fns:
            self._fns[provider] = self.providers[provider]()
        return self._fns[provider]

    def check(self, case, candidates, dtype=torch.float32) -> dict[str, float]:
        """Every candidate against the reference with the same dropout (outputs and every input
        gradient; bf16 by the bf16 rule); raises on a mismatch. Returns first-call seconds."""
        first, res = {}, {}
        refs = {("reference", d) for _, d in candidates}
        for cand in list(dict.fromkeys(list(candidates) + sorted(refs))):
            t0 = time.perf_counter()
            res[cand] = case.run(self.fn(cand[0]), case.leaves(dtype), cand[1])
            first[cand] = time.perf_counter() - t0
        for provider, drop in candidates:
            where = f"{self.op} {label(provider, drop)} {dtype_name(dtype)}"
            if dtype == torch.float32:
                assert_rows_ok(compare_rows(where, case.names, res[provider, drop], res["reference", drop]))
            else:
                ref32 = case.run(self.fn("reference"), case.leaves(torch.float32), drop)
                assert_rows_ok(compare_rows(where, case.names, res[provider, drop], ref32, res["reference", drop]))
        return {label(*c): s for c, s in first.items()}

    def call(self, case, provider: str, dropout: bool) -> Callable[[list], list]:
        """`call(leaves)`: one forward + backward on those leaves (synchronized on CUDA)."""
        fn = self.fn(provider)
        sync = torch.cuda.synchronize if case.lens.is_cuda else (lambda: None)

        def run(ins):
            res = case.run(fn, ins, dropout)
            sync()
            return res
        return run

    def steady_step(self, case, provider: str, dropout: bool, dtype) -> Callable[[], None]:
        """One forward + backward on the same leaves, gradients reset, for `cuda_ms` (the GPU
        timings): no copy and no host synchronization inside the timed region (the CUDA events
        around it time the device work; `measure` synchronizes the first call itself)."""
        fn, ins = self.fn(provider), case.leaves(dtype)

        def step():
            for t in ins:
                t.grad = None
            case.run(fn, ins, dropout)
        return step

    def cpu_rows(self, widths, candidates, rounds: int, batch: int, dim: int) -> list[dict]:
        """The CPU study: per width, check every candidate, then time them in interleaved rounds
        (every candidate once per round); min / median ms and the ratio to the reference."""
        rows = []
        for width in widths:
            case = self.make_case(width, "cpu", batch, dim, seed=None)
            first = self.check(case, candidates)
            calls = {label(p, d): self.call(case, p, d) for p, d in candidates}
            times = interleaved(calls, rounds, setup=case.leaves)
            for (p, d) in candidates:
                name = label(p, d)
                ts, base = times[name], statistics.median(times[label("reference", d)])
                rows.append({"op": self.op, "width": width, "candidate": name, "min_ms": 1e3 * min(ts),
                             "median_ms": 1e3 * statistics.median(ts), "first_call_s": first[name],
                             "speedup_vs_reference_median": base / statistics.median(ts),
                             "mean_length": float(case.lens.float().mean())})
        return rows

    def gpu_rows(self, dev, batch: int, dim: int, widths, dtypes, candidates,
                 timer: Callable[[Callable], float] = cuda_ms, compile_until: float = math.inf) -> list[dict]:
        """The GPU timings (benches/gpu_check.py's timing half): forward + backward per candidate,
        width and dtype, `timer` ms (CUDA events) and the first call; an error is recorded in its
        row. torch.compile at COMPILE_WIDTH only, and only before `compile_until` (perf_counter)."""
        rows = []
        for dtype in dtypes:
            for width in widths:
                case = self.make_case(width, dev, batch, dim, seed=width)
                for provider, drop in candidates:
                    if self.gpu_skip(provider, width) or (
                            provider == "compile" and time.perf_counter() > compile_until):
                        continue
                    row = {"op": label(self.op, drop), "dtype": dtype_name(dtype), "L": width, "impl": provider}
                    rows.append({**row, **measure(self.steady_step(case, provider, drop, dtype), timer)})
        return add_ratios(rows, ("op", "dtype", "L"), batch)

    # pytest-benchmark: the providers as a parametrize axis (one group per device, width, dtype)
    @staticmethod
    def cpu_params(widths, candidates) -> list:
        return [pytest.param(w, p, d, id=f"cpu-L{w}-{label(p, d)}") for w in widths for p, d in candidates]

    @staticmethod
    def gpu_params(widths, dtypes, candidates) -> list:
        """Without torch.compile in smoke mode (tens of seconds per shape)."""
        return [pytest.param(w, dt, p, d, id=f"gpu-L{w}-{dtype_name(dt)}-{label(p, d)}")
                for dt in dtypes for w in widths for p, d in candidates if not (SMOKE and p == "compile")]

    def bench(self, benchmark, width: int, batch: int, dim: int, device: str, provider: str, dropout: bool, dtype,
              rounds: int, warmup: int) -> None:
        """Check against the reference first, then time forward + backward (fresh leaves per call)."""
        benchmark.group = f"{self.op} {device} L={width} B={batch} d={dim} {dtype_name(dtype)}"
        case = self.make_case(width, device, batch, dim, seed=None if device == "cpu" else width)
        self.check(case, [(provider, dropout)], dtype)
        benchmark.pedantic(self.call(case, provider, dropout), setup=lambda: ((case.leaves(dtype),), {}),
                           rounds=rounds, warmup_rounds=warmup)

    def bench_cpu(self, benchmark, width: int, provider: str, dropout: bool, batch: int, dim: int) -> None:
        self.bench(benchmark, width, batch, dim, "cpu", provider, dropout, torch.float32, rounds=3 if SMOKE else 15,
                   warmup=1 if SMOKE else 2)

    def bench_gpu(self, benchmark, width: int, dtype, provider: str, dropout: bool, batch: int, dim: int,
                  bf16_interpreted: bool = False) -> None:
        """A GPU provider, or a skip that says why it cannot run here."""
        why = gpu_skip_reason(provider, dtype, bf16_interpreted) or self.gpu_skip(provider, width)
        if why:
            pytest.skip(why)
        self.bench(benchmark, width, batch, dim, gpu_device(provider), provider, dropout, dtype,
                   rounds=1 if SMOKE and not CUDA else 20, warmup=0 if SMOKE else 5)


def run_op_bench_cli(bench: OpBench, candidates, widths, batch: int, dim: int, doc: str, argv=None) -> int:
    """The CPU script of an op bench: `--threads N --rounds R --json PATH`; interleaved rounds
    (`OpBench.cpu_rows`), one table, the rows as JSON ({"meta", "rows"})."""
    import argparse
    import datetime
    import json
    import platform
    import sys

    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--rounds", type=int, default=3 if SMOKE else 20)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = bench.cpu_rows(widths, candidates, args.rounds, batch, dim)
    src = length_pool()[1]
    print(f"# {datetime.datetime.now().isoformat(timespec='seconds')} {platform.processor() or platform.machine()} "
          f"torch {torch.__version__} threads={torch.get_num_threads()} batch={batch} d={dim} "
          f"rounds={args.rounds} lengths: {src}")
    print(f"{'op':<18} {'L':>3} {'mean len':>8} {'candidate':<18} {'min ms':>8} {'median ms':>9} "
          f"{'x ref (median)':>14} {'first call s':>12}")
    for r in rows:
        print(f"{r['op']:<18} {r['width']:>3} {r['mean_length']:>8.2f} {r['candidate']:<18} {r['min_ms']:>8.2f} "
              f"{r['median_ms']:>9.2f} {r['speedup_vs_reference_median']:>14.2f} {r['first_call_s']:>12.2f}")
    if args.json:
        meta = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                "threads": torch.get_num_threads(), "batch": batch, "dim": dim, "lengths": src,
                "machine": platform.machine(), "python": sys.version.split()[0]}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0
