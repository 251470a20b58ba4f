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
