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
   rules with the dT / dq sums over up to 43k terms; the repeat bias's exact loss (fp32;
   `models.repeat.biased_cross_entropy` with the Triton log-sum-exp and with the chunked
   PyTorch path, against its dense formula); and the chunked ranking / top-k on
   CUDA tensors against the full-matrix ones (integer equality, recorded: cuBLAS may
   round a chunk's GEMM differently from the full one);
2. timing of forward + backward (CUDA events, median of 50 after 10 warm-up calls), by the
   per-op benches (their GPU providers: `BENCH.gpu_rows` of benches/bench_session_attention.py
   and benches/bench_aggregate.py, `gpu_timings` of benches/bench_scoring.py), at
   batch 512, padded length 50 (and 20; and 164, the tiled path), d = 100, fp32 and bf16:
   the Triton kernel (and, at widths <= 128, its tiled variant, to tune MAX_FUSED_LEN), the
   eager reference, `scaled_dot_product_attention` (attention, no dropout mask: SDPA
   cannot take one), and torch.compile of the reference (at L = 50 only: it recompiles per
   shape, dtype and mask); linear_cross_entropy at 43,097 and 1,000,000 items: triton,
   the chunked PyTorch backend and eager, with the peak CUDA memory of each step above
   what was allocated before it, and the same three for the repeat bias's loss, fp32
   (`biased_timings`; the linear_cross_entropy providers also run one at a time under
   `pytest benches/bench_<op>.py` on a GPU);
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
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
# the installed package, never the source tree (which lacks mtd_fast.kernels and the
# compiled extension): drop the checkout from sys.path before the first import (benches/,
# the folder of this script, stays: the per-op benches and their harness are imported from it)
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]

import mtd_fast  # noqa: E402
from mtd_fast.ops.aggregate import aggregate_ref  # noqa: E402
from mtd_fast.ops.linear_cross_entropy import linear_cross_entropy_ref  # noqa: E402
from mtd_fast.ops.session_attention import session_attention_ref  # noqa: E402

import bench_aggregate  # noqa: E402
import bench_scoring  # noqa: E402
import bench_session_attention  # noqa: E402
from harness import add_ratios, compare_rows, cuda_ms, geometric_lengths, measure  # noqa: E402

SMOKE = os.environ.get("MTD_GPU_CHECK_SMOKE") == "1"
BATCH, DIM = (7, 16) if SMOKE else (512, 100)
LCE_ITEMS = (97, 300) if SMOKE else (43097, 1_000_000)
COMPILE_BUDGET_S = 150  # torch.compile timings are skipped once the timing stage is this old
# the strict Triton requests of the per-op benches ({op: "triton"}: raises instead of falling back)
session_attention_triton = bench_session_attention.session_attention_triton
aggregate_triton = bench_aggregate.aggregate_triton
_force_tiled = bench_session_attention.session_attention_triton_tiled  # tiled kernels at any width
lce_triton, lce_chunked = bench_scoring.step_fn("triton"), bench_scoring.step_fn("chunked")


def _timer(step) -> float:
    if SMOKE:  # interpreter on the CPU: one call, wall clock; the numbers mean nothing
        return cuda_ms(step, warmup=0, iters=1)
    return cuda_ms(step)


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
    """fp32 within harness.FP32_TOL; bf16 (when run) by the bf16 rule, both against ref32."""
    return compare_rows(case, names, fast32, ref32) + (compare_rows(case, names, fast16, ref32, ref16)
                                                       if fast16 else [])


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
        lens = geometric_lengths(b, L, b + L, dev)
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
        lens = geometric_lengths(b, L, b + L, dev)
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
# timing: the per-op benches' GPU providers
# ------------------------------------------------------------------------------------------
def timings(dev) -> list[dict]:
    """session_attention (with and without a dropout mask) and aggregate: triton, the tiled
    triton at widths <= 128, the eager reference, SDPA, torch.compile (L = 50, while the stage
    is younger than COMPILE_BUDGET_S), fp32 and bf16, L = 50, 20, 164."""
    t_start = time.perf_counter()
    dtypes = (torch.float32,) if SMOKE else (torch.float32, torch.bfloat16)
    widths = (20,) if SMOKE else (50, 20, 164)  # 164: a Retailrocket-like batch, tiled kernels
    rows = []
    for bench in (bench_session_attention, bench_aggregate):
        # smoke: no torch.compile, no forced tiling (the interpreter's time is the CI's)
        cands = [(p, d) for p, d in bench.GPU if not (SMOKE and p in ("compile", "triton_tiled"))]
        rows += bench.BENCH.gpu_rows(dev, BATCH, DIM, widths, dtypes, cands, timer=_timer,
                                     compile_until=t_start + COMPILE_BUDGET_S)
    return rows


# ------------------------------------------------------------------------------------------
# linear cross-entropy (full softmax over an item table) and chunked ranking
# ------------------------------------------------------------------------------------------
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
        q, table, y = bench_scoring.make_inputs(b, m, d, b + m + d, dev)
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


def session_terms(b: int, m: int, dev, seed: int, u: int = 10):
    """A repeat bias's sparse term (`MTDConfig.repeat_bias`): ids (b, u) distinct item ids per
    row (every other row padded with 0 after 7), bias (b, u) ~ N(0, 1), and targets (b,) in
    0..m-1 that re-click a session item in every other row."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(0, m, (b, 1), generator=gen)
    ids = (base + torch.arange(u) * max(1, m // u)) % m + 1
    ids[1::2, 7:] = 0
    bias = torch.randn(b, u, generator=gen)
    y = torch.randint(0, m, (b,), generator=gen)
    y[::2] = ids[::2, 3] - 1
    return ids.to(dev), bias.to(dev), y.to(dev)


def _biased_run(fn, q, table, bias, y, ids):
    ins = [x.detach().clone().requires_grad_(True) for x in (q, table, bias)]
    loss = fn(ins[0], ins[1], y, ids, ins[2])
    loss.backward(torch.tensor(0.7, device=q.device, dtype=loss.dtype))
    return [loss] + [x.grad for x in ins]


def _biased_impls():
    from mtd_fast.models.repeat import biased_cross_entropy, biased_cross_entropy_ref

    return {"triton": lambda *a: biased_cross_entropy(*a, triton=True), "chunked": biased_cross_entropy,
            "reference": biased_cross_entropy_ref}


def check_biased_cross_entropy(dev) -> list[dict]:
    """The repeat bias's exact loss (fp32): the Triton log-sum-exp corrected for the session
    items (`biased_cross_entropy(..., triton=True)`, what MTD with `repeat_bias` trains with on
    the Triton backend) and the chunked PyTorch path, against the dense formula."""
    rows, impls = [], _biased_impls()
    cases = ((BATCH, LCE_ITEMS[0], DIM), (13, 100_003, DIM)) if not SMOKE else ((BATCH, LCE_ITEMS[0], DIM),)
    for b, m, d in cases:
        q, table, _ = bench_scoring.make_inputs(b, m, d, 3 + b + m, dev)
        ids, bias, y = session_terms(b, m, dev, b + m)
        want = _biased_run(impls["reference"], q, table, bias, y, ids)
        for name in ("triton", "chunked"):
            rows += compare_rows(f"biased_cross_entropy B={b} M={m} d={d}" + (" chunked" if name == "chunked" else ""),
                                 ("loss", "dq", "dT", "dbias"), _biased_run(impls[name], q, table, bias, y, ids), want)
    return rows


def biased_timings(dev) -> list[dict]:
    """Forward + backward of the repeat bias's loss, fp32, at batch BATCH and the LCE sizes:
    the Triton log-sum-exp corrected, the chunked PyTorch path (the bias inside the fused rows
    pass up to 65,536 items) and the dense formula, with the peak CUDA memory of a step."""
    rows = []
    for m in LCE_ITEMS:
        q0, t0, _ = bench_scoring.make_inputs(BATCH, m, DIM, m, dev)
        ids, b0, y = session_terms(BATCH, m, dev, m)
        q, table, bias = (x.clone().requires_grad_(True) for x in (q0, t0, b0))
        for name, fn in _biased_impls().items():
            def step(fn=fn):
                q.grad = table.grad = bias.grad = None
                fn(q, table, y, ids, bias).backward()
            row = {"op": "biased_cross_entropy", "dtype": "float32", "M": m, "impl": name}
            if dev.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                before = torch.cuda.memory_allocated()
            row.update(measure(step, _timer))
            if dev.type == "cuda":
                row["peak_extra_MB"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            rows.append(row)
    return add_ratios(rows, ("M", "dtype"), BATCH)


def check_ranking(dev) -> list[dict]:
    """Chunked ranking / top-k on this device against the full score matrix. On the CPU they
    are equal bit for bit (MKL rounds a chunk's columns as in the full GEMM); recorded here
    for cuBLAS, which may pick other kernels (split-K) for the narrower chunk products."""
    from mtd_fast.metrics import ranks_from_parts, ranks_from_scores, topk_from_parts, topk_from_scores

    rows = []
    for b, m in ((BATCH, LCE_ITEMS[0]), (64, LCE_ITEMS[1])):
        q, table, _ = bench_scoring.make_inputs(b, m, DIM, 7 + b, dev)
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
    backend and eager, fp32 and bf16, with the peak CUDA memory of a step (bench_scoring)."""
    dtypes = (torch.float32,) if SMOKE else (torch.float32, torch.bfloat16)
    return bench_scoring.gpu_timings(dev, BATCH, DIM, LCE_ITEMS, dtypes, timer=_timer)


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
    lens = geometric_lengths(BATCH, 50, 7, "cpu").tolist()
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
        out[f"{label}_ms"] = cuda_ms(step, warmup=0, iters=1) if SMOKE else cuda_ms(step, warmup=5, iters=20)
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
    for fn in (check_attention, check_aggregate, check_linear_cross_entropy, check_biased_cross_entropy,
               check_ranking):
        try:
            result["checks"] += fn(dev)
        except Exception:  # keep going: the timing table is still worth having
            result["errors"].append(f"{fn.__name__}: {traceback.format_exc()}")
    for key, fn in (("timings", timings), ("lce_timings", lce_timings), ("lce_timings", biased_timings)):
        try:
            result[key] += fn(dev)
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
