"""One-shot GPU check of the Triton kernels: correctness (fp32, bf16) and timing.

    python benches/gpu_check.py [OUT.json]        (or $OUT/gpu_check.json when $OUT is set)
    pytest benches/gpu_check.py                   (skips without CUDA)

It tests the INSTALLED package (`pip install --no-build-isolation --no-deps .`): the
checkout is removed from sys.path before `mtd_fast` is imported, and the JSON records
where `mtd_fast` came from. Every fast kernel is reached through the public ops with a
strict backend dict (`{op: "triton"}`), which raises instead of falling back, so the
reference can never be timed against itself.

In one run, on one CUDA device, no network, a few minutes at most (H200: expected well
under 5 minutes, most of it kernel compilation):

1. correctness against the reference ops, outputs and every input gradient with one
   upstream gradient:
   - fp32: |fast - ref| <= atol + rtol |ref| with (atol, rtol) = (1e-4, 1e-4) (ieee dots,
     batch-wide reductions of dg / dgamma over 25,600 terms; a tighter table lives in
     tests/testing.py, for the small shapes of the op tests);
   - bf16: max |fast_bf16 - ref_fp32| <= 2 max |ref_bf16 - ref_fp32| + 1e-5 (both against
     the fp32 reference; flash-attention's rule);
   on batch 512, lengths up to 50 (and the odd shapes: length 1, 19, heads 4, d 64);
   linear_cross_entropy at batch 512, d 100, 43,097 items (and odd shapes), the same
   rules with the dT / dq sums over up to 43k terms; and the chunked ranking / top-k on
   CUDA tensors against the full-matrix ones (integer equality, recorded: cuBLAS may
   round a chunk's GEMM differently from the full one);
2. timing of forward + backward (CUDA events, median of 50 after 10 warm-up calls) at
   batch 512, padded length 50 (and 20; and 164, the tiled path), d = 100, fp32 and bf16:
   the Triton kernel (and, at widths <= 128, its tiled variant, to tune MAX_FUSED_LEN), the
   eager reference, `scaled_dot_product_attention` (attention, no dropout mask: SDPA
   cannot take one), and torch.compile of the reference (at L = 50 only: it recompiles per
   shape, dtype and mask); linear_cross_entropy at 43,097 and 1,000,000 items: triton,
   the chunked PyTorch backend and eager, with the peak CUDA memory of each step above
   what was allocated before it;
3. HOOK: the full MTD training step, backend "triton" (every op) vs "reference"
   (`time_mtd_training_step` below, clearly marked; skipped with the reason in the JSON when
   `mtd_fast.models.mtd` is missing; its owner may replace the body).

Prints one table and writes JSON (meta, checks, timings, lce_timings, mtd_step).

MTD_GPU_CHECK_SMOKE=1 with TRITON_INTERPRET=1 runs the same script on CPU tensors through
the Triton interpreter at tiny sizes (no timing worth reading): tests/test_kernels.py
does that, so the script itself cannot rot without a GPU.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the installed package, never the source tree (which lacks mtd_fast.kernels and the
# compiled extension): drop the checkout from sys.path before the first import
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import mtd_fast  # noqa: E402
from mtd_fast import ops  # noqa: E402
from mtd_fast.ops.aggregate import aggregate_ref  # noqa: E402
from mtd_fast.ops.linear_cross_entropy import linear_cross_entropy_ref  # noqa: E402
from mtd_fast.ops.session_attention import session_attention_ref, session_attention_sdpa  # noqa: E402

SMOKE = os.environ.get("MTD_GPU_CHECK_SMOKE") == "1"
BATCH, DIM = (7, 16) if SMOKE else (512, 100)
LCE_ITEMS = (97, 300) if SMOKE else (43097, 1_000_000)
FP32_TOL = (1e-4, 1e-4)
COMPILE_BUDGET_S = 150  # torch.compile timings are skipped once the timing stage is this old
BF16_FLOOR = 1e-5
DIGI_TEST = ROOT.parent / "shared" / "data" / "diginetica" / "test.txt"


def _lengths(b: int, width: int, seed: int, device) -> torch.Tensor:
    """Diginetica-like lengths (geometric, mean 4.85), clipped to width; first 1, last full."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.rand(b, generator=gen).clamp_min(1e-12)
    lens = (torch.log(u) / math.log(1 - 1 / 4.85)).floor().long() + 1
    lens = lens.clamp(1, width)
    lens[0], lens[-1] = 1, width
    return lens.to(device)


# ------------------------------------------------------------------------------------------
# correctness
# ------------------------------------------------------------------------------------------
def _attn_run(fn, q, k, v, lens, h, mask, go, dtype):
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = fn(*ins, lens, num_heads=h, dropout_mask=None if mask is None else mask.to(dtype))
    return [out] + list(torch.autograd.grad(out, ins, go.to(dtype)))


def _agg_run(fn, h, hp, a, g, lens, gamma, mode, gx, gp, dtype):
    ins = [t.detach().to(dtype).requires_grad_(True) for t in (h, hp, a, g)]
    if isinstance(gamma, torch.Tensor):
        gamma = gamma.detach().clone().requires_grad_(True)
        ins.append(gamma)
    xs, ps = fn(*ins[:4], lens, gamma=gamma, mode=mode)
    return [xs, ps] + list(torch.autograd.grad((xs, ps), ins, (gx.to(dtype), gp.to(dtype))))


def _compare(case: str, names, fast32, ref32, fast16, ref16) -> list[dict]:
    rows = []
    atol, rtol = FP32_TOL
    for n, f, r in zip(names, fast32, ref32):
        err = (f.float() - r.float()).abs()
        bound = atol + rtol * r.float().abs()
        finite = bool(torch.isfinite(f).all())
        rows.append({"case": case, "tensor": n, "dtype": "fp32", "max_err": err.max().item(),
                     "finite": finite, "ok": bool((err <= bound).all()) and finite})
    for n, f, r16, r in zip(names, fast16, ref16, ref32):
        e_fast = (f.float() - r.float()).abs().max().item()
        e_ref = (r16.float() - r.float()).abs().max().item()
        finite = bool(torch.isfinite(f).all())
        rows.append({"case": case, "tensor": n, "dtype": "bf16", "max_err": e_fast, "ref_bf16_err": e_ref,
                     "finite": finite, "ok": e_fast <= 2 * e_ref + BF16_FLOOR and finite})
    return rows


def session_attention_triton(q, k, v, lengths, num_heads=1, dropout_mask=None):
    """The Triton kernel, reached through the public op with a strict request."""
    return ops.session_attention(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask,
                                 backend={"session_attention": "triton"})


def aggregate_triton(h, hp, a, g, lengths, gamma=0.75, mode="additive"):
    return ops.aggregate(h, hp, a, g, lengths, gamma=gamma, mode=mode, backend={"aggregate": "triton"})


def lce_triton(q, table, targets):
    return ops.linear_cross_entropy(q, table, targets, backend={"linear_cross_entropy": "triton"})


def lce_chunked(q, table, targets):
    return ops.linear_cross_entropy(q, table, targets, backend={"linear_cross_entropy": "chunked"})


def check_attention(dev) -> list[dict]:
    rows = []
    cases = ((BATCH, 50, DIM, 1, False), (BATCH, 50, DIM, 1, True), (BATCH, 50, DIM, 4, True),
             (37, 19, 64, 2, True), (13, 1, DIM, 1, False), (64, 128, DIM, 1, True),
             (64, 164, DIM, 1, True), (31, 300, 64, 2, False))  # > 128: tiled kernels
    if SMOKE:
        cases = ((3, 19, 16, 2, True), (3, 1, 16, 1, False))
    for b, L, d, h, drop in cases:
        gen = torch.Generator().manual_seed(b + L + d + h)
        q, k, v, go = (torch.randn(b, L, d, generator=gen).to(dev) for _ in range(4))
        lens = _lengths(b, L, b + L, dev)
        mask = ((torch.rand(b, h, L, L, generator=gen) < 0.7).float() / 0.7).to(dev) if drop else None
        case = f"attention B={b} L={L} d={d} h={h} drop={drop}"
        names = ("out", "dq", "dk", "dv")
        f32 = _attn_run(session_attention_triton, q, k, v, lens, h, mask, go, torch.float32)
        r32 = _attn_run(session_attention_ref, q, k, v, lens, h, mask, go, torch.float32)
        # bf16 tl.dot returns garbage in the interpreter (known upstream problem): GPU only
        f16 = [] if SMOKE else _attn_run(session_attention_triton, q, k, v, lens, h, mask, go, torch.bfloat16)
        r16 = [] if SMOKE else _attn_run(session_attention_ref, q, k, v, lens, h, mask, go, torch.bfloat16)
        rows += _compare(case, names, f32, r32, f16, r16)
        if L <= 128 and L > 1 and not SMOKE:  # the tiled kernels forced at this width (timed below too)
            rows += _compare(case + " forced-tiled", names, _attn_run(_force_tiled, q, k, v, lens, h, mask, go,
                                                                      torch.float32), r32,
                             _attn_run(_force_tiled, q, k, v, lens, h, mask, go, torch.bfloat16), r16)
        # padded query rows: exactly zero
        pad = torch.arange(L, device=dev)[None, :] >= lens[:, None]
        rows.append({"case": case, "tensor": "out padded rows == 0", "dtype": "fp32",
                     "max_err": f32[0][pad].abs().max().item() if pad.any() else 0.0,
                     "ok": bool((f32[0][pad] == 0).all())})
    return rows


def check_aggregate(dev) -> list[dict]:
    rows = []
    cases = ((BATCH, 50, DIM, "additive", 0.75), (BATCH, 50, DIM, "product", "t"),
             (37, 19, 64, "additive", "t"), (13, 1, DIM, "product", 0.75))
    if SMOKE:
        cases = ((3, 19, 16, "product", "t"),)
    for b, L, d, mode, gamma in cases:
        gen = torch.Generator().manual_seed(b + L + d)
        h, hp = torch.randn(b, L, d, generator=gen).to(dev), torch.randn(b, L, d, generator=gen).to(dev)
        a, g = torch.randn(b, d, generator=gen).to(dev), torch.randn(d, generator=gen).to(dev)
        gx, gp = torch.randn(b, d, generator=gen).to(dev), torch.randn(b, d, generator=gen).to(dev)
        lens = _lengths(b, L, b + L, dev)
        gam = torch.tensor(0.75, device=dev) if gamma == "t" else gamma
        case = f"aggregate B={b} L={L} d={d} {mode} gamma={'tensor' if gamma == 't' else gamma}"
        names = ("x_s", "p_s", "dh", "dhp", "da", "dg") + (("dgamma",) if gamma == "t" else ())
        args = (h, hp, a, g, lens, gam, mode, gx, gp)
        rows += _compare(case, names, _agg_run(aggregate_triton, *args, torch.float32),
                         _agg_run(aggregate_ref, *args, torch.float32),
                         _agg_run(aggregate_triton, *args, torch.bfloat16),
                         _agg_run(aggregate_ref, *args, torch.bfloat16))
    return rows


# ------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------
def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _time_cuda(step, warmup: int = 10, iters: int = 50) -> float:
    if SMOKE:  # interpreter on the CPU: one call, wall clock; the numbers mean nothing
        t0 = time.perf_counter()
        step()
        return (time.perf_counter() - t0) * 1e3
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        step()
        e.record()
        torch.cuda.synchronize()
        times.append(s.elapsed_time(e))
    return statistics.median(times)


def _force_tiled(*args, **kwargs):
    """The Triton attention (strict request) with the tiled kernels whatever the width."""
    from mtd_fast.kernels import session_attention as sa

    old = sa.MAX_FUSED_LEN
    sa.MAX_FUSED_LEN = 0
    try:
        return session_attention_triton(*args, **kwargs)
    finally:
        sa.MAX_FUSED_LEN = old


def timings(dev) -> list[dict]:
    from mtd_fast.kernels import session_attention as sa

    rows = []
    t_start = time.perf_counter()
    for dtype in ((torch.float32,) if SMOKE else (torch.float32, torch.bfloat16)):
        for L in ((20,) if SMOKE else (50, 20, 164)):  # 164: a Retailrocket-like batch, tiled kernels
            # torch.compile recompiles per shape / dtype / mask (10-30 s each): only at L = 50,
            # and only while the run is young, to stay inside the few-minute budget
            use_compile = L == 50 and time.perf_counter() - t_start < COMPILE_BUDGET_S and not SMOKE
            compiled_attn = torch.compile(session_attention_ref, dynamic=False) if use_compile else None
            compiled_agg = torch.compile(aggregate_ref, dynamic=False) if use_compile else None
            gen = torch.Generator().manual_seed(L)
            lens = _lengths(BATCH, L, L, dev)
            q, k, v = (torch.randn(BATCH, L, DIM, generator=gen).to(dev, dtype).requires_grad_(True) for _ in range(3))
            go = torch.randn(BATCH, L, DIM, generator=gen).to(dev, dtype)
            mask = ((torch.rand(BATCH, 1, L, L, generator=gen) < 0.7).float() / 0.7).to(dev, dtype)
            attn = {"triton": session_attention_triton, "reference": session_attention_ref,
                    "sdpa": session_attention_sdpa}
            if L <= sa.MAX_FUSED_LEN and not SMOKE:  # the tiled kernels at the same width: to tune MAX_FUSED_LEN
                attn["triton_tiled"] = _force_tiled
            if compiled_attn is not None:
                attn["compile"] = compiled_attn
            for m in (None, mask):
                for name, fn in attn.items():
                    if m is not None and name == "sdpa":
                        continue  # SDPA cannot take an external dropout mask (it would be the reference)

                    def step(fn=fn, m=m):
                        for t in (q, k, v):
                            t.grad = None
                        fn(q, k, v, lens, num_heads=1, dropout_mask=m).backward(go)
                    rows.append({"op": "session_attention" + ("+dropout" if m is not None else ""),
                                 "dtype": str(dtype).split(".")[-1], "L": L, "impl": name, **_measure(step)})
            h, hp = (torch.randn(BATCH, L, DIM, generator=gen).to(dev, dtype).requires_grad_(True) for _ in range(2))
            a = torch.randn(BATCH, DIM, generator=gen).to(dev, dtype).requires_grad_(True)
            g = torch.randn(DIM, generator=gen).to(dev, dtype).requires_grad_(True)
            gx, gp = (torch.randn(BATCH, DIM, generator=gen).to(dev, dtype) for _ in range(2))
            agg = [("triton", aggregate_triton), ("reference", aggregate_ref)]
            if compiled_agg is not None:
                agg.append(("compile", compiled_agg))
            for name, fn in agg:
                def step(fn=fn):
                    for t in (h, hp, a, g):
                        t.grad = None
                    torch.autograd.backward(fn(h, hp, a, g, lens, gamma=0.75, mode="additive"), (gx, gp))
                rows.append({"op": "aggregate", "dtype": str(dtype).split(".")[-1], "L": L, "impl": name,
                             **_measure(step)})
    # ratios against the eager reference of the same op / dtype / L
    for r in rows:
        ref = next(x for x in rows if x["op"] == r["op"] and x["dtype"] == r["dtype"] and x["L"] == r["L"]
                   and x["impl"] == "reference")
        r["speedup_vs_reference"] = ref["ms"] / r["ms"]
        r["samples_per_s"] = BATCH / (r["ms"] / 1e3)
    return rows


def _measure(step) -> dict:
    """First call (compilation included) and steady-state ms; an error is recorded, not raised."""
    try:
        t0 = time.perf_counter()
        step()
        _sync()
        first = time.perf_counter() - t0
        return {"ms": _time_cuda(step), "first_call_s": first}
    except Exception as exc:
        return {"ms": float("nan"), "first_call_s": float("nan"), "error": f"{type(exc).__name__}: {exc}"[:500]}


# ------------------------------------------------------------------------------------------
# linear cross-entropy (full softmax over an item table) and chunked ranking
# ------------------------------------------------------------------------------------------
def _lce_inputs(b: int, m: int, d: int, seed: int, dev):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=gen).to(dev)
    table = (torch.randn(m, d, generator=gen) * 0.1).to(dev)  # logits ~ N(0, 1)
    y = torch.randint(0, m, (b,), generator=gen).to(dev)
    return q, table, y


def _lce_run(fn, q, table, y, dtype):
    qa, ta = (x.detach().to(dtype).requires_grad_(True) for x in (q, table))
    loss = fn(qa, ta, y)
    loss.backward(torch.tensor(0.7, device=q.device, dtype=loss.dtype))  # an upstream gradient != 1
    return [loss, qa.grad, ta.grad]


def check_linear_cross_entropy(dev) -> list[dict]:
    rows = []
    cases = ((BATCH, LCE_ITEMS[0], DIM), (37, 1000, 64), (13, 100_003, DIM)) if not SMOKE else \
        ((BATCH, LCE_ITEMS[0], DIM), (3, 50, 8))
    for b, m, d in cases:
        q, table, y = _lce_inputs(b, m, d, b + m + d, dev)
        case = f"linear_cross_entropy B={b} M={m} d={d}"
        names = ("loss", "dq", "dT")
        f32 = _lce_run(lce_triton, q, table, y, torch.float32)
        r32 = _lce_run(linear_cross_entropy_ref, q, table, y, torch.float32)
        f16 = [] if SMOKE else _lce_run(lce_triton, q, table, y, torch.bfloat16)
        r16 = [] if SMOKE else _lce_run(linear_cross_entropy_ref, q, table, y, torch.bfloat16)
        rows += _compare(case, names, f32, r32, f16, r16)
        # the chunked PyTorch backend on this device, same rule
        rows += _compare(case + " chunked", names, _lce_run(lce_chunked, q, table, y, torch.float32), r32, [], [])
    return rows


def check_ranking(dev) -> list[dict]:
    """Chunked ranking / top-k on this device against the full score matrix. On the CPU they
    are equal bit for bit (MKL rounds a chunk's columns as in the full GEMM); recorded here
    for cuBLAS, which may pick other kernels (split-K) for the narrower chunk products."""
    from mtd_fast.metrics import ranks_from_parts, ranks_from_scores, topk_from_parts, topk_from_scores

    rows = []
    for b, m in ((BATCH, LCE_ITEMS[0]), (64, LCE_ITEMS[1])):
        q, table, _ = _lce_inputs(b, m, DIM, 7 + b, dev)
        y = torch.randint(1, m + 1, (b,), generator=torch.Generator().manual_seed(b)).to(dev)
        scores = q @ table.t()
        r_full, r_chunk = ranks_from_scores(scores, y), ranks_from_parts(q, table, y)
        t_full, t_chunk = topk_from_scores(scores, 20), topk_from_parts(q, table, 20)
        rows.append({"case": f"ranks B={b} M={m}", "tensor": "ranks", "dtype": "fp32",
                     "max_err": (r_full - r_chunk).abs().max().item(), "ok": bool(torch.equal(r_full, r_chunk))})
        rows.append({"case": f"top-20 B={b} M={m}", "tensor": "ids", "dtype": "fp32",
                     "max_err": float((t_full != t_chunk).sum().item()), "ok": bool(torch.equal(t_full, t_chunk))})
    return rows


def lce_timings(dev) -> list[dict]:
    """Forward + backward of the scoring loss at batch 512, d 100: triton, the chunked PyTorch
    backend and eager, fp32 and bf16, with the peak CUDA memory of a step above what was
    allocated before it (inputs and their gradients' first allocation excluded: set_to_none)."""
    rows = []
    impls = {"triton": lce_triton, "chunked": lce_chunked, "reference": linear_cross_entropy_ref}
    for m in LCE_ITEMS:
        for dtype in ((torch.float32,) if SMOKE else (torch.float32, torch.bfloat16)):
            q0, t0, y = _lce_inputs(BATCH, m, DIM, m, dev)
            q, table = q0.to(dtype).requires_grad_(True), t0.to(dtype).requires_grad_(True)
            for name, fn in impls.items():
                def step(fn=fn):
                    q.grad = table.grad = None
                    fn(q, table, y).backward()
                row = {"op": "linear_cross_entropy", "dtype": str(dtype).split(".")[-1], "M": m, "impl": name}
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                row.update(_measure(step))
                if torch.cuda.is_available():
                    row["peak_extra_MB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
                rows.append(row)
    for r in rows:
        ref = next(x for x in rows if x["M"] == r["M"] and x["dtype"] == r["dtype"] and x["impl"] == "reference")
        r["speedup_vs_reference"] = ref["ms"] / r["ms"]
        r["samples_per_s"] = BATCH / (r["ms"] / 1e3)
    return rows


# ------------------------------------------------------------------------------------------
# HOOK: full MTD training step. Owned by whoever maintains mtd_fast.models.mtd: replace the
# body freely; run() records whatever dict it returns (or its traceback) under "mtd_step",
# and the correctness verdict does not depend on it.
# ------------------------------------------------------------------------------------------
def time_mtd_training_step(dev) -> dict:
    """One recommendation training step of MTD (forward, loss, backward, Adam step) at batch
    512, d = 100, a Diginetica-sized catalogue (43,097 items), lengths up to 50: every op on
    "triton" (a strict dict: attention, aggregation, the scoring loss) against "reference",
    CUDA events, median of 20 after 5 warm-up steps.
    Skipped (with the reason) when `mtd_fast.models.mtd` is missing.
    First version written against the model as it stood on 2026-11-29 (MTD(n_items,
    MTDConfig, dropout, backend), batch_from_sessions, loss)."""
    try:
        from mtd_fast.models.mtd import MTD
    except ImportError as exc:
        return {"skipped": f"mtd_fast.models.mtd is missing ({exc})"}
    import numpy as np

    from mtd_fast.config import MTDConfig
    from mtd_fast.data import Sessions

    n_items = LCE_ITEMS[0]
    lens = _lengths(BATCH, 50, 7, "cpu").tolist()
    rng = np.random.default_rng(0)
    seqs = [list(rng.integers(1, n_items + 1, size=n)) for n in lens]
    targets = torch.tensor(rng.integers(1, n_items + 1, size=BATCH), device=dev)
    out = {"batch": BATCH, "n_items": n_items, "max_len": 50}
    strict = {"session_attention": "triton", "aggregate": "triton", "linear_cross_entropy": "triton"}
    for label, backend in (("triton", strict), ("reference", "reference")):
        torch.manual_seed(0)
        model = MTD(n_items, MTDConfig(hidden_size=DIM), dropout=0.3, backend=backend).to(dev)
        model.train()
        opt = torch.optim.Adam(model.rec_parameters(), lr=1e-3)
        batch = model.batch_from_sessions(Sessions.from_lists(seqs), np.arange(BATCH))

        def step(model=model, opt=opt, batch=batch):
            opt.zero_grad(set_to_none=True)
            model.loss(batch, targets).backward()
            opt.step()
        out[f"{label}_ms"] = _time_cuda(step, warmup=5, iters=20)
    out["speedup"] = out["reference_ms"] / out["triton_ms"]
    return out


# ------------------------------------------------------------------------------------------
# driver
# ------------------------------------------------------------------------------------------
def run(out_path=None) -> dict:
    if SMOKE:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError("MTD_GPU_CHECK_SMOKE=1 runs on the CPU through the interpreter: set TRITON_INTERPRET=1")
        dev = torch.device("cpu")
    elif not torch.cuda.is_available():
        raise RuntimeError("gpu_check needs a CUDA device")
    else:
        dev = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in true fp32 (the kernels follow it)
    t_start = time.perf_counter()
    import triton

    from mtd_fast.ops import describe

    ops_ = ("session_attention", "aggregate", "linear_cross_entropy")
    result = {"meta": {"date": datetime.datetime.now().isoformat(timespec="seconds"),
                       "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (interpreter)",
                       "torch": torch.__version__, "triton": triton.__version__,
                       "python": platform.python_version(), "batch": BATCH, "dim": DIM, "smoke": SMOKE,
                       "mtd_fast": mtd_fast.__file__,
                       "available": mtd_fast.available_backends(),
                       "auto_on_device": {op: describe(op, "auto", dev) for op in ops_}},
              "checks": [], "timings": [], "lce_timings": [], "errors": []}
    for fn in (check_attention, check_aggregate, check_linear_cross_entropy, check_ranking):
        try:
            result["checks"] += fn(dev)
        except Exception:  # keep going: the timing table is still worth having
            result["errors"].append(f"{fn.__name__}: {traceback.format_exc()}")
    for key, fn in (("timings", timings), ("lce_timings", lce_timings)):
        try:
            result[key] = fn(dev)
        except Exception:
            result["errors"].append(f"{key}: {traceback.format_exc()}")
    try:
        result["mtd_step"] = time_mtd_training_step(dev)
    except Exception:
        result["mtd_step"] = {"error": traceback.format_exc()}
    result["meta"]["seconds"] = time.perf_counter() - t_start
    result["ok"] = (not result["errors"] and all(c["ok"] for c in result["checks"])
                    and not any("error" in t and t["impl"] == "triton"
                                for t in result["timings"] + result["lce_timings"]))
    _print(result)
    if out_path is None and os.environ.get("OUT"):
        out_path = os.path.join(os.environ["OUT"], "gpu_check.json")
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1))
        print(f"wrote {out_path}")
    return result


def _print(res: dict) -> None:
    m = res["meta"]
    print(f"# gpu_check {m['date']} {m['device']} torch {m['torch']} triton {m['triton']} auto={m['auto_on_device']} "
          f"mtd_fast from {m['mtd_fast']}")
    bad = [c for c in res["checks"] if not c["ok"]]
    print(f"correctness: {len(res['checks']) - len(bad)}/{len(res['checks'])} ok")
    for c in bad:
        print(f"  FAIL {c['case']} {c['tensor']} {c['dtype']} max_err={c['max_err']:.3g}"
              + (f" (bf16 reference {c['ref_bf16_err']:.3g})" if "ref_bf16_err" in c else ""))
    worst = {}
    for c in res["checks"]:
        key = (c["case"].split()[0], c["dtype"])
        worst[key] = max(worst.get(key, 0.0), c["max_err"])
    for (op, dt), e in sorted(worst.items()):
        print(f"  worst max error {op:<10} {dt}: {e:.3g}")
    print(f"{'op':<26} {'dtype':<9} {'L':>3} {'impl':<10} {'ms fwd+bwd':>10} {'x reference':>11} "
          f"{'samples/s':>11} {'first call s':>12}")
    for r in res["timings"]:
        print(f"{r['op']:<26} {r['dtype']:<9} {r['L']:>3} {r['impl']:<10} {r['ms']:>10.3f} "
              f"{r['speedup_vs_reference']:>11.2f} {r['samples_per_s']:>11.0f} {r['first_call_s']:>12.2f}"
              + (f"  ERROR {r['error']}" if "error" in r else ""))
    print(f"{'op':<22} {'dtype':<9} {'M':>9} {'impl':<10} {'ms fwd+bwd':>10} {'x reference':>11} {'peak MB':>9}")
    for r in res["lce_timings"]:
        print(f"{r['op']:<22} {r['dtype']:<9} {r['M']:>9} {r['impl']:<10} {r['ms']:>10.3f} "
              f"{r['speedup_vs_reference']:>11.2f} {r.get('peak_extra_MB', float('nan')):>9.0f}"
              + (f"  ERROR {r['error']}" if "error" in r else ""))
    print(f"mtd step: {res.get('mtd_step')}")
    for e in res["errors"]:
        print("ERROR", e)
    print(f"total {m['seconds']:.0f} s; {'OK' if res['ok'] else 'NOT OK'}")


def test_gpu_check(tmp_path):
    import pytest

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("run without TRITON_INTERPRET (real kernels)")
    res = run(str(tmp_path / "gpu_check.json"))
    assert res["ok"], [c for c in res["checks"] if not c["ok"]] or res["errors"]


if __name__ == "__main__":
    res = run(sys.argv[1] if len(sys.argv) > 1 else None)
    sys.exit(0 if res["ok"] else 1)
