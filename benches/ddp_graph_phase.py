"""Graph phase under DDP: rank 0 computes and broadcasts, or every rank computes (a measurement).

    python benches/ddp_graph_phase.py [--dataset diginetica] [--world 2] [--steps 20] [--threads 1]

For each way (`broadcast`: the trainer's default; `replicate`: MTD_FAST_DDP_GRAPH=replicate)
it launches `--world` gloo processes on this machine, each building the dataset's global
graph and an MTD model, and times the trainer's own `distributed_graph_phase` (a phase of
exactly `--steps` DGI steps, write-back, and for `broadcast` the broadcast of the item
table and the graph side's weights), from a barrier to the end, on every rank; then the
same phase in one process. Prints the wall seconds (max over ranks) and checks that every
rank ends with bit-identical weights. Real data is read from ../shared/data.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time


def worker(args) -> None:
    import hashlib

    import torch
    import torch.distributed as td

    torch.set_num_threads(args.threads)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        td.init_process_group("gloo")
    import mtd_fast
    from mtd_fast import MTDConfig, TrainConfig, ops
    from mtd_fast.distributed import Dist

    from harness import data_dir

    tr = sys.modules["mtd_fast.train"]
    if args.dataset == "synthetic":
        ds = mtd_fast.load_dataset("synthetic", n_sessions=20000, n_items=5000)
    else:
        ds = mtd_fast.load_dataset(args.dataset, root=data_dir(args.dataset))
    tcfg = TrainConfig(graph_steps=args.steps, graph_patience=args.steps)
    dist = Dist()
    tr.seed_everything(0)
    net = tr.build_model("mtd", ds.n_items, MTDConfig(), tcfg)
    graph = ops.global_graph(ds.train_sessions, ds.n_items)
    opt_g = torch.optim.Adam(net.graph_parameters(), lr=tcfg.lr)
    if dist.enabled:
        td.barrier()
    t0 = time.perf_counter()
    loss, steps, _ = tr.distributed_graph_phase(net, graph, opt_g, tcfg, True, 1, dist)
    wall = time.perf_counter() - t0
    h = hashlib.sha256()
    for v in net.state_dict().values():
        h.update(v.numpy().tobytes())
    rows = dist.all_gather_object({"rank": dist.rank, "wall": wall, "steps": steps, "digest": h.hexdigest(),
                                   "nodes": graph.num_nodes, "nnz": graph.nnz})
    if dist.main:
        print(json.dumps(rows))
    if dist.enabled:
        td.barrier()  # every rank past its last collective before any tears the group down
        td.destroy_process_group()
        # gloo processes aborted now and then in the interpreter's teardown after their work
        # (mtd_fast.cli.main, --hard-exit): leave without C++ static destructors
        sys.stdout.flush()
        os._exit(0)


def launch(args, world: int, mode: str) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "LOCAL_RANK": str(r),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": str(args.threads),
               "MTD_FAST_DDP_GRAPH": mode}
        procs.append(subprocess.Popen([sys.executable, __file__, "--worker", "--dataset", args.dataset, "--steps",
                                       str(args.steps), "--threads", str(args.threads)], env=env,
                                      stdout=subprocess.PIPE, text=True))
    outs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{mode}: a worker failed")
    return json.loads(outs[0].strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="diginetica")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    for rep in range(args.repeats):
        single = launch(args, 1, "broadcast")[0]
        line = {"repeat": rep, "nodes": single["nodes"], "nnz": single["nnz"], "single_s": round(single["wall"], 3)}
        for mode in ("broadcast", "replicate"):
            rows = launch(args, args.world, mode)
            assert len({r["digest"] for r in rows}) == 1, f"{mode}: ranks differ"
            line[f"{mode}_s"] = round(max(r["wall"] for r in rows), 3)
            line[f"{mode}_same_as_single"] = rows[0]["digest"] == single["digest"]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
