"""Smoke runs of the bench scripts that are run by hand (large_catalogue.py: one MTD epoch at 1M
items; time_to_accuracy.py: seconds of training until a test-metric target), at toy size, so
they cannot rot. Each runs the script in a subprocess with MTD_BENCH_SMOKE=1."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path


def test_large_catalogue_smoke(tmp_path):
    """benches/large_catalogue.py (MTD, one epoch, 1M items; run by hand) at toy size, so it
    cannot rot: a whole `mtd_fast.train` through the chunked loss and ranking."""
    script = Path(__file__).resolve().parent / "large_catalogue.py"
    out = tmp_path / "large.json"
    res = subprocess.run([sys.executable, str(script), "--items", "2000", "--sessions", "400", "--graph-steps", "3",
                          "--json", str(out)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=dict(os.environ, MTD_BENCH_SMOKE="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["backends"]["linear_cross_entropy"] == "chunked" and data["peak_rss_MB"] > 0
    assert 0 <= data["test"]["P@20"] <= 100


def test_time_to_accuracy_smoke(tmp_path):
    """benches/time_to_accuracy.py (run by hand on full Diginetica) at toy size: the curve, the
    target check and the skip of a finished label."""
    script = Path(__file__).resolve().parent / "time_to_accuracy.py"
    cmd = [sys.executable, str(script), "--label", "t", "--chunk", "3", "--chunks", "2", "--threads", "1",
           "--target", "P@20=0", "--option", "hidden_size=8", "--out", str(tmp_path)]
    env = dict(os.environ, MTD_BENCH_SMOKE="1")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "synthetic__t.json").read_text())
    assert [c["chunk"] for c in data["curve"]] == [1, 2] and data["passed_at"]["chunk"] == 1
    assert data["curve"][1]["train_seconds_cum"] > data["curve"][0]["train_seconds_cum"] > 0
    assert data["model_config"]["hidden_size"] == 8 and data["train_config"]["max_steps_per_epoch"] == 3
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_step_time_smoke(tmp_path):
    """benches/step_time.py (per-step seconds, run by hand to compare two checkouts) at toy size."""
    script = Path(__file__).resolve().parent / "step_time.py"
    out = tmp_path / "steps.json"
    res = subprocess.run([sys.executable, str(script), "--models", "srgnn", "narm", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=dict(os.environ, MTD_BENCH_SMOKE="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["srgnn", "narm"]
    assert all(r["step_s"] > 0 and r["step_cpu_s"] > 0 and r["batch_cpu_s"] > 0 for r in rows)


def test_graph_branch_smoke(tmp_path):
    """benches/graph_branch.py (the graph branch's share of MTD's table, from a run's
    checkpoint; run by hand) on a one-epoch synthetic run."""
    import mtd_fast

    run_dir = tmp_path / "run"
    mtd_fast.train(mtd_fast.load_dataset("synthetic"), model="mtd", epochs=1, hidden_size=8, max_steps_per_epoch=3,
                   quiet=True, run_dir=run_dir)
    script = Path(__file__).resolve().parent / "graph_branch.py"
    res = subprocess.run([sys.executable, str(script), "--checkpoint", str(run_dir / "checkpoint_last.pt"),
                          "--dataset", "synthetic", "--batches", "2"], capture_output=True, text=True, timeout=600,
                         cwd=tmp_path, env=dict(os.environ, MTD_BENCH_SMOKE="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
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
    script = Path(__file__).resolve().parent / "publish_table2.py"
    res = subprocess.run([sys.executable, str(script), "--from", str(tmp_path / "results"), "--figures",
                          str(tmp_path / "figures"), "--readme", str(readme)], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert res.stdout.startswith("copied 2:") and "| STAMP |" in readme.read_text()
    assert len(list((tmp_path / "figures" / "table2").glob("*.json"))) == 2


def test_item_table_ops_smoke(tmp_path):
    """benches/item_table_ops.py (the item-table pieces of a step against the forms they
    replaced; run by hand) on synthetic data: the equality checks and one timing round."""
    script = Path(__file__).resolve().parent / "item_table_ops.py"
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=tmp_path,
                         env=dict(os.environ, MTD_BENCH_SMOKE="1"))
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert [line.split(":")[0] for line in res.stdout.splitlines()] == ["normalize", "permute", "dgi_pair", "adam",
                                                                         "rank_count"]
