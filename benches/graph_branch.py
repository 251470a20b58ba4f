"""How much of MTD's item table is the graph branch, and which loss grows it: for a checkpoint of
a `graph_mode="residual"` MTD run (a run directory's checkpoint_last.pt / checkpoint_best.pt),
the median row norms of E and of GCN(E) over the graph's nodes, the median cosine of the
table T = E + GCN(E) with each, and the gradients of the recommendation loss and of the DGI
term along the GCN's LayerNorm gain (d loss / d log-scale of the gain: negative means that
loss wants the branch larger), summed over --batches random training batches.

    python benches/graph_branch.py --checkpoint RUN_DIR/checkpoint_last.pt --dataset diginetica [--batches 4]

MTD_BENCH_SMOKE=1: --dataset synthetic (a checkpoint trained on the default synthetic data).
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch
import torch.nn.functional as F

import mtd_fast
from mtd_fast import MTD, MTDConfig, ops

from harness import data_dir


def measure(net: MTD, ds, batches: int, seed: int = 0) -> dict:
    with torch.no_grad():
        table, h0, h = net.propagate()
        nodes = net.graph.torch_tensors(table.device).nodes
        e, t = net.item_emb.weight[nodes], table[nodes]
        out = {"E_row_norm_median": float(e.norm(dim=1).median()),
               "GCN_row_norm_median": float(h.norm(dim=1).median()),
               "cos_T_E_median": float(F.cosine_similarity(t, e, dim=1).median()),
               "cos_T_GCN_median": float(F.cosine_similarity(t, h, dim=1).median())}
    gain = net.gnn[0].ln.weight
    scale = gain.detach()
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    g_rec, g_dgi = torch.zeros_like(gain), torch.zeros_like(gain)
    for _ in range(batches):
        idx = rng.choice(len(ds.train), min(512, len(ds.train)), replace=False)
        batch = net.batch_from_sessions(ds.train.prefixes, idx)
        targets = torch.from_numpy(ds.train.targets[idx].astype(np.int64))
        table, h0, h = net.propagate()
        q, cand = net.score_parts(batch, table)
        rec = net.parts_loss(q, cand, targets)
        dgi = net.dgi_bce(h, net.graph_output(h0[torch.randperm(h0.shape[0])]))
        g_rec += torch.autograd.grad(rec, gain, retain_graph=True)[0]
        g_dgi += torch.autograd.grad(dgi, gain)[0]
    out["d_rec_d_log_gain"] = float((g_rec * scale).sum()) / batches
    out["d_dgi_d_log_gain"] = float((g_dgi * scale).sum()) / batches
    out["rec_over_dgi"] = out["d_rec_d_log_gain"] / out["d_dgi_d_log_gain"]
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--dataset", default="diginetica")
    p.add_argument("--batches", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.dataset == "synthetic":
        ds = mtd_fast.load_dataset("synthetic")
    else:
        ds = mtd_fast.load_dataset(args.dataset, root=data_dir(args.dataset))
    state = torch.load(args.checkpoint, map_location="cpu", weights_only=False)["state"]["model"]
    net = MTD(ds.n_items, MTDConfig(hidden_size=state["item_emb.weight"].shape[1]), dropout=0.3).eval()
    net.load_state_dict(state)
    net.set_graph(ops.global_graph(ds.train_sessions, ds.n_items))
    print(json.dumps(measure(net, ds, args.batches), indent=2))


if __name__ == "__main__":
    main()
