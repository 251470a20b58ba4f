"""Command line: train / evaluate / stats / preprocess, and errors that name the problem."""
from __future__ import annotations

import json
import subprocess
import sys

from mtd_fast.cli import main

from testing import shared_path

SMALL = ["--n-sessions", "400", "--n-items", "60", "--hidden-size", "16", "--graph-mode", "overwrite",
         "--graph-steps", "5", "--quiet"]


def test_train_save_evaluate(tmp_path, capsys):
    model, js = tmp_path / "m.pt", tmp_path / "r.json"
    assert main(["train", "--epochs", "2", *SMALL, "--save", str(model), "--json", str(js)]) == 0
    out = capsys.readouterr().out
    assert "test (validation-picked)" in out and "best epoch on test (published protocol)" in out
    res = json.loads(js.read_text())
    assert res["model_config"]["hidden_size"] == 16 and res["train_config"]["graph_steps"] == 5
    assert len(res["history"]) == 2 and "P@20" in res["metrics"]
    assert main(["evaluate", str(model), "--n-sessions", "400", "--n-items", "60", "--split", "valid"]) == 0
    out = capsys.readouterr().out
    assert "| valid |" in out


def test_bool_flags_and_model_choice(tmp_path):
    js = tmp_path / "r.json"
    assert main(["train", "--model", "mtd-lo", "--epochs", "1", *SMALL, "--no-use-position-decay",
                 "--json", str(js)]) == 0
    res = json.loads(js.read_text())
    assert res["model_config"]["use_position_decay"] is False
    assert res["train_config"]["graph_phases"] == 0 and res["history"][0]["graph_loss"] is None


def test_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["train", "--lr", "-1", *SMALL]) == 2
    assert "lr=-1.0 is invalid" in capsys.readouterr().err
    assert main(["stats", "--dataset", "nope"]) == 2
    assert "unknown dataset 'nope'" in capsys.readouterr().err
    assert main(["stats", "--dataset", "diginetica", "--data-dir", "/no/such/dir"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["train", "--model", "gpt", *SMALL]) == 2
    assert "unknown model 'gpt'" in capsys.readouterr().err


def test_stats_real(capsys):
    root = shared_path("diginetica")
    assert main(["stats", "--dataset", "diginetica", "--data-dir", str(root)]) == 0
    out = capsys.readouterr().out
    assert "186670" in out and "60858" in out and "982961" in out


def test_preprocess_raw_sample(tmp_path, capsys):
    raw = shared_path("diginetica_sample_raw", "sample_train-item-views.csv")
    assert main(["preprocess", str(raw), "--out", str(tmp_path / "sample")]) == 0
    assert (tmp_path / "sample" / "all_train_seq.txt").is_file()
    assert main(["stats", "--data-dir", str(tmp_path / "sample")]) == 0
    out = capsys.readouterr().out
    assert "| sample | 469 |" in out  # dataset name = folder name, then the 469 training sessions


def test_python_dash_m_entry_point(tmp_path):
    # cwd outside the checkout, so `-m` runs the installed package
    r = subprocess.run([sys.executable, "-m", "mtd_fast", "stats", "--n-sessions", "100"], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "train_sessions" in r.stdout and "| synthetic | 90 |" in r.stdout

