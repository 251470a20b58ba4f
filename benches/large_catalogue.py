"""MTD end to end on a synthetic catalogue of 1,000,000 items: one training epoch, with the
run's peak RSS, on a 24 GB machine.

    OMP_WAIT_POLICY=PASSIVE python benches/large_catalogue.py [--items 1000000] [--sessions 30000]
        [--json benches/results/large_catalogue.json]

Data: `mtd_fast.load_dataset("synthetic", n_items=..., n_sessions=..., avg_length=4.85)`:
power-law item popularity (p_j ~ 1 / rank^0.8), a sparse planted transition structure,
Diginetica's average session length 4.85 (lengths 2 + Poisson, capped at 30); the last 10%
of sessions are the test set, the last 10% of the rest validation. The sample count is
kept modest (30,000 sessions -> 93,608 training samples, 183 steps of 512) so that the run
takes about 20 minutes here: every step scores all 1M items (the chunked loss: 4-6 s per
step on these 2 shared cores) and every evaluated sample ranks all 1M items. 30,000
sessions is also about the fewest for which the 1M-id catalogue passes `train`'s sparse-id
check (101,831 distinct items >= 1/10 of the ids; 25,000 sessions give 86,740).

What runs: `mtd_fast.train(model="mtd", epochs=1)` with the defaults (with the graph-phase
modes a graph phase on the global item graph first, `graph_steps` capped at 50 and
reported; then one recommendation epoch through `ops.linear_cross_entropy`, then
validation and test ranking through `metrics.ranks_from_parts`), the test set evaluated
once at the end. The JSON records the graph_mode (the committed run: "overwrite", the
default when it ran).
Printed and written: dataset statistics, seconds per phase, metrics, peak RSS (Linux
`ru_maxrss` of this process) and the RSS after loading the data; plus what eager
scoring would have needed: (512 x 1M) fp32 logits are 2 GB, 3 of them at its peak.

MTD_BENCH_SMOKE=1 (or --items 2000 --sessions 400) runs the same at toy size in seconds;
benches/bench_scripts.py::test_large_catalogue_smoke does that.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def run(items: int, sessions: int, graph_steps: int = 50, batch: int = 512, quiet: bool = False) -> dict:
    import mtd_fast

    t0 = time.perf_counter()
    ds = mtd_fast.load_dataset("synthetic", n_sessions=sessions, n_items=items, seed=0, avg_length=4.85)
    load_s = time.perf_counter() - t0
    stats = ds.stats()
    rss_data = rss_mb()
    mode = mtd_fast.MTDConfig().graph_mode
    # graph_steps bounds a graph phase; the per-step modes ("joint", "residual") have none
    # and refuse the option
    phase_kw = {"graph_steps": graph_steps} if mode not in ("joint", "residual") else {}
    t0 = time.perf_counter()
    result = mtd_fast.train(ds, model="mtd", epochs=1, seed=0, quiet=quiet, batch_size=batch,
                            eval_test_each_epoch=False, **phase_kw)
    total_s = time.perf_counter() - t0
    h = result.history[0]
    out = {
        "meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
                 "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "machine": platform.machine(),
                 "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                 "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])},
        "items": items, "sessions": sessions, "batch": batch, "graph_mode": mode,
        "graph_steps_cap": phase_kw.get("graph_steps"),
        "stats": {k: (float(v) if isinstance(v, float) else v) for k, v in stats.items()},
        "backends": result.backends,
        "seconds": {"load": load_s, "train_call_total": total_s, "graph_phase": h["graph_seconds"],
                    "rec_epoch": h["train_seconds"], "eval_valid": h.get("eval_seconds")},
        "graph_steps": h.get("graph_steps"), "train_loss": h["train_loss"], "train_samples": h.get("train_samples"),
        "valid": h["valid"], "test": {k: v for k, v in result.metrics.items() if k != "best_on_test"},
        "rss_after_data_MB": rss_data, "peak_rss_MB": peak_rss_mb(),
        "eager_logits_GB_per_matrix": batch * items * 4 / 2**30,
    }
    return out


def main(argv=None) -> int:
    smoke = os.environ.get("MTD_BENCH_SMOKE") == "1"
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=2000 if smoke else 1_000_000)
    p.add_argument("--sessions", type=int, default=400 if smoke else 30_000)
    p.add_argument("--graph-steps", type=int, default=50)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    out = run(args.items, args.sessions, args.graph_steps, quiet=smoke)
    print(json.dumps(out, indent=1))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
