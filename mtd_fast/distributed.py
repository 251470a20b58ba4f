"""Data-parallel training over `torch.distributed` (one process per device or CPU slot).

`train()` looks for an initialised default process group (the CLI initialises one when
`torchrun` launched it; from Python, call `torch.distributed.init_process_group` first).
With world size W > 1:

- every rank draws the same shuffled order of samples (same seed), cuts the same global
  batches of `batch_size`, and takes a contiguous 1/W of each (`Dist.shard`): the global
  batch is unchanged;
- each rank backpropagates its shard's mean loss; the gradients are summed with weights
  n_rank / n_batch in one flat all-reduce (`Dist.reduce_grads`), so they equal the
  gradient of the global batch's mean loss (+ the L2 term once); a parameter that no rank
  touched keeps grad None, as in a single process (Adam skips it); every rank then takes
  the same optimizer step, so replicas stay identical bit for bit (an all-reduce hands
  every rank the same bits);
- the graph phase (phase modes) runs on rank 0 and its result (the written-back item rows,
  the graph side's weights) is broadcast (`Dist.broadcast_tensors_`), README "Multi-process
  training" has the measurement behind this choice; the per-step modes compute the graph
  side on every rank, as part of each rank's forward;
- evaluation is sharded: each rank ranks a contiguous 1/W of the samples, the metric sums
  are all-reduced;
- only rank 0 writes (run directory, --save, --json) and prints.

Errors raised on one rank must reach the others, or those would wait in the next
collective until the timeout: checks that only rank 0 runs go through `Dist.on_main`,
which broadcasts rank 0's exception; values every rank computes the same way (gradients,
losses) are checked after the all-reduce, so every rank raises together. A rank that
dies closes its sockets, and gloo / nccl raise on the others in the next collective;
the process group's timeout (`--dist-timeout`, default 600 s) bounds the rest.
"""
from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

__all__ = ["Dist", "init_from_env", "DistError"]


class DistError(RuntimeError):
    """A multi-process run that cannot proceed (settings, a failed rank)."""


class Dist:
    """The data-parallel context of one run; a no-op single-process context when no process
    group is initialised or it has one rank."""

    def __init__(self) -> None:
        import torch.distributed as td

        self.td = td
        self.enabled = td.is_available() and td.is_initialized() and td.get_world_size() > 1
        self.rank = td.get_rank() if self.enabled else 0
        self.world = td.get_world_size() if self.enabled else 1
        self.backend = td.get_backend() if self.enabled else None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device_for(self, device: str) -> str:
        """Each rank on its own GPU: "cuda" means cuda:LOCAL_RANK under torchrun (an explicit
        "cuda:N" is kept as given)."""
        if self.enabled and device == "cuda":
            return f"cuda:{int(os.environ.get('LOCAL_RANK', self.rank % max(torch.cuda.device_count(), 1)))}"
        return device

    def _call(self, what: str, fn: Callable, *args, **kwargs) -> Any:
        """A collective; its failure (a peer that died, a timeout) becomes one DistError naming
        this rank and the collective, not gloo's or nccl's transport message alone."""
        try:
            return fn(*args, **kwargs)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise DistError(f"rank {self.rank} of {self.world}: {what} failed; another process of this run failed, "
                            f"was killed or timed out (see its output) [{type(exc).__name__}: {first}]") from exc

    def _comm_device(self) -> torch.device:
        # nccl moves CUDA tensors only; gloo moves CPU tensors (and CUDA ones through the host)
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    # ---- data ------------------------------------------------------------------------------------
    def shard(self, idx: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of a global batch (parts differ by at most one sample)."""
        if not self.enabled:
            return idx
        return np.array_split(idx, self.world)[self.rank]

    # ---- collectives ---------------------------------------------------------------------------
    def reduce_grads(self, params: Sequence[torch.Tensor], weight: float, extras: Sequence[float]) -> list[float]:
        """Replace each p.grad by sum over ranks of weight_rank * grad_rank (None where no rank has a
        gradient); return the sums over ranks of `extras` (already weighted by the caller)."""
        if not self.enabled:
            return list(extras)
        dev = self._comm_device()
        dtype = params[0].dtype if params and params[0].is_floating_point() else torch.float32
        grads = [p.grad for p in params]
        flat = torch.cat([(g.detach().reshape(-1).to(dev, dtype) * weight) if g is not None
                          else torch.zeros(p.numel(), device=dev, dtype=dtype) for p, g in zip(params, grads)]
                         + [torch.tensor([1.0 if g is not None else 0.0 for g in grads], device=dev, dtype=dtype),
                            torch.tensor(list(extras), dtype=dtype, device=dev)])
        self._call("the gradient all-reduce", self.td.all_reduce, flat)
        off = 0
        for p in params:
            n = p.numel()
            p.grad = flat[off:off + n].view_as(p).to(p.device, p.dtype).clone()
            off += n
        has = flat[off:off + len(params)].tolist()
        off += len(params)
        for p, h in zip(params, has):
            if h == 0:
                p.grad = None
        return flat[off:off + len(extras)].tolist()

    def all_gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's rows (n_r, ...) concatenated in rank order: the global batch's order,
        since `shard` gives each rank a contiguous part. The row counts may differ by rank."""
        if not self.enabled:
            return rows
        dev = self._comm_device()
        count = torch.tensor([rows.shape[0]], dtype=torch.int64, device=dev)
        counts = [torch.zeros_like(count) for _ in range(self.world)]
        self._call("a row-count all-gather", self.td.all_gather, counts, count)
        sizes = [int(c) for c in counts]
        padded = rows.new_zeros((max(sizes), *rows.shape[1:]), device=dev)
        padded[: rows.shape[0]] = rows.to(dev)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        self._call("a row all-gather", self.td.all_gather, parts, padded)
        return torch.cat([part[:n] for part, n in zip(parts, sizes)]).to(rows.device)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sums over ranks, in float64."""
        if not self.enabled:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device())
        self._call("a metric all-reduce", self.td.all_reduce, t)
        return t.tolist()

    def broadcast_tensors_(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite each tensor on every rank with rank 0's values (one flat broadcast)."""
        if not self.enabled or not tensors:
            return
        dev = self._comm_device()
        groups: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:  # one flat broadcast per dtype: no value goes through a narrower type
            if t.numel():
                groups.setdefault(t.dtype, []).append(t)
        for dtype, ts in groups.items():
            wire = torch.uint8 if dtype == torch.bool else dtype
            flat = torch.cat([t.detach().reshape(-1).to(dev, wire) for t in ts])
            self._call("a weight broadcast", self.td.broadcast, flat, src=0)
            off = 0
            with torch.no_grad():
                for t in ts:
                    t.copy_(flat[off:off + t.numel()].view(t.shape).to(dtype))
                    off += t.numel()

    def broadcast_object(self, obj: Any) -> Any:
        if not self.enabled:
            return obj
        box = [obj]
        self._call("an object broadcast", self.td.broadcast_object_list, box, src=0,
                   device=self._comm_device() if self.backend == "nccl" else None)
        return box[0]

    def all_gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        self._call("an object all-gather", self.td.all_gather_object, out, obj)
        return out

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run fn on rank 0 and hand its result, or its exception, to every rank."""
        if not self.enabled:
            return fn()
        result, error = None, None
        if self.main:
            try:
                result = fn()
            except Exception as exc:  # re-raised below on every rank, rank 0 included
                error = exc
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise error
        return result

    def agree(self, problem: Optional[BaseException]) -> None:
        """Raise on every rank when any rank met a problem (the lowest rank's exception)."""
        if not self.enabled:
            if problem is not None:
                raise problem
            return
        problems = self.all_gather_object(problem)
        for p in problems:
            if p is not None:
                raise p


def init_from_env(device: str, timeout_s: float) -> bool:
    """Initialise the default process group from torchrun's environment (RANK, WORLD_SIZE,
    MASTER_ADDR, MASTER_PORT); False when not launched that way. nccl for CUDA, gloo else."""
    import torch.distributed as td

    if td.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    td.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return True
