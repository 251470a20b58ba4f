"""`ops.common.normalize_rows` and `permute_rows`: the hand-written backward passes MTD's step
uses on item-table-sized tensors give the values and gradients of the plain PyTorch forms
(`F.normalize`, `x[perm]`), and bad permutations are refused."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mtd_fast.config import MTDConfig
from mtd_fast.data import load_dataset
from mtd_fast.models import MTD
from mtd_fast.ops import global_graph
from mtd_fast.ops.common import normalize_rows, permute_rows


def _grads(fn, x: torch.Tensor, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normalize_rows_matches_f_normalize(dtype):
    torch.manual_seed(0)
    x = torch.randn(257, 33, dtype=dtype) * torch.rand(257, 1, dtype=dtype) * 5
    x[3] = 0.0  # a zero row: the norm is clamped to eps, the gradient is g / eps
    x[7] = 1e-14  # a row below eps
    g = torch.randn_like(x)
    want_y, want_g = _grads(lambda t: F.normalize(t, dim=-1), x, g)
    got_y, got_g = _grads(normalize_rows, x, g)
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    torch.testing.assert_close(got_y, want_y, rtol=tol, atol=tol)
    live = torch.ones(len(x), dtype=torch.bool)
    live[[3, 7]] = False
    torch.testing.assert_close(got_g[live], want_g[live], rtol=tol, atol=tol)
    # clamped rows (norm < eps): the gradient is g / eps, ~1e12 here
    torch.testing.assert_close(got_g[~live], g[~live] / 1e-12, rtol=tol, atol=0)
    torch.testing.assert_close(want_g[~live], got_g[~live], rtol=tol, atol=0)
    assert torch.linalg.vector_norm(got_y[10:], dim=-1).sub(1).abs().max() < tol


def test_normalize_rows_gradcheck():
    torch.manual_seed(1)
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(normalize_rows, (x,))


def test_permute_rows_matches_indexing():
    torch.manual_seed(2)
    x = torch.randn(50, 7, dtype=torch.float64)
    g = torch.randn_like(x)
    perm = torch.randperm(50)
    want_y, want_g = _grads(lambda t: t[perm], x, g)
    got_y, got_g = _grads(lambda t: permute_rows(t, perm), x, g)
    assert torch.equal(got_y, want_y) and torch.equal(got_g, want_g)
    assert torch.autograd.gradcheck(lambda t: permute_rows(t, perm), (x[:, :2].clone().requires_grad_(),))


@pytest.mark.parametrize("perm, match", [
    (torch.tensor([0, 1, 1, 3]), "repeats an index"),
    (torch.tensor([0, 1, 2]), "shape"),
    (torch.tensor([0, 1, 2, 4]), "indices in 0..3"),
    (torch.tensor([-1, 0, 1, 2]), "indices in 0..3"),
])
def test_permute_rows_refuses_what_is_not_a_permutation(perm, match):
    with pytest.raises(ValueError, match=match):
        permute_rows(torch.zeros(4, 2), perm)


def test_mtd_multitask_loss_gradients_unchanged_by_the_row_ops(monkeypatch):
    """MTD's per-step loss (residual table, cosine scores, DGI with a fixed corruption) has the
    same value and gradients through the hand-written row ops as through F.normalize and
    advanced indexing (float64, so only the order of sums can differ)."""
    import mtd_fast.models.mtd as mtd_module

    ds = load_dataset("synthetic", n_items=60, n_sessions=300, seed=4)
    torch.manual_seed(5)
    net = MTD(ds.n_items, MTDConfig(hidden_size=16)).double().eval()  # eval: no dropout draws
    net.set_graph(global_graph(ds.train_sessions, ds.n_items))
    batch = net.batch_from_sessions(ds.train.prefixes, list(range(64)))
    targets = torch.from_numpy(ds.train.targets[:64].astype("int64"))
    perm = torch.randperm(net.graph.num_nodes)

    def run():
        net.zero_grad(set_to_none=True)
        loss, _ = net.multitask_loss(batch, targets, 1.0, perm=perm)
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    loss, grads = run()
    monkeypatch.setattr(mtd_module, "normalize_rows", lambda t: F.normalize(t, dim=-1))
    monkeypatch.setattr(mtd_module, "permute_rows", lambda t, p: t[p])
    plain_loss, plain_grads = run()
    torch.testing.assert_close(loss, plain_loss, rtol=1e-12, atol=1e-12)
    assert grads.keys() == plain_grads.keys() and "item_emb.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("kw", [dict(num_gcn_layers=1), dict(num_gcn_layers=2), dict(graph_encoder="gat"),
                                dict(residual_form="light", num_gcn_layers=2)])
def test_dgi_pair_shares_the_first_layer_product_and_is_the_two_passes(kw):
    """graph_output_pair(h0, perm) = (graph_output(h0), graph_output(h0[perm])): values and the
    gradients of every input and weight (float64), whatever the encoder shares."""
    ds = load_dataset("synthetic", n_items=60, n_sessions=300, seed=6)
    torch.manual_seed(7)
    net = MTD(ds.n_items, MTDConfig(hidden_size=12, **kw)).double()
    net.set_graph(global_graph(ds.train_sessions, ds.n_items))
    n = net.graph.num_nodes
    perm = torch.randperm(n)
    gen = torch.Generator().manual_seed(8)
    g1, g2 = torch.randn(n, 12, generator=gen, dtype=torch.float64), torch.randn(n, 12, generator=gen,
                                                                                 dtype=torch.float64)

    def grads(pair: bool):
        net.zero_grad(set_to_none=True)
        h0 = torch.randn(n, 12, generator=torch.Generator().manual_seed(9), dtype=torch.float64).requires_grad_()
        if pair:
            h, hn = net.graph_output_pair(h0, perm)
        else:
            h, hn = net.graph_output(h0), net.graph_output(h0[perm])
        ((h * g1).sum() + (hn * g2).sum()).backward()
        return [h.detach(), hn.detach(), h0.grad] + [p.grad for p in net.gnn.parameters() if p.grad is not None]

    got, want = grads(True), grads(False)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
