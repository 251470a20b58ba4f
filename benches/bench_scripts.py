"""Smoke runs of the bench scripts that are run by hand (large_catalogue.py: one MTD epoch at 1M
items; time_to_accuracy.py: seconds of training until a test-metric target), at toy size, so
they cannot rot. Each runs the script in a subprocess with MTD_BENCH_SMOKE=1."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def smoke(tmp_path: Path, script: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run benches/`script` with `args` in `tmp_path` (MTD_BENCH_SMOKE=1 unless `env` is given); it must succeed."""
    res = subprocess.run([sys.executable, str(HERE / script), *args], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=dict(os.environ, MTD_BENCH_SMOKE="1") if env is None else env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def test_large_catalogue_smoke(tmp_path):
    """benches/large_catalogue.py (MTD, one epoch, 1M items; run by hand) at toy size, so it
    cannot rot: a whole `mtd_fast.train` through the chunked loss and ranking."""
    out = tmp_path / "large.json"
    smoke(tmp_path, "large_catalogue.py", "--items", "2000", "--sessions", "400", "--graph-steps", "3",
          "--json", str(out))
    data = json.loads(out.read_text())
    assert data["backends"]["linear_cross_entropy"] == "chunked" and data["peak_rss_MB"] > 0
    assert 0 <= data["test"]["P@20"] <= 100


def test_time_to_accuracy_smoke(tmp_path):
    """benches/time_to_accuracy.py (run by hand on full Diginetica) at toy size: the curve, the
    target check and the skip of a finished label."""
    args = ["--label", "t", "--chunk", "3", "--chunks", "2", "--threads", "1", "--target", "P@20=0",
            "--option", "hidden_size=8", "--out", str(tmp_path)]
    smoke(tmp_path, "time_to_accuracy.py", *args)
    data = json.loads((tmp_path / "synthetic__t.json").read_text())
    assert [c["chunk"] for c in data["curve"]] == [1, 2] and data["passed_at"]["chunk"] == 1
    assert data["curve"][1]["train_seconds_cum"] > data["curve"][0]["train_seconds_cum"] > 0
    assert data["model_config"]["hidden_size"] == 8 and data["train_config"]["max_steps_per_epoch"] == 3
    assert "nothing to do" in smoke(tmp_path, "time_to_accuracy.py", *args).stdout


def test_step_time_smoke(tmp_path):
    """benches/step_time.py (per-step seconds, run by hand to compare two checkouts) at toy size."""
    out = tmp_path / "steps.json"
    smoke(tmp_path, "step_time.py", "--models", "srgnn", "narm", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["srgnn", "narm"]
    assert all(r["step_s"] > 0 and r["step_cpu_s"] > 0 and r["batch_cpu_s"] > 0 for r in rows)
    assert all(r["step_minor_faults"] >= 0 for r in rows)
    assert json.loads(out.read_text())["malloc"] in ("keep", "system")


def test_graph_branch_smoke(tmp_path):
    """benches/graph_branch.py (the graph branch's share of MTD's table, from a run's
    checkpoint; run by hand) on a one-epoch synthetic run."""
    import mtd_fast

    run_dir = tmp_path / "run"
    mtd_fast.train(mtd_fast.load_dataset("synthetic"), model="mtd", epochs=1, hidden_size=8, max_steps_per_epoch=3,
                   quiet=True, run_dir=run_dir)
    res = smoke(tmp_path, "graph_branch.py", "--checkpoint", str(run_dir / "checkpoint_last.pt"),
                "--dataset", "synthetic", "--batches", "2")
    out = json.loads(res.stdout)
    assert out["E_row_norm_median"] > 0 and out["GCN_row_norm_median"] > 0 and -1 <= out["cos_T_GCN_median"] <= 1


def test_publish_table2_smoke(tmp_path):
    """benches/publish_table2.py (copy finished convergence runs, merge, rewrite the README
    block; run by hand) on two one-epoch synthetic result files and a scratch README."""
    from mtd_fast.experiments import RunSpec, run_all

    run_all([RunSpec("synthetic", model=m, epochs=1, overrides={"hidden_size": 8, "max_steps_per_epoch": 2},
                     dataset_kwargs={"n_sessions": 300, "n_items": 60}) for m in ("pop", "stamp")],
            tmp_path / "results" / "table2", quiet=True)
    readme = tmp_path / "README.md"
    readme.write_text("<!-- table2 -->\nold\n<!-- /table2 -->\n")
    res = smoke(tmp_path, "publish_table2.py", "--from", str(tmp_path / "results"), "--figures",
                str(tmp_path / "figures"), "--readme", str(readme), env=dict(os.environ))
    assert res.stdout.startswith("copied 2 result files and 2 rank files:") and "| STAMP |" in readme.read_text()
    assert len(list((tmp_path / "figures" / "table2").glob("*.json"))) == 2


def test_item_table_ops_smoke(tmp_path):
    """benches/item_table_ops.py (the item-table pieces of a step against the forms they
    replaced; run by hand) on synthetic data: the equality checks and one timing round."""
    res = smoke(tmp_path, "item_table_ops.py")
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == ["normalize", "permute", "dgi_pair", "adam",
                                                                         "rank_count"]


def test_checkpoint_cost_smoke(tmp_path):
    """benches/checkpoint_cost.py (the write time of a mid-epoch checkpoint; run by hand) at toy size."""
    out = tmp_path / "ckpt.json"
    smoke(tmp_path, "checkpoint_cost.py", "--models", "mtd", "stamp", "--json", str(out))
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["mtd", "stamp"]
    assert all(r["mid_epoch_writes"] == 2 and r["mid_epoch_write_s"] > 0 and r["checkpoint_MB"] > 0 for r in rows)


def test_lr_probe_smoke(tmp_path):
    """benches/lr_probe.py (more epochs at a lower lr from a run's best checkpoint; run by hand)
    on a two-epoch synthetic run: the same batches as the run at its own lr give its own next epoch."""
    import mtd_fast

    run_dir = tmp_path / "run"
    kw = dict(model="mtd", hidden_size=8, max_steps_per_epoch=3, quiet=True, patience=5)
    ds = mtd_fast.load_dataset("synthetic")
    mtd_fast.train(ds, epochs=1, run_dir=run_dir, **kw)
    shutil.copytree(run_dir, tmp_path / "after1")  # the run's folder after epoch 1, set aside
    ahead = mtd_fast.train(ds, epochs=2, run_dir=run_dir, resume=True, **kw)  # the run's own epoch 2
    out = tmp_path / "probe.json"
    smoke(tmp_path, "lr_probe.py", "--run-dir", str(tmp_path / "after1"), "--dataset", "synthetic", "--lrs", "1e-3",
          "1e-4", "--json", str(out))
    same, lower = json.loads(out.read_text())
    assert same["from_epoch"] == lower["from_epoch"] == 1 and [e["epoch"] for e in lower["epochs"]] == [2]
    assert same["epochs"][0]["valid"] == ahead.history[1]["valid"]  # lr 1e-3 replays the run's epoch 2 exactly
    assert lower["epochs"][0]["valid"] != same["epochs"][0]["valid"]


def test_repeat_probe_smoke(tmp_path):
    """benches/repeat_probe.py (a repeat bias fitted on half of validation, the model frozen; run
    by hand) on a one-epoch synthetic run: without the bias it gives the run's own test metrics."""
    import mtd_fast

    run_dir = tmp_path / "run"
    # the probe fits the bias on a run trained without it (the default has it: the paper's model here)
    res = mtd_fast.train(mtd_fast.load_dataset("synthetic"), model="mtd", epochs=1, run_dir=run_dir, quiet=True,
                         hidden_size=8, max_steps_per_epoch=3, repeat_bias=False)
    out = tmp_path / "probe.json"
    smoke(tmp_path, "repeat_probe.py", "--run-dir", str(run_dir), "--dataset", "synthetic", "--steps", "5",
          "--json", str(out))
    data = json.loads(out.read_text())
    for k in ("P@20", "MRR@20"):
        assert data["without"]["test"]["all"][k] == round(res.metrics[k], 2)
    assert data["bias"]["offset"] != 0 and data["checkpoint_epoch"] == 1
    assert set(data["with"]["test"]) <= {"all", "repeat", "new"} and "all" in data["with"]["test"]
