"""Training API: result contract, validation-only model selection, learning, save/load, errors."""
from __future__ import annotations

import sys

import pytest
import torch

import mtd_fast
from mtd_fast.metrics import METRIC_KEYS

from testing import pop_p20

FAST = dict(quiet=True)


@pytest.fixture(scope="module")
def trained(synthetic):
    return mtd_fast.train(synthetic, epochs=2, seed=0, **FAST)


def test_result_contract(trained):
    r = trained
    assert set(METRIC_KEYS) <= set(r.metrics)
    assert set(r.metrics["best_on_test"]) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        assert 0 <= r.metrics[k] <= 100 and r.metrics["best_on_test"][k] >= r.metrics[k] - 1e-9
    assert len(r.history) == 2
    for h in r.history:
        for key in ("epoch", "train_loss", "graph_loss", "graph_seconds", "train_seconds", "valid"):
            assert key in h
        assert set(h["valid"]) == set(METRIC_KEYS)
    assert r.history[0]["graph_loss"] is not None  # f = 1 on synthetic data
    assert r.best_epoch in (1, 2)
    assert set(r.backends) == set(mtd_fast.available_backends())


def test_mtd_learns_and_beats_popularity(synthetic, trained):
    pop = pop_p20(synthetic)
    assert trained.metrics["P@20"] > 1.5 * pop, (trained.metrics["P@20"], pop)


def test_model_selection_never_looks_at_test(synthetic, monkeypatch):
    """Script the evaluations: validation is best at epoch 2, test at epoch 3."""
    tr = sys.modules["mtd_fast.train"]
    valid_p20 = iter([10.0, 30.0, 20.0, 15.0, 12.0])
    test_p20 = iter([1.0, 2.0, 50.0, 3.0, 4.0])

    def fake_eval(model, samples, *a, **k):
        which = "valid" if samples is synthetic.valid else "test"
        if which == "test" and not hasattr(fake_eval, "done"):
            v = next(test_p20, None)
            if v is None:  # the final evaluation after restoring the best weights
                fake_eval.done = True
                return {key: -1.0 for key in METRIC_KEYS}
        elif which == "test":
            return {key: -1.0 for key in METRIC_KEYS}
        else:
            v = next(valid_p20)
        return {key: v for key in METRIC_KEYS}

    monkeypatch.setattr(tr, "evaluate_samples", fake_eval)
    r = mtd_fast.train(synthetic, epochs=8, patience=3, graph_phases=0, max_steps_per_epoch=1, **FAST)
    assert r.best_epoch == 2  # chosen on validation, not on test (test peaks at epoch 3)
    assert len(r.history) == 5  # epochs 3, 4, 5 did not beat epoch 2: stopped after patience=3 of 8
    assert r.metrics["best_on_test"]["P@20"] == 50.0  # the published protocol, reported apart


def test_early_stopping_stops(synthetic, monkeypatch):
    tr = sys.modules["mtd_fast.train"]
    vals = iter([5.0, 4.0, 3.0, 2.0, 1.0, 0.5])

    def fake_eval(model, samples, *a, **k):
        v = next(vals) if samples is synthetic.valid else 0.0
        return {key: v for key in METRIC_KEYS}

    monkeypatch.setattr(tr, "evaluate_samples", fake_eval)
    r = mtd_fast.train(synthetic, epochs=10, patience=2, graph_phases=0, max_steps_per_epoch=1, **FAST)
    assert len(r.history) == 3 and r.best_epoch == 1


def test_best_weights_are_restored(synthetic):
    r = mtd_fast.train(synthetic, epochs=2, graph_phases=0, max_steps_per_epoch=3, eval_test_each_epoch=False, **FAST)
    again = mtd_fast.evaluate(r.model, synthetic, split="valid")
    assert again == pytest.approx(r.history[r.best_epoch - 1]["valid"])
    assert r.metrics["best_on_test"] is None


def test_seed_reproducible(synthetic):
    a = mtd_fast.train(synthetic, epochs=1, seed=7, max_steps_per_epoch=4, **FAST)
    b = mtd_fast.train(synthetic, epochs=1, seed=7, max_steps_per_epoch=4, **FAST)
    c = mtd_fast.train(synthetic, epochs=1, seed=8, max_steps_per_epoch=4, **FAST)
    assert a.history[0]["train_loss"] == b.history[0]["train_loss"]
    assert a.history[0]["train_loss"] != c.history[0]["train_loss"]


def test_save_load_roundtrip(tmp_path, trained, synthetic):
    path = tmp_path / "mtd.pt"
    mtd_fast.save(trained.model, path)
    model = mtd_fast.load(path)
    sessions = [[12, 7, 7, 301], [5], [1, 2, 3]]
    assert torch.equal(model.recommend(sessions, k=20), trained.model.recommend(sessions, k=20))
    assert mtd_fast.evaluate(model, synthetic) == pytest.approx({k: trained.metrics[k] for k in METRIC_KEYS})


def test_load_refuses_foreign_files(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a mtd_fast model file"):
        mtd_fast.load(tmp_path / "other.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00\x01junk")
    with pytest.raises(ValueError, match="not a mtd_fast model file"):
        mtd_fast.load(tmp_path / "junk.pt")
    with pytest.raises(FileNotFoundError):
        mtd_fast.load(tmp_path / "missing.pt")


def test_bad_arguments_are_named(synthetic):
    with pytest.raises(TypeError, match="unknown option 'learning_rate'"):
        mtd_fast.train(synthetic, learning_rate=0.1)
    with pytest.raises(ValueError, match="unknown model 'gpt'"):
        mtd_fast.train(synthetic, model="gpt")
    with pytest.raises(ValueError, match="epochs=0"):
        mtd_fast.train(synthetic, epochs=0)
    with pytest.raises(ValueError, match="lr=-1"):
        mtd_fast.train(synthetic, lr=-1)
    with pytest.raises(TypeError, match="Dataset"):
        mtd_fast.train([[1, 2, 3]])
    with pytest.raises(ValueError, match="split='train'"):
        mtd_fast.evaluate(mtd_fast.MTD(500), synthetic, split="train")
    with pytest.raises(ValueError, match="beyond|cannot rank"):
        mtd_fast.evaluate(mtd_fast.MTD(10), synthetic)


def test_reference_backend_forced(synthetic):
    r = mtd_fast.train(synthetic, epochs=1, backend="reference", max_steps_per_epoch=2, **FAST)
    assert set(r.backends.values()) == {"reference"}


def test_input_errors_fail_before_training(synthetic):
    from mtd_fast.data import DataError, Dataset, Samples, Sessions

    no_test = Dataset("no-test", synthetic.sessions, Samples.from_lists([], []), n_items=synthetic.n_items)
    with pytest.raises(DataError, match="no test samples"):
        mtd_fast.train(no_test, epochs=1, quiet=True)
    repeats = Dataset("repeats", Sessions.from_lists([[1, 1, 1], [2, 2]] * 10), Samples.from_lists([[1]], [2]))
    with pytest.raises(DataError, match="global graph is empty"):
        mtd_fast.train(repeats, epochs=1, quiet=True)
    assert mtd_fast.train(repeats, epochs=1, quiet=True, graph_phases=0, hidden_size=8).best_epoch == 1
    with pytest.raises(ValueError, match="graph_weighted=True is invalid: graph_encoder='gat'"):
        mtd_fast.train(synthetic, model="mtd-ga", graph_weighted=True)


def test_num_threads_applies_to_the_run_only(synthetic):
    before = torch.get_num_threads()
    mtd_fast.train(synthetic, epochs=1, num_threads=1, max_steps_per_epoch=1, graph_phases=0, **FAST)
    assert torch.get_num_threads() == before


def test_fused_adam_step_advances_versions_so_the_table_cache_follows(synthetic):
    """The trainer's Adam is fused on the CPU, and torch's fused step writes the weights
    without advancing their version counters; `adam` advances them, so MTD's cached
    evaluation table follows every step (a stale one scored the first test of this file)."""
    from mtd_fast.ops import global_graph
    from mtd_fast.train import adam

    net = mtd_fast.MTD(synthetic.n_items, mtd_fast.MTDConfig(hidden_size=8))
    net.set_graph(global_graph(synthetic.train_sessions, synthetic.n_items))
    opt = adam(net.parameters(), lr=0.1)
    assert all(g["fused"] for g in opt.param_groups)
    with torch.no_grad():
        before = net.item_table().clone()
    for p in net.parameters():
        p.grad = torch.ones_like(p)
    versions = [p._version for p in net.parameters()]
    opt.step()
    assert all(p._version > v for p, v in zip(net.parameters(), versions))
    with torch.no_grad():
        after = net.item_table()
        assert not torch.equal(after, before) and torch.equal(after, net.propagate()[0])


def test_table_cache_never_serves_a_training_mode_table_in_eval_mode(synthetic):
    """With graph_dropout the training-mode table carries a dropout draw; the cache is keyed
    on the mode, so an eval-mode read after a no-grad train-mode read gets the eval table."""
    from mtd_fast.ops import global_graph

    net = mtd_fast.MTD(synthetic.n_items, mtd_fast.MTDConfig(hidden_size=8, graph_dropout=0.5))
    net.set_graph(global_graph(synthetic.train_sessions, synthetic.n_items))
    net.train()
    with torch.no_grad():
        dropped = net.item_table().clone()
    net.eval()
    with torch.no_grad():
        table = net.item_table()
        assert torch.equal(table, net.propagate()[0]) and not torch.equal(table, dropped)


def test_resumed_optimizer_keeps_the_fused_step():
    """A checkpoint saved by the unfused Adam (runs from before `adam`) carries fused=None in
    its param groups; after loading it the trainer's optimizer is fused again, same state."""
    from mtd_fast.train import adam, keep_fused

    p = torch.nn.Parameter(torch.randn(4, 3))
    old = torch.optim.Adam([p], lr=1e-3)
    p.grad = torch.randn(4, 3)
    old.step()
    new = adam([p], lr=1e-3)
    new.load_state_dict(old.state_dict())
    assert not new.param_groups[0]["fused"]
    keep_fused(new, True)
    assert new.param_groups[0]["fused"]
    assert torch.equal(new.state[p]["exp_avg"], old.state[p]["exp_avg"])
    new.step()  # the fused kernel runs on the loaded state
