"""Pieces shared by the op modules: input checks of the session ops, reversed positions,
and where a Triton backend may run."""
from __future__ import annotations

import os

import torch

__all__ = ["check_lengths", "position_index", "triton_devices", "triton_usable", "interpreting"]


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
