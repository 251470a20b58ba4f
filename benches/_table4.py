"""Helpers of the Table 4 timing study (`benches/bench_table4.py`).

Settings read from the environment, the training step that is timed (the body of
`mtd_fast.train.rec_epoch`, step for step), the checks run before timing, the epoch
estimate, the report (markdown table shaped like the paper's Table 4, ratios, JSON, bar
chart) and the client of the RecBole peer process. Unit-tested in
`tests/test_table4_helpers.py`; nothing here imports pytest.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import select
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np

from mtd_fast.train import train_step  # the trainer's own steps, timed as they run

# --------------------------------------------------------------------------- names
ALL_MODELS = ("mtd", "gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan")
PEER_MODELS = ("gru4rec", "narm", "stamp", "sasrec", "srgnn")  # what RecBole 1.2.1 implements
ALL_DATASETS = ("yoochoose1_64", "diginetica", "retailrocket")
DATASET_LABELS = {"yoochoose1_64": "Yoochoose 1/64", "yoochoose1_64_mtd": "Yoochoose 1/64 (MTD ids)",
                  "diginetica": "Diginetica", "retailrocket": "Retailrocket", "synthetic": "synthetic (smoke)"}
MODEL_LABELS = {"mtd": "MTD", "gru4rec": "GRU4Rec", "narm": "NARM", "stamp": "STAMP", "sasrec": "SASRec",
                "srgnn": "SR-GNN", "csrm": "CSRM", "cosan": "CoSAN"}
PEER_LABEL = "RecBole"

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


class SettingsError(ValueError):
    """A bad MTD_T4_* value (names the variable and what it accepts)."""


@dataclass(frozen=True)
class Settings:
    smoke: bool
    datasets: tuple[str, ...]
    models: tuple[str, ...]
    peers: tuple[str, ...]
    recbole_python: Optional[str]
    device: str
    steps: int  # timed training steps per model (estimate mode)
    warmup: int  # untimed steps after the checked step
    epochs: int  # 0: estimate; N: time N whole epochs per model instead
    dgi_steps: int  # timed DGI steps
    graph_steps: int  # bound of the measured graph phase (the trainer's graph_steps)
    graph_patience: int
    threads: Optional[int]
    results: Path
    seed: int
    batch_size: int
    hidden: int
    synthetic_sessions: int
    peer_timeout_s: float

    @property
    def mode(self) -> str:
        return "epochs" if self.epochs > 0 else "estimate"

    @property
    def prefix(self) -> str:
        return "table4_smoke" if self.smoke else "table4"


def _csv(env: Mapping[str, str], key: str, default: Sequence[str], allowed: Optional[Sequence[str]]) -> tuple:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return tuple(default)
    if raw.strip().lower() in ("none", "off", "0"):
        return ()
    if raw.strip().lower() == "all" and allowed is not None:
        return tuple(allowed)
    items = tuple(dict.fromkeys(x.strip().lower() for x in raw.split(",") if x.strip()))
    if allowed is not None:
        bad = [x for x in items if x not in allowed]
        if bad:
            raise SettingsError(f"{key}={raw!r}: unknown {bad[0]!r}; use a comma list of {', '.join(allowed)} "
                                f"(or 'all' / 'none')")
    return items


def _int(env: Mapping[str, str], key: str, default: int, lo: int) -> int:
    raw = env.get(key)
    if raw is None or raw.strip() == "":
        return default
    try:
        v = int(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} must be an int >= {lo}") from None
    if v < lo:
        raise SettingsError(f"{key}={raw!r} must be an int >= {lo}")
    return v


def settings_from_env(env: Mapping[str, str], project: Path) -> Settings:
    """The study's settings from MTD_BENCH_SMOKE, MTD_T4_* and MTD_BENCH_RECBOLE_PYTHON."""
    smoke = env.get("MTD_BENCH_SMOKE") == "1"
    datasets = _csv(env, "MTD_T4_DATASETS", ("synthetic",) if smoke else ALL_DATASETS,
                    (*ALL_DATASETS, "yoochoose1_64_mtd", "synthetic"))
    models = _csv(env, "MTD_T4_MODELS", ALL_MODELS, ALL_MODELS)
    peers = _csv(env, "MTD_T4_PEERS", PEER_MODELS, PEER_MODELS)
    device = (env.get("MTD_T4_DEVICE") or "cpu").strip().lower()
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise SettingsError(f"MTD_T4_DEVICE={device!r}: use cpu, cuda or cuda:N")
    # smoke: 1 thread unless asked; on a busy 2-core machine two OpenMP threads made tiny
    # steps 20-50x slower (MTD, batch 128 of 300 items: 0.5-1.5 s against 25 ms)
    threads = _int(env, "MTD_T4_THREADS", 1 if smoke else 0, 0) or None
    results = Path(env.get("MTD_T4_RESULTS") or (project / "benches" / "results"))
    return Settings(
        smoke=smoke, datasets=datasets, models=models, peers=peers,
        recbole_python=(env.get("MTD_BENCH_RECBOLE_PYTHON") or None), device=device,
        steps=_int(env, "MTD_T4_STEPS", 1 if smoke else 10, 1),
        warmup=_int(env, "MTD_T4_WARMUP", 0 if smoke else 1, 0),
        epochs=_int(env, "MTD_T4_EPOCHS", 0, 0),
        dgi_steps=_int(env, "MTD_T4_DGI_STEPS", 1 if smoke else 10, 1),
        graph_steps=_int(env, "MTD_T4_GRAPH_STEPS", 5 if smoke else 1000, 1),
        graph_patience=_int(env, "MTD_T4_GRAPH_PATIENCE", 10, 1),
        threads=threads, results=results, seed=_int(env, "MTD_T4_SEED", 0, 0),
        batch_size=_int(env, "MTD_T4_BATCH", 128 if smoke else 512, 1),
        hidden=_int(env, "MTD_T4_HIDDEN", 100, 1),
        synthetic_sessions=_int(env, "MTD_T4_SYNTHETIC_SESSIONS", 1500, 20),
        peer_timeout_s=float(_int(env, "MTD_T4_PEER_TIMEOUT", 900, 1)),
    )


# --------------------------------------------------------------------------- batches and steps
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


def _grad_report(params) -> dict:
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
        rep.update(_grad_report(params))
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


# --------------------------------------------------------------------------- estimates
def epoch_estimate(step_seconds: Sequence[float], n_samples: int, batch_size: int) -> dict:
    """Seconds per epoch from timed steps: ceil(n / batch) x median step (the robust
    figure on a shared machine), and x mean (the unbiased one for a sum) beside it."""
    if not step_seconds:
        raise ValueError("no timed steps")
    steps = math.ceil(n_samples / batch_size)
    a = np.asarray(step_seconds, dtype=float)
    med, mean = float(np.median(a)), float(a.mean())
    return {"steps_per_epoch": steps, "timed_steps": int(a.size), "median_step_s": med, "mean_step_s": mean,
            "min_step_s": float(a.min()), "max_step_s": float(a.max()),
            "epoch_s": steps * med, "epoch_s_from_mean": steps * mean}


def measured_epochs(epoch_seconds: Sequence[float], steps_per_epoch: int) -> dict:
    a = np.asarray(epoch_seconds, dtype=float)
    med = float(np.median(a))
    return {"steps_per_epoch": steps_per_epoch, "timed_epochs": int(a.size), "epoch_s": med,
            "epoch_s_from_mean": float(a.mean()), "median_step_s": med / max(steps_per_epoch, 1),
            "epoch_seconds": [float(x) for x in a]}


def amortised(phase_s: float, rec_frequency: int) -> float:
    """Graph-phase seconds per recommendation epoch: one phase every f epochs."""
    if rec_frequency < 1:
        raise ValueError(f"rec_frequency={rec_frequency} must be >= 1")
    return phase_s / rec_frequency


# --------------------------------------------------------------------------- machine
def machine_info(device: str = "cpu") -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"), "machine": platform.machine(),
            "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(), "device": device,
            "loadavg_start": _loadavg()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _loadavg() -> Optional[list[float]]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


# --------------------------------------------------------------------------- report
@dataclass
class Report:
    """Everything measured in one run; rendered as markdown, JSON and a bar chart."""

    settings: dict
    meta: dict
    datasets: dict = field(default_factory=dict)  # key -> info (label, samples, steps/epoch, f, status)
    rows: list = field(default_factory=list)  # one per (row, dataset): ours and peers
    graph: dict = field(default_factory=dict)  # dataset -> DGI/phase entry
    notes: list = field(default_factory=list)

    # ---- recording
    def add_dataset(self, key: str, **info) -> None:
        self.datasets[key] = {"key": key, "label": DATASET_LABELS.get(key, key), **info}

    def add_row(self, row: str, dataset: str, status: str, **data) -> None:
        self.rows = [r for r in self.rows if not (r["row"] == row and r["dataset"] == dataset)]
        self.rows.append({"row": row, "dataset": dataset, "status": status, **data})

    def add_graph(self, dataset: str, status: str, **data) -> None:
        self.graph[dataset] = {"dataset": dataset, "status": status, **data}

    def row(self, row: str, dataset: str) -> Optional[dict]:
        for r in self.rows:
            if r["row"] == row and r["dataset"] == dataset:
                return r
        return None

    # ---- derived
    def dataset_keys(self) -> list[str]:
        order = list(self.settings.get("datasets", ()))
        return [k for k in order if k in self.datasets] + [k for k in self.datasets if k not in order]

    def epoch_s(self, row: str, dataset: str) -> Optional[float]:
        """Seconds per epoch of a table row (None when not measured). Rows: a model name,
        "recbole:<model>", and for MTD "mtd" (recommendation epoch), "mtd:graph" (the
        graph phase amortised over f epochs), "mtd:total" (the two added)."""
        if row == "mtd:graph":
            g = self.graph.get(dataset)
            return g.get("amortised_s") if g and g["status"] == "ok" else None
        if row == "mtd:total":
            a, b = self.epoch_s("mtd", dataset), self.epoch_s("mtd:graph", dataset)
            return None if a is None or b is None else a + b
        r = self.row(row, dataset)
        return r.get("epoch_s") if r and r["status"] == "ok" else None

    def why_missing(self, row: str, dataset: str) -> str:
        d = self.datasets.get(dataset, {})
        if d.get("status") not in (None, "ok"):
            return d.get("reason") or d["status"]
        if row in ("mtd:graph", "mtd:total"):
            g = self.graph.get(dataset)
            if row == "mtd:total" and self.epoch_s("mtd", dataset) is None:
                return self.why_missing("mtd", dataset)
            return (g.get("reason") or g["status"]) if g else "not run"
        r = self.row(row, dataset)
        return (r.get("reason") or r["status"]) if r else "not run"

    def table_rows(self) -> list[tuple[str, str]]:
        """(row key, label) in the paper's order: baselines, MTD, then the peer rows."""
        models = list(self.settings.get("models", ALL_MODELS))
        out = [(m, MODEL_LABELS.get(m, m)) for m in models if m != "mtd"]
        if "mtd" in models:
            out += [("mtd:total", "**MTD** (rec. epoch + graph phase / f)"), ("mtd", "MTD recommendation epoch"),
                    ("mtd:graph", "MTD graph phase / f (amortised)")]
        ver = self.meta.get("recbole", {}).get("recbole")
        label = f"{PEER_LABEL} {ver}" if ver else PEER_LABEL
        out += [(f"recbole:{m}", f"{label} {MODEL_LABELS.get(m, m)} (peer)")
                for m in self.settings.get("peers", ())]
        return out

    def ratios(self) -> list[dict]:
        """MTD seconds per epoch / each baseline's (ours and the peers'), per dataset."""
        out = []
        for row, label in self.table_rows():
            if row.startswith("mtd"):
                continue
            for ds in self.dataset_keys():
                base = self.epoch_s(row, ds)
                tot, rec = self.epoch_s("mtd:total", ds), self.epoch_s("mtd", ds)
                out.append({"baseline": row, "label": label, "dataset": ds,
                            "mtd_total_over_baseline": (tot / base) if tot and base else None,
                            "mtd_rec_over_baseline": (rec / base) if rec and base else None})
        return out

    # ---- rendering
    def markdown(self) -> str:
        keys = self.dataset_keys()
        s, m = self.settings, self.meta
        heads = [self.datasets[k]["label"] for k in keys]
        lines = [f"# Table 4: seconds per training epoch ({'SMOKE, ' if s.get('smoke') else ''}"
                 f"batch {s.get('batch_size')}, d = {s.get('hidden')}, full catalogue)", ""]
        lines.append(method_sentence(s))
        lines.append("")
        lines.append(meta_sentence(m))
        lines.append("")
        lines += _md_table(["Model", *heads],
                           [[label, *[_cell(self.epoch_s(r, k)) for k in keys]] for r, label in self.table_rows()])
        foot = self._footnotes()
        if foot:
            lines += ["", *foot]
        # dataset facts
        lines += ["", "## Datasets (training samples as `mtd_fast.train` uses them)", ""]
        lines += _md_table(["Dataset", "train samples", "items M", "steps / epoch", "f (rec_frequency)",
                            "graph nodes / nnz(A+I)"],
                           [[d["label"], str(d.get("train_samples", "–")), str(d.get("n_items", "–")),
                             str(d.get("steps_per_epoch", "–")), str(d.get("rec_frequency", "–")),
                             (f"{self.graph[k]['graph_nodes']} / {self.graph[k]['graph_nnz']}"
                              if k in self.graph and "graph_nodes" in self.graph[k] else "–")]
                            for k, d in ((k, self.datasets[k]) for k in keys)])
        # step times
        lines += ["", "## Median seconds per training step (the measurements behind the table)", ""]
        lines += _md_table(["Model", *heads],
                           [["MTD (recommendation step)" if r == "mtd" else label,
                             *[_step_cell(self.row(r, k)) for k in keys]]
                            for r, label in self.table_rows() if not r.startswith("mtd:")])
        # graph phases
        if any(self.graph.values()):
            lines += ["", "## MTD graph phases (DGI on the global item graph, reported apart)", ""]
            lines.append("A DGI step: `net.dgi_loss(graph)` + l2 + backward + Adam on `net.graph_parameters()`. "
                         "A phase: `mtd_fast.train.graph_phase` as the trainer runs it (stop after "
                         f"graph_patience = {s.get('graph_patience')} steps without a lower loss, at most "
                         f"graph_steps = {s.get('graph_steps')}), measured once per dataset: phase 1, from the "
                         "initial weights, as at epoch 1. Amortised = phase seconds / f (one phase every f "
                         "recommendation epochs, for the first graph_phases x f epochs).")
            if any(g.get("per_step") for g in self.graph.values()):
                lines.append("With a per-step graph_mode (the default, residual) there are no phases: the GCN and "
                             "the DGI term run inside every training step, so their cost is part of MTD's "
                             "recommendation epoch above, the amortised phase cost is 0, and the DGI step timed "
                             "here (two GCN passes + backward + Adam) is roughly what the graph side adds to a step.")
            lines.append("")
            rows = []
            for k in keys:
                g = self.graph.get(k)
                if not g or g["status"] != "ok":
                    rows.append([self.datasets[k]["label"], *(["–"] * 6),
                                 (g.get("reason") or g["status"]) if g else "not run"])
                    continue
                rows.append([self.datasets[k]["label"], f"{g['median_step_s']:.4g} (n={g['timed_steps']})",
                             f"{g['phase_steps']} ({g['stopped_by']})", _cell(g["phase_s"]),
                             str(g["rec_frequency"]), _cell(g["amortised_s"]), f"{g['graph_build_s']:.3g}", ""])
            lines += _md_table(["Dataset", "s / DGI step (median)", "phase steps (stopped by)", "s / phase", "f",
                                "s / epoch amortised", "graph build s (once)", "note"], rows)
        # ratios
        rat = self.ratios()
        if rat and any(r["mtd_total_over_baseline"] or r["mtd_rec_over_baseline"] for r in rat):
            lines += ["", "## MTD / baseline (seconds per epoch; below 1: MTD is faster)", ""]
            for key, what in (("mtd_total_over_baseline", "MTD total (rec. epoch + graph phase / f)"),
                              ("mtd_rec_over_baseline", "MTD recommendation epoch alone")):
                lines += [f"{what} / baseline:", ""]
                by = {(r["baseline"], r["dataset"]): r[key] for r in rat}
                lines += _md_table(["Baseline", *heads],
                                   [[label, *[_ratio_cell(by.get((row, k))) for k in keys]]
                                    for row, label in self.table_rows() if not row.startswith("mtd")])
                lines.append("")
        checks = [r for r in self.rows if r.get("check")]
        if checks:
            lines += ["## Checks run before timing", ""]
            lines.append(f"Every model: one real training step on a full batch gave a finite loss, finite and "
                         f"nonzero gradients and finite weights after Adam. MTD: the default backends against "
                         f"backend=\"reference\" on the same batch and weights, loss within rtol {LOSS_RTOL:g} + "
                         f"atol {LOSS_ATOL:g} and gradients within {GRAD_RTOL:g} x max|g_ref| (fp32), dropout off "
                         f"and dropout on with the same seed; DGI loss with the same corruption permutation.")
            for r in self.rows:
                cmp_ = r.get("backend_check")
                if cmp_:
                    lines.append(f"- {self.datasets.get(r['dataset'], {}).get('label', r['dataset'])}: MTD "
                                 f"backends {r.get('backends')} vs reference: eval loss rel. diff "
                                 f"{cmp_['eval_loss_rel_diff']:.2e}, train {cmp_['train_loss_rel_diff']:.2e}, "
                                 f"grad rel. err {max(cmp_['eval_grad_rel_err'], cmp_['train_grad_rel_err']):.2e}")
            for k, g in self.graph.items():
                c = g.get("backend_check")
                if c:
                    lines.append(f"- {self.datasets.get(k, {}).get('label', k)}: DGI backends {g.get('backends')} "
                                 f"vs reference: loss rel. diff {c['dgi_loss_rel_diff']:.2e}, grad rel. err "
                                 f"{c['dgi_grad_rel_err']:.2e}")
            lines.append("")
        if self.notes:
            lines += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        return "\n".join(lines).rstrip() + "\n"

    def _footnotes(self) -> list[str]:
        reasons: dict[str, list[str]] = {}
        for row, label in self.table_rows():
            for k in self.dataset_keys():
                if self.epoch_s(row, k) is None:
                    reasons.setdefault(self.why_missing(row, k), []).append(f"{label.replace('**', '')} / "
                                                                           f"{self.datasets[k]['label']}")
        out = []
        for why, where in reasons.items():
            shown = ", ".join(where[:4]) + (f" and {len(where) - 4} more" if len(where) > 4 else "")
            out.append(f"- '–' ({shown}): {why}")
        return out

    def to_json(self) -> dict:
        return {"settings": self.settings, "meta": self.meta, "datasets": self.datasets, "rows": self.rows,
                "graph": self.graph, "ratios": self.ratios(), "notes": self.notes,
                "table": {label: {k: self.epoch_s(r, k) for k in self.dataset_keys()} for r, label in
                          self.table_rows()}}

    def write(self, folder: Path, prefix: str) -> dict[str, Path]:
        folder.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": folder / f"{prefix}.md", "json": folder / f"{prefix}.json",
                 "chart": folder / f"{prefix}.png"}
        self.meta["loadavg_end"] = _loadavg()
        paths["markdown"].write_text(self.markdown())
        paths["json"].write_text(json.dumps(self.to_json(), indent=1, default=_json_default))
        why = bar_chart(self, paths["chart"])
        if why:
            del paths["chart"]
            self.notes.append(f"no chart: {why}")
            paths["markdown"].write_text(self.markdown())
        return paths


def method_sentence(s: Mapping[str, Any]) -> str:
    if s.get("epochs", 0) > 0:
        return (f"**MEASURED** whole epochs: each cell is the median of {s['epochs']} timed full training "
                f"epoch(s) (`mtd_fast.train.rec_epoch`; the peer: one pass over RecBole's train dataloader), "
                f"after {s.get('warmup')} warm-up step(s).")
    return (f"**ESTIMATED** seconds per epoch, not a timed epoch: steps per epoch x the median time of "
            f"{s.get('steps')} timed full-size training steps (full catalogue, batch {s.get('batch_size')}: "
            f"batch building, forward, loss + l2, backward, Adam step), after one checked step and "
            f"{s.get('warmup')} warm-up step(s); every model and the peer run the same batches in the same "
            f"order. `MTD_T4_EPOCHS=N` times N whole epochs instead.")


def meta_sentence(m: Mapping[str, Any]) -> str:
    parts = [f"{m.get('date')}", f"{m.get('cpu')} ({m.get('cpus')} CPUs, {m.get('machine')})",
             f"device {m.get('device')}" + (f" ({m['gpu']})" if m.get("gpu") else ""),
             f"torch {m.get('torch')} with {m.get('torch_threads')} threads", f"numpy {m.get('numpy')}",
             f"python {m.get('python')}", f"load average {m.get('loadavg_start')} -> {m.get('loadavg_end')}"]
    if m.get("backends"):
        parts.append(f"MTD backends {m['backends']}")
    rb = m.get("recbole")
    if rb:
        parts.append(f"peer: RecBole {rb.get('recbole')} (torch {rb.get('torch')}, numpy {rb.get('numpy')}, "
                     f"{rb.get('threads')} threads, own venv)")
    return "Run: " + "; ".join(parts) + "."


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def fmt_seconds(x: Optional[float]) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if x >= 1000:
        return f"{x:,.0f}"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 1:
        return f"{x:.1f}"
    return f"{x:.3g}"


_cell = fmt_seconds


def _ratio_cell(x: Optional[float]) -> str:
    return "–" if x is None else f"{x:.2f}"


def _step_cell(r: Optional[dict]) -> str:
    if not r or r["status"] != "ok" or r.get("median_step_s") is None:
        return "–"
    n = r.get("timed_steps") or r.get("timed_epochs")
    return f"{r['median_step_s']:.3g} (n={n})"


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "| " + " | ".join(["---"] + ["---:"] * (len(head) - 1)) + " |"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return out


COLORS = {"gru4rec": "tab:blue", "narm": "tab:orange", "stamp": "tab:green", "sasrec": "tab:purple",
          "srgnn": "tab:brown", "csrm": "tab:pink", "cosan": "tab:olive", "mtd": "tab:red"}


def bar_chart(report: Report, path: Path) -> Optional[str]:
    """Grouped bars, one group per dataset; MTD stacked (rec. epoch + amortised graph
    phase); each RecBole peer hatched, in its model's colour. Rows with no measurement
    are left out. Returns why there is no chart, or None."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib not importable ({exc})"
    keys = report.dataset_keys()
    rows = [(r, label.replace("**", "")) for r, label in report.table_rows()
            if r not in ("mtd", "mtd:graph") and any(report.epoch_s(r if r != "mtd:total" else "mtd", k)
                                                     for k in keys)]
    if not keys or not rows:
        return "nothing measured"
    fig, ax = plt.subplots(figsize=(min(16.0, max(7.0, 2.5 + 0.32 * len(rows) * len(keys))), 4.8))
    width = 0.8 / len(rows)
    for j, (row, label) in enumerate(rows):
        xs = np.arange(len(keys)) + (j - (len(rows) - 1) / 2) * width
        if row == "mtd:total":
            rec = [report.epoch_s("mtd", k) or 0.0 for k in keys]
            gra = [report.epoch_s("mtd:graph", k) or 0.0 for k in keys]
            ax.bar(xs, rec, width, color=COLORS["mtd"], label="MTD rec. epoch")
            ax.bar(xs, gra, width, bottom=rec, color="salmon", label="MTD graph phase / f")
            continue
        peer = row.startswith("recbole:")
        model = row.split(":")[-1]
        vals = [report.epoch_s(row, k) or 0.0 for k in keys]
        ax.bar(xs, vals, width, color=COLORS.get(model, "grey"), alpha=0.55 if peer else 1.0,
               hatch="//" if peer else None, edgecolor="black" if peer else None, linewidth=0.4,
               label=label.replace(" (peer)", ""))
    ax.set_xticks(np.arange(len(keys)))
    ax.set_xticklabels([report.datasets[k]["label"] for k in keys])
    ax.set_ylabel("seconds per training epoch")
    s = report.settings
    mode = (f"median of {s.get('epochs')} timed epochs" if s.get("epochs", 0) > 0
            else f"estimated: steps/epoch x median of {s.get('steps')} timed steps")
    ax.set_title(f"Table 4: seconds per epoch, batch {s.get('batch_size')}, d {s.get('hidden')}, "
                 f"{report.meta.get('device', 'cpu')}, {report.meta.get('torch_threads')} threads\n({mode}; "
                 f"hatched: RecBole peer)", fontsize=9)
    ax.legend(fontsize=7, ncol=1, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None


# --------------------------------------------------------------------------- the peer process
class PeerUnavailable(RuntimeError):
    """The peer cannot run here (not installed, does not start): its rows are skipped."""


class PeerError(RuntimeError):
    """The peer ran and failed (a real failure of the measured step)."""


def write_peer_samples(path: Path, samples, order: Sequence[np.ndarray], n_items: int) -> dict:
    """Write the samples at the concatenated `order` batches, plus the longest prefix of
    all `samples` (so the peer pads as a full epoch does), as an .npz for the peer."""
    idx = np.concatenate([np.asarray(b, dtype=np.int64) for b in order]) if len(order) else np.zeros(0, np.int64)
    sub = samples.select(idx)
    lens = samples.prefixes.lengths
    k = int(np.argmax(lens))
    np.savez(path, offsets=sub.prefixes.offsets, items=sub.prefixes.items, targets=sub.targets,
             n_items=np.int64(n_items), longest_prefix=samples.prefixes[k].astype(np.int64),
             longest_target=np.int64(samples.targets[k]))
    return {"rows": int(idx.size), "longest_prefix": int(lens[k])}


class PeerProcess:
    """A running `benches/peers/recbole_peer.py`: one JSON request, one JSON reply."""

    def __init__(self, python: str, script: Path, samples_npz: Path, *, threads: int, device: str, batch: int,
                 hidden: int, seed: int, shuffle: bool, log_path: Path, timeout_s: float = 900.0,
                 blocks: int = 1, heads: int = 1, gnn_steps: int = 1):
        if not python or not Path(python).exists():
            raise PeerUnavailable(f"MTD_BENCH_RECBOLE_PYTHON={python!r} does not exist")
        self.timeout_s = timeout_s
        self.log_path = log_path
        self._log = open(log_path, "w")
        cmd = [python, str(script), "--samples", str(samples_npz), "--threads", str(threads), "--device", device,
               "--batch", str(batch), "--hidden", str(hidden), "--seed", str(seed), "--shuffle", str(int(shuffle)),
               "--blocks", str(blocks), "--heads", str(heads), "--gnn-steps", str(gnn_steps)]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONPATH", "VIRTUAL_ENV"))}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
                                     text=True, env=env)
        try:
            self.hello = self._read()
        except PeerError as exc:
            self.close()
            raise PeerUnavailable(f"the RecBole peer did not start: {exc}") from None
        if not self.hello.get("ok"):
            self.close()
            raise PeerUnavailable(f"the RecBole peer did not start: {self.hello.get('error')}")

    def _stderr_tail(self, n: int = 15) -> str:
        try:
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").strip().splitlines()[-n:])
        except OSError:
            return ""

    def _read(self) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], self.timeout_s)
        if not ready:
            raise PeerError(f"no answer within {self.timeout_s:.0f} s (log {self.log_path})")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            raise PeerError(f"the peer exited with code {code}; its stderr ends:\n{self._stderr_tail()}")
        return json.loads(line)

    def request(self, cmd: str, **kw) -> dict:
        if self.proc.poll() is not None:
            raise PeerError(f"the peer is not running (exit code {self.proc.returncode}):\n{self._stderr_tail()}")
        self.proc.stdin.write(json.dumps({"cmd": cmd, **kw}) + "\n")
        self.proc.stdin.flush()
        rep = self._read()
        if not rep.get("ok"):
            raise PeerError(f"{cmd}: {rep.get('error')}\n{rep.get('trace', '')}")
        return rep

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                self.proc.kill()
                self.proc.wait(timeout=30)
        self._log.close()


def settings_dict(s: Settings) -> dict:
    d = asdict(s)
    d["results"] = str(s.results)
    d["mode"] = s.mode
    return d
