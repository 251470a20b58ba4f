"""Exact resume: a run killed with SIGKILL at any point and resumed ends bit for bit where the
uninterrupted run ends (metrics, history without its timings, every weight); and the run
directory's files, refusals and fallbacks.

Each run is its own process (`_run_driver.py`): the kill is a real SIGKILL at a chosen call
of the trainer's step functions, and two processes agreeing is the determinism promise too.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

DRIVER = Path(__file__).with_name("_run_driver.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(out: Path, *args: str, expect_kill: bool = False, threads: int = 1) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(DRIVER), str(out), "--threads", str(threads), *args],
                       capture_output=True, text=True, timeout=300, env=ENV)
    if expect_kill:
        assert r.returncode == -9, (r.returncode, r.stderr[-2000:])
    else:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def assert_same_run(a: Path, b: Path) -> None:
    ja, jb = json.loads(a.read_text()), json.loads(b.read_text())
    assert ja == jb  # metrics, history (losses, graph phases, every metric) and best epoch, exactly
    wa, wb = torch.load(str(a) + ".pt"), torch.load(str(b) + ".pt")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, one per graph-mode family, each also writing a run directory."""
    d = tmp_path_factory.mktemp("ref")
    out = {}
    for mode in ("overwrite", "residual"):
        out[mode] = d / f"{mode}.json"
        run(out[mode], "--run-dir", str(d / f"run_{mode}"), "--option", f"graph_mode={mode}")
    return out


@pytest.mark.parametrize("mode,kill", [
    ("overwrite", "train_step:9"),   # epoch 2, step 3 of 6
    ("overwrite", "dgi_step:9"),     # graph phase 2, DGI step 3 of 6
    ("residual", "train_step:10"),   # per-step graph side: both optimizers mid-epoch
    ("overwrite", "replace:3"),      # while replacing checkpoint_last.pt (the temporary file is complete)
])
def test_killed_and_resumed_equals_uninterrupted(tmp_path, reference, mode, kill):
    rd = tmp_path / "run"
    opt = ["--option", f"graph_mode={mode}"]
    run(tmp_path / "dead.json", "--run-dir", str(rd), "--kill", kill, *opt, expect_kill=True)
    assert not (tmp_path / "dead.json").exists()
    assert (rd / "checkpoint_last.pt").is_file()
    run(tmp_path / "resumed.json", "--run-dir", str(rd), "--resume", *opt)
    assert_same_run(reference[mode], tmp_path / "resumed.json")
    lines = (rd / "epochs.jsonl").read_text().splitlines()
    assert [json.loads(x)["epoch"] for x in lines] == [1, 2, 3]  # no line twice, none missing
    record = json.loads((rd / "run.json").read_text())
    (resumed,) = record["resumes"]  # the one resumption, by the same checkout
    assert 0 <= resumed["after_epoch"] < 3 and resumed["commit"] == record["commit"]
    assert "--resume" in resumed["command"]
    assert sorted(p.name for p in rd.iterdir()) == ["checkpoint_best.pt", "checkpoint_last.pt", "curves.png",
                                                  "epochs.jsonl", "result.json", "run.json"]


@pytest.mark.parametrize("mode,kill,steps_saved", [
    ("residual", "train_step:10", 2),    # 9 steps done (epoch 2: 3 of 6); the last checkpoint after step 2
    ("overwrite", "train_step:11", 4),   # epoch 2: 4 of 6 done, after its graph phase
])
def test_killed_mid_epoch_resumes_from_the_mid_epoch_checkpoint(tmp_path, reference, mode, kill, steps_saved):
    """checkpoint_every=2: a run killed in epoch 2 resumes after that epoch's last saved step,
    not at its start, and still ends bit for bit where the uninterrupted run (which wrote no
    mid-epoch checkpoint) ends: the option changes nothing that is trained."""
    rd = tmp_path / "run"
    opt = ["--option", f"graph_mode={mode}", "--option", "checkpoint_every=2"]
    run(tmp_path / "dead.json", "--run-dir", str(rd), "--kill", kill, *opt, expect_kill=True)
    from mtd_fast.rundir import RunDir

    state, _ = RunDir(rd).load_checkpoint()
    assert state["position"]["epoch"] == 1 and state["position"]["step"] == steps_saved
    partial = state["partial_epoch"]
    assert partial["steps"] == steps_saved and partial["samples"] == 64 * steps_saved
    assert len(partial["dgi_values"]) == (steps_saved if mode == "residual" else 0)
    assert state["best_epoch"] == 1 and state["best_state"] is not None  # the model itself has moved on
    assert len((rd / "epochs.jsonl").read_text().splitlines()) == 1
    run(tmp_path / "resumed.json", "--run-dir", str(rd), "--resume", *opt)
    assert_same_run(reference[mode], tmp_path / "resumed.json")
    (resumed,) = json.loads((rd / "run.json").read_text())["resumes"]
    assert resumed["after_epoch"] == 1 and resumed["after_step"] == steps_saved
    assert [json.loads(x)["epoch"] for x in (rd / "epochs.jsonl").read_text().splitlines()] == [1, 2, 3]


def test_checkpoint_every_refusals(tmp_path):
    import mtd_fast

    ds = mtd_fast.load_dataset("synthetic", n_sessions=200, n_items=40)
    with pytest.raises(ValueError, match="checkpoint_every needs run_dir"):
        mtd_fast.train(ds, epochs=1, quiet=True, checkpoint_every=5)
    for bad in (0, -1, 2.5, True, "10"):
        with pytest.raises(ValueError, match=r"checkpoint_every=.* must be an int >= 1"):
            mtd_fast.train(ds, epochs=1, quiet=True, run_dir=tmp_path / "r", checkpoint_every=bad)


def test_malformed_mid_epoch_progress_is_named(tmp_path):
    """A checkpoint whose mid-epoch progress is damaged or does not fit the run (but whose
    digest fits: written so) is refused with the file named before anything is trained or
    noted, not resumed into a wrong epoch."""
    import mtd_fast
    from mtd_fast.rundir import RunDir, RunDirError

    ds = mtd_fast.load_dataset("synthetic", n_sessions=400, n_items=60)
    kw = dict(epochs=2, seed=0, quiet=True, hidden_size=16, batch_size=64, max_steps_per_epoch=4)
    rd = tmp_path / "run"
    mtd_fast.train(ds, run_dir=rd, **kw)
    state, _ = RunDir(rd).load_checkpoint()
    good = {"steps": 2, "loss_sum": 1.0, "samples": 128, "seconds": 1.0, "dgi_values": [0.5, 0.6]}
    for partial, step in [({**good, "steps": "2"}, 2),
                          ({**good, "steps": 4, "samples": 256}, 4),  # the epoch has 4 steps: not mid-epoch
                          ({**good, "dgi_values": ["x"]}, 2),
                          ({**good, "samples": 129}, 2),  # more than 2 batches of 64
                          (good, 3),  # the position disagrees with the progress
                          (None, 2)]:  # a step without progress
        state["partial_epoch"], state["position"]["step"] = partial, step
        RunDir(rd).save_checkpoint(state, best=False)
        with pytest.raises(RunDirError, match=r"checkpoint_last.pt: its mid-epoch progress does not fit this run"):
            mtd_fast.train(ds, run_dir=rd, resume=True, **{**kw, "epochs": 3})
    assert "resumes" not in json.loads((rd / "run.json").read_text())
    state["partial_epoch"], state["position"]["step"] = good, 2
    RunDir(rd).save_checkpoint(state, best=False)
    assert mtd_fast.train(ds, run_dir=rd, resume=True, **{**kw, "epochs": 3}).history[2]["train_samples"] > 128


def test_mid_epoch_checkpoints_are_a_newer_version(tmp_path):
    """A mid-epoch checkpoint is version 2 (an epoch's end stays 1): code that reads only
    version 1 would take it for an epoch's end and train the epoch's first steps twice; it
    refuses it instead (and falls back to the best, epoch-end checkpoint)."""
    import mtd_fast
    from mtd_fast.rundir import CHECKPOINT_FORMAT
    from mtd_fast.serialization import ModelFileError, read_payload

    ds = mtd_fast.load_dataset("synthetic", n_sessions=400, n_items=60)
    rd = tmp_path / "run"
    mtd_fast.train(ds, epochs=1, quiet=True, hidden_size=16, batch_size=64, max_steps_per_epoch=4, run_dir=rd)
    assert read_payload(rd / "checkpoint_last.pt", CHECKPOINT_FORMAT, 1, "checkpoint")["version"] == 1
    real = mtd_fast.rundir.RunDir.save_checkpoint
    kept = []

    def keep(self, state, best):
        real(self, state, best)
        if state["partial_epoch"] is not None:
            kept.append((self.path / "checkpoint_last.pt").read_bytes())

    mtd_fast.rundir.RunDir.save_checkpoint = keep
    try:
        mtd_fast.train(ds, epochs=1, quiet=True, hidden_size=16, batch_size=64, max_steps_per_epoch=4,
                       run_dir=tmp_path / "mid", checkpoint_every=2)
    finally:
        mtd_fast.rundir.RunDir.save_checkpoint = real
    (tmp_path / "mid.pt").write_bytes(kept[0])
    assert read_payload(tmp_path / "mid.pt", CHECKPOINT_FORMAT, 2, "checkpoint")["version"] == 2
    with pytest.raises(ModelFileError, match="written by a newer mtd_fast"):
        read_payload(tmp_path / "mid.pt", CHECKPOINT_FORMAT, 1, "checkpoint")


def test_resumed_mid_epoch_keeps_the_lr_the_warm_up_left():
    """The warm-up sets lr * (k + 1) / w at step k, and its last value (lr * w / w, not always
    lr to the last bit: 1e-4 * 13 / 13 != 1e-4) stays until the epoch ends; a resumption
    later in that epoch sets that value again instead of the epoch's lr."""
    import numpy as np

    import mtd_fast
    from mtd_fast.config import MTDConfig, TrainConfig
    from mtd_fast.train import EpochProgress, adam, build_model, rec_epoch

    assert 1e-4 * 13 / 13 != 1e-4
    ds = mtd_fast.load_dataset("synthetic", n_sessions=600, n_items=60)
    cfg = TrainConfig(lr=1e-4, warmup_steps=13, batch_size=32, max_steps_per_epoch=16)

    def lrs(progress):
        torch.manual_seed(0)
        net = build_model("stamp", ds.n_items, MTDConfig(hidden_size=8), cfg)
        opt = adam(net.rec_parameters(), lr=cfg.lr)
        seen = []
        rec_epoch(net, ds.train, opt, net.rec_parameters(), cfg, np.random.default_rng(0), True, 1,
                  progress=progress, on_step=lambda p, n: seen.append(opt.param_groups[0]["lr"]))
        return seen

    full = lrs(None)
    assert len(full) == 16 and full[12] == full[15] == 1e-4 * 13 / 13
    for start in (13, 14):
        assert lrs(EpochProgress(steps=start, loss_sum=1.0, samples=32 * start, seconds=1.0)) == full[start:]


def test_corrupt_last_checkpoint_falls_back_to_best(tmp_path, reference):
    rd = tmp_path / "run"
    opt = ["--option", "graph_mode=overwrite"]
    run(tmp_path / "dead.json", "--run-dir", str(rd), "--kill", "train_step:15", *opt, expect_kill=True)  # epoch 3
    last = rd / "checkpoint_last.pt"
    data = bytearray(last.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0xFF for b in data[mid:mid + 64])
    last.write_bytes(bytes(data))
    r = run(tmp_path / "resumed.json", "--run-dir", str(rd), "--resume", *opt)
    assert "checkpoint_last.pt" in r.stderr and "checksum mismatch" in r.stderr
    assert "checkpoint_best.pt" in r.stderr
    assert_same_run(reference["overwrite"], tmp_path / "resumed.json")


def test_truncated_last_checkpoint_resumed_through_the_cli(tmp_path, reference):
    """A checkpoint cut short (a disk filled mid-write by something other than our atomic
    writer) is named and skipped for the best one; the resume goes through `mtd-fast train
    --run-dir D --resume`, the command a user types, and ends where the uninterrupted run ends."""
    rd = tmp_path / "run"
    opt = ["--option", "graph_mode=overwrite"]
    run(tmp_path / "dead.json", "--run-dir", str(rd), "--kill", "train_step:15", *opt, expect_kill=True)  # epoch 3
    last = rd / "checkpoint_last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 3])
    out = tmp_path / "cli.json"
    cmd = [sys.executable, "-m", "mtd_fast", "train", "--dataset", "synthetic", "--n-sessions", "400",
           "--n-items", "60", "--epochs", "3", "--seed", "0", "--hidden-size", "16", "--graph-mode", "overwrite",
           "--graph-steps", "6", "--batch-size", "64", "--max-steps-per-epoch", "6", "--patience", "5",
           "--quiet", "--run-dir", str(rd), "--resume", "--json", str(out)]  # 1 thread: ENV
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=ENV)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "checkpoint_last.pt" in r.stderr and "checkpoint_best.pt" in r.stderr
    ref = json.loads(reference["overwrite"].read_text())
    assert json.loads(out.read_text())["metrics"] == ref["metrics"]
    bad = [c for c in cmd if c not in ("--resume", "--json", str(out))] + ["--checkpoint-every", "0"]
    bad[bad.index("--run-dir") + 1] = str(tmp_path / "other")
    r = subprocess.run(bad, capture_output=True, text=True, timeout=300, env=ENV)  # the flag reaches train()
    assert r.returncode != 0 and "checkpoint_every=0 must be an int >= 1" in r.stderr, r.stderr[-2000:]


def test_run_directory_contents(reference):
    rd = reference["overwrite"].parent / "run_overwrite"
    rec = json.loads((rd / "run.json").read_text())
    assert rec["format"] == "mtd_fast.run" and rec["identity"]["model"] == "mtd"
    ident = rec["identity"]
    assert ident["train_config"]["batch_size"] == 64 and ident["model_config"]["hidden_size"] == 16
    assert len(ident["dataset"]["content_sha256"]) == 64 and ident["dataset"]["n_items"] == 60
    assert rec["command"] and rec["mtd_fast_version"] and rec["torch"] == torch.__version__
    lines = [json.loads(x) for x in (rd / "epochs.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in lines] == [1, 2, 3]
    assert all(h["graph_loss"] is not None and set(h["valid"]) >= {"P@20", "MRR@20"} for h in lines)
    assert (rd / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads((rd / "result.json").read_text())
    assert result["metrics"] == json.loads(reference["overwrite"].read_text())["metrics"]


def test_resume_refusals(tmp_path, reference):
    import mtd_fast
    from mtd_fast.rundir import RunDirError

    ds = mtd_fast.load_dataset("synthetic", n_sessions=400, n_items=60)
    kw = dict(epochs=3, seed=0, quiet=True, hidden_size=16, graph_mode="overwrite", graph_steps=6, batch_size=64,
              max_steps_per_epoch=6, patience=5)
    with pytest.raises(ValueError, match="resume=True needs run_dir"):
        mtd_fast.train(ds, resume=True, **kw)
    with pytest.raises(RunDirError, match="does not exist"):
        mtd_fast.train(ds, run_dir=tmp_path / "none", resume=True, **kw)
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunDirError, match="is empty: nothing to resume"):
        mtd_fast.train(ds, run_dir=tmp_path / "empty", resume=True, **kw)
    done = reference["overwrite"].parent / "run_overwrite"
    with pytest.raises(RunDirError, match="already holds a run"):
        mtd_fast.train(ds, run_dir=done, **kw)
    with pytest.raises(RunDirError, match=r"train_config.lr: 0.001 in the run directory, 0.002 now"):
        mtd_fast.train(ds, run_dir=done, resume=True, **{**kw, "lr": 2e-3})
    other = mtd_fast.load_dataset("synthetic", n_sessions=400, n_items=60, seed=1)
    with pytest.raises(RunDirError, match="dataset.content_sha256"):
        mtd_fast.train(other, run_dir=done, resume=True, **kw)
    with pytest.raises(RunDirError, match="^resume: .*model: 'mtd' in the run directory, 'mtd-lo' now"):
        mtd_fast.train(ds, model="mtd-lo", run_dir=done, resume=True, **kw)
    # a run directory from before a config field existed resumes when the field is at its
    # default (new options default to the old behaviour), and refuses otherwise
    older = tmp_path / "older"
    shutil.copytree(done, older)
    rec = json.loads((older / "run.json").read_text())
    del rec["identity"]["model_config"]["score_scale"], rec["identity"]["train_config"]["warmup_steps"]
    (older / "run.json").write_text(json.dumps(rec))
    mtd_fast.train(ds, run_dir=older, resume=True, **kw)
    with pytest.raises(RunDirError, match=r"model_config.score_scale: absent in the run directory, 5.0 now"):
        mtd_fast.train(ds, run_dir=older, resume=True, **{**kw, "score_scale": 5.0})
    newer = tmp_path / "newer"
    newer.mkdir()
    rec = json.loads((done / "run.json").read_text())
    (newer / "run.json").write_text(json.dumps({**rec, "version": 99}))
    with pytest.raises(RunDirError, match="newer mtd_fast .*version 99"):
        mtd_fast.train(ds, run_dir=newer, resume=True, **kw)


def test_finished_run_resumes_to_the_same_result(tmp_path, reference):
    """Resuming a complete run trains nothing and returns its result again; more epochs extend it."""
    import shutil

    import mtd_fast

    rd = tmp_path / "run"
    shutil.copytree(reference["overwrite"].parent / "run_overwrite", rd)
    ds = mtd_fast.load_dataset("synthetic", n_sessions=400, n_items=60)
    kw = dict(seed=0, quiet=True, hidden_size=16, graph_mode="overwrite", graph_steps=6, batch_size=64,
              max_steps_per_epoch=6, patience=5)
    # The reference epochs ran in a 1-thread process: this process trains at 1 thread too, since
    # CPU reductions (and so the losses' last bits) depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        r = mtd_fast.train(ds, epochs=3, run_dir=rd, resume=True, **kw)
        assert r.metrics == json.loads(reference["overwrite"].read_text())["metrics"]
        longer = mtd_fast.train(ds, epochs=4, run_dir=rd, resume=True, **kw)
        straight = mtd_fast.train(ds, epochs=4, **kw)
    finally:
        torch.set_num_threads(threads)
    assert [h["train_loss"] for h in longer.history] == [h["train_loss"] for h in straight.history]
    assert longer.metrics == straight.metrics


def test_checkpoint_that_does_not_fit(tmp_path):
    """A checkpoint whose tensors do not fit the model is named, not a raw RuntimeError."""
    import mtd_fast
    from mtd_fast.rundir import RunDir

    ds = mtd_fast.load_dataset("synthetic", n_sessions=400, n_items=60)
    kw = dict(epochs=1, seed=0, quiet=True, hidden_size=16, batch_size=64, max_steps_per_epoch=2)
    rd = tmp_path / "run"
    mtd_fast.train(ds, run_dir=rd, **kw)
    found = RunDir(rd).load_checkpoint()
    state = found[0]
    state["model"]["item_emb.weight"] = torch.zeros(7, 16)
    RunDir(rd).save_checkpoint(state, best=True)
    with pytest.raises(ValueError, match=r"item_emb.weight has shape \(7, 16\).*expects \(61, 16\)"):
        mtd_fast.train(ds, run_dir=rd, resume=True, **{**kw, "epochs": 2})


def test_code_versions_follow_the_resumptions(tmp_path):
    """run.json's resumes -> which commit trained which epochs: equal neighbours merge, and a
    resumption from an earlier checkpoint (a corrupt last one) hands the redone epochs over."""
    from mtd_fast.rundir import RunDir

    def prov(commit: str) -> dict:
        return {"commit": commit, "commit_dirty": False, "command": f"mtd-fast train ({commit})",
                "created": "2026-12-02T00:00:00+00:00", "api_call": "x"}

    rd = RunDir(tmp_path)
    rd.start({"model": "mtd"}, prov("a"))
    assert rd.code_versions() == [{"from_epoch": 1, "commit": "a", "commit_dirty": False}]
    rd.note_resume(3, prov("b"))
    rd.note_resume(5, prov("b"))
    assert rd.code_versions() == [{"from_epoch": 1, "commit": "a", "commit_dirty": False},
                                  {"from_epoch": 4, "commit": "b", "commit_dirty": False}]
    rd.note_resume(2, prov("c"))  # back to the checkpoint after epoch 2: epochs 3.. are c's
    assert rd.code_versions() == [{"from_epoch": 1, "commit": "a", "commit_dirty": False},
                                  {"from_epoch": 3, "commit": "c", "commit_dirty": False}]
    assert [r["after_epoch"] for r in json.loads((tmp_path / "run.json").read_text())["resumes"]] == [3, 5, 2]
    rd.note_resume(6, prov("e"))  # a run that had stopped after 6 epochs, resumed only to finish it
    assert rd.code_versions(epochs_run=6) == [{"from_epoch": 1, "commit": "a", "commit_dirty": False},
                                              {"from_epoch": 3, "commit": "c", "commit_dirty": False}]
    assert rd.code_versions()[-1] == {"from_epoch": 7, "commit": "e", "commit_dirty": False}
    assert not RunDir(tmp_path, writer=False).note_resume(9, prov("d"))  # rank > 0 writes nothing
    assert len(json.loads((tmp_path / "run.json").read_text())["resumes"]) == 4
    # mid-epoch checkpoints: a stretch starts at a step of an epoch, and one from an earlier
    # point (the last checkpoint broken: back to the previous one) replaces what came after
    rd.note_resume(7, prov("f"), steps_done=200)
    assert rd.code_versions()[-1] == {"from_epoch": 8, "from_step": 201, "commit": "f", "commit_dirty": False}
    rd.note_resume(7, prov("g"), steps_done=100)
    rd.note_resume(7, prov("g"), steps_done=400)
    assert rd.code_versions()[-2:] == [{"from_epoch": 7, "commit": "e", "commit_dirty": False},
                                       {"from_epoch": 8, "from_step": 101, "commit": "g", "commit_dirty": False}]
    assert json.loads((tmp_path / "run.json").read_text())["resumes"][-1]["after_step"] == 400
