"""CPU time of the item-table-sized pieces of a training step, each against the form it
replaced, in one process, alternating (A, B, A, B, ...): the commands behind the README's
"MTD's item-table passes", "Fused Adam" and ranking figures.

    python benches/item_table_ops.py [--dataset diginetica] [--rounds 3] [--reps 5]

- normalize: `ops.common.normalize_rows` vs `F.normalize` on the candidate table, fwd + bwd;
- permute: `ops.common.permute_rows` vs `x[perm]` on the graph's nodes, fwd + bwd;
- dgi_pair: `MTD.graph_output_pair` vs two `graph_output` passes (real, corrupted), fwd + bwd;
- adam: `train.adam` (fused) vs `torch.optim.Adam` on the item table plus two small tensors;
- rank_count: the ranking pass's counts summed in int32 vs a default bool sum (int64), on one
  chunk of scores (1024 x 2048).
Each line: the median thread CPU milliseconds per call of every round, new then old. Checks
first that each pair computes the same thing. MTD_BENCH_SMOKE=1: synthetic data, one round.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import mtd_fast
from mtd_fast import ops
from mtd_fast.models import MTD
from mtd_fast.ops.common import normalize_rows, permute_rows
from mtd_fast.train import adam

from harness import SMOKE, data_dir


def cpu_ms(fn, reps: int) -> float:
    fn()
    t0 = time.thread_time()
    for _ in range(reps):
        fn()
    return (time.thread_time() - t0) / reps * 1e3


def cases(ds):
    net = MTD(ds.n_items)
    net.set_graph(ops.global_graph(ds.train_sessions, ds.n_items))
    n, d = net.graph.num_nodes, net.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(ds.n_items, d, generator=gen, requires_grad=True)
    h0 = torch.randn(n, d, generator=gen, requires_grad=True)
    perm = torch.randperm(n, generator=gen)

    def fwd_bwd(f, x):
        def run():
            x.grad = None
            out = f(x)
            (sum(o.sum() for o in out) if isinstance(out, tuple) else out.sum()).backward()
            return out
        return run

    def two_passes(x):
        return net.graph_output(x), net.graph_output(permute_rows(x, perm))

    def adam_step(make):
        params = [torch.nn.Parameter(torch.randn(ds.n_items + 1, d, generator=gen)),
                  torch.nn.Parameter(torch.randn(d, d, generator=gen)), torch.nn.Parameter(torch.randn(3 * d))]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = make(params)
        return lambda: opt.step()

    scores, st = torch.randn(1024, 2048, generator=gen), torch.randn(1024, 1, generator=gen)
    return {
        "normalize": (fwd_bwd(normalize_rows, table), fwd_bwd(lambda x: F.normalize(x, dim=-1), table)),
        "permute": (fwd_bwd(lambda x: permute_rows(x, perm), h0), fwd_bwd(lambda x: x[perm], h0)),
        "dgi_pair": (fwd_bwd(lambda x: net.graph_output_pair(x, perm), h0), fwd_bwd(two_passes, h0)),
        "adam": (adam_step(lambda ps: adam(ps, lr=1e-3)), adam_step(lambda ps: torch.optim.Adam(ps, lr=1e-3))),
        "rank_count": (lambda: (scores <= st).sum(1, dtype=torch.int32), lambda: (scores <= st).sum(1)),
    }


def check(pairs) -> None:
    """Each pair gives the same values (the Adam pair is timed only: its fused step differs in the last bit)."""
    for name, (new, old) in pairs.items():
        if name == "adam":
            continue
        a, b = new(), old()
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x.detach().to(y.dtype), y.detach(), rtol=1e-5, atol=1e-5, msg=name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="diginetica")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(1)
    if SMOKE:
        ds = mtd_fast.load_dataset("synthetic", n_sessions=600, n_items=80)
        args.rounds, args.reps = 1, 1
    else:
        ds = mtd_fast.load_dataset(args.dataset, root=data_dir(args.dataset))
    pairs = cases(ds)
    check(pairs)
    for name, (new, old) in pairs.items():
        times = [(cpu_ms(new, args.reps), cpu_ms(old, args.reps)) for _ in range(args.rounds)]
        new_ms, old_ms = [a for a, _ in times], [b for _, b in times]
        print(f"{name}: new {' / '.join(f'{a:.1f}' for a in new_ms)} ms, old {' / '.join(f'{b:.1f}' for b in old_ms)}"
              f" ms (median {statistics.median(new_ms):.1f} vs {statistics.median(old_ms):.1f})", flush=True)


if __name__ == "__main__":
    main()
