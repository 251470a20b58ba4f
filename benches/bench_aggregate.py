"""aggregate: every provider checked against the reference, then forward + backward timed.

Providers (the parametrize axis), each checked against `aggregate_ref` on the same device
and dtype first (both outputs and every input gradient, one pair of upstream gradients;
fp32 |fast - ref| <= 1e-4 + 1e-4 |ref|, bf16 by flash-attention's rule), mode "additive",
gamma 0.75:

- CPU, float32: `reference` (eager), `compile` (torch.compile of the reference, dynamic=False,
  warm; compile time reported apart), `packed` (the length-bucketed backend of
  `mtd_fast.ops.aggregate`); batch 512, Diginetica-like lengths padded to 20 and 50, d = 100;
- GPU (skipped without CUDA), float32 and bfloat16: `triton` (the kernel through the public
  op with a strict `{op: "triton"}`), `reference`, `compile` (at L = 50 only: it recompiles
  per shape and dtype); batch 512, L = 50, 20 and 164. Under TRITON_INTERPRET=1 with
  MTD_BENCH_SMOKE=1 `triton` runs on CPU tensors.

Run:
    python benches/bench_aggregate.py [--threads N] [--rounds R] [--json PATH]
        CPU: interleaved rounds, min / median ms and the ratio reference / candidate;
    pytest benches/bench_aggregate.py --benchmark-only [--benchmark-group-by=group]
    python benches/gpu_check.py
        calls `GPU` below (`BENCH.gpu_rows`) for the GPU timings, with the other ops', in one run.
MTD_BENCH_SMOKE=1 shrinks everything (CPU batch 48, GPU batch 7, length 24, d 16, no
torch.compile) to a seconds-long CI check.

Measured 2026-11-29 on the 2-core shared dev VM (load 2-4 from other jobs), torch 2.13 CPU,
lengths from the Diginetica test prefixes (mean 3.9), ms fwd+bwd median of 20 interleaved
rounds, speed-up over the reference in brackets (with `python benches/bench_cpu_ops.py`,
the joint CPU bench of this op and session_attention before it was split per op, same
cases; the conditions and the OMP_WAIT_POLICY note in benches/bench_session_attention.py):

| op, padded L        | threads          | reference | compile     | packed       |
| aggregate, 20       | 1                | 5.8       | 4.5 (1.31)  | 2.8 (2.10)   |
| aggregate, 50       | 1                | 15.4      | 12.1 (1.28) | 3.9 (3.94)   |
| aggregate, 20 / 50  | 2, OMP passive   | 6.1 / 14.2 | -          | 3.9 / 4.3 (1.57 / 3.34) |

Commands now:

    python benches/bench_aggregate.py --threads 1 --json cpu_t1.json
    OMP_WAIT_POLICY=PASSIVE python benches/bench_aggregate.py --json cpu_t2.json
"""
from __future__ import annotations

import sys

import torch

from mtd_fast import ops
from mtd_fast.ops.aggregate import aggregate_packed, aggregate_ref

from harness import ENCODER, GPU_DTYPES, SMOKE, CaseBase, OpBench, diginetica_lengths, pytest, run_op_bench_cli

BATCH, GPU_BATCH, DIM, WIDTHS, GPU_WIDTHS = (ENCODER.batch, ENCODER.gpu_batch, ENCODER.dim, ENCODER.widths,
                                            ENCODER.gpu_widths)


class Case(CaseBase):
    """h, hp (batch, L, d), a (batch, d), g (d,), lengths (batch,) and upstream gradients gx,
    gp (batch, d), float32 on `device`."""

    names = ("x_s", "p_s", "dh", "dhp", "da", "dg")

    def __init__(self, width: int, device="cpu", batch: int = BATCH, dim: int = DIM, seed=None):
        gen = torch.Generator().manual_seed(2 if seed is None else seed)
        self.lens = diginetica_lengths(batch, width).to(device)
        self.h, self.hp = (torch.randn(batch, width, dim, generator=gen).to(device) for _ in range(2))
        self.a, self.g = torch.randn(batch, dim, generator=gen).to(device), torch.randn(dim, generator=gen).to(device)
        self.gx, self.gp = (torch.randn(batch, dim, generator=gen).to(device) for _ in range(2))

    def leaves(self, dtype=torch.float32) -> list:
        return [t.detach().to(dtype).requires_grad_(True) for t in (self.h, self.hp, self.a, self.g)]

    def run(self, fn, ins, dropout: bool = False) -> list:
        dtype = ins[0].dtype
        xs, ps = fn(*ins, self.lens, gamma=0.75, mode="additive")
        torch.autograd.backward((xs, ps), (self.cast("gx", dtype), self.cast("gp", dtype)))
        return [xs, ps] + [t.grad for t in ins]


def aggregate_triton(h, hp, a, g, lengths, gamma=0.75, mode="additive"):
    """The Triton kernel, reached through the public op with a strict request."""
    return ops.aggregate(h, hp, a, g, lengths, gamma=gamma, mode=mode, backend={"aggregate": "triton"})


def gpu_skip(provider: str, width: int):
    if provider == "compile" and width != 50:
        return "torch.compile recompiles per shape and dtype (10-30 s each): timed at L = 50 only"
    return None


BENCH = OpBench("aggregate", Case, {
    "reference": lambda: aggregate_ref,
    "packed": lambda: aggregate_packed,
    "compile": lambda: torch.compile(aggregate_ref, dynamic=False),
    "triton": lambda: aggregate_triton,
}, gpu_skip)
CPU = [("reference", False), ("packed", False)] + ([] if SMOKE else [("compile", False)])
GPU = [("triton", False), ("reference", False), ("compile", False)]



@pytest.mark.parametrize("width,provider,dropout", BENCH.cpu_params(WIDTHS, CPU))
def test_aggregate_cpu(benchmark, width, provider, dropout):
    BENCH.bench_cpu(benchmark, width, provider, dropout, BATCH, DIM)


@pytest.mark.parametrize("width,dtype,provider,dropout", BENCH.gpu_params(GPU_WIDTHS, GPU_DTYPES, GPU))
def test_aggregate_gpu(benchmark, width, dtype, provider, dropout):
    BENCH.bench_gpu(benchmark, width, dtype, provider, dropout, GPU_BATCH, DIM, bf16_interpreted=True)  # no tl.dot


if __name__ == "__main__":
    sys.exit(run_op_bench_cli(BENCH, CPU, WIDTHS, BATCH, DIM, __doc__))
