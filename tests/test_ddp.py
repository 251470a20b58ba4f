"""Data-parallel training over torch.distributed: gloo, 2 processes on this CPU machine.

Every rank is its own process (`_run_driver.py` with torchrun's environment variables, or
torchrun itself for the CLI). Tiny synthetic data, so the whole file takes well under a
minute on 2 cores.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from test_resume import assert_same_run

DRIVER = Path(__file__).with_name("_run_driver.py")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this torch build")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, out: Path, *args: str, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start `world` driver processes as torchrun would and wait for all of them."""
    port = free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, str(DRIVER), str(out), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    done = []
    try:
        for p in procs:
            o, e = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, o, e))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return done


def ok(results: list[subprocess.CompletedProcess]) -> None:
    for r in results:
        assert r.returncode == 0, r.stderr[-3000:]


@pytest.mark.parametrize("mode", ["residual", "overwrite"])
def test_two_processes_match_one_with_the_same_global_batch(tmp_path, mode):
    """dropout=0, so no random draw differs between the layouts; what remains is float32
    reassociation: the global batch's gradient is the weighted sum of two half-batch
    gradients instead of one sum over the whole batch (~1e-7 relative per step). The graph
    side: in `overwrite` the phase runs on rank 0 from the same RNG state as the single
    process and is broadcast; in `residual` (the default) it runs in every step on every rank
    with the same DGI corruption as the single process (seeded by the step, not by the ranks'
    RNG). Measured (overwrite): epoch losses agree to 2e-8 relative after 3 epochs of 20
    steps, graph losses and metrics exactly. The bounds below leave two orders of magnitude
    for other CPUs / BLAS builds; metrics may differ by at most two test samples' worth (a
    near-tie flipping at rank 20)."""
    opts = ["--option", "dropout=0.0", "--option", "max_steps_per_epoch=None", "--option", f"graph_mode={mode}"]
    ok(launch(2, tmp_path / "ddp.json", *opts))
    r = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "one.json"), *opts], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = json.loads((tmp_path / "ddp.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert len(a["history"]) == len(b["history"]) == 3
    for x, y in zip(a["history"], b["history"]):
        assert x["train_samples"] == y["train_samples"]  # the same global batches, all of them
        assert x["train_loss"] == pytest.approx(y["train_loss"], rel=1e-5)
        assert x["graph_loss"] == pytest.approx(y["graph_loss"], rel=1e-5)
    n_test = 159  # test samples of this synthetic set
    for k in ("P@5", "P@10", "P@20"):
        assert abs(a["metrics"][k] - b["metrics"][k]) <= 2 * 100 / n_test + 1e-9, k
    for k in ("MRR@20", "NDCG@20"):
        assert abs(a["metrics"][k] - b["metrics"][k]) <= 2 * 100 / n_test, k


@pytest.mark.parametrize("every", [None, 2])
def test_resume_under_ddp_is_exact(tmp_path, every):
    """Both ranks SIGKILLed mid-epoch 2 (dropout on: each rank's own RNG states are in the
    checkpoint), resumed on 2 ranks: equal bit for bit to the uninterrupted 2-rank run; from
    the end of epoch 1, or (checkpoint_every=2) from step 2 of epoch 2."""
    ok(launch(2, tmp_path / "ref.json", "--run-dir", str(tmp_path / "ref")))
    opt = ["--option", f"checkpoint_every={every}"]
    dead = launch(2, tmp_path / "dead.json", "--run-dir", str(tmp_path / "run"), "--kill", "train_step:9", *opt)
    assert [r.returncode for r in dead] == [-9, -9]
    ok(launch(2, tmp_path / "resumed.json", "--run-dir", str(tmp_path / "run"), "--resume", *opt))
    assert_same_run(tmp_path / "ref.json", tmp_path / "resumed.json")
    rec = json.loads((tmp_path / "run" / "run.json").read_text())
    assert rec["identity"]["world_size"] == 2
    (resumed,) = rec["resumes"]
    assert (resumed["after_epoch"], resumed.get("after_step")) == ((1, 2) if every else (1, None))
    # a different number of processes is another run
    r = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "one.json"), "--run-dir", str(tmp_path / "run"),
                        "--resume"], capture_output=True, text=True, timeout=240,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode != 0 and "world_size: 2 in the run directory, 1 now" in r.stderr


def test_replicated_graph_phase_equals_the_broadcast_one(tmp_path, monkeypatch):
    """`MTD_FAST_DDP_GRAPH=replicate` (every rank computes the graph phase from rank 0's RNG
    state) ends bit for bit where the default (rank 0 computes, then broadcasts) ends, on this
    machine: same hardware and thread count on both ranks. dropout=0: the replicated path hands
    rank 0's RNG state to rank 1, which would otherwise change rank 1's later dropout draws."""
    opts = ["--option", "dropout=0.0", "--option", "graph_mode=overwrite"]
    ok(launch(2, tmp_path / "broadcast.json", *opts))
    monkeypatch.setenv("MTD_FAST_DDP_GRAPH", "replicate")
    ok(launch(2, tmp_path / "replicate.json", *opts))
    assert all(h["graph_loss"] is not None for h in json.loads((tmp_path / "replicate.json").read_text())["history"])
    assert_same_run(tmp_path / "broadcast.json", tmp_path / "replicate.json")


@pytest.mark.parametrize("model", ["csrm", "cosan"])
def test_memory_models_keep_one_memory_across_processes(tmp_path, model):
    """CSRM's and CoSAN's FIFO memories are written with the whole global batch on every rank
    (each rank computes only its shard's rows): the ranks' memories stay equal, and equal to a
    single process's (dropout 0; float32 reassociation of the gradient sums aside). The batch
    size leaves a last global batch of one sample, so rank 1 has an empty shard there and must
    still join the row all-gather (a missing one would hang until the 60 s timeout)."""
    import mtd_fast

    data = next(d for d in (f"n_sessions={n},n_items=60" for n in range(400, 420))
                if len(mtd_fast.load_dataset("synthetic", **{k: int(v) for k, v in
                                                             (kv.split("=") for kv in d.split(","))}).train) % 2)
    n_train = len(mtd_fast.load_dataset("synthetic", **{k: int(v) for k, v in (kv.split("=") for kv in
                                                                                 data.split(","))}).train)
    opts = ["--data", data, "--option", f"model={model}", "--option", "dropout=0.0", "--option", "memory_size=64",
            "--option", f"batch_size={n_train - 1}", "--option", "max_steps_per_epoch=None",
            "--option", "epochs=2"]
    ok(launch(2, tmp_path / "ddp.json", *opts, "--all-ranks-state"))
    r = subprocess.run([sys.executable, str(DRIVER), str(tmp_path / "one.json"), *opts], capture_output=True,
                       text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    states = [torch.load(tmp_path / name) for name in ("ddp.json.pt", "ddp.json.rank1.pt", "one.json.pt")]
    mems = [[v for k, v in st.items() if k.endswith(".memory")] for st in states]
    assert len(mems[0]) == 1 and int([v for k, v in states[0].items() if k.endswith("mem_count")][0]) > 0
    assert torch.equal(mems[0][0], mems[1][0])  # one memory on every rank
    assert torch.allclose(mems[0][0], mems[2][0], rtol=1e-4, atol=1e-5)  # and the single process's
    for k in ("mem_ptr", "mem_count"):
        assert [int(v) for st in states for key, v in st.items() if key.endswith(k)] == [
            int(v) for key, v in states[2].items() if key.endswith(k)] * 3


def test_ranks_draw_their_own_dropout(tmp_path):
    """Each rank seeds torch's generator apart from the others after the weights are
    broadcast: the same seed everywhere drew the same dropout masks for different samples.
    Compared as the first training step starts (later the ranks' draw counts differ anyway:
    the attention masks follow each shard's session lengths)."""
    ok(launch(2, tmp_path / "x.json", "--option", "dropout=0.3", "--all-ranks-state"))
    a, b = (torch.load(tmp_path / f"x.json.rank{r}.rng") for r in (0, 1))
    assert not torch.equal(a, b)


def test_batch_size_not_divisible_by_world_size(tmp_path):
    res = launch(2, tmp_path / "x.json", "--option", "batch_size=63")
    for r in res:
        assert r.returncode != 0
        assert "batch_size=63 is not divisible by the world size 2" in r.stderr


def test_a_rank_that_dies_stops_the_others(tmp_path):
    """Rank 1 is SIGKILLed mid-epoch; rank 0 must fail with an error, not wait forever."""
    t0 = time.perf_counter()
    res = launch(2, tmp_path / "x.json", "--kill", "train_step:5", "--kill-rank", "1", timeout=150)
    assert res[1].returncode == -9
    assert res[0].returncode not in (0, -9), res[0].stderr[-2000:]
    assert "DistError: rank 0 of 2: the gradient all-reduce failed; another process of this run failed" in \
        res[0].stderr, res[0].stderr[-2000:]
    assert time.perf_counter() - t0 < 140


def test_torchrun_cli(tmp_path):
    """The README command: torchrun -m mtd_fast train, rank 0 writing the run directory and --json."""
    rd, js = tmp_path / "run", tmp_path / "r.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "mtd_fast",
           "train", "--n-sessions", "300", "--n-items", "40", "--hidden-size", "8",
           "--epochs", "2", "--batch-size", "64", "--run-dir", str(rd), "--json", str(js), "--dist-timeout", "60"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("best validation epoch") == 2  # rank 0 only: the status line and the summary
    res = json.loads(js.read_text())
    assert len(res["history"]) == 2
    assert json.loads((rd / "run.json").read_text())["identity"]["world_size"] == 2
    assert len((rd / "epochs.jsonl").read_text().splitlines()) == 2
