"""Training and evaluation: the alternating multi-task schedule of `MTD_SPEC.md` section 4.

for r in range(epochs):
    if r % f == 0 and r // f < graph_phases: graph phase (DGI on the graph side only,
        E frozen; keep the lowest-loss H) and write-back E[nodes] = H_best
    one recommendation epoch; evaluate on VALIDATION; keep the best weights
    (validation P@20, ties MRR@20); stop after `patience` epochs without improvement
restore the best weights; evaluate on test.

The test set is never used for any choice. When `eval_test_each_epoch` is on, it is
evaluated after each epoch only to report the field's best-epoch-on-test protocol,
under the separate key `metrics["best_on_test"]`.

Around that schedule (README "Run directories, resume, determinism, multi-process"):
- `run_dir=` writes configs, per-epoch lines, curves and a checkpoint of the whole state
  after every epoch and every graph phase (`mtd_fast.rundir`); `resume=True` restores
  the newest one and continues, bit for bit the run that was not interrupted: every
  random draw (batch order, dropout masks, DGI corruptions) comes from a generator whose
  state the checkpoint holds, and the ops are deterministic (`TrainConfig.deterministic`);
- inside an initialised `torch.distributed` process group the run is data-parallel
  (`mtd_fast.distributed`): shards of each global batch, all-reduced gradients, the graph
  phase on rank 0 and broadcast, sharded evaluation, rank 0 writes;
- parameters and gradients are checked every step: a non-finite one stops the run with
  the epoch and step, before it reaches the weights.

This module holds `train` and the functions it is made of (steps, phases, epochs,
evaluation); the run's state machine (run directory, resume, the epoch loop) is
`mtd_fast.run.Run`, which calls those functions through this module.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import ops
from .allocator import keep_freed_memory
from .config import PHASE_MODES, ConfigError, MTDConfig, TrainConfig, check_graph_options, split_overrides
from .data.dataset import Dataset
from .data.store import DataError, Samples, iter_batches
from .distributed import Dist
from .metrics import MetricAccumulator
from .models import ablation_overrides, model_class
from .models.base import SessionModel
from .models.layers import FifoMemory
from .run import Run

__all__ = ["train", "evaluate", "TrainResult", "build_model", "evaluate_samples", "sample_ranks", "train_step",
           "dgi_step", "graph_side", "GraphEveryStep", "EpochProgress", "epoch_lr", "steps_per_epoch", "rec_epoch",
           "graph_phase", "distributed_graph_phase", "seed_everything"]

log = logging.getLogger("mtd_fast")

# history keys that measure time: they differ between any two runs, everything else is exact
TIMING_KEYS = ("graph_seconds", "train_seconds", "eval_seconds")


@dataclass
class TrainResult:
    """What `train` returns. `metrics` are test metrics of the validation-picked model;
    `metrics["best_on_test"]` is the published protocol's figure, for comparison only."""

    model: SessionModel
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    best_epoch: Optional[int]
    model_config: MTDConfig
    train_config: TrainConfig
    dataset: str
    backends: dict[str, str] = field(default_factory=dict)
    graph_build_seconds: float = 0.0
    run_dir: Optional[str] = None

    def __repr__(self) -> str:
        m = self.metrics
        return (f"TrainResult(model={self.model.name!r}, dataset={self.dataset!r}, best_epoch={self.best_epoch}, "
                f"P@20={m.get('P@20', float('nan')):.2f}, MRR@20={m.get('MRR@20', float('nan')):.2f})")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators as `train` does before building the model."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _bars_wanted(quiet: bool) -> bool:
    """Progress bars only on a terminal: into a file or pipe each redraw is a new line, hundreds
    per epoch; there the one status line per epoch (`say`) is the progress report."""
    if quiet:
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _progress(iterable, total: int, desc: str, quiet: bool, initial: int = 0):
    if not _bars_wanted(quiet):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True, initial=initial)


def _logging_shows_info() -> bool:
    """True when the user's logging setup prints INFO records of "mtd_fast" (then printing
    the same status line as well would show it twice)."""
    return log.isEnabledFor(logging.INFO) and log.hasHandlers()


def say(msg: str, quiet: bool) -> None:
    """Print a status line: to logging when it shows INFO records of "mtd_fast", else unless
    `quiet`, above a live progress bar when there is one."""
    if _logging_shows_info():
        log.info(msg)
    elif not quiet:
        if _bars_wanted(quiet):
            from tqdm.auto import tqdm

            tqdm.write(msg)  # above the live bar, not through it
        else:
            print(msg, flush=True)


def build_model(name: str, n_items: int, model_config: MTDConfig, train_config: TrainConfig,
                backend: Any = None) -> SessionModel:
    cls = model_class(name)
    net = cls(n_items, model_config, dropout=train_config.dropout, backend=backend)
    net.name = name.lower()
    return net.to(train_config.device)


def _ranked_batches(model: SessionModel, samples: Samples, batch_size: int, quiet: bool, desc: str):
    """The target ranks (batch,) of every batch of `samples`, in order, in eval mode."""
    if len(samples) == 0:
        raise DataError("cannot evaluate on an empty split")
    if samples.max_item() > model.n_items:
        raise DataError(f"the samples hold item id {samples.max_item()}, beyond the model's catalogue "
                        f"of {model.n_items} items")
    from .metrics import batch_ranks  # chunked ranking for models with score_parts: no (batch, M) scores

    was_training = model.training
    model.eval()
    try:
        batches = list(iter_batches(len(samples), batch_size))
        for idx in _progress(batches, len(batches), desc, quiet):
            with torch.no_grad():  # not around the yield: grad mode is the caller's while suspended
                batch = model.batch_from_sessions(samples.prefixes, idx)
                targets = torch.from_numpy(samples.targets[idx].astype(np.int64)).to(model.device)
                ranks = batch_ranks(model, batch, targets)
            yield ranks
    finally:
        model.train(was_training)


def evaluate_samples(model: SessionModel, samples: Samples, batch_size: int = 1024, quiet: bool = True,
                     desc: str = "eval") -> dict[str, float]:
    """P/MRR/NDCG @5/10/20 (x100) with full ranking over all M items."""
    acc = MetricAccumulator()
    for ranks in _ranked_batches(model, samples, batch_size, quiet, desc):
        acc.add(ranks)
    return acc.result()


def sample_ranks(model: SessionModel, samples: Samples, batch_size: int = 1024) -> np.ndarray:
    """The rank (1 = best, full catalogue, the metrics' tie rule) of every sample's target,
    in the samples' order, as int64 (n,): what paired comparisons of two models need.
    `MetricAccumulator` over these gives exactly `evaluate_samples`' metrics."""
    return torch.cat([r.cpu() for r in _ranked_batches(model, samples, batch_size, True, "ranks")]).numpy()


def evaluate(model: SessionModel, dataset: Dataset, split: str = "test", batch_size: int = 1024) -> dict[str, float]:
    """Metrics of `model` on `dataset`'s "valid" or "test" split."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}: use 'valid' or 'test'")
    _check_same_ids(model, dataset)
    if dataset.n_items > model.n_items:
        raise DataError(f"dataset {dataset.name!r} has {dataset.n_items} items but the model was trained on "
                        f"{model.n_items}: it cannot rank the extra ones")
    return evaluate_samples(model, dataset.split(split), batch_size)


def _check_same_ids(model: SessionModel, dataset: Dataset) -> None:
    """A model trained on compacted ids must meet the same compaction (else ids mean other items)."""
    a, b = getattr(model, "original_ids", None), getattr(dataset, "original_ids", None)
    if a is None and b is None:
        return
    if a is None or b is None or not np.array_equal(a, b):
        which = "was" if a is not None else "was not"
        raise DataError(f"the model {which} trained on load_dataset(..., compact_ids=True) ids, and dataset "
                        f"{dataset.name!r} is numbered differently: load it the way the model's training data was "
                        "loaded (same files, fraction and compact_ids)")


def epoch_lr(cfg: TrainConfig, r: int) -> float:
    """The step-decayed lr of recommendation epoch r (0-based): lr * lr_decay^(r // lr_decay_epochs)."""
    return cfg.lr * cfg.lr_decay ** (r // cfg.lr_decay_epochs)


def set_lr(opt: Optional[torch.optim.Optimizer], lr: float) -> None:
    """Set every parameter group of `opt` (None: nothing) to learning rate `lr`."""
    if opt is not None:
        for group in opt.param_groups:
            group["lr"] = lr


# ---- non-finite checks ------------------------------------------------------------------------
def first_nonfinite(named: list[tuple[str, torch.Tensor]]) -> Optional[str]:
    """The name of the first tensor holding NaN or inf, else None. A sum of per-tensor sums
    first: NaN and inf propagate through it, and it costs 0.7 ms for MTD's 4.45M Diginetica
    parameters on one thread (a float64 sum took 31 ms, isfinite().all() 22 ms, against a
    ~280 ms step). The exact per-tensor scan runs only when that sum is not finite (it can
    also overflow on huge finite values: then the scan finds nothing and training goes on)."""
    ts = [t.detach() for _, t in named if t is not None]
    if not ts or bool(torch.isfinite(torch.stack([_sum(t) for t in ts]).sum())):
        return None
    for name, t in named:
        if t is not None and not bool(torch.isfinite(t.detach()).all()):
            return name
    return None


def _sum(t: torch.Tensor) -> torch.Tensor:
    if t.dtype in (torch.float32, torch.float64):
        return t.sum().to(torch.float64)
    return t.sum(dtype=torch.float64) if not t.is_floating_point() else t.sum(dtype=torch.float32).double()


def _named(net: torch.nn.Module, params: list) -> list[tuple[str, torch.Tensor]]:
    names = {id(p): n for n, p in net.named_parameters()}
    return [(names.get(id(p), "?"), p) for p in params]


def _check_step(net, params: list, loss: float, when: str) -> None:
    """Raise FloatingPointError naming what became non-finite: the loss, a gradient
    (before the optimizer step, so the weights stay clean) or a weight (after it)."""
    if not math.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss}")
    named = _named(net, params)
    bad = first_nonfinite([(n, p.grad) for n, p in named] if when == "grads" else named)
    if bad is not None:
        what = "the gradient of" if when == "grads" else "the weight"
        raise FloatingPointError(f"{what} {bad} became non-finite (NaN or inf)")


def dgi_step(net, graph, h0: torch.Tensor, opt, params, l2: float) -> tuple[float, torch.Tensor]:
    """One DGI step on the graph side (E frozen: H^0 = h0 is detached): loss + L2,
    backward, Adam step. Returns (loss, H of this step); raises FloatingPointError when
    the loss, a gradient or a weight of the graph side becomes non-finite."""
    loss, h = net.dgi_loss(graph, h0)
    total = loss + l2 * net.l2_penalty(params) if l2 else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    value = float(total.detach())
    _check_step(net, params, value, "grads")
    opt.step()
    _check_step(net, params, value, "weights")
    return value, h


def graph_phase(net, graph, opt: torch.optim.Optimizer, cfg: TrainConfig, quiet: bool, phase: int):
    """Graph phase number `phase` (graph_mode "overwrite" / "rescaled") in one process: up to
    cfg.graph_steps DGI steps on the graph side (stopped after cfg.graph_patience steps without
    a lower loss), then the lowest-loss H written back into the item table. Returns (lowest
    loss, steps run, seconds)."""
    t0 = time.perf_counter()
    params = net.graph_parameters()
    best_loss, best_h, bad, steps = math.inf, None, 0, 0
    nodes = graph.torch_tensors(net.device).nodes
    h0 = net.item_emb.weight.detach()[nodes]  # E frozen during the phase
    net.train()
    for _ in _progress(range(cfg.graph_steps), cfg.graph_steps, f"graph phase {phase}", quiet):
        try:
            value, h = dgi_step(net, graph, h0, opt, params, cfg.l2)
        except FloatingPointError as exc:
            raise FloatingPointError(f"graph phase {phase}, DGI step {steps + 1}: {exc} (lr={cfg.lr}); try a "
                                     "lower lr") from None
        steps += 1
        if value < best_loss:
            best_loss, best_h, bad = value, h.detach().clone(), 0
        else:
            bad += 1
            if bad >= cfg.graph_patience:
                break
    if best_h is not None:
        net.write_back(graph, best_h)
    return best_loss, steps, time.perf_counter() - t0


def distributed_graph_phase(net, graph, opt: torch.optim.Optimizer, cfg: TrainConfig, quiet: bool, phase: int,
                            dist: Dist) -> tuple[float, int, float]:
    """`graph_phase` as `train` runs it: in one process as always; under DDP on rank 0, then its
    result (the item table, the graph side's weights) broadcast (README: measured against every
    rank computing it; `MTD_FAST_DDP_GRAPH=replicate` selects that alternative)."""
    if not dist.enabled:
        return graph_phase(net, graph, opt, cfg, quiet, phase)
    if os.environ.get("MTD_FAST_DDP_GRAPH") == "replicate":
        # identical RNG state on every rank -> identical corruptions -> identical phases, on
        # identical hardware and thread counts only (nothing checks that here)
        torch.set_rng_state(dist.broadcast_object(torch.get_rng_state()))
        return graph_phase(net, graph, opt, cfg, quiet, phase)
    out = dist.on_main(lambda: graph_phase(net, graph, opt, cfg, quiet, phase))
    dist.broadcast_tensors_([net.item_emb.weight, *net.graph_parameters()])
    return out


@dataclass
class GraphEveryStep:
    """The graph side of graph_mode "joint" / "residual", trained at every recommendation step:
    its optimizer and parameters, the DGI weight lambda_g, and the DGI values seen.

    DGI's corruption permutation of step `step` comes from a generator seeded by (seed,
    step), not from torch's global RNG: every DDP rank draws the same one (so the replicated
    graph side gets the single-process gradient), and a resumed run draws what an
    uninterrupted one would, whatever else consumed random numbers."""

    opt: torch.optim.Optimizer
    params: list
    weight: float
    seed: int = 0
    step: int = 0  # global training step, set by `rec_epoch`
    dgi_values: list = field(default_factory=list)

    def mean_dgi(self) -> Optional[float]:
        return sum(self.dgi_values) / len(self.dgi_values) if self.dgi_values else None

    def corruption(self, n: int, device) -> torch.Tensor:
        """The (n,) row permutation of this step's corrupted graph."""
        gen = torch.Generator().manual_seed((self.seed % 2**31) * 2**32 + self.step)
        return torch.randperm(n, generator=gen).to(device)


class _Adam(torch.optim.Adam):
    """torch's Adam, whose step also advances every parameter's version counter: the fused
    kernel writes the weights without doing so (torch 2.13), and the item-table cache of
    MTD's evaluation (`MTD.item_table`) keys on those counters, so it would have served a
    table from before the step (tests/test_train.py caught exactly that)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = super().step(closure)
        for group in self.param_groups:
            if group.get("fused"):
                for p in group["params"]:
                    torch.autograd.graph.increment_version(p)
        return loss


def adam(params, lr: float) -> torch.optim.Adam:
    """Adam with torch's fused kernel where every parameter allows it (floating point, on the
    CPU or CUDA): one pass per tensor instead of one per elementwise op. On a 43k x 100 item
    table (plus two small tensors) a step took 5 ms against 15 ms (1 thread, benches/item_table_ops.py); the
    result differs from the unfused step in the last bit (about 1e-7), so a run is still
    deterministic but not bit-identical to one made before this choice."""
    params = list(params)
    fused = bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    return _Adam(params, lr=lr, fused=fused or None)


def keep_fused(opt: torch.optim.Optimizer, fused: Optional[bool]) -> None:
    """After `load_state_dict`: the saved param groups carry the saving optimizer's `fused`
    flag (a checkpoint from before `adam` was fused); keep this one's, so a resumed run runs
    the fused step too."""
    for group in opt.param_groups:
        group["fused"] = fused


def graph_side(net, graph, cfg: TrainConfig,
               seed: int = 0) -> tuple[Optional[torch.optim.Optimizer], Optional[GraphEveryStep]]:
    """The graph side of training on `graph` (None: no graph): its Adam optimizer and, for the
    per-step graph modes (joint, residual), the `GraphEveryStep` that `train_step` takes, with
    the graph attached to `net`. The phase modes get (optimizer, None): `graph_phase` uses it."""
    if graph is None:
        return None, None
    if net.config.graph_mode in PHASE_MODES:
        return adam(net.graph_parameters(), lr=cfg.lr), None
    net.set_graph(graph)
    params = net.graph_parameters(discriminator=cfg.graph_weight > 0)  # W_D unused without the DGI term
    opt = adam(params, lr=cfg.lr)
    return opt, GraphEveryStep(opt, params, cfg.graph_weight, seed=seed)


def train_step(net, samples: Samples, idx: np.ndarray, opt, params, l2: float,
               on_grads: Optional[Callable[[dict], None]] = None, graph: Optional[GraphEveryStep] = None, *,
               dist: Optional[Dist] = None, global_size: Optional[int] = None) -> float:
    """One recommendation step: batch building, forward, loss + l2 * 0.5||theta||^2,
    backward, Adam step. Returns the loss. `on_grads(batch)` runs between backward and the
    optimizer step (benches inspect gradients there). With `graph` (graph_mode "joint" /
    "residual") the loss is `net.multitask_loss` plus the graph side's L2, and both
    optimizers step.

    Under DDP (`dist`), `idx` is this rank's shard of a global batch of `global_size`
    samples (possibly empty): the gradients are all-reduced with weights len(idx) /
    global_size and the returned loss is the global batch's mean.

    Raises FloatingPointError when the loss or a gradient is not finite (checked after
    the all-reduce, so every rank raises together, and before the step, so the weights
    stay clean), or when a weight became non-finite in the step.
    """
    dist = dist if dist is not None else _SINGLE
    all_params = list(params) + (list(graph.params) if graph is not None else [])
    opt.zero_grad(set_to_none=True)
    if graph is not None:
        graph.opt.zero_grad(set_to_none=True)
    value, dgi_value = 0.0, None
    if len(idx):
        batch = net.batch_from_sessions(samples.prefixes, idx)
        targets = torch.from_numpy(samples.targets[idx].astype(np.int64)).to(net.device)
        if graph is None:
            loss = net.loss(batch, targets)
        else:
            perm = graph.corruption(net.graph.num_nodes, net.device) if graph.weight > 0 else None
            loss, dgi = net.multitask_loss(batch, targets, graph.weight, perm=perm)
            if dgi is not None:
                dgi_value = float(dgi.detach())
            if l2:
                loss = loss + l2 * net.l2_penalty(graph.params)
        if l2:
            loss = loss + l2 * net.l2_penalty(params)
        loss.backward()
        value = float(loss.detach())
        if on_grads is not None:
            on_grads(batch)
    else:  # an empty shard still takes part in the memory models' row all-gather (see rec_epoch)
        for m in net.modules():
            if isinstance(m, FifoMemory) and m.gather is not None:
                m.write(m.memory.new_zeros(0, m.dim))
    if dist.enabled:
        w = len(idx) / global_size
        value, dgi_sum, dgi_n = dist.reduce_grads(all_params, w, [value * w, (dgi_value or 0.0) * w,
                                                                  1.0 if dgi_value is not None else 0.0])
        dgi_value = dgi_sum if dgi_n > 0 else None
    if graph is not None and dgi_value is not None:
        graph.dgi_values.append(dgi_value)
    _check_step(net, all_params, value, "grads")
    opt.step()
    if graph is not None:
        graph.opt.step()
    _check_step(net, all_params, value, "weights")
    return value


@dataclass
class EpochProgress:
    """Where a recommendation epoch stands after its first `steps` steps: the sum of the
    per-sample losses and the samples seen so far, and the training seconds spent on them
    (a mid-epoch checkpoint stores it; `rec_epoch` goes on from it)."""

    steps: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    seconds: float = 0.0


def rec_epoch(net, samples: Samples, opt, params, cfg: TrainConfig, rng: np.random.Generator, quiet: bool,
              epoch: int, graph: Optional[GraphEveryStep] = None, *,
              dist: Optional[Dist] = None, progress: Optional[EpochProgress] = None,
              on_step: Optional[Callable[[EpochProgress, int], None]] = None) -> tuple[float, int, float]:
    """Recommendation epoch number `epoch` (1-based): `train_step` over the batches of one
    shuffle of `samples` by `rng` (at most cfg.max_steps_per_epoch), with the linear warm-up of
    cfg.warmup_steps over the first steps of the run. Returns (mean loss per sample, samples
    seen, seconds).

    `progress`: the epoch's first `progress.steps` steps are already done (a resumption from
    a mid-epoch checkpoint: `rng` must be in its state from before this epoch's shuffle, so
    the same batches are drawn); the epoch goes on from there and its totals include them.
    `on_step(progress, n_steps)` runs after every step (the run's mid-epoch checkpoints)."""
    dist = dist if dist is not None else _SINGLE
    t0 = time.perf_counter()
    progress = EpochProgress() if progress is None else dataclasses.replace(progress)
    net.train()
    # the same global batches on every rank
    batches = list(iter_batches(len(samples), cfg.batch_size, rng))[:steps_per_epoch(len(samples), cfg)]
    if not 0 <= progress.steps <= len(batches):
        raise ValueError(f"epoch {epoch} has {len(batches)} steps; cannot go on after step {progress.steps}")
    # memory models (CSRM, CoSAN): every process writes the global batch, not its own shard
    memories = [m for m in net.modules() if isinstance(m, FifoMemory)] if dist.enabled else []
    for m in memories:
        m.gather = dist.all_gather_rows
    base = progress.seconds  # the steps a previous process trained
    try:
        _rec_steps(net, samples, batches, opt, params, cfg, epoch, graph, dist, progress, on_step, quiet,
                   lambda: base + time.perf_counter() - t0)
    finally:
        for m in memories:
            m.gather = None
    return progress.loss_sum / max(progress.samples, 1), progress.samples, base + time.perf_counter() - t0


def steps_per_epoch(n_samples: int, cfg: TrainConfig) -> int:
    """The number of training steps (batches) of an epoch over `n_samples` samples."""
    n = -(-n_samples // cfg.batch_size)
    return n if cfg.max_steps_per_epoch is None else min(n, cfg.max_steps_per_epoch)


def _warm_up(cfg: TrainConfig, epoch: int, done: int, opt, graph: Optional[GraphEveryStep]) -> None:
    """The linear warm-up from lr / warmup_steps to the epoch's lr: set the lr of the run's step
    `done` (0-based; nothing once the warm-up is over, the epoch's lr stays)."""
    if done < cfg.warmup_steps:
        lr = epoch_lr(cfg, epoch - 1) * (done + 1) / cfg.warmup_steps
        set_lr(opt, lr)
        set_lr(graph.opt if graph is not None else None, lr)


def _rec_steps(net, samples, batches, opt, params, cfg, epoch, graph, dist, progress: EpochProgress, on_step,
               quiet: bool, clock: Callable[[], float]) -> None:
    start, first = progress.steps, (epoch - 1) * len(batches)  # first: the run's steps before this epoch
    last_warm = min(first + start, cfg.warmup_steps) - 1  # the last warm-up step among those done
    if start and last_warm >= first:  # resumed mid-epoch after warm-up steps of this epoch: the lr they left
        _warm_up(cfg, epoch, last_warm, opt, graph)
    bar = _progress(batches[start:], len(batches), f"epoch {epoch}", quiet, initial=start)
    for i, idx in enumerate(bar, start):
        done = first + i  # steps before this one (every epoch has len(batches) steps)
        _warm_up(cfg, epoch, done, opt, graph)
        if graph is not None:
            graph.step = done
        try:
            value = train_step(net, samples, dist.shard(idx), opt, params, cfg.l2, graph=graph, dist=dist,
                               global_size=len(idx))
        except FloatingPointError as exc:
            lr_now = opt.param_groups[0]["lr"]
            raise FloatingPointError(f"epoch {epoch}, step {i + 1} of {len(batches)}: {exc} (lr={lr_now:g}); "
                                     "try a lower lr") from None
        progress.loss_sum += value * len(idx)
        progress.samples += len(idx)
        progress.steps, progress.seconds = i + 1, clock()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
        if on_step is not None:
            on_step(progress, len(batches))


_SINGLE = Dist.__new__(Dist)  # the single-process context, without touching torch.distributed
_SINGLE.enabled, _SINGLE.rank, _SINGLE.world, _SINGLE.backend = False, 0, 1, None


# ---- determinism ------------------------------------------------------------------------------
@contextlib.contextmanager
def _determinism(flag: Optional[bool], device: str):
    """`TrainConfig.deterministic` for the duration of one run (README "Determinism").

    None: torch's deterministic algorithms on CPU runs (warn-only for ops without one), off on
    CUDA. On the CPU the only nondeterministic op MTD's training reaches is the backward of
    advanced indexing (`table[tokens]`): `index_put_(accumulate=True)` adds with atomics on
    > 1 thread; the deterministic mode makes it serial, at no measurable cost (36.0 ms with and
    without for a 40k x 100 table and 2,600 tokens, 2 threads). True: also on CUDA (cuBLAS
    workspace, cuDNN), raising for an op torch has no deterministic version of. False: left
    as the caller set it.

    torch's deterministic mode also fills every fresh `torch.empty` with NaN
    (`torch.utils.deterministic.fill_uninitialized_memory`), a guard against kernels that read
    memory they did not write. It is switched off for the run: on MTD's Diginetica step it
    filled several item-table-sized LayerNorm, SpMM and gradient buffers per step that the
    kernels then overwrite (torch.profiler), and the guard is what tests are for
    (tests/test_determinism.py: identical runs give identical weights, with it off).
    """
    cuda = device.startswith("cuda")
    on = (not cuda) if flag is None else flag
    if not on:
        yield
        return
    before = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if cuda and "CUBLAS_WORKSPACE_CONFIG" not in os.environ:
        # cuBLAS reads it when its handle is made: before the first GEMM of the process
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        if torch.cuda.is_initialized():
            log.warning("deterministic=True: CUBLAS_WORKSPACE_CONFIG was set after CUDA started; set it to "
                        ":4096:8 in the environment before launching for deterministic cuBLAS")
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=flag is None)
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])
        torch.utils.deterministic.fill_uninitialized_memory = fill
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


# ---- entry point ------------------------------------------------------------------------------
def train(dataset: Dataset, *, model: str = "mtd", epochs: int = 10, seed: int = 0, backend: Any = None,
          quiet: bool = False, run_dir: Any = None, resume: bool = False, checkpoint_every: Optional[int] = None,
          **overrides: Any) -> TrainResult:
    """Train `model` on `dataset` with the MTD schedule; pick the epoch on validation.

    `overrides`: any field of `MTDConfig` or `TrainConfig` (unknown names raise TypeError).
    `backend`: None means `$MTD_FAST_BACKEND` when set, else "auto" (an explicit value wins).
    `run_dir`: a folder that receives configs, per-epoch JSON lines, curves and atomic
    checkpoints (`mtd_fast.rundir`); `resume=True` continues the run in it exactly.
    `checkpoint_every`: with `run_dir`, also checkpoint after every that many training steps
    within an epoch (default: at the end of each epoch and graph phase only), so a run killed
    mid-epoch loses at most that many steps; a resumption from such a checkpoint is as exact
    as from an epoch's end. It does not change what is trained.
    Inside an initialised torch.distributed process group the run is data-parallel.
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"train() needs a mtd_fast Dataset (see mtd_fast.load_dataset), got {type(dataset).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")
    if not isinstance(resume, bool):
        raise ValueError(f"resume={resume!r} must be True or False")
    if resume and run_dir is None:
        raise ValueError("resume=True needs run_dir=PATH: the run directory to continue")
    if run_dir is not None and not isinstance(run_dir, (str, os.PathLike)):
        raise TypeError(f"run_dir must be a path, got {type(run_dir).__name__}")
    if checkpoint_every is not None:
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every={checkpoint_every!r} must be an int >= 1 (training steps) or None")
        if run_dir is None:
            raise ValueError("checkpoint_every needs run_dir=PATH: the run directory that keeps the checkpoints")
    model_class(model)  # unknown names fail before any work
    if len(dataset.test) == 0:
        raise DataError(f"dataset {dataset.name!r} has no test samples: nothing to report after training")
    mkw, tkw = split_overrides(ablation_overrides(model, overrides))
    mcfg, tcfg = MTDConfig(**mkw), TrainConfig(**tkw)
    if getattr(model_class(model), "uses_global_graph", False):
        check_graph_options(mcfg.graph_mode, set(overrides), tcfg)
    backend = ops.validate_spec(backend)
    if tcfg.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={tcfg.device!r} but CUDA is not available")
    dataset.check_catalogue()  # before any allocation that scales with the largest id
    keep_freed_memory()  # no page faults on the blocks every step frees and allocates again
    dist = Dist()
    if dist.enabled and tcfg.batch_size % dist.world:
        raise ConfigError(f"batch_size={tcfg.batch_size} is not divisible by the world size {dist.world}: each of "
                          f"the {dist.world} processes takes an equal share of every global batch (try "
                          f"batch_size={tcfg.batch_size // dist.world * dist.world or dist.world})")
    run = None
    if run_dir is not None:
        from .rundir import RunDir

        dist.on_main(lambda: RunDir.check(run_dir, resume))
        run = RunDir(run_dir, writer=dist.main)
    threads_before = torch.get_num_threads()
    if tcfg.num_threads is not None:
        torch.set_num_threads(tcfg.num_threads)
    api_call = (f"mtd_fast.train(<dataset {dataset.name!r}>, model={model!r}, epochs={epochs}, seed={seed}, "
                f"backend={backend!r}" + "".join(f", {k}={v!r}" for k, v in overrides.items()) + ")")
    try:
        with _determinism(tcfg.deterministic, tcfg.device):
            # this module is the trainer: Run calls its step functions here
            return Run(sys.modules[__name__], dataset, model, epochs, seed, backend, quiet, mcfg, tcfg, dist, run,
                       resume, api_call, checkpoint_every).go()
    finally:
        torch.set_num_threads(threads_before)  # num_threads applies to this run only
