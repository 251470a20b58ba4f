"""`mtd_fast.ops.linear_cross_entropy` (the chunked backend, and the Triton one where it
runs) against the eager formula, and every model's training loss going through it.

- loss and both gradients equal `F.cross_entropy(q @ T.T, t)` and its autograd, fp32 to
  ~1e-6 relative (float64 to 1e-12), both chunk strategies, many chunk sizes (one row /
  one item column per chunk, uneven last chunks, one chunk), upstream gradients != 1,
  partial `requires_grad`, no-grad calls; float64 `gradcheck`;
- no (batch, M) tensor is ever created (a dispatch mode records every aten output);
- bad input raises naming the problem; dispatch lists the op and honours its rules;
- each baseline with `score_parts` has the same loss and gradients through the op as
  through its full scores; GRU4Rec's [h, 1] . [W | b] equals its old h W^T + b;
- Triton (`mtd_fast.kernels.linear_cross_entropy`; CUDA, or the CPU under
  TRITON_INTERPRET=1; the `triton` marker): loss and both gradients against the eager
  reference (several tiles per program, row blocks, partial gradients, the float64
  fallback), strict dispatch, MTD's loss through the kernel.

Tolerances (fp32): the chunked sums run in another order than eager's (per-chunk
partial sums of the softmax and of the table gradient): measured max error <= 4e-7 of
the largest entry at these sizes (1e-6 at 43k items, 3e-6 at 1M in the bench). The bound
here is 2e-6 of the largest entry; with logits of ~200, where fp32 itself errs by ulps of
200, the chunked error against float64 must be at most twice eager fp32's own. Model-level
parameter gradients (through the encoders): 1e-4 of the largest entry, the project's
model-level fp32 bound. Triton: the op-level fp32 row of the table in testing.py (atol
2e-5, rtol 1e-4); MTD's loss and gradients through the kernel 1e-5 / 1e-4.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _memcheck import largest_tensor

import mtd_fast
from mtd_fast import ops
from mtd_fast.data.store import DataError, Sessions
from mtd_fast.models import model_class
from mtd_fast.ops import BackendError, linear_cross_entropy
from mtd_fast.ops.linear_cross_entropy import (
    ITEMS_BUDGET_BYTES,
    ROWS_BUDGET_BYTES,
    ROWS_MAX_ITEMS,
    linear_cross_entropy_chunked,
    linear_cross_entropy_ref,
    plan_chunks,
)
from mtd_fast.train import build_model

from testing import MODEL_TOL, TRITON_DEVICE, assert_close, triton_only

FP32_REL = 2e-6


def _inputs(b, m, d, seed, dtype=torch.float32, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, d, generator=gen) * scale).to(dtype)
    t = (torch.randn(m, d, generator=gen) * scale).to(dtype)
    y = torch.randint(0, m, (b,), generator=gen)
    return q, t, y


def _run(fn, q, t, y, grad=None, need=(True, True)):
    """(loss, dq, dT); the loss keeps its grad_fn (the backend's autograd Function)."""
    qa = q.clone().requires_grad_(need[0])
    ta = t.clone().requires_grad_(need[1])
    loss = fn(qa, ta, y)
    if need[0] or need[1]:
        loss.backward(grad)
    return loss, qa.grad, ta.grad


def _close_rel(name, got, want, rel):
    """max |got - want| <= rel * max |want|."""
    assert got is not None and want is not None, f"{name}: missing gradient"
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape}/{got.dtype}"
    err = (got - want).abs().max().item()
    bound = rel * max(want.abs().max().item(), 1e-30)
    assert err <= bound, f"{name}: max error {err:.3g} > {bound:.3g} ({rel:g} of max |want|)"


CASES = [
    # (batch, M, dim, chunk_size, strategy)
    (13, 37, 5, None, None),
    (13, 37, 5, 1, "items"),  # one item column per chunk
    (13, 37, 5, 1, "rows"),  # one row per chunk
    (13, 37, 5, 37 * 4, "rows"),  # 4 rows: uneven last chunk (13 = 3 x 4 + 1)
    (13, 37, 5, 13 * 10, "items"),  # 10 items: uneven last chunk
    (64, 1000, 100, None, "rows"),
    (64, 1000, 100, None, "items"),
    (64, 1000, 100, 64 * 333, "items"),
    (1, 50, 8, None, None),  # one row
    (7, 1, 3, None, None),  # one item: loss 0, gradients 0
    (300, 7, 16, 7 * 128, "rows"),
]


@pytest.mark.parametrize("b,m,d,chunk,strategy", CASES)
def test_matches_eager_fp32(b, m, d, chunk, strategy):
    q, t, y = _inputs(b, m, d, seed=b + m + d)
    got = _run(lambda a, c, yy: linear_cross_entropy_chunked(a, c, yy, chunk_size=chunk, strategy=strategy), q, t, y)
    want = _run(lambda a, c, yy: F.cross_entropy(a @ c.t(), yy), q, t, y)
    for name, x, w in zip(("loss", "dq", "dT"), got, want):
        if w.abs().max() == 0:
            assert torch.equal(x, w), name
        else:
            _close_rel(name, x, w, FP32_REL)


@pytest.mark.parametrize("strategy", ["rows", "items"])
def test_matches_eager_fp64_and_upstream_grad(strategy):
    q, t, y = _inputs(17, 53, 6, seed=3, dtype=torch.float64)
    g = torch.tensor(-0.37, dtype=torch.float64)
    got = _run(lambda a, c, yy: linear_cross_entropy_chunked(a, c, yy, chunk_size=53 * 5, strategy=strategy),
               q, t, y, g)
    want = _run(lambda a, c, yy: F.cross_entropy(a @ c.t(), yy), q, t, y, g)
    for name, x, w in zip(("loss", "dq", "dT"), got, want):
        torch.testing.assert_close(x, w, atol=1e-12, rtol=1e-12, msg=lambda msg: f"{name}: {msg}")


@pytest.mark.parametrize("strategy", ["rows", "items"])
def test_gradcheck_float64(strategy):
    q, t, y = _inputs(5, 11, 3, seed=4, dtype=torch.float64)
    fn = lambda a, c: linear_cross_entropy_chunked(a, c, y, chunk_size=7, strategy=strategy)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (q.requires_grad_(), t.requires_grad_()))


@pytest.mark.parametrize("strategy", ["rows", "items"])
@pytest.mark.parametrize("need", [(True, False), (False, True)])
def test_partial_gradients_and_no_grad(strategy, need):
    q, t, y = _inputs(9, 40, 4, seed=5)
    fn = lambda a, c, yy: linear_cross_entropy_chunked(a, c, yy, chunk_size=40 * 2, strategy=strategy)  # noqa: E731
    loss, dq, dt = _run(fn, q, t, y, need=need)
    want = _run(lambda a, c, yy: F.cross_entropy(a @ c.t(), yy), q, t, y, need=need)
    assert (dq is None) == (not need[0]) and (dt is None) == (not need[1])
    _close_rel("grad", dq if need[0] else dt, want[1] if need[0] else want[2], FP32_REL)
    with torch.no_grad():
        _close_rel("no-grad loss", fn(q, t, y), want[0], FP32_REL)


def test_large_logits_no_worse_than_eager():
    # logits up to ~200 (a diverging or unnormalised model): fp32 itself then errs by ulps of
    # 200 (1.5e-5) in every softmax weight, eager included. The rule (flash-attention's, as
    # for bf16 elsewhere): against float64, the chunked error is at most twice eager fp32's
    # own error (+ a floor). Measured: equal errors for dq / dT, 9x smaller for the loss.
    q, t, y = _inputs(32, 500, 20, seed=6, scale=3.0)
    ref64 = _run(lambda a, c, yy: F.cross_entropy(a @ c.t(), yy), q.double(), t.double(), y)
    eager = _run(lambda a, c, yy: F.cross_entropy(a @ c.t(), yy), q, t, y)
    for strategy in ("rows", "items"):
        got = _run(lambda a, c, yy: linear_cross_entropy_chunked(a, c, yy, chunk_size=32 * 64, strategy=strategy),
                   q, t, y)
        assert torch.isfinite(got[0])
        for name, x, e, w in zip(("loss", "dq", "dT"), got, eager, ref64):
            err, err_eager = (x.double() - w).abs().max().item(), (e.double() - w).abs().max().item()
            assert err <= 2 * err_eager + 1e-7, f"{strategy} {name}: {err:.3g} > 2 x eager's {err_eager:.3g}"


@pytest.mark.parametrize("strategy", ["rows", "items"])
def test_bfloat16_rule(strategy):
    # half precision: against the fp32 result, the chunked bf16 error is at most twice eager
    # bf16's own (+1e-5): flash-attention's rule, as for the Triton kernels
    q, t, y = _inputs(24, 300, 16, seed=12)
    ref = _run(lambda a, c, yy: F.cross_entropy(a @ c.t(), yy), q, t, y)
    eager = _run(lambda a, c, yy: F.cross_entropy(a @ c.t(), yy), q.bfloat16(), t.bfloat16(), y)
    got = _run(lambda a, c, yy: linear_cross_entropy_chunked(a, c, yy, chunk_size=24 * 50, strategy=strategy),
               q.bfloat16(), t.bfloat16(), y)
    for name, x, e, r in zip(("loss", "dq", "dT"), got, eager, ref):
        assert x.dtype == torch.bfloat16
        err, err_eager = (x.float() - r).abs().max().item(), (e.float() - r).abs().max().item()
        assert err <= 2 * err_eager + 1e-5, f"{strategy} {name}: {err:.3g} > 2 x eager bf16's {err_eager:.3g}"


@pytest.mark.parametrize("strategy", ["rows", "items"])
def test_no_batch_by_items_tensor(strategy):
    # batch 64 > dim 16, so (batch, M) is the largest legitimate size only eager reaches
    b, m, d = 64, 3000, 16
    q, t, y = _inputs(b, m, d, seed=7)
    qa, ta = q.clone().requires_grad_(), t.clone().requires_grad_()
    n, op, shape = largest_tensor(lambda: linear_cross_entropy_chunked(qa, ta, y, chunk_size=b * m // 8,
                                                                       strategy=strategy).backward())
    assert n <= max(b * m // 8, m * d), f"{strategy}: {op} made a {shape} tensor"
    qb, tb = q.clone().requires_grad_(), t.clone().requires_grad_()
    n_eager, _, _ = largest_tensor(lambda: F.cross_entropy(qb @ tb.t(), y).backward())
    assert n_eager >= b * m  # the check itself sees the eager logits


def test_plan_chunks_by_catalogue_size():
    # measured: rows up to ~65k items, items beyond (module docstring); budget -> chunk
    assert plan_chunks(512, 43_097)[0] == "rows"
    assert plan_chunks(512, 1_000_000)[0] == "items"
    assert plan_chunks(512, ROWS_MAX_ITEMS + 1)[0] == "items"
    strategy, rows = plan_chunks(512, 43_097)
    assert rows * 43_097 * 4 <= ROWS_BUDGET_BYTES and rows >= 16
    strategy, cols = plan_chunks(512, 1_000_000)
    assert cols * 512 * 4 <= ITEMS_BUDGET_BYTES
    assert plan_chunks(40, 100, chunk_size=2050) == ("rows", 20)  # at most chunk_size logits
    assert plan_chunks(10, 100, chunk_size=30, strategy="items") == ("items", 3)
    assert plan_chunks(10, 100, chunk_size=30)[0] == "items"  # too few rows fit: item chunks
    with pytest.raises(ValueError, match="unknown strategy"):
        plan_chunks(10, 100, strategy="cols")


# ---- bad input -----------------------------------------------------------------------------

def test_bad_input_raises_clearly():
    q, t, y = _inputs(4, 10, 3, seed=8)
    with pytest.raises(ValueError, match="target 10 is out of range.*0..9"):
        linear_cross_entropy(q, t, torch.tensor([1, 2, 3, 10]))
    with pytest.raises(ValueError, match="target -1 is out of range.*padding id 0"):
        linear_cross_entropy(q, t, torch.tensor([1, -1, 3, 4]))
    with pytest.raises(TypeError, match="integer class indices"):
        linear_cross_entropy(q, t, y.float())
    with pytest.raises(TypeError, match="share one floating dtype"):
        linear_cross_entropy(q, t.double(), y)
    with pytest.raises(ValueError, match="one device"):
        linear_cross_entropy(q, t.to("meta"), y)
    with pytest.raises(ValueError, match="empty batch"):
        linear_cross_entropy(q[:0], t, y[:0])
    with pytest.raises(ValueError, match="no rows"):
        linear_cross_entropy(q, t[:0], y)
    with pytest.raises(ValueError, match="dim 3 but item_table has dim 2"):
        linear_cross_entropy(q, t[:, :2], y)
    with pytest.raises(ValueError, match=r"targets must be \(batch=4,\)"):
        linear_cross_entropy(q, t, y[:3])
    for bad in (0, -5, True, 2.5):
        with pytest.raises(ValueError, match="chunk_size"):
            linear_cross_entropy(q, t, y, chunk_size=bad)


def test_models_reject_the_padding_target():
    model = model_class("narm")(20)
    batch = model.batch_from_sessions(Sessions.from_lists([[1, 2], [3]]), np.arange(2))
    with pytest.raises(DataError, match="0 is the padding id"):
        model.loss(batch, torch.tensor([4, 0]))
    with pytest.raises(DataError, match="21 is not an item"):
        model.loss(batch, torch.tensor([4, 21]))


# ---- dispatch ------------------------------------------------------------------------------

def test_dispatch_lists_and_selects(monkeypatch):
    monkeypatch.delenv("MTD_FAST_BACKEND", raising=False)
    avail = mtd_fast.available_backends()["linear_cross_entropy"]
    assert avail[0] == "chunked" or avail[0] == "triton"
    assert "chunked" in avail and avail[-1] == "reference"
    assert ops.describe("linear_cross_entropy", None, "cpu") == "chunked"  # auto on the CPU
    assert ops.describe("linear_cross_entropy", "reference", "cpu") == "reference"
    assert ops.describe("linear_cross_entropy", {"linear_cross_entropy": "chunked"}, "cpu") == "chunked"
    assert ops.describe("linear_cross_entropy", "packed", "cpu") == "chunked"  # a string it lacks: auto
    monkeypatch.setenv("MTD_FAST_BACKEND", "reference")
    assert ops.describe("linear_cross_entropy", None, "cpu") == "reference"
    q, t, y = _inputs(6, 30, 4, seed=9)
    qa = q.clone().requires_grad_()
    assert "Rows" in linear_cross_entropy(qa, t, y, backend="chunked").grad_fn.name()
    assert "NllLoss" in linear_cross_entropy(qa, t, y).grad_fn.name()  # env: the eager reference
    _close_rel("ref", linear_cross_entropy(q, t, y), linear_cross_entropy_ref(q, t, y), 0)


@pytest.mark.skipif(torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
                    reason="Triton is usable here")
def test_strict_triton_request_raises_on_cpu():
    q, t, y = _inputs(6, 30, 4, seed=10)
    with pytest.raises(BackendError, match="linear_cross_entropy.*available here: chunked, reference"):
        linear_cross_entropy(q, t, y, backend={"linear_cross_entropy": "triton"})


# ---- triton --------------------------------------------------------------------------------

def _triton_inputs(b, m, d, seed):
    """q, T, targets on Triton's device and an upstream gradient != 1."""
    q, t, y = (x.to(TRITON_DEVICE) for x in _inputs(b, m, d, seed))
    return q, t, y, torch.tensor(0.7, device=TRITON_DEVICE)


TRITON_CASES = [
    # (batch, M, dim, target programs): the last column forces several tiles per program
    pytest.param(5, 37, 20, None, id="B5-M37-d20"),  # one tile, padded rows and columns
    pytest.param(7, 130, 100, None, id="B7-M130-d100"),  # 3 tiles -> 3 splits / programs, 7 dim chunks
    pytest.param(7, 130, 100, 1, id="B7-M130-d100-tiles4"),  # one program looping over 4 tiles
    pytest.param(33, 70, 16, None, id="B33-M70-d16"),  # two row blocks
    pytest.param(1, 17, 3, None, id="B1-M17-d3"),
]


@triton_only
@pytest.mark.parametrize("b,m,d,progs", TRITON_CASES)
def test_triton_matches_reference(b, m, d, progs, monkeypatch):
    from mtd_fast.kernels import linear_cross_entropy as lce

    if progs is not None:
        monkeypatch.setattr(lce, "TARGET_PROGRAMS", progs)
    q, t, y, go = _triton_inputs(b, m, d, seed=b + m + d)
    got = _run(lce.linear_cross_entropy_triton, q, t, y, go)
    want = _run(linear_cross_entropy_ref, q, t, y, go)
    assert "LinearCrossEntropyFunction" in got[0].grad_fn.name()
    for name, x, w in zip(("loss", "dq", "dT"), got, want):
        assert_close(name, x, w)


@triton_only
def test_triton_partial_grads_and_fallback():
    from mtd_fast.kernels.linear_cross_entropy import linear_cross_entropy_triton

    q, t, y, go = _triton_inputs(5, 40, 8, seed=41)
    for need in ((True, False), (False, True)):
        got = _run(linear_cross_entropy_triton, q, t, y, go, need)
        want = _run(linear_cross_entropy_ref, q, t, y, go, need)
        for name, x, w, n in zip(("dq", "dT"), got[1:], want[1:], need):
            if n:
                assert_close(name, x, w)
            else:
                assert x is None
    # float64 runs the chunked PyTorch path (tl.dot has no fp64 on every GPU)
    q64, t64 = q.double().requires_grad_(), t.double()
    out = linear_cross_entropy_triton(q64, t64, y)
    assert "LinearCrossEntropyFunction" not in out.grad_fn.name()
    torch.testing.assert_close(out, linear_cross_entropy_ref(q64, t64, y), atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="out of range"):
        linear_cross_entropy_triton(q, t, torch.full_like(y, 40))


@triton_only
def test_triton_strict_dispatch():
    q, t, y, _ = _triton_inputs(3, 50, 16, seed=42)
    q.requires_grad_(True)
    assert ops.describe("linear_cross_entropy", {"linear_cross_entropy": "triton"}, q.device) == "triton"
    out = ops.linear_cross_entropy(q, t, y, backend={"linear_cross_entropy": "triton"})
    assert "LinearCrossEntropyFunction" in out.grad_fn.name()
    assert_close("loss", out, linear_cross_entropy_ref(q, t, y))


@triton_only
def test_triton_mtd_loss_through_the_kernel():
    # the model's own path: MTD.loss -> score_parts -> ops.linear_cross_entropy -> the kernel
    rng = np.random.default_rng(1)
    seqs = [list(rng.integers(1, 41, size=n)) for n in [1, 3, 7, 2, 5]]
    targets = torch.tensor(rng.integers(1, 41, size=len(seqs)), device=TRITON_DEVICE)
    results = []
    for backend in ({"linear_cross_entropy": "triton"}, "reference"):
        torch.manual_seed(0)
        # without the re-click term (the default has it): the plain kernel, not the biased path (test_repeat)
        model = mtd_fast.MTD(40, mtd_fast.MTDConfig(hidden_size=16, repeat_bias=False), dropout=0.3,
                             backend=backend).to(TRITON_DEVICE)
        batch = model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(len(seqs)))
        torch.manual_seed(1)
        loss = model.loss(batch, targets)
        loss.backward()
        results.append((loss.detach(), loss.grad_fn.name(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (l_t, fn_t, g_t), (l_r, fn_r, g_r) = results
    assert "LinearCrossEntropyFunction" in fn_t and "LinearCrossEntropyFunction" not in fn_r
    atol, rtol = MODEL_TOL["triton"]
    torch.testing.assert_close(l_t, l_r, atol=atol, rtol=rtol)
    for name in g_r:
        torch.testing.assert_close(g_t[name], g_r[name], atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


# ---- models --------------------------------------------------------------------------------

SCORE_PARTS_MODELS = ["mtd", "gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan"]


def _model_batch(name, n_items=60, seed=0):
    torch.manual_seed(seed)
    model = build_model(name, n_items, mtd_fast.MTDConfig(hidden_size=16), mtd_fast.TrainConfig(dropout=0.0), None)
    rng = np.random.default_rng(seed)
    seqs = [list(rng.integers(1, n_items + 1, size=n)) for n in (1, 2, 5, 3, 7, 4, 9, 2)]
    batch = model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(len(seqs)))
    targets = torch.from_numpy(rng.integers(1, n_items + 1, size=len(seqs)))
    return model, batch, targets


def test_which_models_score_by_parts():
    for name in SCORE_PARTS_MODELS:
        assert model_class(name)(10).has_score_parts, name
    for name in ("pop", "spop", "itemknn"):
        assert not model_class(name)(10).has_score_parts, name


@pytest.mark.parametrize("name", SCORE_PARTS_MODELS)
def test_model_loss_through_the_op(name):
    # model.loss (score_parts -> linear_cross_entropy, auto = chunked) has the same value and
    # parameter gradients as F.cross_entropy on the model's full scores
    results = []
    for through_op in (True, False):
        model, batch, targets = _model_batch(name)
        model.train()
        loss = model.loss(batch, targets) if through_op else F.cross_entropy(model.scores(batch), targets - 1)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, loss.grad_fn.name()))
    (l_c, g_c, fn_c), (l_r, g_r, _) = results
    assert fn_c == "_RowsFunctionBackward", fn_c
    _close_rel("loss", l_c, l_r, FP32_REL)
    assert g_c.keys() == g_r.keys() and len(g_r) >= 2
    # parameter gradients went through the encoders' backward (differences of larger terms):
    # the project's model-level fp32 bound, 1e-4 relative (MODEL_TOL in tests/testing.py);
    # measured up to 1.6e-5 of the largest entry (CSRM's attention weights, entries ~1e-7)
    for n in g_r:
        if g_r[n].abs().max() > 0:
            _close_rel(n, g_c[n], g_r[n], 1e-4)


def test_gru4rec_parts_equal_its_output_layer():
    model, batch, _ = _model_batch("gru4rec")
    model.eval()
    with torch.no_grad():
        model.output.bias.normal_()  # a nonzero bias, so the extra column matters
        h = model.forward(batch)
        old = model.output(h)  # h W^T + b: the scores before score_parts
        torch.testing.assert_close(model.scores(batch), old, atol=1e-6, rtol=1e-6)
