"""Issue 14's experiments (ablation, sensitivity, interpret) on tiny synthetic data, and
the silhouette score on hand-made sets."""
from __future__ import annotations

import importlib
import json
import shutil
import sys

import numpy as np
import pytest

from mtd_fast.experiments import ExperimentError, Study, ablation, interpret, run_experiment, sensitivity
from mtd_fast.experiments.interpret import silhouette

train_module = importlib.import_module("mtd_fast.train")
TINY = {"hidden_size": 8, "batch_size": 64, "max_steps_per_epoch": 1}


def settings(tmp_path, **kw):
    return {"dataset": "synthetic", "dataset_kwargs": {"n_sessions": 400, "n_items": 40}, "epochs": 1,
            "overrides": dict(TINY), "out": tmp_path, "quiet": True, **kw}


def refuse_training(monkeypatch):
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("a finished study trained again"))


def read(path):
    return json.loads(path.read_text())


def test_ablation_files_values_and_resume(tmp_path, monkeypatch):
    study = Study("ablation", dataset="diginetica")
    assert [(s.model, s.seed) for s in ablation.specs(study)] == [(m, s) for m in ablation.MODELS for s in (0, 1, 2)]
    res = run_experiment("ablation", **settings(tmp_path, models=["mtd-va", "mtd-lo"], seeds=[0, 1]))
    runs = sorted((tmp_path / "ablation").glob("*.json"))
    assert len(runs) == 4
    merged = read(tmp_path / "ablation.json")
    assert merged == json.loads(json.dumps(res["merged"]))
    (ds,) = merged["datasets"]
    assert [r["label"] for r in ds["rows"]] == ["mtd-va", "mtd-lo"]  # the paper's order
    files = {(d["label"], d["seed"]): d for d in map(read, runs)}
    for row in ds["rows"]:
        vals = [files[(row["label"], s)]["metrics"]["P@20"] for s in (0, 1)]
        assert row["metrics"]["P@20"]["values"] == vals
        assert row["metrics"]["P@20"]["mean"] == pytest.approx(np.mean(vals))
        assert row["metrics"]["P@20"]["sd"] == pytest.approx(np.std(vals, ddof=1))
        picked = [next(h["valid"] for h in files[(row["label"], s)]["history"]
                       if h["epoch"] == files[(row["label"], s)]["best_epoch"]) for s in (0, 1)]
        assert row["valid"]["MRR@20"]["values"] == [v["MRR@20"] for v in picked]
    md = (tmp_path / "ablation.md").read_text()
    assert "| MTD-va | no self-attention, no position decay |" in md and "| MTD-lo |" in md
    assert (tmp_path / "ablation.png").stat().st_size > 1000
    refuse_training(monkeypatch)
    again = run_experiment("ablation", **settings(tmp_path, models=["mtd-va", "mtd-lo"], seeds=[0, 1]))
    assert again["merged"] == res["merged"]


def test_ablation_report_pairs_mtd_with_each_ablation(tmp_path):
    res = run_experiment("ablation", **settings(tmp_path, models=["mtd", "mtd-lo"], seeds=[0, 1]))
    (entry,) = res["merged"]["paired"]
    (row,) = entry["rows"]
    assert (row["label"], row["seeds"]) == ("mtd-lo", [0, 1]) and entry["unpaired"] == {}
    files = {(d["label"], d["seed"]): d for d in map(read, (tmp_path / "ablation").glob("*.json"))}
    want = np.mean([files[("mtd", s)]["metrics"]["MRR@20"] - files[("mtd-lo", s)]["metrics"]["MRR@20"]
                    for s in (0, 1)])
    assert row["test"]["MRR@20"]["diff"] == pytest.approx(want, abs=1e-9)
    assert "| MTD-lo | 0, 1 |" in (tmp_path / "ablation.md").read_text()


def test_sensitivity_specs_share_the_default_point():
    phases = Study("sensitivity", dataset="diginetica", overrides={"graph_mode": "overwrite"})
    labels = [s.label for s in sensitivity.specs(phases)]
    assert labels == ["default", "d=25", "d=50", "d=150", "d=200", *[f"f={f}" for f in (1, 2, 3, 5, 6, 7, 8)],
                      "gcn=2", "gcn=3", "gcn=4"]  # Diginetica's f is 4, d 100, one GCN layer
    # per-step graph modes (the default) have no phases: the graph task's weight is lambda_g
    labels = [s.label for s in sensitivity.specs(Study("sensitivity", dataset="diginetica"))]
    assert labels == ["default", "d=25", "d=50", "d=150", "d=200", "lambda=0", "lambda=0.1", "lambda=0.3",
                      "lambda=3", "gcn=2", "gcn=3", "gcn=4"]  # lambda_g 1 is the default
    with pytest.raises(ExperimentError, match="--frequencies sweeps rec_frequency"):
        sensitivity.specs(Study("sensitivity", options={"frequencies": [2]}))
    with pytest.raises(ExperimentError, match="must be a number >= 0"):
        sensitivity.specs(Study("sensitivity", options={"graph_weights": [-1.0]}))
    syn = [s.label for s in sensitivity.specs(Study("sensitivity", overrides={"hidden_size": 50}))]
    assert "d=50" not in syn and "d=100" in syn and "f=1" not in syn
    with pytest.raises(ExperimentError, match="drop --models"):
        sensitivity.specs(Study("sensitivity", models=["narm"]))


def test_sensitivity_files_degradation_and_resume(tmp_path, monkeypatch):
    opts = {"hidden_sizes": [4, 8], "frequencies": [1, 2], "gcn_layers": [1, 2]}
    kw = settings(tmp_path, options=opts)
    kw["overrides"]["graph_mode"] = "overwrite"  # a phase mode, so the frequency f is swept
    res = run_experiment("sensitivity", **kw)
    runs = sorted((tmp_path / "sensitivity").glob("*.json"))
    assert sorted(read(p)["label"] for p in runs) == ["d=4", "default", "f=2", "gcn=2"]
    data = read(tmp_path / "sensitivity.json")
    sweeps = {t["param"]: t["rows"] for t in data["sweeps"]}
    assert {p: [r["value"] for r in rows] for p, rows in sweeps.items()} == {
        "hidden_size": [4, 8], "rec_frequency": [1, 2], "num_gcn_layers": [1, 2]}
    files = {read(p)["label"]: read(p) for p in runs}
    for rows in sweeps.values():
        assert sum(r["chosen"] for r in rows) == 1
        best = max(r["valid P@20"] for r in rows)
        for r in rows:
            rec = files[r["label"]]
            v = next(h["valid"]["P@20"] for h in rec["history"] if h["epoch"] == rec["best_epoch"])
            assert r["valid P@20"] == pytest.approx(v) and r["test P@20"] == pytest.approx(rec["metrics"]["P@20"])
            assert r["degradation P@20"] == pytest.approx((best - v) / best)
        assert next(r for r in rows if r["chosen"])["degradation P@20"] == 0
    assert files["f=2"]["train_config"]["rec_frequency"] == 2 and files["default"]["dataset_rec_frequency"] == 1
    assert (tmp_path / "sensitivity.png").stat().st_size > 1000
    assert "training frequency f" in (tmp_path / "sensitivity.md").read_text()
    refuse_training(monkeypatch)
    assert run_experiment("sensitivity", **kw)["sweeps"] == res["sweeps"]


def test_sensitivity_sweeps_graph_weight_in_per_step_modes(tmp_path):
    opts = {"hidden_sizes": [8], "graph_weights": [0.0, 1.0], "gcn_layers": [1]}
    res = run_experiment("sensitivity", **settings(tmp_path, options=opts))
    (t,) = [t for t in res["sweeps"] if t["param"] == "graph_weight"]
    assert [r["value"] for r in t["rows"]] == [0.0, 1.0] and [r["label"] for r in t["rows"]] == ["lambda=0", "default"]
    assert "graph loss weight lambda_g" in (tmp_path / "sensitivity.md").read_text()


def test_interpret_files_weights_tsne_and_resume(tmp_path, monkeypatch):
    opts = {"heatmap_sessions": 2, "tsne_sessions": 30, "tsne_classes": 3}
    kw = settings(tmp_path, dataset_kwargs={"n_sessions": 600, "n_items": 40}, options=opts)
    res = run_experiment("interpret", **kw)
    stem = tmp_path / "interpret_synthetic-n_items=40-n_sessions=600"
    data = read(stem.with_suffix(".json"))
    assert set(data["checkpoints"]) == set(interpret.MODELS)
    assert all(d["source"] == "trained" for d in data["checkpoints"].values())
    assert len(list((tmp_path / "interpret").glob("*.pt"))) == 3
    assert len(data["sessions"]) == 2
    for s in data["sessions"]:
        n = len(s["items"])
        assert 3 <= n <= 10
        assert sum(s["alpha"]) == pytest.approx(1, abs=1e-5) and sum(s["position_decay"]) == pytest.approx(1, abs=1e-5)
        att = np.array(s["self_attention"])  # (blocks, heads, n, n)
        assert att.shape == (1, 1, n, n) and np.allclose(att.sum(-1), 1, atol=1e-5) and np.all(np.triu(att, 1) == 0)
    t = data["tsne"]
    assert len(t["classes"]) == 3 and len(t["labels"]) == sum(t["counts"]) <= 30
    for m in interpret.MODELS:
        pts = np.array(t["models"][m]["points"])
        assert pts.shape == (len(t["labels"]), 2)
        assert t["models"][m]["silhouette_2d"] == pytest.approx(silhouette(pts, t["labels"]))
        assert -1 <= t["models"][m]["silhouette"] <= 1
    for suffix in ("_attention.png", "_weights.png", "_tsne.png"):
        assert (tmp_path / (stem.name + suffix)).stat().st_size > 1000
    assert "silhouette (model space)" in stem.with_suffix(".md").read_text()

    refuse_training(monkeypatch)  # done: nothing retrained, same analysis
    assert run_experiment("interpret", **kw)["data"] == res["data"]
    mine = tmp_path / "given.pt"  # a checkpoint given on the command line is used as is
    shutil.copy(next((tmp_path / "interpret").glob("*__mtd__seed0.pt")), mine)
    given = run_experiment("interpret", **{**kw, "options": {**opts, "checkpoint": [f"mtd={mine}"]}})
    assert given["data"]["checkpoints"]["mtd"] == {"path": str(mine), "source": "given"}
    with pytest.raises(ExperimentError, match="MODEL=PATH"):
        run_experiment("interpret", **{**kw, "options": {"checkpoint": ["gpt=x.pt"]}})


def test_interpret_without_scikit_learn_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)  # import now raises ImportError
    refuse_training(monkeypatch)
    with pytest.raises(ExperimentError, match="needs scikit-learn"):
        run_experiment("interpret", **settings(tmp_path))


def test_interpret_checks_a_given_checkpoint_before_training(tmp_path, monkeypatch):
    import mtd_fast

    path = tmp_path / "small.pt"
    mtd_fast.save(mtd_fast.MTD(10, mtd_fast.MTDConfig(hidden_size=8)), path)
    refuse_training(monkeypatch)
    with pytest.raises(ExperimentError, match="a model of 10 items, but dataset 'synthetic' has 40"):
        run_experiment("interpret", **settings(tmp_path, options={"checkpoint": [f"mtd={path}"]}))
    with pytest.raises(FileNotFoundError, match="no such file"):
        run_experiment("interpret", **settings(tmp_path, options={"checkpoint": [f"stamp={tmp_path / 'nope.pt'}"]}))
    with pytest.raises(ExperimentError, match="one seed"):
        run_experiment("interpret", **settings(tmp_path, seeds=[0, 1]))


def test_silhouette_on_hand_made_sets():
    x = np.array([[0.0], [1.0], [10.0], [11.0]])
    # a = 1 for every point; b = 10.5, 9.5, 9.5, 10.5 -> s = 9.5/10.5, 8.5/9.5, 8.5/9.5, 9.5/10.5
    assert silhouette(x, [0, 0, 1, 1]) == pytest.approx((9.5 / 10.5 + 8.5 / 9.5) / 2)
    assert silhouette(x, ["a", "b", "a", "b"]) < 0  # classes across the two clumps
    # a class of one point scores 0 for that point: (0 + 8/9 + ...) by hand
    y = np.array([[0.0, 0.0], [0.0, 1.0], [5.0, 0.0]])
    assert silhouette(y, [0, 0, 1]) == pytest.approx(((np.hypot(5, 0) - 1) / 5 + (np.hypot(5, 1) - 1) / np.hypot(5, 1)
                                                      + 0) / 3)
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(c, 0.1, size=(20, 3)) for c in (0.0, 5.0, 10.0)])
    labels = np.repeat([0, 1, 2], 20)
    assert silhouette(blobs, labels) > 0.9
    metrics = pytest.importorskip("sklearn.metrics")
    assert silhouette(blobs, labels) == pytest.approx(metrics.silhouette_score(blobs, labels))
    assert silhouette(x, [0, 1, 1, 0]) == pytest.approx(metrics.silhouette_score(x, [0, 1, 1, 0]))
    with pytest.raises(ValueError):
        silhouette(x, [0, 0, 0, 0])
