"""The length-bucketed CPU backend "packed" (`mtd_fast.ops.session_attention`, `mtd_fast.ops.aggregate`)
against the reference.

Outputs and the gradient of every input with one upstream gradient, on awkward shapes
(length-1 sessions, short sessions padded to long widths, odd lengths 19 and 50, prime
batch sizes, hidden 100 and 64, 1 and several heads, with and without a dropout mask,
both aggregation modes, gamma float and tensor), plus float64 gradcheck of the
hand-written attention backward.

Tolerances (dtype, atol, rtol):
| float32 | 2e-5 | 1e-4 | same math in another summation order (groups of <= 64 columns
  instead of padded rows); measured <= 4e-6 at these sizes |
| float64 | gradcheck defaults (eps 1e-6, atol 1e-5, rtol 1e-3) |
"""
from __future__ import annotations

import importlib

import pytest
import torch
from _checks import assert_padded_rows_zero

import mtd_fast.ops as ops
from mtd_fast.ops.aggregate import aggregate_packed, aggregate_ref
from mtd_fast.ops.session_attention import length_buckets, session_attention_packed, session_attention_ref

# the op modules (the package attributes of the same names are the op functions)
attention_mod = importlib.import_module("mtd_fast.ops.session_attention")
aggregate_mod = importlib.import_module("mtd_fast.ops.aggregate")

ATOL, RTOL = 2e-5, 1e-4


@pytest.fixture(autouse=True)
def _always_packed(monkeypatch, request):
    # the shapes here are small: without this the size guard would send them to the reference
    if "size_guard" not in request.node.name:
        monkeypatch.setattr(attention_mod, "SMALL_ATTENTION", 0)
        monkeypatch.setattr(aggregate_mod, "SMALL_AGGREGATE", 0)


def _close(name, got, want):
    assert got is not None, f"{name}: no gradient"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=lambda m: f"{name}: {m}")


def _lengths(b, L, gen, fixed=None):
    if fixed is not None:
        return torch.tensor(fixed)
    lens = torch.randint(1, L + 1, (b,), generator=gen)
    lens[0], lens[-1] = 1, L
    return lens


def test_length_buckets_cover_every_session_once():
    lens = torch.tensor([1, 2, 3, 4, 5, 8, 9, 16, 17, 50, 50, 1, 33])
    groups = length_buckets(lens, 50, min_width=1)
    seen = torch.cat([idx for idx, _ in groups]).sort().values
    assert torch.equal(seen, torch.arange(lens.numel()))
    for idx, w in groups:
        assert (lens[idx] <= w).all() and w <= 50
        assert w == 50 or (w & (w - 1)) == 0  # powers of two, capped at the width
    assert [w for _, w in groups] == [1, 2, 4, 8, 16, 32, 50]
    assert [w for _, w in length_buckets(lens, 50)] == [4, 8, 16, 32, 50]  # default: 1-4 share one group
    assert [w for _, w in length_buckets(torch.tensor([1, 2, 3]), 3)] == [3]


ATTN_CASES = [
    pytest.param(7, 19, 100, 1, False, None, id="B7-L19-d100-h1"),
    pytest.param(7, 19, 100, 1, True, None, id="B7-L19-d100-h1-drop"),
    pytest.param(5, 50, 100, 4, True, None, id="B5-L50-d100-h4-drop"),
    pytest.param(11, 50, 64, 2, False, None, id="B11-L50-d64-h2"),
    pytest.param(3, 1, 100, 1, True, None, id="B3-L1-d100"),
    pytest.param(5, 50, 64, 1, True, [1, 2, 3, 1, 7], id="B5-L50-short-sessions-only"),  # no group at full width
    pytest.param(3, 19, 64, 1, False, [25, 19, 4], id="B3-L19-length-beyond-width"),  # reference: all rows valid
]


@pytest.mark.parametrize("b,L,d,h,dropout,lengths", ATTN_CASES)
def test_session_attention_packed_matches_reference(b, L, d, h, dropout, lengths):
    gen = torch.Generator().manual_seed(b * 100 + L + d)
    q, k, v = (torch.randn(b, L, d, generator=gen) for _ in range(3))
    lens = _lengths(b, L, gen, lengths)
    mask = (torch.rand(b, h, L, L, generator=gen) < 0.7).float() / 0.7 if dropout else None
    go = torch.randn(b, L, d, generator=gen)
    res = []
    for fn in (session_attention_packed, session_attention_ref):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = fn(*ins, lens, num_heads=h, dropout_mask=mask)
        res.append((out,) + torch.autograd.grad(out, ins, go))
    for name, x, y in zip(("out", "dq", "dk", "dv"), *res):
        _close(name, x, y)
    out = res[0][0]
    assert_padded_rows_zero(out, lens.tolist())


def test_session_attention_packed_partial_grads_and_strides():
    gen = torch.Generator().manual_seed(5)
    b, L, d = 7, 19, 100
    qkv = torch.randn(b, L, 3 * d, generator=gen)
    lens = _lengths(b, L, gen)
    go = torch.randn(b, L, d, generator=gen)
    q, k = qkv[..., :d], qkv[..., d:2 * d]  # non-contiguous views, no grad
    v = qkv[..., 2 * d:].clone().requires_grad_(True)
    out = session_attention_packed(q, k, v, lens, num_heads=4)
    (dv,) = torch.autograd.grad(out, (v,), go)
    v2 = v.detach().clone().requires_grad_(True)
    ref = session_attention_ref(q, k, v2, lens, num_heads=4)
    (dv2,) = torch.autograd.grad(ref, (v2,), go)
    _close("out", out, ref)
    _close("dv", dv, dv2)


def test_session_attention_packed_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    b, L, d, h = 4, 6, 4, 2
    ins = [torch.randn(b, L, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lens = torch.tensor([1, 6, 3, 2])
    mask = (torch.rand(b, h, L, L, generator=gen) < 0.7).double() / 0.7
    assert torch.autograd.gradcheck(lambda q, k, v: session_attention_packed(q, k, v, lens, h, mask), ins)
    assert torch.autograd.gradcheck(lambda q, k, v: session_attention_packed(q, k, v, lens, h, None), ins)


AGG_CASES = [
    pytest.param(7, 19, 100, 0.75, None, id="B7-L19-d100-float"),
    pytest.param(7, 19, 100, "t", None, id="B7-L19-d100-tensor"),
    pytest.param(5, 50, 64, "t", None, id="B5-L50-d64-tensor"),
    pytest.param(5, 50, 100, -0.4, [1, 2, 3, 50, 9], id="B5-L50-negative-gamma"),
    pytest.param(3, 1, 100, "t", None, id="B3-L1-d100-tensor"),
    pytest.param(3, 19, 64, "t", [25, 19, 4], id="B3-L19-length-beyond-width"),
]


@pytest.mark.parametrize("mode", ["additive", "product"])
@pytest.mark.parametrize("b,L,d,gamma,lengths", AGG_CASES)
def test_aggregate_packed_matches_reference(b, L, d, gamma, lengths, mode):
    gen = torch.Generator().manual_seed(b * 100 + L + d)
    h, hp = torch.randn(b, L, d, generator=gen), torch.randn(b, L, d, generator=gen)
    a, g = torch.randn(b, d, generator=gen), torch.randn(d, generator=gen)
    lens = _lengths(b, L, gen, lengths)
    gx, gp = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    res = []
    for fn in (aggregate_packed, aggregate_ref):
        ins = [t.clone().requires_grad_(True) for t in (h, hp, a, g)]
        gam = gamma
        if gamma == "t":
            gam = torch.tensor(0.75, requires_grad=True)
            ins.append(gam)
        xs, ps = fn(*ins[:4], lens, gamma=gam, mode=mode)
        res.append((xs, ps) + torch.autograd.grad((xs, ps), ins, (gx, gp)))
    assert len(res[0]) == len(res[1])
    for name, x, y in zip(("x_s", "p_s", "dh", "dhp", "da", "dg", "dgamma"), *res):
        _close(name, x, y)
    dh = res[0][2]
    assert_padded_rows_zero(dh, lens.tolist())


def test_aggregate_packed_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    b, L, d = 3, 5, 4
    ins = [torch.randn(b, L, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ins += [torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.tensor(0.6, dtype=torch.float64, requires_grad=True)]
    lens = torch.tensor([1, 5, 3])
    for mode in ("additive", "product"):
        assert torch.autograd.gradcheck(lambda h, hp, a, g, gam: aggregate_packed(h, hp, a, g, lens, gam, mode), ins)


def test_size_guard_sends_small_inputs_to_the_reference():
    q = torch.randn(3, 5, 8, requires_grad=True)
    lens = torch.tensor([1, 5, 2])
    out = session_attention_packed(q, q, q, lens)
    assert "PackedAttention" not in out.grad_fn.name()
    big = torch.randn(64, 20, 8, requires_grad=True)
    out = session_attention_packed(big, big, big, torch.randint(1, 21, (64,)))
    assert "PackedAttention" in out.grad_fn.name()


def test_auto_picks_packed_on_cpu_and_dispatch_reaches_it():
    assert ops.describe("session_attention", "auto", "cpu") == "packed"
    assert ops.describe("aggregate", "auto", "cpu") == "packed"
    assert "packed" in ops.available_backends()["session_attention"]
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(3, 5, 8, generator=gen, requires_grad=True)
    lens = torch.tensor([1, 5, 2])
    out = ops.session_attention(q, q, q, lens, backend="packed")
    assert "PackedAttention" in out.grad_fn.name()
    _close("out", out, session_attention_ref(q, q, q, lens))


@pytest.mark.parametrize("kw", [{"num_heads": 2, "learn_position_decay": True},
                                {"item_attention": "product", "num_blocks": 2}])
def test_mtd_training_step_packed_matches_reference(kw):
    # the model's real call pattern (dropout masks drawn by the model, gamma a buffer or a
    # Parameter, q/k/v unpacked from valid tokens): same loss and same parameter gradients
    np = pytest.importorskip("numpy")
    from mtd_fast import MTD, MTDConfig
    from mtd_fast.data import Sessions

    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 41, size=n)) for n in [1, 2, 3, 7, 19, 4, 1, 12, 5, 2, 3]]
    targets = torch.tensor(rng.integers(1, 41, size=len(seqs)))
    results = []
    for backend in ("packed", "reference"):
        torch.manual_seed(0)
        model = MTD(40, MTDConfig(hidden_size=16, **kw), dropout=0.3, backend=backend)
        model.train()
        batch = model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(len(seqs)))
        torch.manual_seed(1)  # the same dropout masks for both backends
        loss = model.loss(batch, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_p, grads_p), (loss_r, grads_r) = results
    _close("loss", loss_p, loss_r)
    assert grads_p.keys() == grads_r.keys() and len(grads_p) > 5
    for name in grads_r:
        _close(name, grads_p[name], grads_r[name])
