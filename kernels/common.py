"""What the kernel modules share: launch helpers (dot precision, dropout-mask arguments, the
device check) and the two device functions both attention kernels use, plus the helpers
with which each kernel module's `aot_cases()` writes its signatures for `aot.py`. Triton is
imported here, so only the kernel modules import this module (`mtd_fast.kernels` itself
imports nothing)."""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from mtd_fast.ops.common import interpreting

__all__ = ["LOG2E", "load_rows", "dropout_ptrs", "dot_precision", "lengths_i32", "mask_args", "check_device",
           "aot_signature", "attention_arg_types", "AOT_DTYPES"]

LOG2E = 1.4426950408889634
# AOT cases: the dtypes compiled, as Triton pointer-type names
AOT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@triton.jit
def load_rows(ptr, b, stride_b, stride_l, stride_d, offs_r, col, mask):
    """The [rows, head columns] tile of one session of a (B, L, d) tensor, zeros outside `mask`."""
    return tl.load(ptr + b * stride_b + offs_r[:, None] * stride_l + col[None, :] * stride_d, mask=mask, other=0.0)


@triton.jit
def dropout_ptrs(DMASK, b, h, offs_m, offs_n, stride_mb, stride_mh, stride_mi, stride_mj):
    """Pointers to the (query, key) block of one session's and head's dropout mask."""
    return DMASK + b * stride_mb + h * stride_mh + offs_m[:, None] * stride_mi + offs_n[None, :] * stride_mj


def dot_precision(dtype: torch.dtype) -> str:
    """`input_precision` of fp32 `tl.dot`s: "tf32" when `torch.backends.cuda.matmul.allow_tf32`
    is set (the switch that governs PyTorch's own fp32 matmuls), else "ieee"."""
    if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def lengths_i32(lengths: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Session lengths as the kernels read them: contiguous int32 on `device`."""
    return lengths.to(device=device, dtype=torch.int32).contiguous()


def mask_args(dropout_mask: Optional[torch.Tensor], b: int, h: int, L: int, like: torch.Tensor):
    """(tensor, its 4 strides) for a dropout mask broadcastable to (b, h, L, L); without a
    mask a stand-in tensor that is never read (HAS_DROPOUT=False) and zero strides."""
    if dropout_mask is None:
        return like, (0, 0, 0, 0)
    m = dropout_mask.expand(b, h, L, L)  # broadcasting (e.g. (B, 1, L, L)) via stride 0
    return m, tuple(m.stride())


def check_device(t: torch.Tensor, who: str, cpu_backend: str) -> None:
    """Triton runs CUDA tensors, and CPU tensors only under the interpreter: raise naming the
    CPU backend to use instead."""
    if t.device.type == "cpu" and not interpreting():
        raise RuntimeError(f"{who}: Triton runs CPU tensors only under TRITON_INTERPRET=1 (set before importing "
                           f"mtd_fast.kernels); use backend={cpu_backend!r} on the CPU")


def attention_arg_types(dt: str) -> dict:
    """AOT argument types the whole-row and tiled attention kernels share, for data type `dt`
    ("fp32" / "bf16"): tensors of that type, int32 lengths and sizes, fp32 scales."""
    return {**{a: f"*{dt}" for a in ("Q", "K", "V", "DMASK", "O", "DO", "DQ", "DK", "DV")}, "LENS": "*i32",
            "L": "i32", "HEAD_DIM": "i32", "qk_scale": "fp32", "sm_scale": "fp32"}


def aot_signature(fn, types: dict) -> dict:
    """Triton signature of `fn`'s runtime arguments: `types` by name, i64 for strides;
    the rest (constexprs) are filled in by compile_kernel."""
    return {a: types.get(a, "i64" if a.startswith("stride") else None) for a in fn.arg_names
            if a in types or a.startswith("stride")}
