"""What a mid-epoch checkpoint costs: seconds to write `checkpoint_last.pt` (and its size) for
each model on one dataset, next to the seconds of the training steps between two checkpoints.

    python benches/checkpoint_cost.py --models mtd stamp --dataset diginetica [--every 3] [--steps 10]
        [--threads 1] [--json out.json]

Trains each model for two epochs of --steps steps with `train(..., run_dir=TMP,
checkpoint_every=--every)` and times every `RunDir.save_checkpoint` call: the mid-epoch
ones of epoch 2 (last checkpoint only, holding the best weights of epoch 1 besides the
model's own: the size of every mid-epoch checkpoint after the first epoch) and the epoch
ends' (last and best). The step seconds are the epochs' training seconds over their steps,
the checkpoint writes taken out. MTD_BENCH_SMOKE=1: synthetic data (a smoke run, not a
measurement).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import mtd_fast
from mtd_fast import rundir

from harness import SMOKE, data_dir


def measure(ds, model: str, every: int, steps: int, threads: int) -> dict:
    real = rundir.RunDir.save_checkpoint
    writes: list[tuple[int, bool, float, int]] = []  # (epochs done, mid-epoch, seconds, bytes)

    def timed(self, state, best):
        t0 = time.perf_counter()
        real(self, state, best)
        writes.append((state["position"]["epoch"], state["partial_epoch"] is not None, time.perf_counter() - t0,
                       (self.path / rundir.LAST).stat().st_size))

    rundir.RunDir.save_checkpoint = timed
    try:
        with tempfile.TemporaryDirectory() as d:
            r = mtd_fast.train(ds, model=model, epochs=2, quiet=True, run_dir=Path(d) / "run", checkpoint_every=every,
                               max_steps_per_epoch=steps, num_threads=threads, eval_test_each_epoch=False, patience=2)
    finally:
        rundir.RunDir.save_checkpoint = real
    mid = [(t, size) for epochs, partial, t, size in writes if partial and epochs == 1]
    end = [t for _, partial, t, _ in writes if not partial]
    if not mid:
        raise SystemExit(f"{model}: no mid-epoch checkpoint; use --steps > --every")
    train_s = sum(h["train_seconds"] for h in r.history) - sum(t for _, partial, t, _ in writes if partial)
    return {"model": model, "mid_epoch_write_s": statistics.median(t for t, _ in mid),
            "epoch_end_write_s": statistics.median(end), "checkpoint_MB": max(size for _, size in mid) / 2**20,
            "step_s": train_s / (2 * steps), "mid_epoch_writes": len(mid)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["mtd", "stamp"])
    p.add_argument("--dataset", default="diginetica")
    p.add_argument("--every", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if SMOKE:
        ds = mtd_fast.load_dataset("synthetic", n_sessions=600, n_items=80)
        args.every, args.steps = 1, 3
    else:
        ds = mtd_fast.load_dataset(args.dataset, root=data_dir(args.dataset))
    rows = []
    for model in args.models:
        row = measure(ds, model, args.every, args.steps, args.threads)
        rows.append(row)
        print(f"{model}: mid-epoch checkpoint {row['mid_epoch_write_s']:.3f} s (median of {row['mid_epoch_writes']}), "
              f"epoch end (last + best) {row['epoch_end_write_s']:.3f} s, {row['checkpoint_MB']:.0f} MB; "
              f"one step {row['step_s']:.3f} s, so every 200 steps costs "
              f"{100 * row['mid_epoch_write_s'] / (200 * row['step_s']):.2f} % of them", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"dataset": ds.name, "threads": args.threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
