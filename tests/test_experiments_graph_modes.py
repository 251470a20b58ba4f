"""`experiment graph_modes`: specs, files, the validation-only choice, and resume."""
from __future__ import annotations

import importlib
import json

import pytest

from mtd_fast.experiments import ExperimentError, Study, graph_modes, run_experiment

train_module = importlib.import_module("mtd_fast.train")
TINY = {"hidden_size": 8, "batch_size": 64, "max_steps_per_epoch": 2}


def test_variants_and_specs():
    labels = [s.label for s in graph_modes.specs(Study("graph_modes"))]
    assert len(labels) == 20 and set(labels) == set(graph_modes.VARIANTS)
    by_label = {s.label: s for s in graph_modes.specs(Study("graph_modes", seeds=[3]))}
    assert by_label["mtd-lo+cos"].model == "mtd-lo" and by_label["mtd-lo+cos"].overrides_dict["score_norm"] is True
    assert by_label["residual-w0"].overrides_dict["graph_weight"] == 0.0
    ls = by_label["residual-ls+cos"].overrides_dict
    assert ls["learn_score_scale"] is True and ls["score_norm"] is True and ls["graph_mode"] == "residual"
    assert graph_modes.baseline_of("residual-ls+cos") == "mtd-lo+cos" and "residual-ls" not in graph_modes.VARIANTS
    assert {s.seed for s in by_label.values()} == {3}
    rep, lo_rep = by_label["residual-rep+cos"].overrides_dict, by_label["mtd-lo-rep+cos"]
    assert rep["repeat_bias"] is True and rep["graph_mode"] == "residual" and rep["score_norm"] is True
    assert lo_rep.model == "mtd-lo" and lo_rep.overrides_dict["repeat_bias"] is True
    assert graph_modes.baseline_of("residual-rep+cos") == "mtd-lo-rep+cos"
    repid = by_label["residual-repid+cos"].overrides_dict
    assert repid == {**rep, "repeat_identity": True}
    assert graph_modes.baseline_of("residual-repid+cos") == "mtd-lo-rep+cos"
    assert graph_modes.baseline_of("joint+cos") == "mtd-lo+cos" and graph_modes.baseline_of("joint") == "mtd-lo"
    with pytest.raises(ExperimentError, match="unknown graph_modes variant"):
        graph_modes.specs(Study("graph_modes", models=["residual", "blend"]))
    with pytest.raises(ExperimentError, match="fixes score_norm"):
        graph_modes.specs(Study("graph_modes", models=["residual"], overrides={"score_norm": True}))


def _record(label, valid_p20, test_p20, dataset="a"):
    hist = [{"epoch": 1, "valid": {"P@20": valid_p20, "MRR@20": 1.0}, "train_seconds": 1.0, "train_loss": 1.0}]
    metrics = {k: 0.0 for k in ("P@5", "P@10", "MRR@5", "MRR@10", "NDCG@5", "NDCG@10", "NDCG@20")}
    metrics.update({"P@20": test_p20, "MRR@20": 1.0})
    return {"dataset": dataset, "fraction": 1.0, "dataset_kwargs": {}, "label": label,
            "model": graph_modes.VARIANTS[label][0], "seed": 0, "best_epoch": 1, "history": hist,
            "metrics": metrics, "stats": {}}


def test_select_ranks_by_validation_gain_over_same_scoring_mtd_lo():
    from mtd_fast.experiments.merge import merge_json

    recs = [_record("mtd-lo", 50, 10), _record("mtd-lo+cos", 60, 10), _record("residual", 55, 0),
            _record("residual+cos", 62, 99), _record("joint", 49, 99),
            _record("mtd-lo", 40, 10, "b"), _record("mtd-lo+cos", 40, 10, "b"), _record("residual", 47, 0, "b"),
            _record("residual+cos", 41, 99, "b")]  # joint has not run on b: it cannot rank
    choice = graph_modes.select(merge_json(recs))
    gains = dict(choice["ranking"])
    assert gains["residual"] == pytest.approx((5 + 7) / 2) and gains["residual+cos"] == pytest.approx((2 + 1) / 2)
    assert "joint" not in gains and choice["chosen"] == "residual"  # test metrics (99) never matter


def test_files_report_and_resume(tmp_path, monkeypatch):
    kw = {"dataset": "synthetic", "dataset_kwargs": {"n_sessions": 300, "n_items": 40}, "epochs": 1,
          "overrides": dict(TINY), "out": tmp_path, "quiet": True,
          "models": ["mtd-lo", "residual", "joint+cos", "mtd-lo+cos"]}
    res = run_experiment("graph_modes", **kw)
    files = sorted((tmp_path / "graph_modes").glob("*.json"))
    assert len(files) == 4
    recs = {json.loads(p.read_text())["label"]: json.loads(p.read_text()) for p in files}
    assert recs["residual"]["model_config"]["graph_mode"] == "residual"
    assert recs["joint+cos"]["model_config"]["score_norm"] is True
    merged = json.loads((tmp_path / "graph_modes.json").read_text())
    valid = {lab: next(h["valid"]["P@20"] for h in r["history"] if h["epoch"] == r["best_epoch"])
             for lab, r in recs.items()}
    gains = dict(map(tuple, merged["selection"]["ranking"]))
    assert gains["residual"] == pytest.approx(valid["residual"] - valid["mtd-lo"])
    assert gains["joint+cos"] == pytest.approx(valid["joint+cos"] - valid["mtd-lo+cos"])
    assert merged["selection"]["chosen"] == max(("residual", "joint+cos"), key=gains.get)
    assert "Best graph variant on validation" in (tmp_path / "graph_modes.md").read_text()
    assert (tmp_path / "graph_modes.png").stat().st_size > 1000
    monkeypatch.setattr(train_module, "train", lambda *a, **k: pytest.fail("a finished run trained again"))
    again = run_experiment("graph_modes", **kw)
    assert again["selection"] == res["selection"]
