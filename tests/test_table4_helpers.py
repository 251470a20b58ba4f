"""Unit tests of the Table 4 bench's helpers (the package `benches/table4/`): settings, the timed
training step (the trainer's own, checked against the loss and update by hand), checks, estimates, report and ratios,
and the peer client's protocol (against a stand-in peer; RecBole itself is not needed)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

PROJECT = Path(__file__).resolve().parents[1]


def _load_helpers():
    """benches/table4/ as the package `table4`, the name the bench imports it by (under pytest
    benches/ is on sys.path; here it is not, and is not put there): a spec from its __init__.py
    with the folder as its search path, so that its relative imports find the submodules."""
    name = "table4"
    if name in sys.modules:
        return sys.modules[name]
    folder = PROJECT / "benches" / "table4"
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # the submodules import from their package; dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


t4 = _load_helpers()


@pytest.fixture(scope="module")
def tiny():
    from mtd_fast import load_dataset

    return load_dataset("synthetic", n_sessions=300, n_items=60, seed=1)


# --------------------------------------------------------------------------- settings
def test_settings_defaults_full_and_smoke(tmp_path):
    s = t4.settings_from_env({}, tmp_path)
    assert s.datasets == ("yoochoose1_64", "diginetica", "retailrocket")
    assert s.models == t4.ALL_MODELS and s.peers == t4.PEER_MODELS
    assert (s.batch_size, s.hidden, s.steps, s.warmup, s.epochs, s.graph_steps) == (512, 100, 10, 1, 0, 1000)
    assert s.mode == "estimate" and s.prefix == "table4" and s.threads is None and s.recbole_python is None
    assert s.results == tmp_path / "benches" / "results"
    sm = t4.settings_from_env({"MTD_BENCH_SMOKE": "1"}, tmp_path)
    assert sm.smoke and sm.datasets == ("synthetic",) and sm.steps == 1 and sm.warmup == 0 and sm.threads == 1
    assert sm.prefix == "table4_smoke"


def test_settings_lists_and_errors(tmp_path):
    s = t4.settings_from_env({"MTD_T4_MODELS": " MTD, narm,mtd ", "MTD_T4_PEERS": "none", "MTD_T4_EPOCHS": "2",
                              "MTD_T4_DATASETS": "diginetica", "MTD_T4_RESULTS": str(tmp_path / "r"),
                              "MTD_BENCH_RECBOLE_PYTHON": "/x/python", "MTD_T4_THREADS": "3"}, tmp_path)
    assert s.models == ("mtd", "narm") and s.peers == () and s.epochs == 2 and s.mode == "epochs"
    assert s.datasets == ("diginetica",) and s.results == tmp_path / "r" and s.recbole_python == "/x/python"
    assert s.threads == 3
    assert t4.settings_from_env({"MTD_T4_PEERS": "all"}, tmp_path).peers == t4.PEER_MODELS
    with pytest.raises(t4.SettingsError, match="MTD_T4_MODELS.*'bert4rec'"):
        t4.settings_from_env({"MTD_T4_MODELS": "mtd,bert4rec"}, tmp_path)
    with pytest.raises(t4.SettingsError, match="MTD_T4_PEERS"):
        t4.settings_from_env({"MTD_T4_PEERS": "csrm"}, tmp_path)  # RecBole has no CSRM
    with pytest.raises(t4.SettingsError, match="MTD_T4_STEPS"):
        t4.settings_from_env({"MTD_T4_STEPS": "0"}, tmp_path)
    with pytest.raises(t4.SettingsError, match="MTD_T4_STEPS"):
        t4.settings_from_env({"MTD_T4_STEPS": "many"}, tmp_path)
    with pytest.raises(t4.SettingsError, match="MTD_T4_DEVICE"):
        t4.settings_from_env({"MTD_T4_DEVICE": "tpu"}, tmp_path)


# --------------------------------------------------------------------------- batches and the step
def test_plan_batches_follows_the_trainer_then_cycles():
    from mtd_fast.data import iter_batches

    got = t4.plan_batches(1000, 128, 5, seed=3)
    want = list(iter_batches(1000, 128, np.random.default_rng(3)))[:5]
    assert all(np.array_equal(a, b) for a, b in zip(got, want))
    small = t4.plan_batches(10, 4, 7, seed=0)  # 2 full batches per permutation, tail dropped
    assert len(small) == 7 and all(b.size == 4 for b in small)
    assert all(len(set(b.tolist())) == 4 for b in small)
    assert [b.size for b in t4.plan_batches(3, 512, 2, 0)] == [3, 3]  # n < batch: the whole set
    with pytest.raises(ValueError):
        t4.plan_batches(0, 4, 1, 0)


@pytest.mark.parametrize("model", ["stamp", "mtd"])
def test_timed_step_is_one_sgd_step_on_the_loss_by_hand(tiny, model):
    """The bench times the trainer's own `train_step`; what it computes, written out here:
    the mean cross-entropy of the batch targets (item j is score column j - 1) over the full
    catalogue + l2 * 0.5 sum ||theta||^2, one optimizer step on its gradient (plain SGD here, so
    the new weights are w - lr * g), and the loss before the step returned."""
    from mtd_fast.config import MTDConfig, TrainConfig
    from mtd_fast.train import build_model, train_step

    assert t4.steps.train_step is train_step  # the checked step runs the trainer's own
    cfg = TrainConfig(batch_size=32, dropout=0.0)  # no dropout: the loss by hand sees the same network
    lr, l2 = 0.5, 1e-3
    torch.manual_seed(0)
    net = build_model(model, tiny.n_items, MTDConfig(hidden_size=16), cfg)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    idx = t4.plan_batches(len(tiny.train), cfg.batch_size, 1, seed=5)[0]
    params = net.rec_parameters()
    got = train_step(net, tiny.train, idx, torch.optim.SGD(params, lr=lr), params, l2)

    torch.manual_seed(0)
    ref = build_model(model, tiny.n_items, MTDConfig(hidden_size=16), cfg)
    ref.train()
    ref_params = ref.rec_parameters()
    batch = ref.batch_from_sessions(tiny.train.prefixes, idx)
    targets = torch.from_numpy(tiny.train.targets[idx].astype(np.int64))
    scores = ref.scores(batch)
    assert scores.shape == (len(idx), tiny.n_items)
    loss = torch.nn.functional.cross_entropy(scores, targets - 1) + l2 * 0.5 * sum((p * p).sum() for p in ref_params)
    grads = dict(zip((id(p) for p in ref_params), torch.autograd.grad(loss, ref_params)))
    assert got == pytest.approx(float(loss.detach()), rel=1e-5)
    moved = 0
    for (name, p), (_, q) in zip(net.named_parameters(), ref.named_parameters()):
        want = q.detach() - lr * grads[id(q)] if id(q) in grads else before[name]
        torch.testing.assert_close(p.detach(), want, atol=1e-6, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
        moved += not torch.equal(p.detach(), before[name])
    assert moved > 2


def test_checked_step_reports_a_bad_step(tiny):
    from mtd_fast.config import MTDConfig, TrainConfig
    from mtd_fast.train import build_model

    net = build_model("gru4rec", tiny.n_items, MTDConfig(hidden_size=8), TrainConfig())
    params = net.rec_parameters()
    opt = torch.optim.Adam(params)
    idx = np.arange(16)
    rep = t4.checked_train_step(net, tiny.train, idx, opt, params, 1e-6)
    assert rep["ok"] and rep["grads_finite"] and rep["grad_norm"] > 0 and math.isfinite(rep["loss"])
    with torch.no_grad():
        params[0].fill_(float("nan"))
    rep = t4.checked_train_step(net, tiny.train, idx, opt, params, 1e-6)
    assert not rep["ok"]


def test_backend_comparison_passes_and_can_fail(tiny):
    from mtd_fast import ops
    from mtd_fast.config import MTDConfig, TrainConfig
    from mtd_fast.train import build_model

    mcfg, tcfg = MTDConfig(hidden_size=16), TrainConfig()
    torch.manual_seed(0)
    fast = build_model("mtd", tiny.n_items, mcfg, tcfg, ops.validate_spec("auto"))
    ref = build_model("mtd", tiny.n_items, mcfg, tcfg, ops.validate_spec("reference"))
    ref.load_state_dict(fast.state_dict())
    idx = np.arange(40)
    rep = t4.compare_rec_backends(fast, ref, tiny.train, idx, seed=3)
    assert rep["ok"], rep
    graph = ops.global_graph(tiny.train_sessions, tiny.n_items)
    dgi = t4.compare_dgi_backends(fast, ref, graph, seed=3)
    assert dgi["ok"], dgi
    with torch.no_grad():  # different weights: the check must notice
        ref.combine.weight.mul_(1.5)
        ref.gnn[0].weight.weight.mul_(1.5)
    assert not t4.compare_rec_backends(fast, ref, tiny.train, idx, seed=3)["ok"]
    assert not t4.compare_dgi_backends(fast, ref, graph, seed=3)["ok"]


def test_grad_rel_err_and_close():
    a, b = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(3))
    assert t4.grad_rel_err([a], [b]) == 0.0  # neither has a gradient
    a.grad, b.grad = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 4.004])
    assert t4.grad_rel_err([a], [b]) == pytest.approx(0.001, rel=1e-3)
    b.grad = None
    assert t4.grad_rel_err([a], [b]) == math.inf
    assert t4.close(10.0, 10.0 + 5e-4) and not t4.close(10.0, 10.01)


# --------------------------------------------------------------------------- estimates
def test_epoch_estimate_and_amortised():
    e = t4.epoch_estimate([0.5, 0.4, 10.0, 0.6], n_samples=1025, batch_size=512)
    assert e["steps_per_epoch"] == 3 and e["timed_steps"] == 4
    assert e["median_step_s"] == pytest.approx(0.55) and e["epoch_s"] == pytest.approx(1.65)
    assert e["epoch_s_from_mean"] == pytest.approx(3 * 11.5 / 4)
    with pytest.raises(ValueError):
        t4.epoch_estimate([], 10, 2)
    m = t4.measured_epochs([100.0, 120.0, 110.0], steps_per_epoch=10)
    assert m["epoch_s"] == 110.0 and m["median_step_s"] == 11.0 and m["timed_epochs"] == 3
    assert t4.amortised(12.0, 4) == 3.0 and t4.amortised(5.0, 1) == 5.0
    with pytest.raises(ValueError):
        t4.amortised(1.0, 0)


def test_fmt_seconds():
    assert [t4.fmt_seconds(x) for x in (None, float("nan"), 0.01234, 5.26, 123.4, 1234.5)] == \
        ["–", "–", "0.0123", "5.3", "123", "1,234"]


# --------------------------------------------------------------------------- the report
def _report(tmp_path) -> "t4.Report":
    s = t4.settings_from_env({"MTD_T4_DATASETS": "diginetica,retailrocket", "MTD_T4_MODELS": "mtd,narm,stamp",
                              "MTD_T4_PEERS": "narm"}, tmp_path)
    r = t4.Report(t4.settings_dict(s), {"date": "2026-11-29", "torch": "2.13.0", "torch_threads": 2, "cpus": 2,
                                        "recbole": {"recbole": "1.2.1"}})
    r.add_dataset("diginetica", status="ok", train_samples=1000, n_items=50, steps_per_epoch=2, rec_frequency=4)
    r.add_dataset("retailrocket", status="skipped", reason="data not found at /nowhere")
    r.add_row("mtd", "diginetica", "ok", epoch_s=100.0, median_step_s=50.0, timed_steps=3)
    r.add_row("narm", "diginetica", "ok", epoch_s=200.0, median_step_s=100.0, timed_steps=3)
    r.add_row("stamp", "diginetica", "failed", reason="training step check failed")
    r.add_row("recbole:narm", "diginetica", "skipped", reason="RecBole peer rows skipped: not set")
    r.add_graph("diginetica", "ok", amortised_s=20.0, phase_s=80.0, phase_steps=70, stopped_by="patience",
                rec_frequency=4, median_step_s=1.0, timed_steps=3, graph_build_s=0.1, graph_nodes=48, graph_nnz=300)
    return r


def test_report_cells_ratios_and_markdown(tmp_path):
    r = _report(tmp_path)
    assert r.epoch_s("mtd:total", "diginetica") == 120.0 and r.epoch_s("mtd:graph", "diginetica") == 20.0
    assert r.epoch_s("stamp", "diginetica") is None and r.epoch_s("mtd", "retailrocket") is None
    by = {(x["baseline"], x["dataset"]): x for x in r.ratios()}
    assert by[("narm", "diginetica")]["mtd_total_over_baseline"] == pytest.approx(0.6)
    assert by[("narm", "diginetica")]["mtd_rec_over_baseline"] == pytest.approx(0.5)
    assert by[("stamp", "diginetica")]["mtd_total_over_baseline"] is None
    md = r.markdown()
    assert "| Model | Diginetica | Retailrocket |" in md
    assert "| NARM | 200 | – |" in md
    assert "| **MTD** (rec. epoch + graph phase / f) | 120 | – |" in md
    assert "RecBole 1.2.1 NARM (peer)" in md
    assert "ESTIMATED" in md and "data not found at /nowhere" in md and "training step check failed" in md
    assert "RecBole peer rows skipped: not set" in md
    assert "| NARM | 0.60 | – |" in md  # MTD total / NARM
    doc = json.loads(json.dumps(r.to_json()))
    assert doc["table"]["NARM"] == {"diginetica": 200.0, "retailrocket": None}


def test_report_write_files(tmp_path):
    r = _report(tmp_path)
    paths = r.write(tmp_path / "out", "table4_test")
    assert paths["markdown"].read_text().startswith("# Table 4")
    assert json.loads(paths["json"].read_text())["settings"]["batch_size"] == 512
    if "chart" in paths:  # matplotlib installed (the test extra)
        assert paths["chart"].read_bytes()[:4] == b"\x89PNG"


def test_method_sentence_says_estimate_or_measured():
    assert "ESTIMATED" in t4.method_sentence({"epochs": 0, "steps": 15, "warmup": 2, "batch_size": 512})
    assert "MEASURED" in t4.method_sentence({"epochs": 1, "warmup": 2})


# --------------------------------------------------------------------------- the peer
def test_write_peer_samples(tiny, tmp_path):
    batches = t4.plan_batches(len(tiny.train), 16, 3, seed=0)
    info = t4.write_peer_samples(tmp_path / "s.npz", tiny.train, batches, tiny.n_items)
    z = np.load(tmp_path / "s.npz")
    idx = np.concatenate(batches)
    assert info["rows"] == 48 and np.array_equal(z["targets"], tiny.train.targets[idx])
    assert np.array_equal(z["items"][z["offsets"][5]:z["offsets"][6]], tiny.train.prefixes[int(idx[5])])
    assert int(z["n_items"]) == tiny.n_items
    assert z["longest_prefix"].size == tiny.train.prefixes.lengths.max() == info["longest_prefix"]


FAKE_PEER = textwrap.dedent("""
    import json, sys
    print(json.dumps({"ok": True, "ready": True, "recbole": "fake"}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if req["cmd"] == "quit":
            print(json.dumps({"ok": True}), flush=True); break
        if req["cmd"] == "step":
            print(json.dumps({"ok": True, "seconds": 0.25, "loss": 1.0}), flush=True)
        elif req["cmd"] == "die":
            sys.exit(3)
        else:
            print(json.dumps({"ok": False, "error": "unknown " + req["cmd"]}), flush=True)
""")


def test_peer_client_protocol(tmp_path):
    script = tmp_path / "fake_peer.py"
    script.write_text(FAKE_PEER)
    kw = dict(threads=1, device="cpu", batch=8, hidden=4, seed=0, shuffle=False, timeout_s=30)
    p = t4.PeerProcess(sys.executable, script, tmp_path / "x.npz", log_path=tmp_path / "a.log", **kw)
    assert p.hello["recbole"] == "fake"
    assert p.request("step")["seconds"] == 0.25
    with pytest.raises(t4.PeerError, match="unknown nope"):
        p.request("nope")
    with pytest.raises(t4.PeerError, match="exited with code 3"):
        p.request("die")
    p.close()
    with pytest.raises(t4.PeerUnavailable, match="does not exist"):
        t4.PeerProcess(str(tmp_path / "no-python"), script, tmp_path / "x.npz", log_path=tmp_path / "b.log", **kw)
    bad = tmp_path / "bad_peer.py"
    bad.write_text("import sys; sys.exit('no recbole here')\n")
    with pytest.raises(t4.PeerUnavailable, match="did not start"):
        t4.PeerProcess(sys.executable, bad, tmp_path / "x.npz", log_path=tmp_path / "c.log", **kw)
