"""Seconds per training step of one or more models on one dataset (the trainer's own step:
`mtd_fast.train.train_step`, batch building included), and the CPU time of building a batch
alone. For comparing two versions of the code under the same load: run it from each
checkout one after the other (`PYTHONPATH=<checkout> python benches/step_time.py ...`).

    python benches/step_time.py --models srgnn sasrec --dataset yoochoose1_64_mtd [--threads 1]
        [--skip 5] [--steps 20] [--batches 10] [--json out.json]

It first prints how much padding a batch carries: the mean prefix length of the training
samples and the mean padded width (longest prefix) of 200 random batches of 512.
Steps: the wall-clock mean, the median thread CPU time and the median count of minor page
faults (the process's, `getrusage`) of steps skip+1 .. skip+steps of a training epoch (first
the untimed ones: allocation, Numba compilation). `MTD_FAST_MALLOC=system` runs them with
glibc's own malloc thresholds (`mtd_fast/allocator.py`), to compare with the default.
Batches: the median thread CPU time of `model.batch_from_sessions` over --batches random
batches of 512 training prefixes.
MTD_BENCH_SMOKE=1: synthetic data, 3 steps (a smoke run, not a measurement).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import time

import numpy as np
import torch

import mtd_fast
from mtd_fast.config import MTDConfig, TrainConfig
from mtd_fast.train import build_model

from harness import SMOKE, data_dir

train_module = importlib.import_module("mtd_fast.train")


class _Stop(Exception):
    pass


def _minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def step_seconds(ds, model: str, skip: int, steps: int, threads: int) -> tuple[float, float, float]:
    """(mean wall seconds, median thread CPU seconds, median minor page faults) of steps
    skip+1 .. skip+steps of one training epoch. CPU time is the steadier figure on a loaded
    machine (at 1 thread it is the step's own work, the kernel's page faults included; wall
    time adds whatever else ran)."""
    seen, marks, cpu, faults = [0], [], [], []
    original = train_module.train_step

    def timed(*args, **kwargs):
        if seen[0] == skip:
            marks.append(time.perf_counter())
        f0, t0 = _minor_faults(), time.thread_time()
        out = original(*args, **kwargs)
        if seen[0] >= skip:
            cpu.append(time.thread_time() - t0)
            faults.append(_minor_faults() - f0)
        seen[0] += 1
        if seen[0] == skip + steps:
            marks.append(time.perf_counter())
            raise _Stop
        return out

    train_module.train_step = timed
    try:
        mtd_fast.train(ds, model=model, epochs=1, num_threads=threads, quiet=True, eval_test_each_epoch=False)
    except _Stop:
        pass
    finally:
        train_module.train_step = original
    if len(marks) != 2:
        raise SystemExit(f"{model}: the epoch had fewer than {skip + steps} steps; lower --skip / --steps")
    return (marks[1] - marks[0]) / steps, statistics.median(cpu), statistics.median(faults)


def batch_seconds(ds, model: str, batches: int, batch_size: int = 512) -> float:
    """Median thread CPU seconds of building one batch of training prefixes."""
    net = build_model(model, ds.n_items, MTDConfig(), TrainConfig())
    rng = np.random.default_rng(0)
    times = []
    for _ in range(batches):
        idx = rng.choice(len(ds.train), min(batch_size, len(ds.train)), replace=False)
        t0 = time.thread_time()
        net.batch_from_sessions(ds.train.prefixes, idx)
        times.append(time.thread_time() - t0)
    return statistics.median(times)


def padding(ds, draws: int = 200, batch_size: int = 512) -> dict:
    """Mean prefix length of the training samples, mean padded width of random batches."""
    lengths = np.diff(np.asarray(ds.train.prefixes.offsets))
    rng = np.random.default_rng(0)
    size = min(batch_size, len(lengths))
    widths = [int(lengths[rng.choice(len(lengths), size, replace=False)].max()) for _ in range(draws)]
    return {"mean_prefix": float(lengths.mean()), "mean_batch_width": float(np.mean(widths))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--dataset", default="yoochoose1_64_mtd")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", type=int, default=5)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", type=int, default=10)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if SMOKE:
        ds = mtd_fast.load_dataset("synthetic", n_sessions=600, n_items=80)
        args.skip, args.steps, args.batches = 1, 3, 2
    else:
        ds = mtd_fast.load_dataset(args.dataset, root=data_dir(args.dataset))
    pad = padding(ds)
    print(f"{ds.name}: mean prefix {pad['mean_prefix']:.1f} clicks, batches of 512 padded to "
          f"{pad['mean_batch_width']:.1f} on average", flush=True)
    rows = []
    for model in args.models:
        wall, cpu, faults = step_seconds(ds, model, args.skip, args.steps, args.threads)
        row = {"model": model, "step_s": wall, "step_cpu_s": cpu, "step_minor_faults": faults,
               "batch_cpu_s": batch_seconds(ds, model, args.batches)}
        rows.append(row)
        print(f"{model}: {row['step_s']:.4f} s/step (mean of steps {args.skip + 1}-{args.skip + args.steps}), "
              f"{cpu * 1e3:.1f} ms CPU/step (median), {faults:.0f} minor page faults/step (median), "
              f"batch building {row['batch_cpu_s'] * 1e3:.1f} ms CPU (median of {args.batches})", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"dataset": ds.name, "threads": args.threads, "padding": pad, "mtd_fast": mtd_fast.__file__,
                       "malloc": os.environ.get("MTD_FAST_MALLOC") or "keep", "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
