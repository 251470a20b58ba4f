"""The `session_attention` op (`mtd_fast.ops.session_attention`): the reference against a
direct per-sample formula, and every backend against the reference, forward and every
gradient.

Backends (the `backend` axis, `testing.backend_params`): "packed" (length-bucketed, CPU)
and "triton" (`mtd_fast.kernels.session_attention` and `session_attention_tiled`; CUDA,
or the CPU under TRITON_INTERPRET=1). Cases: awkward shapes (length-1 sessions, short
sessions padded to long widths, lengths beyond the width, odd lengths 19 and 50, prime
batch sizes, hidden 100 and 64, 1 to 8 heads, with and without a dropout mask), strided
inputs and partial gradients, padded rows exactly zero, float64 gradcheck of the packed
backward, the tiled kernels (seq_len > 128, and forced at short widths), the bf16 rule on
CUDA. Tolerances: the table in testing.py. bf16 attention runs on CUDA only: bf16 tl.dot
returns garbage in the interpreter (known upstream problem).
"""
from __future__ import annotations

import math

import pytest
import torch

from mtd_fast import ops
from mtd_fast.ops.session_attention import length_buckets, session_attention_packed, session_attention_ref

from testing import (
    CUDA_ONLY,
    TRITON_DEVICE,
    assert_bf16_rule,
    assert_close,
    assert_padded_rows_zero,
    attention_inputs,
    backend_params,
    device_for,
    force_packed,
    impl,
    random_lengths,
    run_attention,
    triton_only,
)

# the autograd Function each backend's output comes from
GRAD_FN = {"packed": "PackedAttention", "triton": "SessionAttentionFunction"}


@pytest.fixture(autouse=True)
def _packed_at_every_size(monkeypatch, request):
    if "size_guard" not in request.node.name:
        force_packed(monkeypatch)


# ---- the reference -------------------------------------------------------------------------
def attention_loop(q, k, v, lengths, h, mask=None):
    b, L, d = q.shape
    dh = d // h
    out = torch.zeros_like(q)
    for bi in range(b):
        n = int(lengths[bi])
        for head in range(h):
            sl = slice(head * dh, (head + 1) * dh)
            for i in range(n):
                s = torch.stack([q[bi, i, sl] @ k[bi, j, sl] / math.sqrt(dh) for j in range(i + 1)])
                w = torch.softmax(s, 0)
                if mask is not None:
                    w = w * mask[bi, head, i, :i + 1]
                out[bi, i, sl] = sum(w[j] * v[bi, j, sl] for j in range(i + 1))
    return out


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("with_mask", [False, True])
def test_reference_formula(heads, with_mask):
    torch.manual_seed(0)
    lengths = torch.tensor([1, 5, 3])
    q, k, v = (torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(3, heads, 5, 5) > 0.3).double() / 0.7 if with_mask else None
    got = session_attention_ref(q, k, v, lengths, heads, mask)
    assert torch.allclose(got, attention_loop(q, k, v, lengths, heads, mask))
    assert torch.all(got[0, 1:] == 0) and torch.all(got[2, 3:] == 0)  # padded queries: zero, not NaN


def test_reference_grad_finite_and_gradcheck():
    torch.manual_seed(1)
    lengths = torch.tensor([2, 4])
    q, k, v = (torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: session_attention_ref(a, b, c, lengths, 2), (q, k, v))
    session_attention_ref(q, k, v, lengths).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_empty_sessions_are_an_input_error():
    q = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="empty session is an input error"):
        ops.session_attention(q, q, q, torch.tensor([2, 0]))


# ---- every backend against the reference ---------------------------------------------------
CASES = [
    # (batch, seq_len, dim, heads, dropout, lengths (None: random), seed)
    pytest.param(7, 19, 100, 1, False, None, 819, id="B7-L19-d100-h1"),
    pytest.param(7, 19, 100, 1, True, None, 819, id="B7-L19-d100-h1-drop"),
    pytest.param(5, 50, 100, 4, True, None, 650, id="B5-L50-d100-h4-drop"),
    pytest.param(11, 50, 64, 2, False, None, 1214, id="B11-L50-d64-h2"),
    pytest.param(3, 1, 100, 1, True, None, 401, id="B3-L1-d100"),
    pytest.param(5, 50, 64, 1, True, [1, 2, 3, 1, 7], 614, id="B5-L50-short-sessions-only"),  # no group at full width
    pytest.param(3, 19, 64, 1, False, [25, 19, 4], 383, id="B3-L19-length-beyond-width"),  # reference: all rows valid
    pytest.param(7, 19, 100, 1, False, None, 1120, id="B7-L19-d100-h1-s1120"),
    pytest.param(7, 19, 100, 1, True, None, 1120, id="B7-L19-d100-h1-drop-s1120"),
    pytest.param(5, 50, 100, 4, True, None, 1154, id="B5-L50-d100-h4-drop-s1154"),
    pytest.param(5, 50, 64, 1, True, None, 1115, id="B5-L50-d64-h1-drop"),
    pytest.param(3, 50, 64, 8, False, None, 1122, id="B3-L50-d64-h8"),  # head dim 8: padded to one 16-wide chunk
    pytest.param(3, 1, 100, 2, True, None, 1103, id="B3-L1-d100-h2-drop"),  # only length-1 sessions
]


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
@pytest.mark.parametrize("b,L,d,h,dropout,lengths,seed", CASES)
def test_matches_reference(backend, b, L, d, h, dropout, lengths, seed):
    q, k, v, lens, mask, go = attention_inputs(b, L, d, h, dropout, seed, device_for(backend), lengths=lengths)
    if backend == "triton":
        from mtd_fast.kernels.session_attention import uses_fused_path

        assert uses_fused_path(q, h)
    got = run_attention(impl("session_attention", backend), q, k, v, lens, h, mask, go)
    want = run_attention(session_attention_ref, q, k, v, lens, h, mask, go)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(name, x, y)
    assert_padded_rows_zero(got[0], lens.tolist())


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
@pytest.mark.parametrize("b,h,seed", [(7, 4, 5), (5, 2, 3)])
def test_strided_inputs_and_partial_grads(backend, b, h, seed):
    # q, k, v as column slices of one fused (B, L, 3d) projection (non-contiguous), and only
    # v requiring grad: dq and dk must be skipped
    L, d = 19, 100
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, L, 3 * d, generator=gen).to(dev)
    lens = random_lengths(b, L, gen).to(dev)
    go = torch.randn(b, L, d, generator=gen).to(dev)
    q, k, v = qkv[..., :d], qkv[..., d:2 * d], qkv[..., 2 * d:].clone().requires_grad_(True)
    assert not q.is_contiguous()
    out = impl("session_attention", backend)(q, k, v, lens, num_heads=h)
    (dv,) = torch.autograd.grad(out, (v,), go)
    v2 = v.detach().clone().requires_grad_(True)
    ref = session_attention_ref(q.contiguous(), k.contiguous(), v2, lens, num_heads=h)
    (dv2,) = torch.autograd.grad(ref, (v2,), go)
    assert_close("out", out, ref)
    assert_close("dv", dv, dv2)


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
def test_padded_rows_are_zero_not_nan(backend):
    # short sessions in a long batch: rows i >= length are exactly 0 in the output and in every
    # gradient (the upstream gradient is nonzero there on purpose)
    L = 50
    lens = [1, 2, 3, 50, 7]
    q, k, v, lens_t, mask, go = attention_inputs(5, L, 100, 1, True, seed=7, device=device_for(backend), lengths=lens)
    out, dq, dk, dv = run_attention(impl("session_attention", backend), q, k, v, lens_t, 1, mask, go)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), name
        assert_padded_rows_zero(t, lens, name)
        for bi, n in enumerate(lens):
            if name == "out" or (name == "dq" and n > 1):  # one key: the softmax has no gradient
                assert t[bi, :n].abs().sum() > 0, f"{name}: valid rows of session {bi} are all zero"
    want = run_attention(session_attention_ref, q, k, v, lens_t, 1, mask, go)
    for name, x, y in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), want):
        assert_close(name, x, y)


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
def test_expanded_upstream_gradient(backend):
    # loss = out.sum() hands the backward an expanded (stride-0) gradient; the backward must
    # read strides instead of assuming contiguity
    q, k, v, lens, mask, _ = attention_inputs(3, 19, 64, 2, True, seed=31, device=device_for(backend))
    grads = []
    for fn in (impl("session_attention", backend), session_attention_ref):
        ins = [t.clone().requires_grad_(True) for t in (q, k, v)]
        fn(*ins, lens, num_heads=2, dropout_mask=mask).sum().backward()
        grads.append([t.grad for t in ins])
    for name, x, y in zip(("dq", "dk", "dv"), *grads):
        assert_close(name, x, y)


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
@pytest.mark.parametrize("case", ["B3-L5-d8", "B3-L19-d64-h2-drop"])
def test_dispatch_reaches_the_backend(backend, case):
    # the public op with backend=<string> and backend={op: name} runs the backend's Function
    if case == "B3-L5-d8":
        gen = torch.Generator().manual_seed(2)
        q = torch.randn(3, 5, 8, generator=gen).to(device_for(backend))
        k = v = q
        lens, h, mask = torch.tensor([1, 5, 2], device=q.device), 1, None
    else:
        q, k, v, lens, mask, _ = attention_inputs(3, 19, 64, 2, True, seed=21, device=device_for(backend))
        h = 2
    q.requires_grad_(True)
    assert ops.describe("session_attention", backend, q.device) == backend
    want = session_attention_ref(q, k, v, lens, num_heads=h, dropout_mask=mask)
    for spec in (backend, {"session_attention": backend}):
        out = ops.session_attention(q, k, v, lens, num_heads=h, dropout_mask=mask, backend=spec)
        assert GRAD_FN[backend] in out.grad_fn.name()
        assert_close("out", out, want)


# ---- packed --------------------------------------------------------------------------------
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


def test_packed_gradcheck_float64():
    gen = torch.Generator().manual_seed(0)
    b, L, d, h = 4, 6, 4, 2
    ins = [torch.randn(b, L, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    lens = torch.tensor([1, 6, 3, 2])
    mask = (torch.rand(b, h, L, L, generator=gen) < 0.7).double() / 0.7
    assert torch.autograd.gradcheck(lambda q, k, v: session_attention_packed(q, k, v, lens, h, mask), ins)
    assert torch.autograd.gradcheck(lambda q, k, v: session_attention_packed(q, k, v, lens, h, None), ins)


# ---- the rows layout -----------------------------------------------------------------------
@pytest.mark.parametrize("backend", backend_params("reference", "packed", "triton"))
@pytest.mark.parametrize("b,L,d,h,dropout,seed", [(7, 19, 100, 1, True, 21), (5, 50, 64, 4, False, 22),
                                                  (3, 1, 100, 2, True, 23), (6, 33, 32, 2, True, 24)])
def test_rows_layout_is_the_padded_op_on_the_valid_rows(backend, b, L, d, h, dropout, seed):
    """q, k, v as (N, d) rows (the valid clicks only, what the models pass): the output and
    every gradient are the padded op's valid rows, for each backend (the packed one reads the
    rows directly; the others see them padded)."""
    from mtd_fast.ops.common import padded_to_rows

    dev = device_for(backend)
    q, k, v, lens, mask, go = attention_inputs(b, L, d, h, dropout, seed, dev)
    lens = lens.clamp(max=L)
    want = run_attention(session_attention_ref, q, k, v, lens, h, mask, go)
    rows = [padded_to_rows(t, lens).detach().requires_grad_() for t in (q, k, v)]
    out = ops.session_attention(*rows, lens, num_heads=h, dropout_mask=mask, backend=backend, width=L)
    out.backward(padded_to_rows(go, lens))
    assert out.shape == (int(lens.sum()), d)
    if backend == "packed":
        assert "PackedAttention" in out.grad_fn.name()
    for name, x, y in zip(("out", "dq", "dk", "dv"), (out.detach(), *(t.grad for t in rows)), want):
        assert_close(name, x, padded_to_rows(y, lens))


def test_rows_layout_refuses_a_wrong_row_count():
    q = torch.randn(9, 8)
    with pytest.raises(ValueError, match="9 rows for sessions of 10 clicks"):
        ops.session_attention(q, q, q, torch.tensor([4, 6]), width=6)
    with pytest.raises(ValueError, match="session lengths must be in 1..6"):
        ops.session_attention(q, q, q, torch.tensor([2, 7]), width=6)


def test_packed_rows_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    lens, L, d, h = torch.tensor([1, 6, 3, 2]), 6, 4, 2
    ins = [torch.randn(int(lens.sum()), d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3)]
    mask = (torch.rand(4, h, L, L, generator=gen) < 0.7).double() / 0.7
    for m in (mask, None):
        assert torch.autograd.gradcheck(lambda q, k, v: session_attention_packed(q, k, v, lens, h, m, width=L), ins)


def test_packed_size_guard_sends_small_inputs_to_the_reference():
    q = torch.randn(3, 5, 8, requires_grad=True)
    lens = torch.tensor([1, 5, 2])
    out = session_attention_packed(q, q, q, lens)
    assert "PackedAttention" not in out.grad_fn.name()
    big = torch.randn(64, 20, 8, requires_grad=True)
    out = session_attention_packed(big, big, big, torch.randint(1, 21, (64,)))
    assert "PackedAttention" in out.grad_fn.name()


# ---- triton --------------------------------------------------------------------------------
@triton_only
@pytest.mark.parametrize("b,L,d,h,dropout,need", [
    pytest.param(3, 150, 64, 2, True, (True, True, True), id="B3-L150-d64-h2-drop"),
    pytest.param(2, 131, 100, 1, False, (True, True, True), id="B2-L131-d100-h1"),
    pytest.param(2, 140, 32, 1, True, (False, True, False), id="B2-L140-dk-only"),
])
def test_triton_tiled_path(b, L, d, h, dropout, need):
    # seq_len > MAX_FUSED_LEN runs the tiled kernels (query / key tiles, online softmax,
    # separate dK/dV and dQ kernels); short sessions in the long batch skip most tiles
    from mtd_fast.kernels.session_attention import MAX_FUSED_LEN, session_attention_triton

    assert L > MAX_FUSED_LEN
    lens = [1, L, 17, 3][:b] if b > 2 else [L, 5]
    q, k, v, lens_t, mask, go = attention_inputs(b, L, d, h, dropout, seed=L, device=TRITON_DEVICE, lengths=lens)
    res = []
    for fn in (session_attention_triton, session_attention_ref):
        ins = [t.detach().clone().requires_grad_(n) for t, n in zip((q, k, v), need)]
        out = fn(*ins, lens_t, num_heads=h, dropout_mask=mask)
        res.append([out] + list(torch.autograd.grad(out, [t for t in ins if t.requires_grad], go)))
    assert "SessionAttentionFunction" in res[0][0].grad_fn.name()
    names = ["out"] + [n for n, x in zip(("dq", "dk", "dv"), need) if x]
    for name, x, y in zip(names, *res):
        assert_close(name, x, y)
    for name, t in zip(names, res[0]):
        assert_padded_rows_zero(t, lens, name)


@triton_only
def test_triton_tiled_kernels_at_short_widths(monkeypatch):
    # the tiled kernels are width-agnostic: forced at L = 19 / 50 (monkeypatched limit) they
    # must agree too, including tiles where the diagonal and the session end cut through
    import mtd_fast.kernels.session_attention as sa

    monkeypatch.setattr(sa, "MAX_FUSED_LEN", 0)
    for b, L, d, h, drop in ((5, 19, 64, 2, True), (3, 50, 100, 1, False)):
        q, k, v, lens, mask, go = attention_inputs(b, L, d, h, drop, seed=77 + L, device=TRITON_DEVICE)
        got = run_attention(sa.session_attention_triton, q, k, v, lens, h, mask, go)
        want = run_attention(session_attention_ref, q, k, v, lens, h, mask, go)
        for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
            assert_close(f"L={L} {name}", x, y)


@triton_only
def test_triton_wide_heads_use_reference_path():
    # head_dim > MAX_FUSED_HEAD_DIM (128) is sent to the reference (documented limit)
    from mtd_fast.kernels.session_attention import session_attention_triton, uses_fused_path

    q, k, v, lens, mask, go = attention_inputs(2, 5, 260, 1, True, seed=5, device=TRITON_DEVICE)
    assert not uses_fused_path(q, 1)
    got = run_attention(session_attention_triton, q, k, v, lens, 1, mask, go)
    want = run_attention(session_attention_ref, q, k, v, lens, 1, mask, go)
    for name, x, y in zip(("out", "dq", "dk", "dv"), got, want):
        assert_close(name, x, y)


@triton_only
def test_triton_rejects_bad_shapes():
    from mtd_fast.kernels.session_attention import session_attention_triton

    q = torch.zeros(2, 3, 10, device=TRITON_DEVICE)
    lens = torch.ones(2, dtype=torch.long, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="num_heads"):
        session_attention_triton(q, q, q, lens, num_heads=3)
    with pytest.raises(ValueError, match="dropout_mask"):
        session_attention_triton(q, q, q, lens, num_heads=1,
                                 dropout_mask=torch.ones(2, 1, 3, 4, device=TRITON_DEVICE))


@triton_only
@CUDA_ONLY
@pytest.mark.parametrize("L,h,dropout", [(50, 1, False), (50, 4, True), (160, 1, True)])
def test_triton_bf16_rule(L, h, dropout):
    # bf16 tl.dot returns garbage in the Triton interpreter: CUDA only
    from mtd_fast.kernels.session_attention import session_attention_triton

    q, k, v, lens, mask, go = attention_inputs(64, L, 100, h, dropout, seed=11, device=TRITON_DEVICE)
    ref32 = run_attention(session_attention_ref, q, k, v, lens, h, mask, go)
    qb, kb, vb = (t.bfloat16() for t in (q, k, v))
    ref16 = run_attention(session_attention_ref, qb, kb, vb, lens, h, mask, go)
    fast = run_attention(session_attention_triton, qb, kb, vb, lens, h, mask, go)
    for name, f, r16, r32 in zip(("out", "dq", "dk", "dv"), fast, ref16, ref32):
        assert f.dtype == torch.bfloat16
        assert_bf16_rule(name, f, r16, r32)
