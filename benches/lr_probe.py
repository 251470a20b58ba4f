"""Is a run's validation plateau the learning rate's? From a run directory's best checkpoint,
train N more epochs at each given lr (the optimizers' state kept, the random state the
checkpoint holds restored, so every lr sees the batches and dropout draws the run itself
drew next) and report validation and test metrics, beside the checkpoint's own validation
figures. Nothing is chosen on test: the test figures are printed for the record only.

    python benches/lr_probe.py --run-dir RESULTS/table2/.partial/diginetica__mtd__seed0 \\
        --dataset diginetica --lrs 1e-4 [--epochs 1] [--json out.json]

(A running or finished run's folder: copy checkpoint_best.pt and run.json aside first; the
runner removes the folder when the run ends.) Per-step graph modes and models without a
graph only: the phase modes' graph phases are not run here.
MTD_BENCH_SMOKE=1: --dataset synthetic (a run trained on the default synthetic data).
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
from mtd_fast.config import PHASE_MODES, MTDConfig, TrainConfig
from mtd_fast.run import set_rng_state
from mtd_fast.rundir import BEST, RUN_FILE

from harness import data_dir

tr = importlib.import_module("mtd_fast.train")  # the module (the package attribute is the function)


def probe(run_dir: Path, ds, lr: float, epochs: int) -> dict:
    ident = json.loads((run_dir / RUN_FILE).read_text())["identity"]
    mcfg, tcfg = MTDConfig(**ident["model_config"]), TrainConfig(**ident["train_config"])
    net = tr.build_model(ident["model"], ds.n_items, mcfg, tcfg, None)
    uses_graph = net.uses_global_graph and tcfg.graph_phases > 0
    if uses_graph and mcfg.graph_mode in PHASE_MODES:
        raise SystemExit(f"graph_mode={mcfg.graph_mode!r} trains in graph phases, which this probe does not run")
    state = torch.load(run_dir / BEST, map_location="cpu", weights_only=False)["state"]
    graph = None
    if uses_graph:
        graph = ops.global_graph(ds.train_sessions, ds.n_items, directed=mcfg.graph_directed,
                                 weighted=mcfg.graph_weighted)
    params = net.rec_parameters()
    opt = tr.adam(params, lr=tcfg.lr)
    opt_g, every_step = tr.graph_side(net, graph, tcfg, seed=ident["seed"])
    net.load_state_dict(state["model"])
    for o, saved in ((opt, state["opt"]), (opt_g, state["opt_g"])):
        if o is not None:
            o.load_state_dict(saved)
            tr.set_lr(o, lr)
    rng = np.random.default_rng(ident["seed"])
    set_rng_state(state["rng"][0], rng)
    done = int(state["position"]["epoch"])
    best = next(h for h in state["history"] if h["epoch"] == state["best_epoch"])
    out = {"model": ident["model"], "lr": lr, "from_epoch": done, "checkpoint_valid": best["valid"], "epochs": []}
    for e in range(done + 1, done + 1 + epochs):
        loss, _, secs = tr.rec_epoch(net, ds.train, opt, params, tcfg, rng, True, e, graph=every_step)
        out["epochs"].append({"epoch": e, "train_loss": loss, "train_seconds": secs,
                              "valid": tr.evaluate_samples(net, ds.valid, tcfg.eval_batch_size),
                              "test": tr.evaluate_samples(net, ds.test, tcfg.eval_batch_size)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run-dir", required=True, help="a run directory (run.json and checkpoint_best.pt)")
    ap.add_argument("--dataset", required=True, help="the run's dataset (synthetic: the default synthetic data)")
    ap.add_argument("--data-dir", default=None, help="its folder (default: the shared data folder of --dataset)")
    ap.add_argument("--lrs", nargs="+", type=float, required=True)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.dataset == "synthetic":
        ds = mtd_fast.load_dataset("synthetic")
    else:
        ds = mtd_fast.load_dataset(args.dataset, root=args.data_dir or data_dir(args.dataset))
    results = [probe(Path(args.run_dir), ds, lr, args.epochs) for lr in args.lrs]
    for r in results:
        cv = r["checkpoint_valid"]
        print(f"{r['model']} from epoch {r['from_epoch']} (valid P@20 {cv['P@20']:.2f} MRR@20 {cv['MRR@20']:.2f}), "
              f"lr {r['lr']:g}:")
        for e in r["epochs"]:
            print(f"  epoch {e['epoch']}: valid P@20 {e['valid']['P@20']:.2f} MRR@20 {e['valid']['MRR@20']:.2f}; "
                  f"test {e['test']['P@20']:.2f} / {e['test']['MRR@20']:.2f} ({e['train_seconds']:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
