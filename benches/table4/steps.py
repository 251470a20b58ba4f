"""The training steps of the Table 4 study and the checks run before anything is timed.

`plan_batches` fixes the batches every model (and the peer) runs, in order; the timed step
is the trainer's own `mtd_fast.train.train_step` (the body of `rec_epoch`, step for step),
wrapped by `timed`; `checked_train_step` runs it once with checks (finite loss, finite and
nonzero gradients, finite weights after the step); `compare_rec_backends` and
`compare_dgi_backends` hold MTD's default backends against backend="reference" on the same
batch and weights, within the tolerances below.
"""
from __future__ import annotations

import math
import time
from typing import Any, Callable

import numpy as np

from mtd_fast.train import train_step  # the trainer's own steps, timed as they run

# Fast backends against backend="reference" on the same batch and weights, fp32. The two
# compute the same function with another summation order (on CPU the recommendation
# loss even runs the same ops: auto picks the reference attention/aggregation there, and
# only the DGI SpMM differs, C++ vs PyTorch). A mean cross-entropy over 512 rows of
# O(10) values, or a BCE over 2 x 43k nodes, moves by a few fp32 ulps per reduction:
# measured <= 2e-7 relative on CPU. The kernels' own tests allow atol 2e-5 / rtol 1e-4 on
# every output element (the TOL table of tests/testing.py); a mean is no looser.
LOSS_RTOL = 1e-4
LOSS_ATOL = 1e-5
# gradients: max |g_fast - g_ref| over a parameter, relative to max |g_ref| of it
GRAD_RTOL = 1e-3


def plan_batches(n: int, batch_size: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` index batches over range(n), each of min(batch_size, n) indices.

    The first epoch's batches are the trainer's (`iter_batches(n, batch_size,
    default_rng(seed))`); a ragged tail is dropped and a fresh permutation continues, so
    every timed step is full-size even on tiny data."""
    if n < 1 or count < 0:
        raise ValueError(f"plan_batches: n={n}, count={count}")
    rng = np.random.default_rng(seed)
    size = min(batch_size, n)
    out: list[np.ndarray] = []
    while len(out) < count:
        order = rng.permutation(n)
        for s in range(0, n - size + 1, size):
            out.append(order[s:s + size])
            if len(out) == count:
                break
    return out


def grad_report(params) -> dict:
    """The gradients of `params` after a backward pass: how many there are, whether all are
    finite, and their global L2 norm."""
    import torch

    grads = [p.grad for p in params if p.grad is not None]
    finite = bool(all(torch.isfinite(g).all() for g in grads))
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads)) if grads else 0.0
    return {"n_grads": len(grads), "n_params": len(list(params)), "grads_finite": finite, "grad_norm": norm}


def checked_train_step(net, samples, idx: np.ndarray, opt, params, l2: float, graph=None) -> dict:
    """`train_step` with checks: a finite loss, every gradient finite, a nonzero gradient,
    finite parameters after the Adam step. Returns what it saw; "ok" says all held."""
    import torch

    rep: dict = {}

    def inspect(batch):
        rep.update(grad_report(params))
        rep["batch_width"] = int(batch["items"].shape[1]) if "items" in batch else None

    try:
        value = train_step(net, samples, idx, opt, params, l2, on_grads=inspect, graph=graph)
    except FloatingPointError:
        value = float("nan")
    rep.update(loss=value, params_finite=bool(all(torch.isfinite(p).all() for p in params)),
               batch_rows=int(len(idx)))
    rep["ok"] = bool(math.isfinite(value) and rep.get("grads_finite", False) and rep.get("grad_norm", 0) > 0
                     and rep["params_finite"])
    return rep


def rel_diff(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def close(a: float, b: float, rtol: float = LOSS_RTOL, atol: float = LOSS_ATOL) -> bool:
    return abs(a - b) <= atol + rtol * abs(b)


def grad_rel_err(fast_params, ref_params) -> float:
    """max over parameters of max|g_fast - g_ref| / max|g_ref| (0 where both lack a grad)."""
    worst = 0.0
    for pf, pr in zip(fast_params, ref_params):
        if pf.grad is None and pr.grad is None:
            continue
        if (pf.grad is None) != (pr.grad is None):
            return math.inf
        scale = float(pr.grad.abs().max())
        err = float((pf.grad.double() - pr.grad.double()).abs().max())
        worst = max(worst, err / scale if scale > 0 else (0.0 if err == 0 else math.inf))
    return worst


def compare_rec_backends(fast, ref, samples, idx: np.ndarray, seed: int) -> dict:
    """Loss and gradients of the recommendation loss, `fast` vs `ref` (same weights):
    in eval mode (dropout off) and in train mode with the same seed (same dropout masks,
    which the model draws outside any kernel)."""
    import torch

    out: dict[str, Any] = {}
    for mode in ("eval", "train"):
        losses = []
        for net in (fast, ref):
            net.train(mode == "train")
            batch = net.batch_from_sessions(samples.prefixes, idx)
            targets = torch.from_numpy(samples.targets[idx].astype(np.int64)).to(net.device)
            net.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            loss = net.loss(batch, targets)
            loss.backward()
            losses.append(float(loss.detach()))
        out[f"{mode}_loss_fast"], out[f"{mode}_loss_ref"] = losses
        out[f"{mode}_loss_rel_diff"] = rel_diff(*losses)
        out[f"{mode}_loss_close"] = close(*losses)
        out[f"{mode}_grad_rel_err"] = grad_rel_err(list(fast.rec_parameters()), list(ref.rec_parameters()))
    fast.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    fast.train()
    ref.train()
    out["ok"] = bool(out["eval_loss_close"] and out["train_loss_close"] and out["eval_grad_rel_err"] <= GRAD_RTOL
                     and out["train_grad_rel_err"] <= GRAD_RTOL)
    return out


def compare_dgi_backends(fast, ref, graph, seed: int) -> dict:
    """DGI loss and graph-side gradients, `fast` vs `ref`, same corruption permutation."""
    import torch

    nodes = graph.torch_tensors(fast.device).nodes
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(int(nodes.numel()), generator=gen).to(fast.device)
    losses = []
    for net in (fast, ref):
        net.train()
        net.zero_grad(set_to_none=True)
        loss, _h = net.dgi_loss(graph, perm=perm)
        loss.backward()
        losses.append(float(loss.detach()))
    out = {"dgi_loss_fast": losses[0], "dgi_loss_ref": losses[1], "dgi_loss_rel_diff": rel_diff(*losses),
           "dgi_loss_close": close(*losses),
           "dgi_grad_rel_err": grad_rel_err(fast.graph_parameters(), ref.graph_parameters())}
    fast.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    out["ok"] = bool(out["dgi_loss_close"] and out["dgi_grad_rel_err"] <= GRAD_RTOL)
    return out


def timed(fn: Callable[[], Any], sink: list) -> Callable[[], Any]:
    """`fn` that appends its own wall seconds (perf_counter) to `sink` on every call."""
    def run():
        t0 = time.perf_counter()
        out = fn()
        sink.append(time.perf_counter() - t0)
        return out
    return run
