"""DGI loss curve of MTD's graph side without early stopping (a diagnostic, not a test).

    python benches/dgi_curve.py [--dataset yoochoose1_64] [--steps 300] [--window 30] [--threads 1]

Trains only the graph side (GCN + discriminator, E frozen, as in a graph phase) for
`--steps` DGI steps with fresh corruptions and prints the mean and min loss per window,
plus how often the discriminator gets positives and corrupted rows right at the end.
It shows where the spec's graph_patience=10 stops a phase: on the early plateau near ln 2.
"""
from __future__ import annotations

import argparse

import numpy as np
import torch

import mtd_fast
from mtd_fast import MTD, MTDConfig, ops
from mtd_fast.train import dgi_step

from harness import data_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="yoochoose1_64")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--window", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ds = mtd_fast.load_dataset(args.dataset, root=data_dir(args.dataset))
    graph = ops.global_graph(ds.train_sessions, ds.n_items)
    torch.manual_seed(args.seed)
    model = MTD(ds.n_items, MTDConfig())
    params = model.graph_parameters()
    opt = torch.optim.Adam(params, lr=1e-3)
    h0 = model.item_emb.weight.detach()[torch.from_numpy(graph.nodes)]
    losses = [dgi_step(model, graph, h0, opt, params, 1e-6)[0] for _ in range(args.steps)]
    print(f"{args.dataset}: {graph.num_nodes} nodes, {graph.nnz} nnz; ln 2 = {np.log(2):.4f}")
    for a in range(0, args.steps, args.window):
        w = losses[a:a + args.window]
        print(f"steps {a:4d}-{a + len(w):4d}: mean {np.mean(w):.4f}  min {np.min(w):.4f}")
    with torch.no_grad():
        h = model.graph_encode(h0, graph)
        h_neg = model.graph_encode(h0[torch.randperm(h0.shape[0])], graph)
        wc = model.discriminator.weight.t() @ torch.sigmoid(h.mean(0))
        print(f"discriminator accuracy: positives {(h @ wc > 0).float().mean():.3f}, "
              f"corrupted {(h_neg @ wc < 0).float().mean():.3f}")


if __name__ == "__main__":
    main()
