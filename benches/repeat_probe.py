"""What would a bias on the session's own items buy a trained model? From a run directory's
best checkpoint (a model trained without `repeat_bias`), fit only the bias of
`mtd_fast.models.repeat.RepeatBias` (gate on the session vector, recency, click count) on the
first half of the validation samples, the model frozen, and report the second half of
validation and the test set with and without it, split into re-click targets and new ones.
An upper-bound-free estimate of what training with `repeat_bias=True` could gain; the test
figures are for the record only (nothing is chosen on them).

    python benches/repeat_probe.py --run-dir RUN_DIR --dataset retailrocket [--json out.json]

RUN_DIR holds run.json and checkpoint_best.pt (a running run's `.partial/NAME` folder: copy it
aside first). The frozen model's log-sum-exp over the catalogue does not depend on the bias,
so it is computed once and the fit reads only the session items' scores.
MTD_BENCH_SMOKE=1: --dataset synthetic.
"""
from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

import numpy as np
import torch

import mtd_fast
from mtd_fast import ops
from mtd_fast.config import MTDConfig, TrainConfig
from mtd_fast.experiments.paired import repeat_mask
from mtd_fast.experiments.ranks import metrics_from_ranks
from mtd_fast.models.repeat import RepeatBias, biased_ranks, corrected_cross_entropy, session_items, session_scores
from mtd_fast.ops.linear_cross_entropy import row_logsumexp
from mtd_fast.rundir import BEST, RUN_FILE

from harness import data_dir

tr = importlib.import_module("mtd_fast.train")
KEYS = ("P@20", "MRR@20")


def frozen_terms(net, samples, batch_size: int = 512) -> dict:
    """Per sample: q, the catalogue's log-sum-exp, the target's score, the session's distinct
    items (ids, recency, count) and their scores; the table once."""
    parts = {k: [] for k in ("q", "lse", "target", "ids", "rec", "cnt", "s")}
    with torch.no_grad():
        for i0 in range(0, len(samples), batch_size):
            idx = np.arange(i0, min(len(samples), i0 + batch_size))
            batch = net.batch_from_sessions(samples.prefixes, idx)
            q, table = net.score_parts(batch)
            ids, rec, cnt = session_items(batch["items"], batch["lengths"])
            t = torch.from_numpy(samples.targets[idx].astype(np.int64))
            for k, v in (("q", q), ("lse", row_logsumexp(q, table)), ("target", (q * table[t - 1]).sum(1)),
                         ("ids", ids), ("rec", rec), ("cnt", cnt),
                         ("s", session_scores(q, table, ids))):
                parts[k].append(v)
    width = max(x.shape[1] for x in parts["ids"])
    out = {k: torch.cat([torch.nn.functional.pad(x, (0, width - x.shape[1])) if x.dim() == 2 and k != "q" else x
                         for x in v]) for k, v in parts.items()}
    out["table"], out["targets"] = table, torch.from_numpy(samples.targets.astype(np.int64))
    return out


def frozen_loss(f: dict, sel: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`biased_cross_entropy` of the frozen model on the samples `sel`, from the stored terms."""
    return corrected_cross_entropy(f["lse"][sel], f["s"][sel], f["target"][sel], f["targets"][sel] - 1,
                                   f["ids"][sel], bias)


@torch.no_grad()
def evaluate(f: dict, sel: torch.Tensor, rep: np.ndarray, bias_mod) -> dict:
    ids = f["ids"][sel]
    bias = bias_mod(f["q"][sel], ids, f["rec"][sel], f["cnt"][sel]) if bias_mod else torch.zeros(ids.shape)
    ranks = biased_ranks(f["q"][sel], f["table"], f["targets"][sel], ids, bias).numpy()
    pick = rep[sel.numpy()]
    return {group: {k: round(metrics_from_ranks(ranks[m])[k], 2) for k in KEYS}
            for group, m in (("all", np.ones(len(ranks), bool)), ("repeat", pick), ("new", ~pick)) if m.any()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run-dir", required=True)
    p.add_argument("--dataset", default="diginetica")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    ds = mtd_fast.load_dataset("synthetic") if args.dataset == "synthetic" else \
        mtd_fast.load_dataset(args.dataset, root=data_dir(args.dataset))
    run_dir = Path(args.run_dir)
    ident = json.loads((run_dir / RUN_FILE).read_text())["identity"]
    mcfg, tcfg = MTDConfig(**ident["model_config"]), TrainConfig(**ident["train_config"])
    if mcfg.repeat_bias:
        raise SystemExit(f"{run_dir}: the run already trains a repeat bias")
    net = tr.build_model(ident["model"], ds.n_items, mcfg, tcfg, None)
    if net.uses_global_graph and tcfg.graph_phases > 0:
        net.set_graph(ops.global_graph(ds.train_sessions, ds.n_items, directed=mcfg.graph_directed,
                                       weighted=mcfg.graph_weighted))
    state = torch.load(run_dir / BEST, map_location="cpu", weights_only=False)["state"]
    net.load_state_dict(state["model"])
    net.eval()
    valid, test = frozen_terms(net, ds.valid), frozen_terms(net, ds.test)
    n = len(ds.valid)
    fit = torch.arange(n) < n // 2
    bias = RepeatBias(mcfg.hidden_size)
    opt = torch.optim.Adam(bias.parameters(), lr=args.lr)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = frozen_loss(valid, fit, bias(valid["q"][fit], valid["ids"][fit], valid["rec"][fit], valid["cnt"][fit]))
        loss.backward()
        opt.step()
    rep_v, rep_t = repeat_mask(ds.valid), repeat_mask(ds.test)
    hold, every = ~fit, torch.ones(len(ds.test), dtype=torch.bool)
    out = {"run": ident["model"], "dataset": args.dataset, "checkpoint_epoch": int(state["best_epoch"]),
           "fit_samples": int(fit.sum()),
           "repeat_share": {"valid": float(rep_v.mean()), "test": float(rep_t.mean())},
           **{name: {"valid_second_half": evaluate(valid, hold, rep_v, mod), "test": evaluate(test, every, rep_t, mod)}
              for name, mod in (("without", None), ("with", bias))},
           "bias": {"recency": [round(x, 3) for x in bias.recency.tolist()], "offset": round(bias.offset.item(), 3),
                    "log_count": round(bias.log_count.item(), 3)}}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
