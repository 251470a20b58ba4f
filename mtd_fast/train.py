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
"""
from __future__ import annotations

import copy
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import torch

from . import ops
from .config import PHASE_MODES, MTDConfig, TrainConfig, check_graph_options, split_overrides
from .data.dataset import Dataset
from .data.store import DataError, Samples, iter_batches
from .metrics import MetricAccumulator, better, ranks_from_scores
from .models import ablation_overrides, model_class
from .models.base import SessionModel

__all__ = ["train", "evaluate", "TrainResult", "build_model", "evaluate_samples", "train_step", "dgi_step"]

log = logging.getLogger("mtd_fast")


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

    def __repr__(self) -> str:
        m = self.metrics
        return (f"TrainResult(model={self.model.name!r}, dataset={self.dataset!r}, best_epoch={self.best_epoch}, "
                f"P@20={m.get('P@20', float('nan')):.2f}, MRR@20={m.get('MRR@20', float('nan')):.2f})")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _progress(iterable, total: int, desc: str, quiet: bool):
    if quiet:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, leave=False, dynamic_ncols=True)


def _say(msg: str, quiet: bool) -> None:
    log.info(msg)
    if not quiet:
        from tqdm.auto import tqdm

        tqdm.write(msg)


def build_model(name: str, n_items: int, model_config: MTDConfig, train_config: TrainConfig,
                backend: Any = None) -> SessionModel:
    cls = model_class(name)
    net = cls(n_items, model_config, dropout=train_config.dropout, backend=backend)
    net.name = name.lower()
    return net.to(train_config.device)


@torch.no_grad()
def evaluate_samples(model: SessionModel, samples: Samples, batch_size: int = 1024, quiet: bool = True,
                     desc: str = "eval") -> dict[str, float]:
    """P/MRR/NDCG @5/10/20 (x100) with full ranking over all M items."""
    if len(samples) == 0:
        raise DataError("cannot evaluate on an empty split")
    if samples.max_item() > model.n_items:
        raise DataError(f"the samples hold item id {samples.max_item()}, beyond the model's catalogue "
                        f"of {model.n_items} items")
    from .metrics import batch_ranks  # chunked ranking for models with score_parts: no (batch, M) scores

    was_training = model.training
    model.eval()
    acc = MetricAccumulator()
    try:
        batches = list(iter_batches(len(samples), batch_size))
        for idx in _progress(batches, len(batches), desc, quiet):
            batch = model.batch_from_sessions(samples.prefixes, idx)
            targets = torch.from_numpy(samples.targets[idx].astype(np.int64)).to(model.device)
            acc.add(batch_ranks(model, batch, targets))
    finally:
        model.train(was_training)
    return acc.result()


def evaluate(model: SessionModel, dataset: Dataset, split: str = "test", batch_size: int = 1024) -> dict[str, float]:
    """Metrics of `model` on `dataset`'s "valid" or "test" split."""
    if split not in ("valid", "test"):
        raise ValueError(f"split={split!r}: use 'valid' or 'test'")
    if dataset.n_items > model.n_items:
        raise DataError(f"dataset {dataset.name!r} has {dataset.n_items} items but the model was trained on "
                        f"{model.n_items}: it cannot rank the extra ones")
    return evaluate_samples(model, dataset.split(split), batch_size)


def epoch_lr(cfg: TrainConfig, r: int) -> float:
    """The step-decayed lr of recommendation epoch r (0-based): lr * lr_decay^(r // lr_decay_epochs)."""
    return cfg.lr * cfg.lr_decay ** (r // cfg.lr_decay_epochs)


def _set_lr(opt: Optional[torch.optim.Optimizer], lr: float) -> None:
    if opt is not None:
        for group in opt.param_groups:
            group["lr"] = lr


def dgi_step(net, graph, h0: torch.Tensor, opt, params, l2: float) -> tuple[float, torch.Tensor]:
    """One DGI step on the graph side (E frozen: H^0 = h0 is detached): loss + L2,
    backward, Adam step. Returns (loss, H of this step)."""
    loss, h = net.dgi_loss(graph, h0)
    total = loss + l2 * net.l2_penalty(params) if l2 else loss
    opt.zero_grad(set_to_none=True)
    total.backward()
    opt.step()
    value = float(total.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"DGI loss became {value}")
    return value, h


def _graph_phase(net, graph, opt: torch.optim.Optimizer, cfg: TrainConfig, quiet: bool, phase: int):
    """Up to graph_steps DGI steps on the graph side; write back the lowest-loss H."""
    t0 = time.perf_counter()
    params = net.graph_parameters()
    best_loss, best_h, bad, steps = math.inf, None, 0, 0
    nodes = graph.torch_tensors(net.device)[4]
    h0 = net.item_emb.weight.detach()[nodes]  # E frozen during the phase
    net.train()
    for _ in _progress(range(cfg.graph_steps), cfg.graph_steps, f"graph phase {phase}", quiet):
        value, h = dgi_step(net, graph, h0, opt, params, cfg.l2)
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


@dataclass
class GraphEveryStep:
    """The graph side of graph_mode "joint" / "residual", trained at every recommendation step:
    its optimizer and parameters, the DGI weight lambda_g, and the DGI values seen."""

    opt: torch.optim.Optimizer
    params: list
    weight: float
    dgi_values: list = field(default_factory=list)

    def mean_dgi(self) -> Optional[float]:
        return sum(self.dgi_values) / len(self.dgi_values) if self.dgi_values else None


def train_step(net, samples: Samples, idx: np.ndarray, opt, params, l2: float,
               on_grads: Optional[Callable[[dict], None]] = None, graph: Optional[GraphEveryStep] = None) -> float:
    """One recommendation step: batch building, forward, loss + l2 * 0.5||theta||^2,
    backward, Adam step. Returns the loss (raises on a non-finite one). `on_grads(batch)`
    runs between backward and the optimizer step (benches inspect gradients there).
    With `graph` (graph_mode "joint" / "residual") the loss is `net.multitask_loss` plus the
    graph side's L2, and both optimizers step."""
    batch = net.batch_from_sessions(samples.prefixes, idx)
    targets = torch.from_numpy(samples.targets[idx].astype(np.int64)).to(net.device)
    if graph is None:
        loss = net.loss(batch, targets)
    else:
        loss, dgi = net.multitask_loss(batch, targets, graph.weight)
        if dgi is not None:
            graph.dgi_values.append(float(dgi.detach()))
        if l2:
            loss = loss + l2 * net.l2_penalty(graph.params)
    if l2:
        loss = loss + l2 * net.l2_penalty(params)
    opt.zero_grad(set_to_none=True)
    if graph is not None:
        graph.opt.zero_grad(set_to_none=True)
    loss.backward()
    if on_grads is not None:
        on_grads(batch)
    opt.step()
    if graph is not None:
        graph.opt.step()
    value = float(loss.detach())
    if not math.isfinite(value):
        raise FloatingPointError(f"training loss became {value}; try a lower lr")
    return value


def _rec_epoch(net, samples: Samples, opt, params, cfg: TrainConfig, rng: np.random.Generator, quiet: bool,
               epoch: int, graph: Optional[GraphEveryStep] = None) -> tuple[float, int, float]:
    t0 = time.perf_counter()
    net.train()
    batches = list(iter_batches(len(samples), cfg.batch_size, rng))
    if cfg.max_steps_per_epoch is not None:
        batches = batches[:cfg.max_steps_per_epoch]
    total, n = 0.0, 0
    bar = _progress(batches, len(batches), f"epoch {epoch}", quiet)
    for i, idx in enumerate(bar):
        done = (epoch - 1) * len(batches) + i  # steps before this one (every epoch has len(batches) steps)
        if done < cfg.warmup_steps:  # linear warm-up from lr / warmup_steps to the epoch's lr
            lr = epoch_lr(cfg, epoch - 1) * (done + 1) / cfg.warmup_steps
            _set_lr(opt, lr)
            _set_lr(graph.opt if graph is not None else None, lr)
        try:
            value = train_step(net, samples, idx, opt, params, cfg.l2, graph=graph)
        except FloatingPointError as exc:
            raise FloatingPointError(f"epoch {epoch}: {exc} (lr={cfg.lr})") from None
        total += value * len(idx)
        n += len(idx)
        if not quiet and hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    return total / max(n, 1), n, time.perf_counter() - t0


def train(dataset: Dataset, *, model: str = "mtd", epochs: int = 10, seed: int = 0, backend: Any = "auto",
          quiet: bool = False, **overrides: Any) -> TrainResult:
    """Train `model` on `dataset` with the MTD schedule; pick the epoch on validation.

    `overrides`: any field of `MTDConfig` or `TrainConfig` (unknown names raise TypeError).
    """
    if not isinstance(dataset, Dataset):
        raise TypeError(f"train() needs a mtd_fast Dataset (see mtd_fast.load_dataset), got {type(dataset).__name__}")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs={epochs!r} must be an int >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed={seed!r} must be an int")
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
    threads_before = torch.get_num_threads()
    if tcfg.num_threads is not None:
        torch.set_num_threads(tcfg.num_threads)
    try:
        return _train(dataset, model, epochs, seed, backend, quiet, mcfg, tcfg)
    finally:
        torch.set_num_threads(threads_before)  # num_threads applies to this run only


def _train(dataset: Dataset, model: str, epochs: int, seed: int, backend: Any, quiet: bool, mcfg: MTDConfig,
           tcfg: TrainConfig) -> TrainResult:
    freq = tcfg.rec_frequency or dataset.rec_frequency
    _seed_everything(seed)
    net = build_model(model, dataset.n_items, mcfg, tcfg, backend)
    dev = torch.device(tcfg.device)
    used = {op: ops.describe(op, backend, dev) for op in ops.OPS}

    if not net.neural:
        t0 = time.perf_counter()
        net.fit(dataset)
        fit_s = time.perf_counter() - t0
        valid = evaluate_samples(net, dataset.valid, tcfg.eval_batch_size) if len(dataset.valid) else None
        test = evaluate_samples(net, dataset.test, tcfg.eval_batch_size, quiet, "test")
        history = [{"epoch": 1, "train_loss": None, "graph_loss": None, "graph_seconds": 0.0,
                    "train_seconds": fit_s, "valid": valid, "test": test}]
        metrics = dict(test)
        metrics["best_on_test"] = dict(test)
        _say(f"[{net.name}] fitted in {fit_s:.1f}s  test P@20 {test['P@20']:.2f}  MRR@20 {test['MRR@20']:.2f}", quiet)
        return TrainResult(net, metrics, history, 1, mcfg, tcfg, dataset.name, used)

    graph, graph_build_s = None, 0.0
    phases = net.uses_global_graph and mcfg.graph_mode in PHASE_MODES  # graph phases + write-back
    if net.uses_global_graph and tcfg.graph_phases > 0 and (tcfg.graph_steps > 0 or not phases):
        t0 = time.perf_counter()
        graph = ops.global_graph(dataset.train_sessions, dataset.n_items, directed=mcfg.graph_directed,
                                 weighted=mcfg.graph_weighted, backend=backend)
        graph_build_s = time.perf_counter() - t0
        if graph.num_nodes == 0:
            raise DataError(f"dataset {dataset.name!r}: the training sessions hold no transition between two "
                            "different items, so the global graph is empty; train with graph_phases=0")
        _say(f"[{net.name}] global graph: {graph.num_nodes} nodes, {graph.nnz} nonzeros of A+I "
             f"({graph_build_s:.2f}s, {used['global_graph']})", quiet)
    rec_params = net.rec_parameters()
    opt = torch.optim.Adam(rec_params, lr=tcfg.lr)
    every_step, opt_g = None, None
    if graph is not None and phases:
        opt_g = torch.optim.Adam(net.graph_parameters(), lr=tcfg.lr)
    elif graph is not None:  # joint / residual: the graph side trains at every step
        net.set_graph(graph)
        g_params = net.graph_parameters(discriminator=tcfg.graph_weight > 0)  # W_D unused without the DGI term
        opt_g = torch.optim.Adam(g_params, lr=tcfg.lr)
        every_step = GraphEveryStep(opt_g, g_params, tcfg.graph_weight)
    rng = np.random.default_rng(seed)
    has_valid = len(dataset.valid) > 0
    if not has_valid:
        log.warning("no validation samples (valid_fraction=0): the last epoch is kept, no early stopping")
    history: list[dict[str, Any]] = []
    best, best_state, best_epoch, bad = None, None, None, 0
    for r in range(epochs):
        lr = epoch_lr(tcfg, r)
        _set_lr(opt, lr)
        _set_lr(opt_g, lr)
        graph_loss, graph_s, graph_steps = None, 0.0, 0
        if phases and graph is not None and r % freq == 0 and r // freq < tcfg.graph_phases:
            graph_loss, graph_steps, graph_s = _graph_phase(net, graph, opt_g, tcfg, quiet, r // freq + 1)
        if every_step is not None:
            every_step.dgi_values.clear()
        train_loss, n_seen, train_s = _rec_epoch(net, dataset.train, opt, rec_params, tcfg, rng, quiet, r + 1,
                                                 every_step)
        if every_step is not None:  # the mean DGI term of the epoch's steps (None when graph_weight = 0)
            graph_loss, graph_steps = every_step.mean_dgi(), len(every_step.dgi_values)
        t0 = time.perf_counter()
        valid = evaluate_samples(net, dataset.valid, tcfg.eval_batch_size, quiet, "valid") if has_valid else None
        test = (evaluate_samples(net, dataset.test, tcfg.eval_batch_size, quiet, "test")
                if tcfg.eval_test_each_epoch else None)
        eval_s = time.perf_counter() - t0
        entry = {"epoch": r + 1, "lr": lr, "train_loss": train_loss, "train_samples": n_seen,
                 "graph_loss": graph_loss, "graph_steps": graph_steps, "graph_seconds": graph_s,
                 "train_seconds": train_s, "eval_seconds": eval_s, "valid": valid, "test": test}
        history.append(entry)
        msg = (f"[{net.name}] epoch {r + 1}/{epochs}  loss {train_loss:.4f}  "
               + (f"graph {graph_loss:.4f} ({graph_steps} steps, {graph_s:.1f}s)  " if graph_loss is not None else "")
               + f"train {train_s:.1f}s")
        if valid is not None:
            msg += f"  valid P@20 {valid['P@20']:.2f} MRR@20 {valid['MRR@20']:.2f}"
        _say(msg, quiet)
        if not has_valid or better(valid, best):
            best, best_epoch, bad = valid, r + 1, 0
            best_state = copy.deepcopy(net.state_dict())
        else:
            bad += 1
            if bad >= tcfg.patience:
                _say(f"[{net.name}] early stop: no better validation P@20 for {bad} epochs", quiet)
                break
    net.load_state_dict(best_state)
    metrics: dict[str, Any] = evaluate_samples(net, dataset.test, tcfg.eval_batch_size, quiet, "test")
    if tcfg.eval_test_each_epoch:
        metrics["best_on_test"] = {k: max(h["test"][k] for h in history) for k in metrics}
    else:
        metrics["best_on_test"] = None
    _say(f"[{net.name}] best validation epoch {best_epoch}: test P@20 {metrics['P@20']:.2f} "
         f"MRR@20 {metrics['MRR@20']:.2f}", quiet)
    return TrainResult(net, metrics, history, best_epoch, mcfg, tcfg, dataset.name, used, graph_build_s)
