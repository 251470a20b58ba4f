"""Graph-builder benchmarks (pytest-benchmark): Numba against the NumPy reference and a
pure-Python peer, each checked for bit-exact output before it is timed.

- global graph (`MTD_SPEC.md` section 3) on the full Diginetica training sessions:
  `global_graph_numba` vs `global_graph_ref` (NumPy: unique + lexsort) vs a pure-Python
  dict-of-dicts builder (written here, the way research code usually builds it);
  warm time per build, peak memory of one build (a fresh process: peak RSS growth, and
  tracemalloc's peak of Python/NumPy allocations, which cannot see Numba's allocator),
  and the Numba first-call cost apart: cold compile and load-from-cache, each in a fresh
  process with an empty / filled `NUMBA_CACHE_DIR`.
- per-batch SR-GNN session graphs for a 512-sample Diginetica batch: `session_graphs_numba`
  (padded B x n x n arrays, and `packed=True`: node and edge lists, what SR-GNN trains on)
  vs `session_graphs_ref` (the per-session NumPy loop, the way RecBole's SR-GNN builds them).

Run:  pytest benches/bench_graph.py            (full, about a minute here)
      MTD_BENCH_SMOKE=1 pytest benches/bench_graph.py   (tiny synthetic input, one round)
The last test prints the ratios measured in this run.
"""
from __future__ import annotations

import functools
import gc
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Callable, Optional

import numpy as np
import pytest

from mtd_fast.data import Sessions, load_dataset, pad_batch
from mtd_fast.graph import GlobalGraph, global_graph_ref, session_graphs_ref

from harness import benchmark_median, data_dir_or_skip

SMOKE = os.environ.get("MTD_BENCH_SMOKE") == "1"
BATCH = 64 if SMOKE else 512
RESULTS: dict[str, dict] = {}  # name -> measured numbers, for the closing ratio report


# --------------------------------------------------------------------------- the peer
def global_graph_pydict(sessions: Sessions, n_items: int, directed: bool = False,
                        weighted: bool = False) -> GlobalGraph:
    """Pure-Python global graph: a dict of dicts of transition counts (same output as the
    reference). The usual research-code way; the baseline the compiled builders replace."""
    flat = sessions.items.tolist()
    off = sessions.offsets.tolist()
    adj: dict[int, dict[int, int]] = {}
    for s in range(len(off) - 1):
        for i in range(off[s], off[s + 1] - 1):
            x, y = flat[i], flat[i + 1]
            if x == y:
                continue
            if x > n_items or y > n_items:
                raise ValueError(f"item id {max(x, y)} is out of range for n_items={n_items}")
            row = adj.setdefault(x, {})
            row[y] = row.get(y, 0) + 1
            if not directed:
                row = adj.setdefault(y, {})
                row[x] = row.get(x, 0) + 1
            else:
                adj.setdefault(y, {})
    nodes = sorted(adj)
    node_of = {v: i for i, v in enumerate(nodes)}
    indptr, indices, values, degrees = [0], [], [], []
    for v in nodes:
        row = {node_of[u]: c for u, c in adj[v].items()}
        row[node_of[v]] = 1  # self-loop, weight 1
        cols = sorted(row)
        indices.extend(cols)
        values.extend(row[c] for c in cols)
        indptr.append(len(indices))
        degrees.append(sum(row.values()) if weighted else len(cols))
    return GlobalGraph(np.array(indptr, dtype=np.int64), np.array(indices, dtype=np.int32),
                       np.array(values, dtype=np.float32) if weighted else None,
                       np.array(degrees, dtype=np.float32), np.array(nodes, dtype=np.int64), int(n_items),
                       directed=bool(directed), weighted=bool(weighted))


def _builders() -> dict[str, Callable]:
    from mtd_fast.graph.numba import global_graph_numba

    return {"numba": global_graph_numba, "reference": global_graph_ref, "python_dict": global_graph_pydict}


# --------------------------------------------------------------------------- inputs
def _synthetic_sessions(seed: int = 0) -> tuple[Sessions, int]:
    rng = np.random.default_rng(seed)
    n_items = 300
    lens = rng.integers(1, 12, size=2000)
    items = rng.integers(1, n_items + 1, size=int(lens.sum()))
    rep = np.flatnonzero(rng.random(items.size) < 0.2)
    items[rep[rep > 0]] = items[rep[rep > 0] - 1]  # consecutive repeats
    offsets = np.zeros(lens.size + 1, dtype=np.int64)
    np.cumsum(lens, out=offsets[1:])
    return Sessions(offsets, items.astype(np.int32)), n_items


def _inputs():
    """(train sessions, n_items, samples' prefixes) of the benchmark input."""
    if SMOKE:
        from mtd_fast.data import expand_samples

        sessions, n_items = _synthetic_sessions()
        return sessions, n_items, expand_samples(sessions).prefixes
    ds = load_dataset("diginetica", root=data_dir_or_skip("diginetica"))
    return ds.train_sessions, ds.n_items, ds.train.prefixes


@pytest.fixture(scope="module")
def data():
    sessions, n_items, prefixes = _inputs()
    ref = global_graph_ref(sessions, n_items)
    idx = np.random.default_rng(0).choice(len(prefixes), BATCH, replace=False)
    items, lengths = pad_batch(prefixes, idx)
    return {"sessions": sessions, "n_items": n_items, "ref": ref, "items": items, "lengths": lengths}


# --------------------------------------------------------------------------- helpers
def assert_same_graph(ref: GlobalGraph, got: GlobalGraph) -> None:
    for name in ("indptr", "indices", "degrees", "nodes"):
        a, b = getattr(ref, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name
    assert (ref.values is None) == (got.values is None)
    if ref.values is not None:
        assert ref.values.dtype == got.values.dtype and ref.values.tobytes() == got.values.tobytes()


def assert_same_session_graphs(ref, got) -> None:
    assert type(ref) is type(got)
    for name in ref.__dataclass_fields__:
        a, b = getattr(ref, name), getattr(got, name)
        assert a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes(), name


def _timed(benchmark, fn: Callable, rounds: int, warmup_rounds: int = 1) -> float:
    """Run `fn` under pytest-benchmark; the median seconds (own timing if benchmarking is off)."""
    return benchmark_median(benchmark, fn, rounds, warmup_rounds)


def _vm_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _release_free_heap() -> None:
    """Hand freed heap pages back to the OS (glibc), so that a later allocation grows the RSS
    instead of silently reusing pages the data loader freed: without it the Numba build
    (whose allocator tracemalloc cannot see) read about +2 MB of RSS growth."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _peak_here(name: str) -> dict:
    """Peak memory of one global-graph build in this (fresh) process; run by `_peak`."""
    sessions, n_items, _ = _inputs()
    build = _builders()[name]
    # warm on a tiny input only (Numba kernels loaded, NumPy paths touched): a warm-up on the
    # real input would leave its freed blocks in the heap, and the measured build would
    # reuse them without growing the RSS (it read +0.0 MB for Numba that way)
    tiny, tiny_items = _synthetic_sessions(1)
    build(tiny, tiny_items)
    gc.collect()
    _release_free_heap()
    out: dict = {"rss_peak_bytes": None, "tracemalloc_peak_bytes": None}
    try:  # "5" resets the peak-RSS counter (VmHWM) of this process (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _vm_kib("VmRSS")
        g = build(sessions, n_items)
        hwm = _vm_kib("VmHWM")
        if base is not None and hwm is not None:
            out["rss_peak_bytes"] = (hwm - base) * 1024
        del g
    except OSError:
        pass
    gc.collect()
    tracemalloc.start()
    build(sessions, n_items)
    out["tracemalloc_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return out


def _peak(name: str) -> dict:
    if SMOKE:  # CI: skip the fresh process (numba + torch imports cost seconds each)
        return _peak_here(name)
    proc = subprocess.run([sys.executable, __file__, "--peak", name], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _compile_in_fresh_process(cache_dir: str) -> dict:
    code = ("import json, mtd_fast.graph.numba as gn; s = gn.warmup(); "
            "print(json.dumps(gn.compile_report()))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env["NUMBA_CACHE_DIR"] = cache_dir
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(x: Optional[int]) -> str:
    return "n/a" if x is None else f"{x / 2**20:.1f} MB"


# --------------------------------------------------------------------------- global graph
@pytest.mark.parametrize("name", ["reference", "python_dict", "numba"])
def test_global_graph(benchmark, data, name):
    benchmark.group = "global_graph (full Diginetica train)" if not SMOKE else "global_graph (smoke)"
    build = _builders()[name]
    sessions, n_items = data["sessions"], data["n_items"]
    assert_same_graph(data["ref"], build(sessions, n_items))  # correct before timed
    rounds = 1 if SMOKE else {"reference": 5, "python_dict": 2, "numba": 15}[name]
    median = _timed(benchmark, lambda: build(sessions, n_items), rounds, warmup_rounds=0 if SMOKE else 1)
    peak = _peak(name)
    res = {"median_s": median, "clicks_per_s": sessions.n_clicks / median, **peak}
    if name == "numba":
        import mtd_fast.graph.numba as gn

        res["first_call_in_this_process_s"] = gn.compile_report()["seconds"]
        for other in ("reference", "python_dict"):
            if f"global_graph/{other}" in RESULTS:
                res[f"speedup_vs_{other}"] = RESULTS[f"global_graph/{other}"]["median_s"] / median
        if not SMOKE:  # the spec's budget: under 1 s warm and under 1 GB peak on full Diginetica
            assert median < 1.0, f"numba global graph took {median:.3f} s"
            worst = max(v for v in (peak["rss_peak_bytes"], peak["tracemalloc_peak_bytes"]) if v is not None)
            assert worst < 2**30, f"numba global graph peaked at {_mb(worst)}"
    benchmark.extra_info.update(res)
    RESULTS[f"global_graph/{name}"] = res


def test_numba_first_call_cost(data):
    """Compile cost apart from the warm time: in-process first warmup, plus (full mode) a
    cold compile and a load-from-cache, each in a fresh process."""
    import mtd_fast.graph.numba as gn

    gn.warmup()
    res = {"in_process_s": gn.compile_report()["seconds"], "in_process": gn.compile_report()}
    if not SMOKE:
        with tempfile.TemporaryDirectory(prefix="mtd-bench-numba-") as d:
            cold = _compile_in_fresh_process(d)
            cached = _compile_in_fresh_process(d)
        n = len(gn._KERNELS)
        assert cold["cache_misses"] == n and cached["cache_hits"] == n and cached["cache_misses"] == 0
        res.update(cold_compile_s=cold["seconds"], cache_load_s=cached["seconds"])
    RESULTS["numba_first_call"] = res


# --------------------------------------------------------------------------- session graphs
@pytest.mark.parametrize("name", ["reference", "numba", "numba_packed"])
def test_session_graphs(benchmark, data, name):
    benchmark.group = f"session_graphs ({BATCH}-sample batch)"
    from mtd_fast.graph.numba import session_graphs_numba

    packed = name == "numba_packed"
    build = session_graphs_ref if name == "reference" else session_graphs_numba
    items, lengths = data["items"], data["lengths"]
    assert_same_session_graphs(session_graphs_ref(items, lengths, packed=packed), build(items, lengths, packed=packed))
    if packed:
        build = functools.partial(build, packed=True)
    rounds = 1 if SMOKE else {"reference": 30, "numba": 300, "numba_packed": 300}[name]
    median = _timed(benchmark, lambda: build(items, lengths), rounds, warmup_rounds=0 if SMOKE else 3)
    res = {"median_s": median, "samples_per_s": len(lengths) / median, "batch_shape": list(items.shape)}
    if name != "reference" and "session_graphs/reference" in RESULTS:
        res["speedup_vs_reference"] = RESULTS["session_graphs/reference"]["median_s"] / median
    benchmark.extra_info.update(res)
    RESULTS[f"session_graphs/{name}"] = res


# --------------------------------------------------------------------------- report
def test_zz_report(capsys):
    """Print what this run measured, as ratios (same run, same machine)."""
    import numba

    lines = [f"\n== bench_graph ({'SMOKE' if SMOKE else 'full Diginetica'}) {time.strftime('%Y-%m-%d %H:%M')} "
             f"python {platform.python_version()} numpy {np.__version__} numba {numba.__version__} "
             f"cpus {os.cpu_count()} {platform.machine()}"]
    for key in ("global_graph/reference", "global_graph/python_dict", "global_graph/numba"):
        r = RESULTS.get(key)
        if r:
            lines.append(f"{key:26s} {r['median_s'] * 1e3:9.2f} ms  {r['clicks_per_s'] / 1e6:7.2f} M clicks/s  "
                         f"peak RSS +{_mb(r['rss_peak_bytes'])}  tracemalloc {_mb(r['tracemalloc_peak_bytes'])}")
    r = RESULTS.get("global_graph/numba", {})
    for other in ("reference", "python_dict"):
        if f"speedup_vs_{other}" in r:
            lines.append(f"  numba speed-up vs {other}: {r[f'speedup_vs_{other}']:.1f}x")
    f = RESULTS.get("numba_first_call")
    if f:
        extra = (f", cold compile {f['cold_compile_s']:.2f} s, load from cache {f['cache_load_s']:.2f} s "
                 f"(fresh processes)") if "cold_compile_s" in f else ""
        lines.append(f"numba first call in this process {f['in_process_s']:.2f} s "
                     f"({'compiled' if f['in_process']['cache_misses'] else 'loaded from cache'}){extra}")
    for key in ("session_graphs/reference", "session_graphs/numba", "session_graphs/numba_packed"):
        r = RESULTS.get(key)
        if r:
            lines.append(f"{key:26s} {r['median_s'] * 1e3:9.3f} ms  {r['samples_per_s'] / 1e3:9.1f} k samples/s  "
                         f"batch {tuple(r['batch_shape'])}")
    for key in ("numba", "numba_packed"):
        r = RESULTS.get(f"session_graphs/{key}", {})
        if "speedup_vs_reference" in r:
            lines.append(f"  {key} speed-up vs per-session NumPy loop: {r['speedup_vs_reference']:.1f}x")
    with capsys.disabled():
        print("\n".join(lines))
    assert RESULTS, "no benchmark ran"


if __name__ == "__main__":  # `python bench_graph.py --peak NAME`: the fresh process of `_peak`
    if len(sys.argv) == 3 and sys.argv[1] == "--peak":
        print(json.dumps(_peak_here(sys.argv[2])))
    else:
        sys.exit("usage: pytest benches/bench_graph.py   (or: python bench_graph.py --peak NAME)")
