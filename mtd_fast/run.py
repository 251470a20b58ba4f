"""One call of `mtd_fast.train`: the run's state machine (`Run`), split from `mtd_fast.train`,
which holds the public entry point and the step functions this schedule calls.

`Run.go` is the schedule of `mtd_fast.train`'s docstring with its state kept where a
checkpoint can take it: the run directory (start, or check and resume from the newest
checkpoint), the epoch loop (graph phase, recommendation epoch, validation, best weights,
early stop, a checkpoint after each), the final test, and, for the non-neural models, one
fit instead (`Run._fit_once`).

The step functions are not imported from `mtd_fast.train` (it imports this module: that
would be a cycle); `train` hands its own module in as the `trainer`, and `Run` looks each
one up there at every call, as it did when it lived there: what replaces one in
`mtd_fast.train` (tests, the kill hooks of tests/_run_driver.py) is what runs.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import random
import time
from typing import Any, Callable, Optional, Protocol

import numpy as np
import torch

from . import ops
from .config import PHASE_MODES, MTDConfig, TrainConfig
from .data.dataset import Dataset
from .data.store import DataError, Samples
from .distributed import Dist
from .metrics import METRIC_KEYS, better
from .models.base import SessionModel

__all__ = ["Run", "Trainer", "set_rng_state"]

log = logging.getLogger("mtd_fast")


class Trainer(Protocol):
    """What `Run` calls of `mtd_fast.train` (which passes itself): see the functions there."""

    TrainResult: Callable[..., Any]
    seed_everything: Callable[[int], None]
    build_model: Callable[..., SessionModel]
    graph_side: Callable[..., tuple]
    epoch_lr: Callable[[TrainConfig, int], float]
    set_lr: Callable[[Optional[torch.optim.Optimizer], float], None]
    rec_epoch: Callable[..., tuple[float, int, float]]
    EpochProgress: Callable[..., Any]
    steps_per_epoch: Callable[[int, TrainConfig], int]
    distributed_graph_phase: Callable[..., tuple[float, int, float]]
    evaluate_samples: Callable[..., dict[str, float]]
    first_nonfinite: Callable[[list], Optional[str]]
    say: Callable[[str, bool], None]


def _rng_state(rng: np.random.Generator) -> dict[str, Any]:
    """Every random state a run draws from, as weights_only-loadable values."""
    np_state = list(np.random.get_state(legacy=True))
    np_state[1] = np_state[1].tolist()
    out = {"python": random.getstate(), "numpy": np_state, "torch": torch.get_rng_state(),
           "batches": rng.bit_generator.state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_state(s: dict[str, Any], rng: np.random.Generator) -> None:
    """Restore every random state a checkpoint holds (one rank's entry of its "rng" list):
    Python's, NumPy's global, torch's, the batch generator `rng`'s and CUDA's when present."""
    random.setstate(s["python"])
    n = s["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    torch.set_rng_state(s["torch"])
    rng.bit_generator.state = s["batches"]
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _checked_partial(state: dict[str, Any], n_steps: int, batch_size: int, where: str) -> Optional[dict[str, Any]]:
    """A checkpoint's `partial_epoch` (None at an epoch's end, or the progress of a mid-epoch
    checkpoint: its first `steps` of the epoch's `n_steps` steps), checked against the rest."""
    from .rundir import RunDirError

    partial, pos = state.get("partial_epoch"), state["position"]

    def count(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    if partial is None:
        ok = pos.get("step", 0) == 0
    else:
        ok = (isinstance(partial, dict) and set(partial) == {"steps", "loss_sum", "samples", "seconds", "dgi_values"}
              and count(partial["steps"]) and 0 < partial["steps"] < n_steps
              and pos.get("step") == partial["steps"] and not pos["stopped"] and count(partial.get("samples"))
              and 0 < partial["samples"] <= partial["steps"] * batch_size
              and all(isinstance(partial.get(k), float) for k in ("loss_sum", "seconds"))
              and isinstance(partial.get("dgi_values"), list)
              and all(isinstance(v, float) for v in partial["dgi_values"]))
    if not ok:
        raise RunDirError(f"{where}: its mid-epoch progress does not fit this run (position {pos!r:.100}, progress "
                          f"{partial!r:.200}, {n_steps} steps per epoch): not a complete checkpoint")
    return partial


class Run:
    """One call of `train`: the schedule, with its state kept where a checkpoint can take it."""

    def __init__(self, trainer: Trainer, dataset: Dataset, model: str, epochs: int, seed: int, backend: Any,
                 quiet: bool, mcfg: MTDConfig, tcfg: TrainConfig, dist: Dist, run, resume: bool,
                 api_call: str, checkpoint_every: Optional[int] = None) -> None:
        self.trainer = trainer
        self.ds, self.model_name, self.epochs, self.seed, self.backend = dataset, model, epochs, seed, backend
        self.mcfg, self.tcfg, self.dist, self.run, self.resume, self.api_call = mcfg, tcfg, dist, run, resume, api_call
        self.quiet = quiet or not dist.main  # one voice: rank 0's
        self.checkpoint_every = checkpoint_every  # training steps between mid-epoch checkpoints (None: none)
        self.device = dist.device_for(tcfg.device)
        # run state (what a checkpoint holds besides weights, optimizers and RNG states)
        self.history: list[dict[str, Any]] = []
        self.best, self.best_state, self.best_epoch, self.bad = None, None, None, 0
        self.epoch_done, self.graph_done, self.stopped, self.phase_result = 0, False, False, None
        # a mid-epoch checkpoint's progress through epoch epoch_done + 1 (steps, loss_sum, samples,
        # seconds, dgi_values); None at an epoch boundary
        self.partial: Optional[dict[str, Any]] = None

    def say(self, msg: str) -> None:
        """A status line, from rank 0 only (logging, if set up to show INFO, gets it even when quiet)."""
        if self.dist.main:
            self.trainer.say(msg, self.quiet)

    def evaluate(self, net: SessionModel, samples: Samples, quiet: bool, desc: str) -> dict[str, float]:
        """The trainer's `evaluate_samples`, sharded over the ranks under DDP (each a contiguous
        1/W of the samples; the metric sums are all-reduced in float64)."""
        cfg, dist, evaluate_samples = self.tcfg, self.dist, self.trainer.evaluate_samples
        if not dist.enabled:
            return evaluate_samples(net, samples, cfg.eval_batch_size, quiet, desc)
        part = np.array_split(np.arange(len(samples)), dist.world)[dist.rank]
        sums, problem = [0.0] * (len(METRIC_KEYS) + 1), None
        try:
            if len(part):
                m = evaluate_samples(net, samples.select(part), cfg.eval_batch_size, quiet, desc)
                sums = [m[k] * len(part) for k in METRIC_KEYS] + [float(len(part))]
        except Exception as exc:  # every rank must learn of it, or the others wait in the reduce
            problem = exc
        dist.agree(problem)
        total = dist.sum_floats(sums)
        return {k: total[i] / total[-1] for i, k in enumerate(METRIC_KEYS)}

    # ---- run directory -------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        from .rundir import dataset_identity

        return {"model": self.model_name.lower(), "seed": self.seed, "epochs": self.epochs, "backend": self.backend,
                "model_config": dataclasses.asdict(self.mcfg), "train_config": dataclasses.asdict(self.tcfg),
                "dataset": dataset_identity(self.ds), "world_size": self.dist.world}

    def _open_run_dir(self) -> Optional[dict[str, Any]]:
        """Start or check the run directory on rank 0; the checkpoint to resume from, on every rank."""
        from .rundir import provenance

        run = self.run
        if not self.resume:
            self.dist.on_main(lambda: run.start(self._identity(), provenance(self.api_call)))
            return None

        def load():
            run.check_identity(self._identity())
            return run.load_checkpoint()

        found = self.dist.on_main(load)
        if found is None:
            self.say(f"[{self.model_name}] resume: {run.path} holds no checkpoint yet; starting from the beginning")
            self.dist.on_main(lambda: run.note_resume(0, provenance(self.api_call)))  # this code trains epoch 1 on
            return None
        state, path = found
        self.checkpoint_file = str(path)
        return state

    def _checkpoint(self, net, opt, opt_g, rng, best: bool, entry: Optional[dict[str, Any]] = None,
                    partial: Optional[dict[str, Any]] = None, epoch_rng: Optional[dict[str, Any]] = None) -> None:
        """Save the whole state (collective under DDP: every rank's RNG states are gathered),
        then append the epoch line; rank 0 writes, and its errors reach every rank.

        Mid-epoch (`partial`: the epoch's progress so far), the batch generator's state saved is
        `epoch_rng`, its state before the epoch's shuffle: a resumption draws the same batches
        and skips the steps done."""
        if self.run is None:
            return
        rng_state = _rng_state(rng)
        if partial is not None:
            rng_state["batches"] = epoch_rng
        rngs = self.dist.all_gather_object(rng_state)
        # the best weights are the model's own only at the end of the best epoch
        same_as_model = self.best_epoch == self.epoch_done and not self.graph_done and partial is None
        state = {
            "position": {"epoch": self.epoch_done, "graph_done": self.graph_done, "stopped": self.stopped,
                         "step": partial["steps"] if partial is not None else 0},
            "partial_epoch": partial,
            "phase_result": self.phase_result,
            "model": {k: v.detach().cpu() for k, v in net.state_dict().items()},
            "opt": opt.state_dict(), "opt_g": opt_g.state_dict() if opt_g is not None else None,
            "history": self.history, "best": self.best, "best_epoch": self.best_epoch, "bad": self.bad,
            # the best weights, unless they are the model's own (saved once, not twice)
            "best_state": None if same_as_model or self.best_state is None else
            {k: v.detach().cpu() for k, v in self.best_state.items()},
            "rng": rngs, "world_size": self.dist.world,
        }

        def write():
            self.run.save_checkpoint(state, best)
            if entry is not None:
                self.run.append_epoch(entry)

        self.dist.on_main(write)

    def _restore(self, state: dict[str, Any], net, opt, opt_g, rng) -> None:
        from .rundir import RunDirError
        from .serialization import ModelFileError, check_finite, check_state_fits

        where = getattr(self, "checkpoint_file", "checkpoint")
        try:
            pos = state["position"]
            if state["world_size"] != self.dist.world or len(state["rng"]) != self.dist.world:
                raise RunDirError(f"{where}: written by {state['world_size']} processes, this run has "
                                 f"{self.dist.world}: resume with the same number of processes")
            check_state_fits(net, state["model"], where)
            check_finite(state["model"], where)
            net.load_state_dict(state["model"])
            try:
                for o, saved in ((opt, state["opt"]), (opt_g, state["opt_g"])):
                    if o is not None:
                        fused = o.param_groups[0].get("fused") if o.param_groups else None
                        o.load_state_dict(saved)
                        self.trainer.keep_fused(o, fused)
            except (ValueError, KeyError, TypeError) as exc:
                raise RunDirError(f"{where}: the optimizer state does not fit this model ({exc})") from None
            self.history = list(state["history"])
            self.best, self.best_epoch, self.bad = state["best"], state["best_epoch"], int(state["bad"])
            self.best_state = (copy.deepcopy(net.state_dict()) if state["best_state"] is None
                               else {k: v.to(self.device) for k, v in state["best_state"].items()})
            self.epoch_done, self.graph_done = int(pos["epoch"]), bool(pos["graph_done"])
            self.stopped, self.phase_result = bool(pos["stopped"]), state.get("phase_result")
            self.partial = _checked_partial(state, self.trainer.steps_per_epoch(len(self.ds.train), self.tcfg),
                                            self.tcfg.batch_size, where)
            set_rng_state(state["rng"][self.dist.rank], rng)
        except KeyError as exc:
            raise RunDirError(f"{where}: the training state lacks {exc}: not a complete checkpoint") from None
        except ModelFileError as exc:  # weights that do not fit this model, or non-finite ones
            raise RunDirError(str(exc)) from None
        if self.epoch_done > self.epochs:
            raise RunDirError(f"{where}: {self.epoch_done} epochs are done, more than epochs={self.epochs}: resume "
                              "with at least as many epochs, or start a new run_dir")
        if self.run is not None:
            from .rundir import provenance

            self.dist.on_main(lambda: self.run.write_epochs(self.history))
            step = self.partial["steps"] if self.partial is not None else 0
            self.dist.on_main(lambda: self.run.note_resume(self.epoch_done, provenance(self.api_call), step))
        self.say(f"[{self.model_name}] resumed from {where}: {self.epoch_done} epoch(s) done"
                 + (", graph phase of the next one done" if self.graph_done else "")
                 + (f", {self.partial['steps']} step(s) of the next one done" if self.partial is not None else "")
                 + (", early-stopped" if self.stopped else ""))

    # ---- the schedule --------------------------------------------------------------------------
    def go(self):
        ds, mcfg, tcfg, dist, quiet = self.ds, self.mcfg, self.tcfg, self.dist, self.quiet
        freq = tcfg.rec_frequency or ds.rec_frequency
        tr = self.trainer
        tr.seed_everything(self.seed)
        net = tr.build_model(self.model_name, ds.n_items, mcfg, dataclasses.replace(tcfg, device=self.device),
                          self.backend)
        net.original_ids = ds.original_ids  # recommend() translates ids of a compact_ids dataset
        dev = torch.device(self.device)
        used = {op: ops.describe(op, self.backend, dev) for op in ops.OPS}
        resume_state = self._open_run_dir() if self.run is not None else None

        if not net.neural:
            return self._fit_once(net, used)

        dist.broadcast_tensors_(list(net.state_dict().values()))  # identical replicas from the start
        if dist.rank:  # each rank its own dropout draws for its own samples (rank 0 keeps the single-process stream)
            torch.manual_seed(self.seed + 1_000_003 * dist.rank)
        graph, graph_build_s = None, 0.0
        phases = net.uses_global_graph and mcfg.graph_mode in PHASE_MODES  # graph phases + write-back
        if net.uses_global_graph and tcfg.graph_phases > 0 and (tcfg.graph_steps > 0 or not phases):
            t0 = time.perf_counter()
            graph = ops.global_graph(ds.train_sessions, ds.n_items, directed=mcfg.graph_directed,
                                     weighted=mcfg.graph_weighted, backend=self.backend)
            graph_build_s = time.perf_counter() - t0
            if graph.num_nodes == 0:
                raise DataError(f"dataset {ds.name!r}: the training sessions hold no transition between two "
                                "different items, so the global graph is empty; train with graph_phases=0")
            self.say(f"[{net.name}] global graph: {graph.num_nodes} nodes, {graph.nnz} nonzeros of A+I "
                     f"({graph_build_s:.2f}s, {used['global_graph']})")
        rec_params = net.rec_parameters()
        opt = tr.adam(rec_params, lr=tcfg.lr)
        opt_g, every_step = tr.graph_side(net, graph, tcfg, seed=self.seed)
        rng = np.random.default_rng(self.seed)
        if resume_state is not None:
            self._restore(resume_state, net, opt, opt_g, rng)
        has_valid = len(ds.valid) > 0
        if not has_valid and dist.main:
            log.warning("no validation samples (%s): the last epoch is kept, no early stopping",
                        ds.empty_valid_reason())
        while self.epoch_done < self.epochs and not self.stopped:
            r = self.epoch_done
            lr = tr.epoch_lr(tcfg, r)
            tr.set_lr(opt, lr)
            tr.set_lr(opt_g, lr)
            graph_loss, graph_s, graph_steps = None, 0.0, 0
            if phases and graph is not None and r % freq == 0 and r // freq < tcfg.graph_phases:
                if not self.graph_done:
                    phase = r // freq + 1
                    self.phase_result = list(tr.distributed_graph_phase(net, graph, opt_g, tcfg, quiet, phase,
                                                                            dist))
                    self.graph_done = True
                    self._checkpoint(net, opt, opt_g, rng, best=False)
                graph_loss, graph_steps, graph_s = self.phase_result
            partial, self.partial = self.partial, None
            if every_step is not None:  # the DGI values of the steps a mid-epoch checkpoint holds
                every_step.dgi_values[:] = partial["dgi_values"] if partial is not None else []
            progress = (tr.EpochProgress(**{k: v for k, v in partial.items() if k != "dgi_values"})
                        if partial is not None else None)
            epoch_rng = rng.bit_generator.state  # before the shuffle (restored to it when resumed mid-epoch)
            on_step = self._mid_epoch_saver(net, opt, opt_g, rng, epoch_rng, every_step)
            train_loss, n_seen, train_s = tr.rec_epoch(net, ds.train, opt, rec_params, tcfg, rng, quiet, r + 1,
                                                    every_step, dist=dist, progress=progress, on_step=on_step)
            if every_step is not None:  # the mean DGI term of the epoch's steps (None when graph_weight = 0)
                graph_loss, graph_steps = every_step.mean_dgi(), len(every_step.dgi_values)
            self._check_weights(net, r + 1)
            t0 = time.perf_counter()
            valid = self.evaluate(net, ds.valid, quiet, "valid") if has_valid else None
            test = self.evaluate(net, ds.test, quiet, "test") if tcfg.eval_test_each_epoch else None
            eval_s = time.perf_counter() - t0
            entry = {"epoch": r + 1, "lr": lr, "train_loss": train_loss, "train_samples": n_seen,
                     "graph_loss": graph_loss, "graph_steps": graph_steps, "graph_seconds": graph_s,
                     "train_seconds": train_s, "eval_seconds": eval_s, "valid": valid, "test": test}
            self.history.append(entry)
            msg = (f"[{net.name}] epoch {r + 1}/{self.epochs}  loss {train_loss:.4f}  "
                   + (f"graph {graph_loss:.4f} ({graph_steps} steps, {graph_s:.1f}s)  " if phases and graph_loss
                      is not None else f"dgi {graph_loss:.4f} (every step)  " if graph_loss is not None else "")
                   + f"train {train_s:.1f}s")
            if valid is not None:
                msg += f"  valid P@20 {valid['P@20']:.2f} MRR@20 {valid['MRR@20']:.2f}"
            self.say(msg)
            is_best = not has_valid or better(valid, self.best)
            if is_best:
                self.best, self.best_epoch, self.bad = valid, r + 1, 0
                self.best_state = copy.deepcopy(net.state_dict())
            else:
                self.bad += 1
                self.stopped = self.bad >= tcfg.patience
            self.epoch_done, self.graph_done, self.phase_result = r + 1, False, None
            self._checkpoint(net, opt, opt_g, rng, best=is_best, entry=entry)
            if self.stopped:
                self.say(f"[{net.name}] early stop: no better validation P@20 for {self.bad} epochs")
        net.load_state_dict(self.best_state)
        metrics: dict[str, Any] = self.evaluate(net, ds.test, quiet, "test")
        if tcfg.eval_test_each_epoch:
            metrics["best_on_test"] = {k: max(h["test"][k] for h in self.history) for k in metrics}
        else:
            metrics["best_on_test"] = None
        self.say(f"[{net.name}] best validation epoch {self.best_epoch}: test P@20 {metrics['P@20']:.2f} "
                 f"MRR@20 {metrics['MRR@20']:.2f}")
        result = tr.TrainResult(net, metrics, self.history, self.best_epoch, mcfg, tcfg, ds.name, used, graph_build_s,
                             str(self.run.path) if self.run is not None else None)
        self._write_result(result)
        return result

    def _mid_epoch_saver(self, net, opt, opt_g, rng, epoch_rng: dict[str, Any], every_step):
        """`rec_epoch`'s on_step: a checkpoint after every `checkpoint_every`-th step of the epoch
        (not after its last: the epoch's end writes one); None without a run directory."""
        every = self.checkpoint_every
        if self.run is None or not every:
            return None

        def on_step(progress, n_steps: int) -> None:
            if progress.steps % every == 0 and progress.steps < n_steps:
                partial = {**dataclasses.asdict(progress),
                           "dgi_values": list(every_step.dgi_values) if every_step is not None else []}
                self._checkpoint(net, opt, opt_g, rng, best=False, partial=partial, epoch_rng=epoch_rng)

        return on_step

    def _check_weights(self, net, epoch: int) -> None:
        """Weights are checked at every step; this catches buffers and anything trained outside
        the optimizers (a learned write-back, a fitted memory) once per epoch."""
        bad = self.trainer.first_nonfinite(list(net.state_dict().items()))
        if bad is not None:
            raise FloatingPointError(f"epoch {epoch}: {bad} holds non-finite values (NaN or inf) "
                                     f"(lr={self.tcfg.lr:g}); try a lower lr")

    def _fit_once(self, net, used: dict[str, str]):
        """Non-neural models: one fit on every rank (deterministic), sharded evaluation. Nothing
        to checkpoint: a resumed run fits again, to the same model."""
        ds, tcfg, quiet = self.ds, self.tcfg, self.quiet
        t0 = time.perf_counter()
        net.fit(ds)
        fit_s = time.perf_counter() - t0
        valid = self.evaluate(net, ds.valid, True, "valid") if len(ds.valid) else None
        test = self.evaluate(net, ds.test, quiet, "test")
        history = [{"epoch": 1, "train_loss": None, "graph_loss": None, "graph_seconds": 0.0,
                    "train_seconds": fit_s, "valid": valid, "test": test}]
        metrics = dict(test)
        metrics["best_on_test"] = dict(test)
        self.say(f"[{net.name}] fitted in {fit_s:.1f}s  test P@20 {test['P@20']:.2f}  MRR@20 {test['MRR@20']:.2f}")
        result = self.trainer.TrainResult(net, metrics, history, 1, self.mcfg, tcfg, ds.name, used, 0.0,
                             str(self.run.path) if self.run is not None else None)
        if self.run is not None:
            self.dist.on_main(lambda: self.run.write_epochs(history))
        self._write_result(result)
        return result

    def _write_result(self, result) -> None:
        if self.run is None:
            return
        record = {"model": self.model_name, "dataset": result.dataset, "metrics": result.metrics,
                  "best_epoch": result.best_epoch, "epochs_run": len(result.history), "backends": result.backends,
                  "history": result.history}
        self.dist.on_main(lambda: self.run.write_result(record))
