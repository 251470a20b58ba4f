"""Triton kernels (`mtd_fast.kernels`) against the reference ops, forward and every gradient.

Runs when CUDA is available, or on the CPU under the Triton interpreter:

    TRITON_INTERPRET=1 pytest tests/test_triton_kernels.py

(the variable must be set before the kernel modules are imported, so this file never sets
it; without it and without CUDA the whole module skips). The interpreter costs 2-9 ms per
program instance, so batches here are small primes (3, 5, 7: grids of 3-28 programs).

Tolerances, (dtype, atol, rtol), applied to outputs and to gradients alike:

| dtype    | atol  | rtol  | why |
| -------- | ----- | ----- | --- |
| float32  | 2e-5  | 1e-4  | same math, other summation order: fp32 eps (1.2e-7) times      |
|          |       |       | reductions of <= 128 x 128 terms of O(1-10) values; measured   |
|          |       |       | <= 7e-6 in the interpreter                                     |
| bfloat16 | rule  |       | max |fast - ref32| <= 2 max |ref16 - ref32| + 1e-5              |
|          |       |       | (flash-attention's rule: the fast bf16 path errs at most twice |
|          |       |       | as much as PyTorch's own bf16 computation, both against fp32)  |

bf16 attention runs on CUDA only: bf16 tl.dot returns garbage in the interpreter (known
upstream problem). bf16 aggregation has no tl.dot and is checked in both.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

_INTERP = os.environ.get("TRITON_INTERPRET") == "1"
_CUDA = torch.cuda.is_available()

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not (_INTERP or _CUDA),
                       reason="Triton kernels need CUDA, or TRITON_INTERPRET=1 set before pytest starts"),
]

triton = pytest.importorskip("triton", reason="triton is not installed")

from _checks import assert_padded_rows_zero  # noqa: E402

import mtd_fast.ops as ops  # noqa: E402
from mtd_fast.kernels.aggregate import AggregateFunction, aggregate_triton  # noqa: E402
from mtd_fast.kernels.session_attention import (  # noqa: E402
    MAX_FUSED_LEN,
    SessionAttentionFunction,
    session_attention_triton,
    uses_fused_path,
)
from mtd_fast.ops.aggregate import aggregate_ref  # noqa: E402
from mtd_fast.ops.linear_cross_entropy import linear_cross_entropy_ref  # noqa: E402
from mtd_fast.ops.session_attention import session_attention_ref  # noqa: E402

DEVICE = "cpu" if _INTERP else "cuda"
TOL = {torch.float32: (2e-5, 1e-4)}
BF16_FLOOR = 1e-5


def _close(name, got, want, dtype=torch.float32):
    assert got is not None, f"{name}: no gradient"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def _bf16_rule(name, fast, ref16, ref32):
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    err_fast = (fast.float() - ref32).abs().max().item()
    err_ref = (ref16.float() - ref32).abs().max().item()
    assert err_fast <= 2 * err_ref + BF16_FLOOR, (f"{name}: bf16 max error {err_fast:.3g} > 2 x the bf16 "
                                                  f"reference's {err_ref:.3g} (+{BF16_FLOOR})")


def _lengths(b, L, gen, extra=()):
    lens = torch.randint(1, L + 1, (b,), generator=gen)
    lens[0] = 1  # a length-1 session ...
    lens[-1] = L  # ... and a full one in every batch, so short sessions have padded rows
    for i, v in enumerate(extra):
        lens[1 + i] = v
    return lens


# ------------------------------------------------------------------------------------------
# session attention
# ------------------------------------------------------------------------------------------
def _attn_inputs(b, L, d, h, dropout, seed, dtype=torch.float32, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, L, d, generator=gen) for _ in range(3))
    lens = _lengths(b, L, gen) if lengths is None else torch.tensor(lengths)
    mask = None
    if dropout:
        keep = 0.7
        mask = (torch.rand(b, h, L, L, generator=gen) < keep).float() / keep
    go = torch.randn(b, L, d, generator=gen)
    mv = lambda t: None if t is None else t.to(DEVICE)  # noqa: E731
    return (mv(q).to(dtype), mv(k).to(dtype), mv(v).to(dtype), mv(lens), mv(mask), mv(go))


def _run_attn(fn, q, k, v, lens, h, mask, go):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, lens, num_heads=h, dropout_mask=None if mask is None else mask.to(q.dtype))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go.to(out.dtype))
    return out, dq, dk, dv


ATTN_CASES = [
    # (batch, seq_len, dim, heads, dropout)
    pytest.param(7, 19, 100, 1, False, id="B7-L19-d100-h1"),
    pytest.param(7, 19, 100, 1, True, id="B7-L19-d100-h1-drop"),
    pytest.param(5, 50, 100, 4, True, id="B5-L50-d100-h4-drop"),
    pytest.param(5, 50, 64, 1, True, id="B5-L50-d64-h1-drop"),
    pytest.param(3, 50, 64, 8, False, id="B3-L50-d64-h8"),  # head dim 8: padded to one 16-wide chunk
    pytest.param(3, 1, 100, 2, True, id="B3-L1-d100-h2-drop"),  # only length-1 sessions
]


@pytest.mark.parametrize("b,L,d,h,dropout", ATTN_CASES)
def test_session_attention_matches_reference(b, L, d, h, dropout):
    q, k, v, lens, mask, go = _attn_inputs(b, L, d, h, dropout, seed=1000 + L + d + h)
    assert uses_fused_path(q, h)
    got = _run_attn(session_attention_triton, q, k, v, lens, h, mask, go)
    want = _run_attn(session_attention_ref, q, k, v, lens, h, mask, go)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        _close(name, x, y)


def test_session_attention_padded_rows_are_zero_not_nan():
    # short sessions in a long batch: rows i >= length are exactly 0 in the output and in every
    # gradient (the upstream gradient is nonzero there on purpose)
    L = 50
    lens = [1, 2, 3, 50, 7]
    q, k, v, lens_t, mask, go = _attn_inputs(5, L, 100, 1, True, seed=7, lengths=lens)
    out, dq, dk, dv = _run_attn(session_attention_triton, q, k, v, lens_t, 1, mask, go)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), name
        assert_padded_rows_zero(t, lens, name)
        for bi, n in enumerate(lens):
            if name == "out" or (name == "dq" and n > 1):  # one key: the softmax has no gradient
                assert t[bi, :n].abs().sum() > 0, f"{name}: valid rows of session {bi} are all zero"
    want = _run_attn(session_attention_ref, q, k, v, lens_t, 1, mask, go)
    for name, x, y in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        _close(name, x, y)


def test_session_attention_strided_inputs_and_partial_grads():
    # q, k, v as column slices of one fused (B, L, 3d) projection (non-contiguous), and only
    # v requiring grad: ctx.needs_input_grad must skip dq and dk
    b, L, d, h = 5, 19, 100, 2
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(b, L, 3 * d, generator=gen).to(DEVICE)
    lens = _lengths(b, L, gen).to(DEVICE)
    go = torch.randn(b, L, d, generator=gen).to(DEVICE)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:].clone().requires_grad_(True)
    assert not q.is_contiguous()
    out = session_attention_triton(q, k, v, lens, num_heads=h)
    (dv,) = torch.autograd.grad(out, (v,), go)
    v2 = v.detach().clone().requires_grad_(True)
    ref = session_attention_ref(q.contiguous(), k.contiguous(), v2, lens, num_heads=h)
    (dv2,) = torch.autograd.grad(ref, (v2,), go)
    _close("out", out, ref)
    _close("dv", dv, dv2)


@pytest.mark.parametrize("b,L,d,h,dropout,need", [
    pytest.param(3, 150, 64, 2, True, (True, True, True), id="B3-L150-d64-h2-drop"),
    pytest.param(2, 131, 100, 1, False, (True, True, True), id="B2-L131-d100-h1"),
    pytest.param(2, 140, 32, 1, True, (False, True, False), id="B2-L140-dk-only"),
])
def test_session_attention_tiled_path(b, L, d, h, dropout, need):
    # seq_len > MAX_FUSED_LEN runs the tiled kernels (query / key tiles, online softmax,
    # separate dK/dV and dQ kernels); short sessions in the long batch skip most tiles
    assert L > MAX_FUSED_LEN
    lens = [1, L, 17, 3][:b] if b > 2 else [L, 5]
    q, k, v, lens_t, mask, go = _attn_inputs(b, L, d, h, dropout, seed=L, lengths=lens)
    res = []
    for fn in (session_attention_triton, session_attention_ref):
        ins = [t.detach().clone().requires_grad_(n) for t, n in zip((q, k, v), need)]
        out = fn(*ins, lens_t, num_heads=h, dropout_mask=mask)
        res.append([out] + list(torch.autograd.grad(out, [t for t in ins if t.requires_grad], go)))
    assert "SessionAttentionFunction" in res[0][0].grad_fn.name()
    names = ["out"] + [n for n, x in zip(("dq", "dk", "dv"), need) if x]
    for name, x, y in zip(names, *res):
        _close(name, x, y)
    for name, t in zip(names, res[0]):
        assert_padded_rows_zero(t, lens, name)


def test_session_attention_tiled_kernels_at_short_widths(monkeypatch):
    # the tiled kernels are width-agnostic: forced at L = 19 / 50 (monkeypatched limit) they
    # must agree too, including tiles where the diagonal and the session end cut through
    import mtd_fast.kernels.session_attention as sa

    monkeypatch.setattr(sa, "MAX_FUSED_LEN", 0)
    for b, L, d, h, drop in ((5, 19, 64, 2, True), (3, 50, 100, 1, False)):
        q, k, v, lens, mask, go = _attn_inputs(b, L, d, h, drop, seed=77 + L)
        got = _run_attn(session_attention_triton, q, k, v, lens, h, mask, go)
        want = _run_attn(session_attention_ref, q, k, v, lens, h, mask, go)
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
            _close(f"L={L} {name}", x, y)


def test_session_attention_wide_heads_use_reference_path():
    # head_dim > MAX_FUSED_HEAD_DIM (128) is sent to the reference (documented limit)
    q, k, v, lens, mask, go = _attn_inputs(2, 5, 260, 1, True, seed=5)
    assert not uses_fused_path(q, 1)
    got = _run_attn(session_attention_triton, q, k, v, lens, 1, mask, go)
    want = _run_attn(session_attention_ref, q, k, v, lens, 1, mask, go)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        _close(name, x, y)


def test_session_attention_rejects_bad_shapes():
    q = torch.zeros(2, 3, 10, device=DEVICE)
    lens = torch.ones(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="num_heads"):
        session_attention_triton(q, q, q, lens, num_heads=3)
    with pytest.raises(ValueError, match="dropout_mask"):
        session_attention_triton(q, q, q, lens, num_heads=1, dropout_mask=torch.ones(2, 1, 3, 4, device=DEVICE))


@pytest.mark.skipif(not _CUDA, reason="bf16 tl.dot returns garbage in the Triton interpreter; CUDA only")
@pytest.mark.parametrize("L,h,dropout", [(50, 1, False), (50, 4, True), (160, 1, True)])
def test_session_attention_bf16_rule(L, h, dropout):
    q, k, v, lens, mask, go = _attn_inputs(64, L, 100, h, dropout, seed=11)
    ref32 = _run_attn(session_attention_ref, q, k, v, lens, h, mask, go)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref16 = _run_attn(session_attention_ref, qb, kb, vb, lens, h, mask, go)
    fast = _run_attn(session_attention_triton, qb, kb, vb, lens, h, mask, go)
    for name, f, r16, r32 in zip(("out", "dq", "dk", "dv"), fast, ref16, ref32):
        assert f.dtype == torch.bfloat16
        _bf16_rule(name, f, r16, r32)


# ------------------------------------------------------------------------------------------
# aggregation
# ------------------------------------------------------------------------------------------
def _agg_inputs(b, L, d, seed, g_scale=1.0, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    h, hp = torch.randn(b, L, d, generator=gen), torch.randn(b, L, d, generator=gen)
    a, g = torch.randn(b, d, generator=gen), torch.randn(d, generator=gen) * g_scale
    lens = _lengths(b, L, gen) if lengths is None else torch.tensor(lengths)
    gx, gp = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    return [t.to(DEVICE) for t in (h, hp, a, g, lens, gx, gp)]


def _run_agg(fn, h, hp, a, g, lens, gamma, mode, gx, gp, dtype=torch.float32):
    ins = [t.detach().clone().to(dtype).requires_grad_(True) for t in (h, hp, a, g)]
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.detach().clone().requires_grad_(True)
        ins.append(gamma)
    xs, ps = fn(ins[0], ins[1], ins[2], ins[3], lens, gamma=gamma, mode=mode)
    grads = torch.autograd.grad((xs, ps), ins, (gx.to(xs.dtype), gp.to(ps.dtype)))
    return (xs, ps) + tuple(grads)


AGG_NAMES = ("x_s", "p_s", "dh", "dhp", "da", "dg", "dgamma")

AGG_CASES = [
    # (batch, seq_len, dim, gamma, g_scale); gamma "t" = 0-dim tensor 0.75 requiring grad
    pytest.param(7, 19, 100, 0.75, 1.0, id="B7-L19-d100-float"),
    pytest.param(7, 19, 100, "t", 1.0, id="B7-L19-d100-tensor"),
    pytest.param(5, 50, 64, "t", 1.0, id="B5-L50-d64-tensor"),
    pytest.param(5, 50, 100, -0.4, 1.0, id="B5-L50-d100-negative-gamma"),  # max of beta logits at the other end
    pytest.param(3, 1, 100, "t", 1.0, id="B3-L1-d100-tensor"),
    # large logits (|e| up to ~1e3): the online softmax across chunks must not overflow
    pytest.param(3, 50, 100, 0.75, 40.0, id="B3-L50-d100-large-logits"),
]


@pytest.mark.parametrize("mode", ["additive", "product"])
@pytest.mark.parametrize("b,L,d,gamma,g_scale", AGG_CASES)
def test_aggregate_matches_reference(b, L, d, gamma, g_scale, mode):
    h, hp, a, g, lens, gx, gp = _agg_inputs(b, L, d, seed=2000 + L + d, g_scale=g_scale)
    if gamma == "t":
        gamma = torch.tensor(0.75, device=DEVICE)
    got = _run_agg(aggregate_triton, h, hp, a, g, lens, gamma, mode, gx, gp)
    want = _run_agg(aggregate_ref, h, hp, a, g, lens, gamma, mode, gx, gp)
    assert len(got) == len(want) == (7 if isinstance(gamma, torch.Tensor) else 6)
    for name, x, y in zip(AGG_NAMES, got, want):
        _close(name, x, y)


def test_aggregate_padded_rows_and_partial_grads():
    # gradients of padded rows are exactly zero; only h requires grad, gamma is a tensor
    # without grad: ctx.needs_input_grad must skip the rest
    lens = [1, 2, 50, 4, 9]
    h, hp, a, g, lens_t, gx, gp = _agg_inputs(5, 50, 100, seed=9, lengths=lens)
    hh = h.clone().requires_grad_(True)
    gamma = torch.tensor(0.5, device=DEVICE)
    xs, ps = aggregate_triton(hh, hp, a, g, lens_t, gamma=gamma, mode="product")
    assert xs.grad_fn is not None and "AggregateFunction" in xs.grad_fn.name()
    (dh,) = torch.autograd.grad((xs, ps), (hh,), (gx, gp))
    assert_padded_rows_zero(dh, lens)
    h2 = h.clone().requires_grad_(True)
    xs2, ps2 = aggregate_ref(h2, hp, a, g, lens_t, gamma=gamma, mode="product")
    (dh2,) = torch.autograd.grad((xs2, ps2), (h2,), (gx, gp))
    _close("x_s", xs, xs2)
    _close("p_s", ps, ps2)
    _close("dh", dh, dh2)


def test_aggregate_one_output_used():
    # only p_s reaches the loss: the kernel gets dx_s = None and must treat it as zero
    h, hp, a, g, lens, gx, gp = _agg_inputs(3, 19, 64, seed=4)
    outs = []
    for fn in (aggregate_triton, aggregate_ref):
        hh = h.clone().requires_grad_(True)
        gg = g.clone().requires_grad_(True)
        _, ps = fn(hh, hp, a, gg, lens, gamma=0.75, mode="additive")
        outs.append(torch.autograd.grad((ps * gp).sum(), (hh, gg), allow_unused=True))
    _close("dh", outs[0][0], outs[1][0])
    dg_fast, dg_ref = outs[0][1], outs[1][1]
    zero_ref = torch.zeros_like(h[0, 0]) if dg_ref is None else dg_ref
    _close("dg", dg_fast if dg_fast is not None else torch.zeros_like(zero_ref), zero_ref)


@pytest.mark.parametrize("mode", ["additive", "product"])
def test_aggregate_bf16_rule(mode):
    # no tl.dot in this kernel, so bf16 also runs in the interpreter
    b = 64 if _CUDA and not _INTERP else 5
    h, hp, a, g, lens, gx, gp = _agg_inputs(b, 50, 100, seed=13)
    gamma = torch.tensor(0.75, device=DEVICE)
    ref32 = _run_agg(aggregate_ref, h, hp, a, g, lens, gamma, mode, gx, gp)
    ref16 = _run_agg(aggregate_ref, h, hp, a, g, lens, gamma, mode, gx, gp, dtype=torch.bfloat16)
    fast = _run_agg(aggregate_triton, h, hp, a, g, lens, gamma, mode, gx, gp, dtype=torch.bfloat16)
    for name, f, r16, r32 in zip(AGG_NAMES, fast, ref16, ref32):
        if name != "dgamma":  # gamma stays fp32 (a parameter); its grad is fp32 in both
            assert f.dtype == torch.bfloat16, name
        _bf16_rule(name, f, r16, r32)


def test_aggregate_rejects_bad_input():
    h = torch.zeros(2, 3, 8, device=DEVICE)
    a, g = torch.zeros(2, 8, device=DEVICE), torch.zeros(8, device=DEVICE)
    lens = torch.ones(2, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="mode"):
        aggregate_triton(h, h, a, g, lens, mode="dot")
    with pytest.raises(ValueError, match="a must be"):
        aggregate_triton(h, h, g, g, lens)


# ------------------------------------------------------------------------------------------
# dispatch and compilation
# ------------------------------------------------------------------------------------------
def test_dispatch_reaches_the_kernels():
    q, k, v, lens, mask, go = _attn_inputs(3, 19, 64, 2, True, seed=21)
    q.requires_grad_(True)
    assert ops.describe("session_attention", "triton", q.device) == "triton"
    out = ops.session_attention(q, k, v, lens, num_heads=2, dropout_mask=mask, backend="triton")
    assert "SessionAttentionFunction" in out.grad_fn.name()
    out_d = ops.session_attention(q, k, v, lens, num_heads=2, dropout_mask=mask,
                                  backend={"session_attention": "triton"})
    assert "SessionAttentionFunction" in out_d.grad_fn.name()
    _close("out", out, session_attention_ref(q, k, v, lens, num_heads=2, dropout_mask=mask))

    h, hp, a, g, lens, gx, gp = _agg_inputs(3, 19, 64, seed=22)
    h.requires_grad_(True)
    assert ops.describe("aggregate", "triton", h.device) == "triton"
    xs, ps = ops.aggregate(h, hp, a, g, lens, gamma=0.75, mode="additive", backend="triton")
    assert "AggregateFunction" in xs.grad_fn.name()
    want = aggregate_ref(h, hp, a, g, lens, gamma=0.75, mode="additive")
    _close("x_s", xs, want[0])
    _close("p_s", ps, want[1])
    assert SessionAttentionFunction is not None and AggregateFunction is not None


@pytest.mark.parametrize("kw", [{"num_heads": 2, "learn_position_decay": True}, {"item_attention": "product"}])
def test_mtd_training_step_triton_matches_reference(kw):
    # the model's own call pattern (dropout masks drawn by the model, gamma a buffer or a
    # Parameter): same loss and parameter gradients with the kernels as with the reference
    np = pytest.importorskip("numpy")
    from mtd_fast import MTD, MTDConfig
    from mtd_fast.data import Sessions

    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, 41, size=n)) for n in [1, 2, 3, 7, 19, 4, 12]]
    targets = torch.tensor(rng.integers(1, 41, size=len(seqs)), device=DEVICE)
    results = []
    for backend in ({"session_attention": "triton", "aggregate": "triton"}, "reference"):
        torch.manual_seed(0)
        model = MTD(40, MTDConfig(hidden_size=16, **kw), dropout=0.3, backend=backend).to(DEVICE)
        model.train()
        batch = model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(len(seqs)))  # on the model's device
        torch.manual_seed(1)  # the same dropout masks for both backends
        loss = model.loss(batch, targets)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss_t, grads_t), (loss_r, grads_r) = results
    # model level, the fp32 bound: atol 1e-5, rtol 1e-4
    torch.testing.assert_close(loss_t, loss_r, atol=1e-5, rtol=1e-4)
    assert grads_t.keys() == grads_r.keys() and len(grads_t) > 5
    for name in grads_r:
        torch.testing.assert_close(grads_t[name], grads_r[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_one_epoch_training_same_metrics():
    # a whole (tiny) training run through the kernels: same losses and the same metrics
    import mtd_fast

    ds = mtd_fast.load_dataset("synthetic", n_sessions=60, n_items=30, seed=1)
    runs = {}
    for backend in ({"session_attention": "triton", "aggregate": "triton"}, "reference"):
        runs[str(backend)] = mtd_fast.train(ds, epochs=1, seed=0, backend=backend, quiet=True, hidden_size=16,
                                            batch_size=32, device=DEVICE)
    fast, ref = runs.values()
    assert fast.backends["session_attention"] == "triton" and ref.backends["session_attention"] == "reference"
    torch.testing.assert_close(fast.history[0]["train_loss"], ref.history[0]["train_loss"], atol=1e-5, rtol=1e-4)
    for key in ("P@5", "P@10", "P@20", "MRR@20", "NDCG@20"):
        assert abs(fast.metrics[key] - ref.metrics[key]) < 1e-3, (key, fast.metrics[key], ref.metrics[key])


def test_expanded_upstream_gradients():
    # loss = out.sum() hands the backward an expanded (stride-0) gradient; the launchers pass
    # strides instead of assuming contiguity
    q, k, v, lens, mask, go = _attn_inputs(3, 19, 64, 2, True, seed=31)
    h, hp, a, g, lens2, gx, gp = _agg_inputs(3, 19, 64, seed=32)
    for fn_a, fn_g in ((session_attention_triton, aggregate_triton), (session_attention_ref, aggregate_ref)):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v, h, hp, a, g)]
        out = fn_a(*ins[:3], lens, num_heads=2, dropout_mask=mask)
        xs, ps = fn_g(*ins[3:], lens2, gamma=0.75, mode="product")
        (out.sum() + xs.sum() + 2 * ps.sum()).backward()
        if fn_a is session_attention_triton:
            got = [t.grad for t in ins]
        else:
            for name, x, y in zip(("dq", "dk", "dv", "dh", "dhp", "da", "dg"), got, [t.grad for t in ins]):
                _close(name, x, y)


# ------------------------------------------------------------------------------------------
# linear cross-entropy (chunk-free full softmax over an item table)
# ------------------------------------------------------------------------------------------
def _lce_inputs(b, m, d, seed, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, d, generator=gen) * scale).to(DEVICE)
    t = (torch.randn(m, d, generator=gen) * scale).to(DEVICE)
    y = torch.randint(0, m, (b,), generator=gen).to(DEVICE)
    go = torch.tensor(0.7, device=DEVICE)  # an upstream gradient != 1
    return q, t, y, go


def _lce_run(fn, q, t, y, go, need=(True, True)):
    qa, ta = q.detach().clone().requires_grad_(need[0]), t.detach().clone().requires_grad_(need[1])
    loss = fn(qa, ta, y)
    loss.backward(go)
    return loss, qa.grad, ta.grad


LCE_CASES = [
    # (batch, M, dim, target programs): the last column forces several tiles per program
    pytest.param(5, 37, 20, None, id="B5-M37-d20"),  # one tile, padded rows and columns
    pytest.param(7, 130, 100, None, id="B7-M130-d100"),  # 3 tiles -> 3 splits / programs, 7 dim chunks
    pytest.param(7, 130, 100, 1, id="B7-M130-d100-tiles4"),  # one program looping over 4 tiles
    pytest.param(33, 70, 16, None, id="B33-M70-d16"),  # two row blocks
    pytest.param(1, 17, 3, None, id="B1-M17-d3"),
]


@pytest.mark.parametrize("b,m,d,progs", LCE_CASES)
def test_linear_cross_entropy_matches_reference(b, m, d, progs, monkeypatch):
    from mtd_fast.kernels import linear_cross_entropy as lce

    if progs is not None:
        monkeypatch.setattr(lce, "_TARGET_PROGRAMS", progs)
    q, t, y, go = _lce_inputs(b, m, d, seed=b + m + d)
    got = _lce_run(lce.linear_cross_entropy_triton, q, t, y, go)
    want = _lce_run(linear_cross_entropy_ref, q, t, y, go)
    assert "LinearCrossEntropyFunction" in got[0].grad_fn.name()
    for name, x, w in zip(("loss", "dq", "dT"), got, want):
        _close(name, x, w)


def test_linear_cross_entropy_partial_grads_and_fallback():
    from mtd_fast.kernels.linear_cross_entropy import linear_cross_entropy_triton

    q, t, y, go = _lce_inputs(5, 40, 8, seed=41)
    for need in ((True, False), (False, True)):
        got = _lce_run(linear_cross_entropy_triton, q, t, y, go, need)
        want = _lce_run(linear_cross_entropy_ref, q, t, y, go, need)
        for name, x, w, n in zip(("dq", "dT"), got[1:], want[1:], need):
            if n:
                _close(name, x, w)
            else:
                assert x is None
    # float64 runs the chunked PyTorch path (tl.dot has no fp64 on every GPU)
    q64, t64 = q.double().requires_grad_(), t.double()
    out = linear_cross_entropy_triton(q64, t64, y)
    assert "LinearCrossEntropyFunction" not in out.grad_fn.name()
    torch.testing.assert_close(out, linear_cross_entropy_ref(q64, t64, y), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy_triton(q, t, torch.full_like(y, 40))


def test_linear_cross_entropy_strict_dispatch():
    q, t, y, go = _lce_inputs(3, 50, 16, seed=42)
    q.requires_grad_(True)
    assert ops.describe("linear_cross_entropy", {"linear_cross_entropy": "triton"}, q.device) == "triton"
    out = ops.linear_cross_entropy(q, t, y, backend={"linear_cross_entropy": "triton"})
    assert "LinearCrossEntropyFunction" in out.grad_fn.name()
    _close("loss", out, linear_cross_entropy_ref(q, t, y))


def test_mtd_loss_through_the_triton_kernel():
    # the model's own path: MTD.loss -> score_parts -> ops.linear_cross_entropy -> the kernel
    np = pytest.importorskip("numpy")
    from mtd_fast import MTD, MTDConfig
    from mtd_fast.data import Sessions

    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(1, 41, size=n)) for n in [1, 3, 7, 2, 5]]
    targets = torch.tensor(rng.integers(1, 41, size=len(seqs)), device=DEVICE)
    results = []
    for backend in ({"linear_cross_entropy": "triton"}, "reference"):
        torch.manual_seed(0)
        model = MTD(40, MTDConfig(hidden_size=16), dropout=0.3, backend=backend).to(DEVICE)
        batch = model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(len(seqs)))
        torch.manual_seed(1)
        loss = model.loss(batch, targets)
        loss.backward()
        results.append((loss.detach(), loss.grad_fn.name(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l_t, fn_t, g_t), (l_r, fn_r, g_r) = results
    assert "LinearCrossEntropyFunction" in fn_t and "LinearCrossEntropyFunction" not in fn_r
    torch.testing.assert_close(l_t, l_r, atol=1e-5, rtol=1e-4)
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.skipif(not _INTERP, reason="on a GPU, run benches/gpu_check.py itself")
def test_gpu_check_script_runs_in_smoke_mode(tmp_path):
    # benches/gpu_check.py at tiny sizes on the CPU through the interpreter: the one-shot GPU
    # script (strict backend dicts, the installed package) cannot rot between GPU sessions
    import json
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benches" / "gpu_check.py"
    env = dict(os.environ, MTD_GPU_CHECK_SMOKE="1", TRITON_INTERPRET="1")
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["ok"] and data["meta"]["smoke"]
    assert any(c["case"].startswith("linear_cross_entropy") for c in data["checks"])
    assert {r["impl"] for r in data["lce_timings"]} == {"triton", "chunked", "reference"}
    assert "triton_ms" in data["mtd_step"], data["mtd_step"]


@pytest.mark.skipif(_CUDA, reason="on a GPU the real launches above already compile every kernel")
def test_kernels_compile_for_sm90(tmp_path):
    # The interpreter cannot catch compile-time errors (loop-carried types, tl.dot shape rules,
    # shared-memory limits); Triton compiles to sm_90 cubin without a GPU (python -m
    # mtd_fast.kernels.aot). Runs in a subprocess without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd outside the checkout: `-m` puts the cwd on sys.path, and the checkout's source tree
    # has no mtd_fast.kernels (kernels/ is mapped there at install time)
    res = subprocess.run([sys.executable, "-m", "mtd_fast.kernels.aot", "--quick"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "FAIL" not in res.stdout
