"""Bad and edge inputs that used to pass silently or end in a raw traceback: each now gets a
clear error (or warning) naming the problem."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import mtd_fast
from mtd_fast.cli import main
from mtd_fast.data import DataError, Dataset, DataWarning, Samples, Sessions, expand_samples
from mtd_fast.run import Run
from mtd_fast.serialization import ModelFileError, state_digest

TINY = dict(hidden_size=8, batch_size=64, quiet=True, max_steps_per_epoch=3)
SMALL = ["--n-sessions", "300", "--n-items", "40", "--hidden-size", "8", "--quiet",
         "--max-steps-per-epoch", "2"]


@pytest.fixture(scope="module")
def small():
    return mtd_fast.load_dataset("synthetic", n_sessions=300, n_items=40)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, small):
    r = mtd_fast.train(small, epochs=1, **TINY)
    path = tmp_path_factory.mktemp("m") / "m.pt"
    mtd_fast.save(r.model, path)
    return path, r.model


# ---- diverging training --------------------------------------------------------------------------
def test_huge_lr_stops_with_epoch_and_step(small):
    with pytest.raises(FloatingPointError,
                       match=r"epoch \d+, step \d+ of \d+: .*non-finite|epoch \d+, step \d+ of \d+: "
                                                 r"the loss became"):
        mtd_fast.train(small, epochs=3, lr=1e6, **TINY)


def test_non_finite_gradient_with_a_finite_loss_is_caught_before_the_step(small, monkeypatch):
    """sqrt(0 * x) is 0, its gradient inf * 0 = NaN: the loss stays finite, the check must look
    at the gradients, and the weights must never take the NaN step."""
    from mtd_fast.models.mtd import MTD

    real = MTD.loss
    seen = {}

    def loss(self, batch, targets):
        seen["model"] = self
        return real(self, batch, targets) + torch.sqrt(0.0 * self.item_emb.weight.sum())

    monkeypatch.setattr(MTD, "loss", loss)
    with pytest.raises(FloatingPointError, match=r"epoch 1, step 1 of 3: the gradient of item_emb.weight became "
                                                 r"non-finite"):
        mtd_fast.train(small, epochs=1, graph_phases=0, **TINY)
    assert all(torch.isfinite(p).all() for p in seen["model"].parameters())


# ---- model files -----------------------------------------------------------------------------------
def test_flipped_bytes_are_refused(tmp_path, model_file):
    path, _ = model_file
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x5A for b in data[mid:mid + 64])
    bad = tmp_path / "flipped.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum mismatch|corrupt or truncated"):
        mtd_fast.load(bad)
    cut = tmp_path / "cut.pt"
    cut.write_bytes(path.read_bytes()[: len(data) // 3])
    with pytest.raises(ModelFileError, match="corrupt or truncated"):
        mtd_fast.load(cut)


def _resave(tmp_path, path, edit, name="edited.pt"):
    payload = torch.load(path, weights_only=True)
    payload.pop("digest")
    edit(payload)
    payload["digest"] = state_digest(payload)
    out = tmp_path / name
    torch.save(payload, out)
    return out


def test_non_finite_weights_are_refused(tmp_path, model_file):
    path, _ = model_file

    def nan(p):
        p["state_dict"]["item_emb.weight"][3, 1] = float("nan")

    with pytest.raises(ModelFileError, match=r"item_emb.weight holds 1 non-finite"):
        mtd_fast.load(_resave(tmp_path, path, nan))


@pytest.mark.parametrize("edit,match", [
    (lambda p: p.update(n_items=999), r"item_emb.weight has shape \(41, 8\).*expects \(1000, 8\).*n_items differs"),
    (lambda p: p["config"].update(colour="red"), r"unknown config key 'colour'"),
    (lambda p: p.pop("state_dict"), r"the field 'state_dict' is missing"),
    (lambda p: p.update(model="gpt"), r"unknown model 'gpt'"),
    (lambda p: p["state_dict"].pop("combine.weight"), r"do not fit .*missing combine.weight"),
    (lambda p: p.update(version=7), r"newer mtd_fast \(format version 7"),
])
def test_broken_model_files_are_named(tmp_path, model_file, edit, match):
    path, _ = model_file
    with pytest.raises(ModelFileError, match=match):
        mtd_fast.load(_resave(tmp_path, path, edit))


def test_version_1_files_still_load(tmp_path, model_file):
    path, model = model_file
    payload = torch.load(path, weights_only=True)
    payload.pop("digest")
    payload["version"] = 1
    torch.save(payload, tmp_path / "v1.pt")
    back = mtd_fast.load(tmp_path / "v1.pt")
    assert all(torch.equal(a, b) for a, b in zip(back.state_dict().values(), model.state_dict().values()))


# ---- item ids ----------------------------------------------------------------------------------------
def _sparse_dataset(big: int) -> Dataset:
    rng = np.random.default_rng(0)
    sessions = [list(rng.integers(1, 200, size=rng.integers(2, 8))) for _ in range(300)]
    sessions[17][1] = big
    test = [[int(x) for x in s] for s in sessions[250:]]
    return Dataset("sparse", Sessions.from_lists(sessions[:250]), expand_samples(Sessions.from_lists(test)))


@pytest.mark.parametrize("big", [1_000_000, 2**31 - 1])
def test_sparse_ids_refused_before_allocation_with_the_remedy(big):
    ds = _sparse_dataset(big)
    with pytest.raises(DataError, match=rf"largest item id is {big}.*{big:,} item rows.*only \d+ distinct items.*"
                                        r"compact_ids=True"):
        mtd_fast.train(ds, epochs=1, **TINY)


def test_compact_ids_round_trip(tmp_path):
    ds = _sparse_dataset(1_000_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        c = ds.compact()
    assert c.n_items == ds.distinct_items and c.original_ids[-1] == 1_000_000
    assert np.array_equal(c.original_ids[c.sessions.items], ds.sessions.items)
    r = mtd_fast.train(c, epochs=1, **TINY)
    top = r.model.recommend([[1_000_000, 5], [7]], k=10)
    assert set(top.flatten().tolist()) <= set(c.original_ids[1:].tolist())
    direct = r.model.original_ids
    r.model.original_ids = None  # the same query in compact ids gives the same items
    inner = r.model.recommend([[c.original_ids.searchsorted(1_000_000), c.original_ids.searchsorted(5)],
                               [c.original_ids.searchsorted(7)]], k=10)
    r.model.original_ids = direct
    assert torch.equal(top, torch.from_numpy(direct[inner.numpy()]))
    with pytest.raises(DataError, match=r"sessions\[0\]\[0\] = 999 is not an item of this model's catalogue"):
        r.model.recommend([[999]])
    mtd_fast.save(r.model, tmp_path / "c.pt")
    back = mtd_fast.load(tmp_path / "c.pt")
    assert torch.equal(back.recommend([[1_000_000, 5], [7]], k=10), top)
    with pytest.raises(DataError, match="compact_ids=True"):
        mtd_fast.evaluate(back, ds)  # original numbering: ids would mean other items


def test_load_dataset_compact_ids(tmp_path):
    ds = mtd_fast.load_dataset("synthetic", n_sessions=200, n_items=300, compact_ids=True)
    assert ds.original_ids is not None and ds.n_items == ds.distinct_items < 300
    with pytest.raises(DataError, match="compact_ids='yes' must be True or False"):
        mtd_fast.load_dataset("synthetic", compact_ids="yes")


def test_unseen_test_items_warn_with_the_count():
    train = Sessions.from_lists([[1, 2, 3], [2, 3, 4], [1, 4]] * 5)
    test = Samples.from_lists([[1], [2], [3]], [2, 9, 9])
    with pytest.warns(DataWarning, match=r"2 of 3 test samples \(66.7%\) have a target never clicked in the training "
                                         r"sessions \(1 distinct items\)"):
        Dataset("t", train, test)


def test_empty_validation_names_the_real_cause(caplog):
    sessions = Sessions.from_lists([[1, 2, 3, 4]] * 18 + [[5]] * 2)  # the last 10%: two one-click sessions
    ds = Dataset("short", sessions, Samples.from_lists([[1], [2]], [2, 3]))
    assert len(ds.valid) == 0
    with caplog.at_level(logging.WARNING, logger="mtd_fast"):
        mtd_fast.train(ds, epochs=1, graph_phases=0, **TINY)
    msg = " ".join(r.getMessage() for r in caplog.records)
    assert "2 validation sessions" in msg and "fewer than 2 clicks" in msg and "valid_fraction=0" not in msg


# ---- backend selection through train() and the CLI ---------------------------------------------
def test_env_backend_reaches_train_and_explicit_wins(small, monkeypatch):
    monkeypatch.setenv("MTD_FAST_BACKEND", "reference")
    r = mtd_fast.train(small, epochs=1, **TINY)
    assert set(r.backends.values()) == {"reference"}
    r = mtd_fast.train(small, epochs=1, backend="auto", **TINY)
    assert r.backends["global_graph"] != "reference" or "numba" not in mtd_fast.available_backends()["global_graph"]
    monkeypatch.setenv("MTD_FAST_BACKEND", "nope")
    with pytest.raises(Exception, match="unknown backend 'nope'"):
        mtd_fast.train(small, epochs=1, **TINY)


def test_env_backend_reaches_the_cli(tmp_path, monkeypatch):
    import json

    monkeypatch.setenv("MTD_FAST_BACKEND", "reference")
    js = tmp_path / "r.json"
    assert main(["train", "--epochs", "1", *SMALL, "--json", str(js)]) == 0
    assert set(json.loads(js.read_text())["backends"].values()) == {"reference"}
    assert main(["train", "--epochs", "1", *SMALL, "--backend", "auto", "--json", str(js)]) == 0
    assert "numba" not in mtd_fast.available_backends()["global_graph"] or \
        json.loads(js.read_text())["backends"]["global_graph"] == "numba"


# ---- command line ------------------------------------------------------------------------------------
def test_no_abbreviations(capsys):
    with pytest.raises(SystemExit) as e:
        main(["train", "--epoch", "3", *SMALL])
    assert e.value.code == 2 and "unrecognized arguments: --epoch 3" in capsys.readouterr().err


def test_flags_a_command_does_not_use_are_errors(capsys, tmp_path):
    folder = tmp_path / "data"
    mtd_fast.data.write_pickle_layout(folder, Sessions.from_lists([[1, 2, 3]] * 20), Samples.from_lists([[1]], [2]))
    assert main(["stats", "--data-dir", str(folder), "--n-items", "5"]) == 2
    assert "--n-items applies to the synthetic dataset only" in capsys.readouterr().err
    assert main(["train", "--resume", *SMALL]) == 2
    assert "--resume needs --run-dir" in capsys.readouterr().err


def test_output_paths_checked_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(Run, "go", lambda self: pytest.fail("trained before checking the output paths"))
    assert main(["train", *SMALL, "--save", str(tmp_path / "missing" / "m.pt")]) == 2
    assert "the folder" in capsys.readouterr().err
    assert main(["train", *SMALL, "--json", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    assert main(["train", *SMALL, "--run-dir", str(tmp_path / "run")]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_one_status_line_per_epoch_when_not_a_terminal(tmp_path):
    args = [a for a in SMALL if a != "--quiet"]
    r = subprocess.run([sys.executable, "-m", "mtd_fast", "train", "--epochs", "2", *args],
                       capture_output=True, text=True, timeout=300, cwd=tmp_path,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and "it/s" not in r.stderr  # no progress bar redraws into a pipe
    assert r.stdout.count("epoch 1/2") == 1 and r.stdout.count("epoch 2/2") == 1


def test_status_lines_once_when_logging_shows_info(small, capsys, caplog):
    with caplog.at_level(logging.INFO, logger="mtd_fast"):  # a handler on the root logger shows INFO records
        mtd_fast.train(small, epochs=1, hidden_size=8, batch_size=64, max_steps_per_epoch=2)
    out = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if "epoch 1/1" in r.getMessage()]
    assert len(logged) == 1 and "epoch 1/1" not in out.out + out.err
