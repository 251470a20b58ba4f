"""The Table 4 report: everything one run measured (`Report`), rendered as a markdown table
shaped like the paper's Table 4 (with the step times, graph phases, MTD / baseline ratios
and the checks behind it), as JSON, and as a grouped bar chart; plus the machine facts
(`machine_info`) that head it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np

from .settings import ALL_MODELS, DATASET_LABELS, MODEL_LABELS, PEER_LABEL
from .steps import GRAD_RTOL, LOSS_ATOL, LOSS_RTOL


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
