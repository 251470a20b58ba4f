"""A training run in its own process, for the resume / determinism / DDP tests.

    python _run_driver.py OUT.json [--run-dir D] [--resume] [--kill STEP_KIND:N] [--option k=v ...]

Trains a small synthetic MTD run (options as `--option name=value`) and writes OUT.json
(metrics, history without the timing
keys, best epoch) and OUT.pt (the final state_dict). `--kill train_step:N` (or `dgi_step:N`,
`replace:N`) sends SIGKILL to this process at the N-th call of the trainer's step function
(or of os.replace onto checkpoint_last.pt, after the temporary file is complete): a crash
at a precise point, with nothing flushed or cleaned up. Under torchrun-style environment
variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) it initialises a gloo process group
first (60 s timeout); then only rank 0 writes OUT, and `--kill-rank R` kills rank R only.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import signal
import sys


def _trainer():
    import mtd_fast  # noqa: F401

    return sys.modules["mtd_fast.train"]  # the module: the package's `train` attribute is the function


def _kill_at(kind: str, n: int) -> None:
    tr = _trainer()

    count = {"n": 0}

    def hit() -> None:
        count["n"] += 1
        if count["n"] == n:
            os.kill(os.getpid(), signal.SIGKILL)

    if kind == "replace":
        real = os.replace

        def replace(src, dst, *a, **k):
            if str(dst).endswith("checkpoint_last.pt"):
                hit()
            return real(src, dst, *a, **k)

        os.replace = replace
        return
    real_fn = getattr(tr, kind)

    def wrapped(*a, **k):
        hit()
        return real_fn(*a, **k)

    setattr(tr, kind, wrapped)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--run-dir")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill")
    p.add_argument("--kill-rank", type=int, default=None, help="under DDP: only this rank dies (default: every rank)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--option", action="append", default=[])
    p.add_argument("--data", default="n_sessions=400,n_items=60")
    p.add_argument("--all-ranks-state", action="store_true", help="ranks > 0 save their state dict too (OUT.rankN.pt)")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import datetime

        import torch.distributed as td

        td.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    import mtd_fast

    tr = _trainer()

    rank = int(os.environ.get("RANK", "0"))
    if args.kill and args.kill_rank in (None, rank):
        kind, n = args.kill.split(":")
        _kill_at(kind, int(n))
    if args.all_ranks_state:  # torch's generator state as the first training step starts, per rank
        real_step = tr.train_step

        def first_step(*a, **k):
            if not first_step.seen:
                first_step.seen = True
                torch.save(torch.get_rng_state(), f"{args.out}.rank{rank}.rng")
            return real_step(*a, **k)

        first_step.seen = False
        tr.train_step = first_step
    data = {k: int(v) for k, v in (kv.split("=") for kv in args.data.split(","))}
    ds = mtd_fast.load_dataset("synthetic", **data)
    kw = dict(epochs=3, seed=0, quiet=True, hidden_size=16, graph_steps=6, batch_size=64, max_steps_per_epoch=6,
              patience=5)
    for kv in args.option:
        k, v = kv.split("=", 1)
        try:
            kw[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            kw[k] = v
    if kw.get("graph_mode", mtd_fast.MTDConfig().graph_mode) in ("joint", "residual"):
        kw.pop("graph_steps")  # a phase-mode option: refused in the per-step modes
    r = mtd_fast.train(ds, run_dir=args.run_dir, resume=args.resume, **kw)
    if rank == 0:
        history = [{k: v for k, v in h.items() if k not in tr.TIMING_KEYS} for h in r.history]
        with open(args.out, "w") as fh:
            json.dump({"metrics": r.metrics, "history": history, "best_epoch": r.best_epoch}, fh)
        torch.save(r.model.state_dict(), args.out + ".pt")
    elif args.all_ranks_state:
        torch.save(r.model.state_dict(), f"{args.out}.rank{rank}.pt")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        torch.distributed.barrier()  # no rank tears the group down while another still uses it
        torch.distributed.destroy_process_group()
        # gloo processes aborted now and then in the interpreter's teardown, after their work
        # (see mtd_fast.cli.main): leave without C++ static destructors
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
