"""Keep freed memory in the process during training (glibc malloc), instead of handing it back.

A training step allocates and frees the same large blocks every time: the (items, d) tables
of the graph branch and their gradients, the loss's logits chunks. glibc serves blocks above
its mmap threshold (at most 32 MiB, however high its dynamic threshold climbs) with a fresh
mmap and unmaps them on free, and trims the heap top when more than its trim threshold is
free there, so the next step takes a page fault on every 4 KiB page of those blocks again.
On full Diginetica (43,097 items, batch 512, 1 thread) that was 40,000-65,000 minor faults
per MTD step; `keep_freed_memory()` raises both thresholds (`mallopt`) so the freed blocks
are reused: 1-2 faults a step, and about 23% less CPU time per MTD step
(`benches/step_time.py`, README "Memory reuse").

`train()` calls it once per process. The cost: memory freed during training stays with the
process for reuse instead of going back to the system. `MTD_FAST_MALLOC=system` leaves malloc
as it is. Other C libraries than glibc (musl, macOS, Windows) are left alone.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
from typing import Optional

__all__ = ["keep_freed_memory", "in_effect", "ENV", "MMAP_THRESHOLD", "TRIM_THRESHOLD"]

ENV = "MTD_FAST_MALLOC"
_VALUES = ("keep", "system")
# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# blocks below this come from the heap, so they are reused after free (a 1M-item table of
# d=100 floats is 400 MB); the trim threshold is mallopt's int maximum: never trim the top
MMAP_THRESHOLD = 1 << 30
TRIM_THRESHOLD = 2 ** 31 - 1

_applied: Optional[bool] = None


def _setting() -> str:
    value = os.environ.get(ENV, "").strip().lower() or "keep"
    if value not in _VALUES:
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: use 'keep' (the default: freed memory is reused "
                         "within the process) or 'system' (leave malloc's thresholds as they are)")
    return value


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds once per process (see the module's doc). True
    when they are raised (by this call or an earlier one: they stay raised); False under
    `MTD_FAST_MALLOC=system` in a process that has not raised them, on another C library, or
    when mallopt refuses. A bad `MTD_FAST_MALLOC` raises ValueError naming it."""
    global _applied
    if _setting() == "system":
        return bool(_applied)  # a process that already raised them keeps them
    if _applied is not None:
        return _applied
    _applied = False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # trim first: a refused mmap threshold then still leaves the heap top in place
    _applied = bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)) and bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
    return _applied


def in_effect() -> bool:
    """Whether this process has raised the thresholds (`keep_freed_memory`)."""
    return bool(_applied)
