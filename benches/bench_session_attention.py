"""session_attention: every provider checked against the reference, then forward + backward timed.

Providers (the parametrize axis), each checked against `session_attention_ref` on the same
device and dtype first (output and every input gradient, one upstream gradient; fp32
|fast - ref| <= 1e-4 + 1e-4 |ref|, bf16 by flash-attention's rule):

- CPU, float32: `reference` (eager), `sdpa` (torch.nn.functional.scaled_dot_product_attention
  with a boolean mask; it cannot take an external dropout mask, so a backend built on it
  would fall back to the reference whenever one is given), `compile` (torch.compile of the
  reference, dynamic=False, warm; compile time reported apart), `packed` (the length-
  bucketed backend of `mtd_fast.ops.session_attention`), and reference / packed with a dropout
  mask; batch 512, Diginetica-like lengths padded to 20 and 50, d = 100;
- GPU (skipped without CUDA), float32 and bfloat16, with and without a dropout mask: `triton`
  (the kernel through the public op with a strict `{op: "triton"}`, which raises instead of
  falling back), `triton_tiled` (the tiled kernels forced at widths <= MAX_FUSED_LEN, to tune
  it), `reference`, `sdpa` (no mask), `compile` (at L = 50 only: it recompiles per shape,
  dtype and mask); batch 512, L = 50, 20 and 164 (a Retailrocket-like batch: the tiled path).
  Under TRITON_INTERPRET=1 with MTD_BENCH_SMOKE=1 the Triton providers run on CPU tensors.

Run:
    python benches/bench_session_attention.py [--threads N] [--rounds R] [--json PATH]
        CPU: interleaved rounds (every candidate once per round, so load from other processes
        hits all alike), prints min / median ms and the ratio reference / candidate;
    pytest benches/bench_session_attention.py --benchmark-only [--benchmark-group-by=group]
        every provider under pytest-benchmark (one group per device, padded length and dtype);
    python benches/gpu_check.py
        calls `GPU` below (`BENCH.gpu_rows`) for the GPU timings, with the other ops', in one run.
MTD_BENCH_SMOKE=1 shrinks everything (CPU batch 48, GPU batch 7, length 24, d 16, no
torch.compile) to a seconds-long CI check that the providers run and agree.

Measured 2026-11-29 on the 2-core shared dev VM (load 2-4 from other jobs), torch 2.13 CPU,
lengths from the Diginetica test prefixes (mean 3.9), ms fwd+bwd median of 20 interleaved
rounds, speed-up over the reference in brackets (with `python benches/bench_cpu_ops.py`,
the joint CPU bench of this op and aggregate before it was split per op, same cases):

| op, padded L        | threads          | reference | sdpa        | compile     | packed       |
| attention, 20       | 1                | 13.9      | 16.0 (0.87) | 13.1 (1.06) | 6.6 (2.12)   |
| attention, 50       | 1                | 56.7      | 56.2 (1.01) | 47.3 (1.20) | 9.4 (6.02)   |
| attention+mask, 50  | 1                | 58.6      | -           | -           | 9.6 (6.10)   |
| attention, 20 / 50  | 2, OMP passive   | 14.3 / 56.1 | 16.0 / 53.7 (0.89 / 1.05) | - | 7.1 / 10.1 (2.00 / 5.56) |

With 2 threads and OpenMP's default (active) waiting, the loaded VM made every candidate
bimodal (medians 2-40x the minimum; packed, with more small parallel regions, suffered
most: medians from 0.4x to 5.6x of the reference across runs, minima always 1.5-5.9x
faster); OMP_WAIT_POLICY=PASSIVE removes that. torch.compile: 2.5-3.4 s to compile per
shape (cached), then 1.06-1.31x. Commands now:

    python benches/bench_session_attention.py --threads 1 --json cpu_t1.json
    OMP_WAIT_POLICY=PASSIVE python benches/bench_session_attention.py --json cpu_t2.json

Lengths: `harness.diginetica_lengths` (the Diginetica test prefixes when present, else
geometric with mean 4.85); clipped to the padded length, one session at full length.
"""
from __future__ import annotations

import sys

import torch

from mtd_fast import ops
from mtd_fast.ops.session_attention import session_attention_packed, session_attention_ref, session_attention_sdpa

from harness import ENCODER, GPU_DTYPES, SMOKE, CaseBase, OpBench, diginetica_lengths, pytest, run_op_bench_cli

BATCH, GPU_BATCH, DIM, WIDTHS, GPU_WIDTHS = (ENCODER.batch, ENCODER.gpu_batch, ENCODER.dim, ENCODER.widths,
                                            ENCODER.gpu_widths)


class Case(CaseBase):
    """q, k, v (batch, L, d), lengths (batch,), an upstream gradient (batch, L, d) and a scaled
    keep-0.7 dropout mask (batch, 1, L, L), float32 on `device`."""

    names = ("out", "dq", "dk", "dv")

    def __init__(self, width: int, device="cpu", batch: int = BATCH, dim: int = DIM, seed=None):
        gen = torch.Generator().manual_seed(1 if seed is None else seed)
        self.lens = diginetica_lengths(batch, width).to(device)
        self.q, self.k, self.v, self.go = (torch.randn(batch, width, dim, generator=gen).to(device) for _ in range(4))
        keep = 0.7
        self.mask = ((torch.rand(batch, 1, width, width, generator=gen) < keep).float() / keep).to(device)

    def leaves(self, dtype=torch.float32) -> list:
        return [t.detach().to(dtype).requires_grad_(True) for t in (self.q, self.k, self.v)]

    def run(self, fn, ins, dropout: bool) -> list:
        dtype = ins[0].dtype
        out = fn(*ins, self.lens, num_heads=1, dropout_mask=self.cast("mask", dtype) if dropout else None)
        out.backward(self.cast("go", dtype))
        return [out] + [t.grad for t in ins]


def session_attention_triton(q, k, v, lengths, num_heads=1, dropout_mask=None):
    """The Triton kernel, reached through the public op with a strict request."""
    return ops.session_attention(q, k, v, lengths, num_heads=num_heads, dropout_mask=dropout_mask,
                                 backend={"session_attention": "triton"})


def session_attention_triton_tiled(*args, **kwargs):
    """The Triton attention (strict request) with the tiled kernels whatever the width."""
    from mtd_fast.kernels import session_attention as sa

    old = sa.MAX_FUSED_LEN
    sa.MAX_FUSED_LEN = 0
    try:
        return session_attention_triton(*args, **kwargs)
    finally:
        sa.MAX_FUSED_LEN = old


def gpu_skip(provider: str, width: int):
    """Why a GPU candidate is not run at this width (None: it is)."""
    if provider == "triton_tiled":
        from mtd_fast.kernels.session_attention import MAX_FUSED_LEN

        if width > MAX_FUSED_LEN:
            return f"above MAX_FUSED_LEN = {MAX_FUSED_LEN} the plain triton row runs the tiled kernels"
    if provider == "compile" and width != 50:
        return "torch.compile recompiles per shape, dtype and mask (10-30 s each): timed at L = 50 only"
    return None


BENCH = OpBench("session_attention", Case, {
    "reference": lambda: session_attention_ref,
    "sdpa": lambda: session_attention_sdpa,
    "packed": lambda: session_attention_packed,
    "compile": lambda: torch.compile(session_attention_ref, dynamic=False),
    "triton": lambda: session_attention_triton,
    "triton_tiled": lambda: session_attention_triton_tiled,
}, gpu_skip)
CPU = [("reference", False), ("sdpa", False), ("packed", False), ("reference", True), ("packed", True)] + (
    [] if SMOKE else [("compile", False)])
# SDPA cannot take an external dropout mask (with one it would be the reference)
GPU = [(p, d) for d in (False, True) for p in ("triton", "triton_tiled", "reference", "sdpa", "compile")
       if not (d and p == "sdpa")]



@pytest.mark.parametrize("width,provider,dropout", BENCH.cpu_params(WIDTHS, CPU))
def test_session_attention_cpu(benchmark, width, provider, dropout):
    BENCH.bench_cpu(benchmark, width, provider, dropout, BATCH, DIM)


@pytest.mark.parametrize("width,dtype,provider,dropout", BENCH.gpu_params(GPU_WIDTHS, GPU_DTYPES, GPU))
def test_session_attention_gpu(benchmark, width, dtype, provider, dropout):
    BENCH.bench_gpu(benchmark, width, dtype, provider, dropout, GPU_BATCH, DIM)


if __name__ == "__main__":
    sys.exit(run_op_bench_cli(BENCH, CPU, WIDTHS, BATCH, DIM, __doc__))
