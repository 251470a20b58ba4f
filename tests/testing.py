"""What the test modules share (imported by name: pytest puts tests/ on sys.path).

- learning bars: `pop_p20` (popularity's test P@20, the bar the learning tests beat).
- real data: `SHARED_DATA` (`mtd_fast.data.data_root`: $MTD_FAST_DATA, else ../shared/data
  beside the project) and `shared_path`, which skips a test when the data is absent.
- the handmade raw click logs of tests/fixtures/: `YOO_MINI` (yoochoose-clicks.dat),
  `RR_MINI` (Retailrocket events.csv), worked out by hand in test_raw.py.
- the op tests' backend axis: `backend_params` (one `pytest.param` per backend; "triton"
  carries the `triton` marker and `TRITON_SKIP`), `triton_only` (the same for a whole
  test), `CUDA_ONLY`, `device_for`, `impl`, and
  `force_packed` (the packed backends at every size, not only above their size guards).
- tolerances and checks: the `TOL` table with `assert_close`, `assert_bf16_rule`,
  `assert_padded_rows_zero`.
- case generators: `random_lengths`, `attention_inputs` / `run_attention`,
  `aggregate_inputs` / `run_aggregate`.

Triton runs where CUDA is available, or on the CPU under the interpreter:
`TRITON_INTERPRET=1 pytest tests -m triton`. The variable must be set before the kernel
modules are imported, so no test sets it; without it and without CUDA every Triton case
skips. The interpreter costs 2-9 ms per program instance, so the batches of the Triton
cases are small primes (3, 5, 7: grids of 3-28 programs).

Tolerances, (dtype, atol, rtol), applied to outputs and to gradients alike (op level):

| dtype    | atol  | rtol  | why |
| -------- | ----- | ----- | --- |
| float32  | 2e-5  | 1e-4  | same math, other summation order (packed: groups of <= 64     |
|          |       |       | columns instead of padded rows; Triton: fp32 eps (1.2e-7)     |
|          |       |       | times reductions of <= 128 x 128 terms of O(1-10) values);    |
|          |       |       | measured <= 4e-6 (packed) and <= 7e-6 (interpreter)           |
| float64  | gradcheck defaults (eps 1e-6, atol 1e-5, rtol 1e-3)                      |
| bfloat16 | rule  |       | max |fast - ref32| <= 2 max |ref16 - ref32| + 1e-5              |
|          |       |       | (flash-attention's rule: the fast bf16 path errs at most twice |
|          |       |       | as much as PyTorch's own bf16 computation, both against fp32)  |

Model level (a whole training step through a backend, `MODEL_TOL`): packed 2e-5 / 1e-4,
Triton 1e-5 / 1e-4 (the issue's fp32 bound).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pytest
import torch

from mtd_fast.data import data_root
from mtd_fast.metrics import MetricAccumulator, ranks_from_scores

PROJECT = Path(__file__).resolve().parents[1]
SHARED_DATA = data_root(PROJECT)
YOO_MINI = PROJECT / "tests" / "fixtures" / "yoochoose-clicks-mini.dat"
RR_MINI = PROJECT / "tests" / "fixtures" / "retailrocket-events-mini.csv"


def shared_path(*parts: str) -> Path:
    """Path under the shared data folder, or skip the test with a reason when it is absent."""
    p = SHARED_DATA.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"real data not found at {p} (tests read it from $MTD_FAST_DATA, else ../shared/data)")
    return p


def pop_p20(ds) -> float:
    """Popularity's test P@20 on `ds`: the training-click counts as every session's scores
    (ties ranked by the project's rule), the bar that the learning tests beat."""
    counts = np.bincount(ds.train_sessions.items.astype(np.int64), minlength=ds.n_items + 1)[1:]
    scores = torch.from_numpy(counts.astype(np.float32))[None, :].expand(len(ds.test), -1)
    acc = MetricAccumulator()
    acc.add(ranks_from_scores(scores, torch.from_numpy(ds.test.targets.astype(np.int64))))
    return acc.result()["P@20"]


# ---- backends ------------------------------------------------------------------------------
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
CUDA = torch.cuda.is_available()
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
# where Triton runs: CUDA tensors, or CPU tensors under the interpreter
TRITON_DEVICE = "cpu" if INTERPRET else "cuda"
TRITON_SKIP = pytest.mark.skipif(
    not TRITON_INSTALLED or not (INTERPRET or CUDA),
    reason="Triton kernels need triton, and CUDA or TRITON_INTERPRET=1 set before pytest starts")
TRITON_MARKS = (pytest.mark.triton, TRITON_SKIP)
CUDA_ONLY = pytest.mark.skipif(not CUDA, reason="CUDA only")


def triton_only(test):
    """Decorator of a Triton-only test: the `triton` marker, skipped where Triton cannot run."""
    return pytest.mark.triton(TRITON_SKIP(test))


def backend_params(*names: str) -> list:
    """The backend axis of an op test: one `pytest.param` per name, id = the name; the
    Triton one is marked `triton` and skips where Triton cannot run."""
    return [pytest.param(n, id=n, marks=TRITON_MARKS if n == "triton" else ()) for n in names]


def device_for(backend: str) -> str:
    """The device a backend's cases run on: Triton's device, the CPU for the others."""
    return TRITON_DEVICE if backend == "triton" else "cpu"


def impl(op: str, backend: str):
    """The implementation of `op` that `backend` names, asked for strictly (a missing one raises)."""
    from mtd_fast.ops.dispatch import resolve

    return resolve(op, {op: backend}, device_for(backend))


def force_packed(monkeypatch) -> None:
    """Run the packed backends at every size: the shapes of the tests are small, and below
    their size guards (SMALL_ATTENTION, SMALL_AGGREGATE) they would run the reference."""
    monkeypatch.setattr(importlib.import_module("mtd_fast.ops.session_attention"), "SMALL_ATTENTION", 0)
    monkeypatch.setattr(importlib.import_module("mtd_fast.ops.aggregate"), "SMALL_AGGREGATE", 0)


# ---- tolerances and checks -----------------------------------------------------------------
TOL = {torch.float32: (2e-5, 1e-4)}
BF16_FLOOR = 1e-5
MODEL_TOL = {"packed": (2e-5, 1e-4), "triton": (1e-5, 1e-4)}


def assert_close(name: str, got, want, dtype=torch.float32) -> None:
    """`got` exists, has `want`'s shape, is finite and within TOL[dtype] of `want`."""
    assert got is not None, f"{name}: no gradient"
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{name}: {m}")


def assert_bf16_rule(name: str, fast, ref16, ref32) -> None:
    """max |fast - ref32| <= 2 max |ref16 - ref32| + BF16_FLOOR (the bf16 row of the table)."""
    assert torch.isfinite(fast).all(), f"{name}: non-finite values"
    err_fast = (fast.float() - ref32).abs().max().item()
    err_ref = (ref16.float() - ref32).abs().max().item()
    assert err_fast <= 2 * err_ref + BF16_FLOOR, (f"{name}: bf16 max error {err_fast:.3g} > 2 x the bf16 "
                                                  f"reference's {err_ref:.3g} (+{BF16_FLOOR})")


def assert_padded_rows_zero(t: torch.Tensor, lengths: Iterable[int], name: str = "") -> None:
    """Rows at or past each session's length are exactly zero (never NaN, never garbage)."""
    prefix = f"{name}: " if name else ""
    for bi, n in enumerate(lengths):
        assert torch.equal(t[bi, n:], torch.zeros_like(t[bi, n:])), f"{prefix}padded rows of session {bi}"


# ---- case generators -----------------------------------------------------------------------
def random_lengths(b: int, L: int, gen: torch.Generator) -> torch.Tensor:
    """(b,) session lengths in 1..L, with a length-1 session first and a full one last, so
    that short sessions have padded rows in every batch."""
    lens = torch.randint(1, L + 1, (b,), generator=gen)
    lens[0], lens[-1] = 1, L
    return lens


def attention_inputs(b: int, L: int, d: int, h: int, dropout: bool, seed: int, device="cpu",
                     dtype=torch.float32, lengths: Optional[list] = None):
    """q, k, v (b, L, d), lengths (random unless given), a scaled keep-0.7 dropout mask
    (b, h, L, L) or None, an upstream gradient (b, L, d); all on `device`."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, L, d, generator=gen) for _ in range(3))
    lens = random_lengths(b, L, gen) if lengths is None else torch.tensor(lengths)
    mask = None
    if dropout:
        keep = 0.7
        mask = (torch.rand(b, h, L, L, generator=gen) < keep).float() / keep
    go = torch.randn(b, L, d, generator=gen)
    mv = lambda t: None if t is None else t.to(device)  # noqa: E731
    return (mv(q).to(dtype), mv(k).to(dtype), mv(v).to(dtype), mv(lens), mv(mask), mv(go))


def run_attention(fn, q, k, v, lens, h, mask, go):
    """(out, dq, dk, dv) of `fn` on fresh leaf copies of q, k, v, upstream gradient `go`."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v, lens, num_heads=h, dropout_mask=None if mask is None else mask.to(q.dtype))
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), go.to(out.dtype))
    return out, dq, dk, dv


def aggregate_inputs(b: int, L: int, d: int, seed: int, g_scale: float = 1.0, lengths: Optional[list] = None,
                     device="cpu"):
    """[h, hp (b, L, d), a (b, d), g (d,) * g_scale, lengths (random unless given),
    upstream gradients gx, gp (b, d)], all on `device`."""
    gen = torch.Generator().manual_seed(seed)
    h, hp = torch.randn(b, L, d, generator=gen), torch.randn(b, L, d, generator=gen)
    a, g = torch.randn(b, d, generator=gen), torch.randn(d, generator=gen) * g_scale
    lens = random_lengths(b, L, gen) if lengths is None else torch.tensor(lengths)
    gx, gp = torch.randn(b, d, generator=gen), torch.randn(b, d, generator=gen)
    return [t.to(device) for t in (h, hp, a, g, lens, gx, gp)]


AGGREGATE_OUTPUTS = ("x_s", "p_s", "dh", "dhp", "da", "dg", "dgamma")


def run_aggregate(fn, h, hp, a, g, lens, gamma, mode, gx, gp, dtype=torch.float32):
    """(x_s, p_s, dh, dhp, da, dg[, dgamma]) of `fn` on fresh leaf copies; a tensor gamma
    is differentiated too."""
    ins = [t.detach().clone().to(dtype).requires_grad_(True) for t in (h, hp, a, g)]
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.detach().clone().requires_grad_(True)
        ins.append(gamma)
    xs, ps = fn(ins[0], ins[1], ins[2], ins[3], lens, gamma=gamma, mode=mode)
    grads = torch.autograd.grad((xs, ps), ins, (gx.to(xs.dtype), gp.to(ps.dtype)))
    return (xs, ps) + tuple(grads)
