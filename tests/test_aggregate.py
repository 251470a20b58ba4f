"""The `aggregate` op (`mtd_fast.ops.aggregate`): the reference against a direct
per-sample formula, and every backend against the reference, both outputs and the
gradient of every input (gamma included when it is a tensor).

Backends (the `backend` axis, `testing.backend_params`): "packed" (valid rows gathered,
segment softmaxes; CPU) and "triton" (`mtd_fast.kernels.aggregate`; CUDA, or the CPU
under TRITON_INTERPRET=1). Cases: both aggregation modes, gamma float (also negative) and
tensor, length-1 sessions, lengths beyond the width, large logits (the online softmax
across chunks must not overflow), padded rows, partial gradients, one output used,
expanded upstream gradients, float64 gradcheck of the packed path, the bf16 rule (no
tl.dot in this kernel, so bf16 also runs in the interpreter). Tolerances: the table in
testing.py.
"""
from __future__ import annotations

import pytest
import torch

from mtd_fast import ops
from mtd_fast.ops.aggregate import aggregate_packed, aggregate_ref

from testing import (
    AGGREGATE_OUTPUTS,
    CUDA,
    INTERPRET,
    TRITON_DEVICE,
    aggregate_inputs,
    assert_bf16_rule,
    assert_close,
    assert_padded_rows_zero,
    backend_params,
    device_for,
    force_packed,
    impl,
    run_aggregate,
    triton_only,
)

# what the output's grad_fn names for each backend
GRAD_FN = {"packed": "IndexAdd", "triton": "AggregateFunction"}


@pytest.fixture(autouse=True)
def _packed_at_every_size(monkeypatch):
    force_packed(monkeypatch)


# ---- the reference -------------------------------------------------------------------------
def aggregate_loop(h, hp, a, g, lengths, gamma, mode):
    xs, ps = [], []
    for b in range(h.shape[0]):
        n = int(lengths[b])
        if mode == "additive":
            e = torch.stack([g @ torch.sigmoid(a[b] + hp[b, i]) for i in range(n)])
        else:
            e = torch.stack([g @ torch.sigmoid(a[b] * hp[b, i]) for i in range(n)])
        alpha = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
        pos = torch.tensor([n - i for i in range(n)], dtype=h.dtype)
        beta = torch.exp(-gamma * pos) / torch.exp(-gamma * pos).sum()
        xs.append(sum(alpha[i] * h[b, i] for i in range(n)))
        ps.append(sum(beta[i] * h[b, i] for i in range(n)))
    return torch.stack(xs), torch.stack(ps)


@pytest.mark.parametrize("mode", ["additive", "product"])
def test_reference_formula(mode):
    torch.manual_seed(2)
    lengths = torch.tensor([1, 6, 3, 6])
    h, hp = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
    h[0, 1:] = 99.0  # padding must be ignored whatever it holds
    a, g = torch.randn(4, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    xs, ps = aggregate_ref(h, hp, a, g, lengths, 0.75, mode)
    ex, ep = aggregate_loop(h, hp, a, g, lengths, 0.75, mode)
    assert torch.allclose(xs, ex) and torch.allclose(ps, ep)
    assert torch.allclose(xs[0], h[0, 0]) and torch.allclose(ps[0], h[0, 0])


def test_reference_gradcheck_with_learned_gamma():
    torch.manual_seed(3)
    lengths = torch.tensor([2, 4, 1])
    args = [torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True),
            torch.tensor(0.5, dtype=torch.float64, requires_grad=True)]

    def f(h, hp, a, g, gm):
        return aggregate_ref(h, hp, a, g, lengths, gm, "additive")

    assert torch.autograd.gradcheck(f, args)


def test_empty_sessions_are_an_input_error():
    q = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="session lengths must be in 1..3"):
        ops.aggregate(q, q, q[:, 0], q[0, 0], torch.tensor([4, 1]))


# ---- every backend against the reference ---------------------------------------------------
CASES = [
    # (batch, seq_len, dim, gamma, g_scale, lengths (None: random), seed); gamma "t" = 0-dim
    # tensor 0.75 requiring grad
    pytest.param(7, 19, 100, 0.75, 1.0, None, 819, id="B7-L19-d100-float"),
    pytest.param(7, 19, 100, "t", 1.0, None, 819, id="B7-L19-d100-tensor"),
    pytest.param(5, 50, 64, "t", 1.0, None, 614, id="B5-L50-d64-tensor"),
    pytest.param(5, 50, 100, -0.4, 1.0, [1, 2, 3, 50, 9], 650, id="B5-L50-negative-gamma"),
    pytest.param(3, 1, 100, "t", 1.0, None, 401, id="B3-L1-d100-tensor"),
    pytest.param(3, 19, 64, "t", 1.0, [25, 19, 4], 383, id="B3-L19-length-beyond-width"),
    pytest.param(7, 19, 100, 0.75, 1.0, None, 2119, id="B7-L19-d100-float-s2119"),
    pytest.param(7, 19, 100, "t", 1.0, None, 2119, id="B7-L19-d100-tensor-s2119"),
    pytest.param(5, 50, 64, "t", 1.0, None, 2114, id="B5-L50-d64-tensor-s2114"),
    # max of the beta logits at the other end
    pytest.param(5, 50, 100, -0.4, 1.0, None, 2150, id="B5-L50-d100-negative-gamma"),
    pytest.param(3, 1, 100, "t", 1.0, None, 2101, id="B3-L1-d100-tensor-s2101"),
    # large logits (|e| up to ~1e3): the online softmax across chunks must not overflow
    pytest.param(3, 50, 100, 0.75, 40.0, None, 2150, id="B3-L50-d100-large-logits"),
]


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
@pytest.mark.parametrize("mode", ["additive", "product"])
@pytest.mark.parametrize("b,L,d,gamma,g_scale,lengths,seed", CASES)
def test_matches_reference(backend, b, L, d, gamma, g_scale, lengths, seed, mode):
    dev = device_for(backend)
    h, hp, a, g, lens, gx, gp = aggregate_inputs(b, L, d, seed, g_scale=g_scale, lengths=lengths, device=dev)
    if gamma == "t":
        gamma = torch.tensor(0.75, device=dev)
    got = run_aggregate(impl("aggregate", backend), h, hp, a, g, lens, gamma, mode, gx, gp)
    want = run_aggregate(aggregate_ref, h, hp, a, g, lens, gamma, mode, gx, gp)
    assert len(got) == len(want) == (7 if isinstance(gamma, torch.Tensor) else 6)
    for name, x, y in zip(AGGREGATE_OUTPUTS, got, want):
        assert_close(name, x, y)
    assert_padded_rows_zero(got[2], lens.tolist(), "dh")


@pytest.mark.parametrize("backend", backend_params("reference", "packed", "triton"))
@pytest.mark.parametrize("mode", ["additive", "product"])
@pytest.mark.parametrize("b,L,d,seed", [(7, 19, 100, 31), (3, 1, 64, 32), (5, 50, 100, 33)])
def test_rows_layout_is_the_padded_op_on_the_valid_rows(backend, mode, b, L, d, seed):
    """h, hp as (N, d) rows (the valid clicks only, what MTD passes): both outputs and every
    gradient equal the padded op's, a learned gamma included, for each backend."""
    from mtd_fast.ops.common import padded_to_rows

    dev = device_for(backend)
    h, hp, a, g, lens, gx, gp = aggregate_inputs(b, L, d, seed, device=dev)
    gamma = torch.tensor(0.75, device=dev)
    want = run_aggregate(aggregate_ref, h, hp, a, g, lens, gamma, mode, gx, gp)

    def rows_op(h_, hp_, a_, g_, lens_, gamma, mode):
        return ops.aggregate(padded_to_rows(h_, lens_), padded_to_rows(hp_, lens_), a_, g_, lens_, gamma=gamma,
                             mode=mode, backend=backend)

    got = run_aggregate(rows_op, h, hp, a, g, lens, gamma, mode, gx, gp)
    for name, x, y in zip(AGGREGATE_OUTPUTS, got, want):
        assert_close(name, x, y)
    with pytest.raises(ValueError, match="rows for sessions of"):
        ops.aggregate(h[0], hp[0], a, g, lens, backend=backend)


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
def test_one_output_used(backend):
    # only p_s reaches the loss: the backward gets dx_s = None and must treat it as zero
    h, hp, a, g, lens, gx, gp = aggregate_inputs(3, 19, 64, seed=4, device=device_for(backend))
    outs = []
    for fn in (impl("aggregate", backend), aggregate_ref):
        hh = h.clone().requires_grad_(True)
        gg = g.clone().requires_grad_(True)
        _, ps = fn(hh, hp, a, gg, lens, gamma=0.75, mode="additive")
        outs.append(torch.autograd.grad((ps * gp).sum(), (hh, gg), allow_unused=True))
    assert_close("dh", outs[0][0], outs[1][0])
    dg_fast, dg_ref = outs[0][1], outs[1][1]
    zero_ref = torch.zeros_like(h[0, 0]) if dg_ref is None else dg_ref
    assert_close("dg", dg_fast if dg_fast is not None else torch.zeros_like(zero_ref), zero_ref)


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
def test_expanded_upstream_gradients(backend):
    # loss = x_s.sum() + 2 p_s.sum() hands the backward expanded (stride-0) gradients; the
    # backward must read strides instead of assuming contiguity
    h, hp, a, g, lens, _, _ = aggregate_inputs(3, 19, 64, seed=32, device=device_for(backend))
    grads = []
    for fn in (impl("aggregate", backend), aggregate_ref):
        ins = [t.clone().requires_grad_(True) for t in (h, hp, a, g)]
        xs, ps = fn(*ins, lens, gamma=0.75, mode="product")
        (xs.sum() + 2 * ps.sum()).backward()
        grads.append([t.grad for t in ins])
    for name, x, y in zip(("dh", "dhp", "da", "dg"), *grads):
        assert_close(name, x, y)


@pytest.mark.parametrize("backend", backend_params("packed", "triton"))
def test_dispatch_reaches_the_backend(backend):
    h, hp, a, g, lens, gx, gp = aggregate_inputs(3, 19, 64, seed=22, device=device_for(backend))
    h.requires_grad_(True)
    assert ops.describe("aggregate", backend, h.device) == backend
    want = aggregate_ref(h, hp, a, g, lens, gamma=0.75, mode="additive")
    for spec in (backend, {"aggregate": backend}):
        xs, ps = ops.aggregate(h, hp, a, g, lens, gamma=0.75, mode="additive", backend=spec)
        assert GRAD_FN[backend] in xs.grad_fn.name()
        assert_close("x_s", xs, want[0])
        assert_close("p_s", ps, want[1])


# ---- packed --------------------------------------------------------------------------------
def test_packed_gradcheck_float64():
    gen = torch.Generator().manual_seed(1)
    b, L, d = 3, 5, 4
    ins = [torch.randn(b, L, d, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2)]
    ins += [torch.randn(b, d, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.randn(d, generator=gen, dtype=torch.float64, requires_grad=True),
            torch.tensor(0.6, dtype=torch.float64, requires_grad=True)]
    lens = torch.tensor([1, 5, 3])
    for mode in ("additive", "product"):
        assert torch.autograd.gradcheck(lambda h, hp, a, g, gam: aggregate_packed(h, hp, a, g, lens, gam, mode), ins)


# ---- triton --------------------------------------------------------------------------------
@triton_only
def test_triton_padded_rows_and_partial_grads():
    # gradients of padded rows are exactly zero; only h requires grad, gamma is a tensor
    # without grad: ctx.needs_input_grad must skip the rest
    from mtd_fast.kernels.aggregate import aggregate_triton

    lens = [1, 2, 50, 4, 9]
    h, hp, a, g, lens_t, gx, gp = aggregate_inputs(5, 50, 100, seed=9, lengths=lens, device=TRITON_DEVICE)
    hh = h.clone().requires_grad_(True)
    gamma = torch.tensor(0.5, device=TRITON_DEVICE)
    xs, ps = aggregate_triton(hh, hp, a, g, lens_t, gamma=gamma, mode="product")
    assert xs.grad_fn is not None and "AggregateFunction" in xs.grad_fn.name()
    (dh,) = torch.autograd.grad((xs, ps), (hh,), (gx, gp))
    assert_padded_rows_zero(dh, lens)
    h2 = h.clone().requires_grad_(True)
    xs2, ps2 = aggregate_ref(h2, hp, a, g, lens_t, gamma=gamma, mode="product")
    (dh2,) = torch.autograd.grad((xs2, ps2), (h2,), (gx, gp))
    assert_close("x_s", xs, xs2)
    assert_close("p_s", ps, ps2)
    assert_close("dh", dh, dh2)


@triton_only
@pytest.mark.parametrize("mode", ["additive", "product"])
def test_triton_bf16_rule(mode):
    # no tl.dot in this kernel, so bf16 also runs in the interpreter
    from mtd_fast.kernels.aggregate import aggregate_triton

    b = 64 if CUDA and not INTERPRET else 5
    h, hp, a, g, lens, gx, gp = aggregate_inputs(b, 50, 100, seed=13, device=TRITON_DEVICE)
    gamma = torch.tensor(0.75, device=TRITON_DEVICE)
    ref32 = run_aggregate(aggregate_ref, h, hp, a, g, lens, gamma, mode, gx, gp)
    ref16 = run_aggregate(aggregate_ref, h, hp, a, g, lens, gamma, mode, gx, gp, dtype=torch.bfloat16)
    fast = run_aggregate(aggregate_triton, h, hp, a, g, lens, gamma, mode, gx, gp, dtype=torch.bfloat16)
    for name, f, r16, r32 in zip(AGGREGATE_OUTPUTS, fast, ref16, ref32):
        if name != "dgamma":  # gamma stays fp32 (a parameter); its grad is fp32 in both
            assert f.dtype == torch.bfloat16, name
        assert_bf16_rule(name, f, r16, r32)


@triton_only
def test_triton_rejects_bad_input():
    from mtd_fast.kernels.aggregate import aggregate_triton

    h = torch.zeros(2, 3, 8, device=TRITON_DEVICE)
    a, g = torch.zeros(2, 8, device=TRITON_DEVICE), torch.zeros(8, device=TRITON_DEVICE)
    lens = torch.ones(2, dtype=torch.long, device=TRITON_DEVICE)
    with pytest.raises(ValueError, match="mode"):
        aggregate_triton(h, h, a, g, lens, mode="dot")
    with pytest.raises(ValueError, match="a must be"):
        aggregate_triton(h, h, g, g, lens)
