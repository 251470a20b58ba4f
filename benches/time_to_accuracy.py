"""Time to accuracy: how many seconds of training MTD needs to pass a test-metric target.

Trains with an evaluation every `--chunk` steps: each chunk is one trainer "epoch" capped at
`max_steps_per_epoch=CHUNK` batches, drawn from a fresh shuffle of the training samples (so
after k chunks the model has seen k x CHUNK x batch samples, without replacement inside a
chunk). Records the cumulative training seconds (the trainer's `train_seconds` + any graph
phase; MTD's per-step graph side is inside the steps; evaluation is not training time), and
the validation and test metrics after every chunk, then says at which chunk the test metrics
first pass `--target` (all of them at once). Early stopping is off: the curve is the point.

The issue's yardstick (README "Time to accuracy"): the official SR-GNN code reaches test P@20
44.42 / MRR@20 14.11 after one epoch of full Diginetica at its batch of 100, in 1,121 s of
training on this machine; the target is to pass that in at most half the time.

    python benches/time_to_accuracy.py --label residual_b512_t1 --threads 1 --chunk 352 --chunks 5
    python benches/time_to_accuracy.py ... --option score_norm=true --option batch_size=256

One JSON file per label in --out (default benches/figures/time_to_accuracy/), skipped when
it exists (delete it to redo). MTD_BENCH_SMOKE=1: synthetic data, tiny sizes (the test in
benches/bench_scripts.py runs it so it cannot rot).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def parse_target(text: str) -> dict[str, float]:
    out = {}
    for part in text.split(","):
        key, _, value = part.partition("=")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise SystemExit(f"--target {text!r}: expected METRIC=VALUE[,METRIC=VALUE], "
                             "e.g. P@20=44.42,MRR@20=14.11") from None
    return out


def parse_options(items: list[str]) -> dict:
    out = {}
    for kv in items:
        key, sep, value = kv.partition("=")
        if not sep:
            raise SystemExit(f"--option {kv!r}: expected name=value")
        try:
            out[key] = ast.literal_eval({"true": "True", "false": "False"}.get(value, value))
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--label", required=True)
    p.add_argument("--dataset", default="diginetica")
    p.add_argument("--data-dir", default=None, help="default: the shared data root's folder of --dataset")
    p.add_argument("--model", default="mtd")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--chunk", type=int, default=352, help="training steps between evaluations")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", default="P@20=44.42,MRR@20=14.11")
    p.add_argument("--option", action="append", default=[], help="a config field, name=value (repeatable)")
    p.add_argument("--out", type=Path, default=HERE / "figures" / "time_to_accuracy")
    args = p.parse_args(argv)
    target, options = parse_target(args.target), parse_options(args.option)
    smoke = os.environ.get("MTD_BENCH_SMOKE") == "1"
    out = args.out / f"{args.dataset if not smoke else 'synthetic'}__{args.label}.json"
    if out.exists():
        print(f"{out} exists: nothing to do (delete it to redo)")
        return 0
    out.parent.mkdir(parents=True, exist_ok=True)

    import torch

    import mtd_fast
    from mtd_fast.provenance import machine, source_commit

    sys.path.insert(0, str(HERE))
    from harness import data_dir

    if smoke:
        ds = mtd_fast.load_dataset("synthetic", n_sessions=600, n_items=80)
    else:
        ds = mtd_fast.load_dataset(args.dataset, root=args.data_dir or data_dir(args.dataset))
    t0 = time.time()
    r = mtd_fast.train(ds, model=args.model, epochs=args.chunks, seed=args.seed, quiet=True,
                       num_threads=args.threads, max_steps_per_epoch=args.chunk, patience=args.chunks + 1, **options)
    curve, cum, passed = [], 0.0, None
    for h in r.history:
        cum += h["train_seconds"] + (h.get("graph_seconds") or 0.0)
        row = {"chunk": h["epoch"], "train_samples": h.get("train_samples"), "train_seconds_cum": cum,
               "valid": {k: h["valid"][k] for k in ("P@20", "MRR@20")},
               "test": {k: h["test"][k] for k in ("P@20", "MRR@20")}}
        curve.append(row)
        ok = all(row["test"][k] >= v for k, v in target.items())
        if ok and passed is None:
            passed = row
        print(f"chunk {h['epoch']}: {cum:7.0f} s  valid P@20 {row['valid']['P@20']:.2f} MRR@20 "
              f"{row['valid']['MRR@20']:.2f}  test P@20 {row['test']['P@20']:.2f} MRR@20 {row['test']['MRR@20']:.2f}"
              + ("  <- passes the target" if ok and passed is row else ""), flush=True)
    rec = {"label": args.label, "dataset": ds.name, "model": args.model, "seed": args.seed, "threads": args.threads,
           "torch_threads": torch.get_num_threads(), "chunk_steps": args.chunk, "options": options, "target": target,
           "passed_at": passed, "curve": curve, "train_samples_total": len(ds.train),
           "graph_build_seconds": r.graph_build_seconds, "backends": r.backends,
           "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "commit": source_commit(), "machine": machine(), "torch": torch.__version__,
           "load_average": os.getloadavg(), "wall_seconds": time.time() - t0,
           "model_config": dataclasses.asdict(r.model_config), "train_config": dataclasses.asdict(r.train_config)}
    out.write_text(json.dumps(rec, indent=1, default=str))
    print(f"written: {out}" + ("" if passed else "  (target not reached)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
