"""What tensors an op creates: the largest one, by element count (imported by name by the tests).

A `TorchDispatchMode` sees every aten call, so "no (batch, M) tensor was ever made" is a
deterministic assertion, unlike a peak-RSS reading on a shared machine.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class _Largest(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.numel, self.op, self.shape = 0, None, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            # views share their base's memory: only count tensors that own new storage
            if isinstance(t, torch.Tensor) and t._base is None and t.numel() > self.numel:
                self.numel, self.op, self.shape = t.numel(), str(func), tuple(t.shape)
        return out


def largest_tensor(fn: Callable[[], object]) -> tuple[int, str, tuple]:
    """Run fn() (forward and backward alike) and return (numel, op, shape) of the largest
    tensor any aten op produced."""
    mode = _Largest()
    with mode:
        fn()
    return mode.numel, mode.op, mode.shape
