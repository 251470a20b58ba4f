"""Pieces shared by the op modules and models: input checks of the session ops, reversed
positions, where a Triton backend may run, segment softmax / sums over packed rows, and two
row operations with hand-written backward passes (`normalize_rows`, `permute_rows`) for
the item-table-sized tensors of MTD's step."""
from __future__ import annotations

import os

import torch

__all__ = ["check_lengths", "position_index", "triton_devices", "triton_usable", "interpreting", "segment_softmax",
           "segment_sum", "normalize_rows", "permute_rows", "check_rows", "rows_to_padded", "padded_to_rows"]


def interpreting() -> bool:
    """True under the Triton interpreter (TRITON_INTERPRET=1: kernels run on CPU tensors, tests only)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def triton_devices() -> tuple[str, ...]:
    """Devices a Triton backend can run on: CUDA, and the CPU under the interpreter (tests
    only; `auto` never picks it there)."""
    return ("cuda", "cpu") if interpreting() else ("cuda",)


def triton_usable() -> bool:
    """Triton counts as available where it can run: a CUDA device, or the interpreter."""
    return torch.cuda.is_available() or interpreting()


def check_lengths(lengths: torch.Tensor, width: int, op: str) -> None:
    """Empty sessions are an input error (MTD_SPEC section 2), never a zero row. Checked on
    CPU tensors; on a GPU this would force a device sync per call, and the model's inputs
    come from `recommend` / the loaders, which reject empty sessions first."""
    if lengths.device.type == "cpu" and lengths.numel():
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 1 or hi > width:
            raise ValueError(f"{op}: session lengths must be in 1..{width} (the padded width), got {lo}..{hi}"
                             + ("; an empty session is an input error" if lo < 1 else ""))


def check_rows(x: torch.Tensor, lengths: torch.Tensor, width: int, op: str) -> None:
    """Inputs in the rows layout: x (N, dim), the valid clicks of the sessions one after the
    other (row-major: session 0's clicks in order, then session 1's, ...), N = sum(lengths),
    every length in 1..width. Checked on CPU tensors (the sum would sync a GPU)."""
    if x.dim() != 2:
        raise ValueError(f"{op}: rows must be (N, dim), got shape {tuple(x.shape)}")
    check_lengths(lengths, width, op)
    if lengths.device.type == "cpu" and int(lengths.sum()) != x.shape[0]:
        raise ValueError(f"{op}: {x.shape[0]} rows for sessions of {int(lengths.sum())} clicks in all "
                         "(the rows layout holds exactly the valid clicks, sum(lengths) rows)")


def rows_to_padded(x: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
    """(N, ...) rows -> (B, width, ...) left-aligned, zeros on padding."""
    b = lengths.numel()
    valid = torch.arange(width, device=x.device)[None, :] < lengths.to(x.device)[:, None]
    flat = valid.reshape(-1).nonzero().squeeze(1)
    out = x.new_zeros(b * width, *x.shape[1:]).index_copy(0, flat, x)
    return out.view(b, width, *x.shape[1:])


def padded_to_rows(y: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, ...) left-aligned -> (N, ...) the valid rows, row-major."""
    b, width = y.shape[:2]
    valid = torch.arange(width, device=y.device)[None, :] < lengths.to(y.device)[:, None]
    return y.reshape(b * width, *y.shape[2:]).index_select(0, valid.reshape(-1).nonzero().squeeze(1))


def position_index(lengths: torch.Tensor, width: int) -> torch.Tensor:
    """Reversed positions (B, L): pos[b, i] = lengths[b] - i for valid i (1 = most recent), 0 on padding."""
    ar = torch.arange(width, device=lengths.device)
    pos = lengths[:, None] - ar[None, :]
    return pos.clamp_min(0)


def segment_softmax(e: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """Softmax of the scores e (N, ...) over the rows of each segment (segment (N,) int64 in
    [0, n)), separately for every trailing index: a masked softmax over padded rows, without
    the padding. The shift by each segment's max is a constant for the gradient (softmax is
    shift-invariant); gathers are `index_select` (backward: one serial `index_add`)."""
    index = segment.view(-1, *([1] * (e.dim() - 1))).expand_as(e)
    top = e.new_full((n, *e.shape[1:]), float("-inf")).scatter_reduce(0, index, e.detach(), "amax")
    ex = torch.exp(e - top.index_select(0, segment))
    return ex / segment_sum(ex, segment, n).index_select(0, segment)


def segment_sum(x: torch.Tensor, segment: torch.Tensor, n: int) -> torch.Tensor:
    """Rows of x (N, ...) summed per segment -> (n, ...) (0 for an empty segment)."""
    return x.new_zeros(n, *x.shape[1:]).index_add(0, segment, x)


class _NormalizeRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        inv = norm.clamp_min(eps).reciprocal_()
        y = x * inv
        ctx.save_for_backward(y, inv, norm >= eps)
        return y

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        y, inv, live = ctx.saved_tensors
        # d(x / |x|): (g - y <g, y>) / |x|; where the norm was clamped to eps, just g / eps
        dot = torch.linalg.vecdot(gy, y, dim=-1).unsqueeze(-1) * live
        return torch.addcmul(gy, y, dot, value=-1).mul_(inv), None


def normalize_rows(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """`F.normalize(x, dim=-1, eps=eps)` (x / max(|x|, eps) per row), same values and
    gradient, in about half the passes over x: on a 43k x 100 item table forward + backward
    took 18 ms against 40 ms (1 thread, benches/item_table_ops.py), and MTD normalizes its whole candidate table at
    every step. Tested against F.normalize, zero and tiny rows included."""
    return _NormalizeRows.apply(x, eps)


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        return g.index_select(0, inverse), None, None


def permute_rows(x: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """x[perm] for a permutation `perm` of x's rows, whose gradient is a gather by the inverse
    permutation instead of a zero fill and an accumulating scatter: DGI's corrupted features
    (42,884 x 100 on Diginetica) forward + backward in 9 ms against 28 ms (1 thread, benches/item_table_ops.py), and
    deterministic at any thread count. Raises ValueError when `perm` is not a permutation of
    range(len(x)) (the inverse would be wrong, and so would the gradient)."""
    n = x.shape[0]
    perm = perm.to(device=x.device, dtype=torch.long)
    if perm.shape != (n,):
        raise ValueError(f"permute_rows: perm must have shape ({n},), one index per row, got {tuple(perm.shape)}")
    lo, hi = (int(perm.min()), int(perm.max())) if n else (0, -1)
    if lo < 0 or hi >= n:
        raise ValueError(f"permute_rows: perm must hold indices in 0..{n - 1}, got {lo}..{hi}")
    inverse = torch.full_like(perm, -1).scatter_(0, perm, torch.arange(n, device=perm.device))
    if n and bool((inverse < 0).any()):
        raise ValueError("permute_rows: perm repeats an index, so it is not a permutation of the rows")
    return _PermuteRows.apply(x, perm, inverse)
