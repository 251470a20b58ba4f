"""`mtd-fast experiment sensitivity` (RQ3, the paper's Figure 4): MTD's hyper-parameters.

Three one-at-a-time sweeps around the default MTD: hidden size d in {25, 50, 100, 150,
200}, the graph task's weight in training and GCN depth (`num_gcn_layers`) in 1..4. The
graph task's weight is the paper's training frequency f (`rec_frequency`, 1..8) when the
study's `graph_mode` trains the graph in phases (overwrite, rescaled); with a per-step
mode (joint, residual: the default) phases do not exist and the sweep is over lambda_g
(`graph_weight`) in {0, 0.1, 0.3, 1, 3} instead. The default point is one run (label
"default") shared by the three sweeps.
Every choice is made on validation: each run's epoch is picked on validation, and the
degradation ratio plotted is that of the validation metric against the best value of
the sweep on that dataset, (best - value) / best, as the paper plots it (0 = the best
setting). Test metrics of the same epochs are in the table beside.
Writes `out/sensitivity/*.json`, `out/sensitivity.md`, `.json` and `.png`.
"""
from __future__ import annotations

from typing import Any, Optional

from ..config import PHASE_MODES, MTDConfig, TrainConfig
from ..data import DATASETS
from .merge import merge_json
from .report import ExperimentError, atomic_write_json, atomic_write_text, markdown_table
from .runner import load_results
from .study import Study, provenance, pyplot, save_figure

__all__ = ["SWEEPS", "active_sweeps", "run", "report", "sweep_tables", "degradation_figure"]

# parameter -> (label prefix, default values, CLI option of Study.options)
SWEEPS = {
    "hidden_size": ("d", (25, 50, 100, 150, 200), "hidden_sizes"),
    "rec_frequency": ("f", tuple(range(1, 9)), "frequencies"),
    "graph_weight": ("lambda", (0.0, 0.1, 0.3, 1.0, 3.0), "graph_weights"),
    "num_gcn_layers": ("gcn", (1, 2, 3, 4), "gcn_layers"),
}
TITLES = {"hidden_size": "hidden size d", "rec_frequency": "training frequency f",
          "graph_weight": "graph loss weight lambda_g", "num_gcn_layers": "GCN layers"}
DEFAULT_SEEDS = (0,)


def active_sweeps(study: Study) -> list[str]:
    """d, the graph task's weight (f for the phase modes, lambda_g for the per-step ones), depth."""
    mode = study.overrides.get("graph_mode", MTDConfig().graph_mode)
    return ["hidden_size", "rec_frequency" if mode in PHASE_MODES else "graph_weight", "num_gcn_layers"]


def _check_value(param: str, v: Any) -> None:
    if param == "graph_weight":
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0
        want = "a number >= 0"
    else:
        ok, want = isinstance(v, int) and not isinstance(v, bool) and v >= 1, "an int >= 1"
    if not ok:
        raise ExperimentError(f"{param} value {v!r} must be {want}")


def _default_value(study: Study, param: str) -> int:
    if param == "rec_frequency":
        if study.overrides.get("rec_frequency") is not None:
            return study.overrides["rec_frequency"]
        return DATASETS[study.dataset][2] if study.dataset in DATASETS else 1  # load_dataset's own default
    if param == "graph_weight":
        return study.overrides.get(param, TrainConfig().graph_weight)
    return study.overrides.get(param, getattr(MTDConfig(), param))


def specs(study: Study):
    if study.models:
        raise ExperimentError("experiment sensitivity sweeps MTD only: drop --models")
    seeds = study.seeds_or(DEFAULT_SEEDS)
    active = active_sweeps(study)
    for param in SWEEPS:
        option = SWEEPS[param][2]
        if param not in active and study.options.get(option):
            raise ExperimentError(f"--{option.replace('_', '-')} sweeps {param}, which graph_mode="
                                  f"{study.overrides.get('graph_mode', MTDConfig().graph_mode)!r} does not read")
    out = [study.paper_spec("mtd", s, label="default") for s in seeds]
    for param in active:
        short, values, option = SWEEPS[param]
        for v in study.options.get(option) or values:
            _check_value(param, v)
            if v != _default_value(study, param):
                out += [study.paper_spec("mtd", s, label=f"{short}={v:g}", extra={param: v}) for s in seeds]
    return out


def run(study: Study) -> dict[str, Any]:
    pyplot()
    study.run(specs(study))
    return report(load_results(study.runs_dir), study)


def sweep_value(rec: dict[str, Any], param: str) -> int:
    """The value a run used (the resolved one: f falls back to the dataset's default)."""
    if param == "rec_frequency":
        return rec["train_config"]["rec_frequency"] or rec["dataset_rec_frequency"]
    if param == "graph_weight":
        return rec["train_config"][param]
    return rec["model_config"][param]


def _degradation(best: float, value: float) -> Optional[float]:
    return (best - value) / best if best > 0 else None


def sweep_tables(merged: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per dataset and parameter: one row per value (mean over seeds) with validation and
    test P@20 / MRR@20 and the validation degradation ratios; `chosen` marks the best value
    on validation (P@20, ties MRR@20)."""
    by_label = {}
    for r in records:
        kw = tuple(sorted((r.get("dataset_kwargs") or {}).items()))
        by_label.setdefault((r["dataset"], float(r["fraction"]), kw, r["label"]), r)
    out = []
    for ds in merged["datasets"]:
        for param, (short, _, _) in SWEEPS.items():
            rows = []
            for row in ds["rows"]:
                if row["label"] != "default" and not row["label"].startswith(f"{short}="):
                    continue
                if not row["valid"]:
                    continue
                rec = by_label[(ds["dataset"], ds["fraction"], tuple(sorted(ds["dataset_kwargs"].items())),
                                row["label"])]
                rows.append({"value": sweep_value(rec, param), "label": row["label"], "seeds": row["seeds"],
                             **{f"valid {k}": row["valid"][k]["mean"] for k in ("P@20", "MRR@20")},
                             **{f"test {k}": row["metrics"][k]["mean"] for k in ("P@20", "MRR@20")}})
            if all(r["label"] == "default" for r in rows):
                continue  # a sweep this study did not run (f in per-step modes, lambda_g in phase modes)
            rows.sort(key=lambda r: r["value"])
            best = max(rows, key=lambda r: (r["valid P@20"], r["valid MRR@20"]))
            for r in rows:
                for k in ("P@20", "MRR@20"):
                    r[f"degradation {k}"] = _degradation(max(x[f"valid {k}"] for x in rows), r[f"valid {k}"])
                r["chosen"] = r is best
            out.append({"dataset": ds["dataset"], "fraction": ds["fraction"], "title": ds["title"], "param": param,
                        "rows": rows})
    return out


def degradation_figure(tables: list[dict[str, Any]]):
    """Columns = the three parameters, rows = P@20 / MRR@20: degradation ratio of the
    validation metric against the sweep's best, one line per dataset."""
    plt = pyplot()
    params = [p for p in SWEEPS if any(t["param"] == p for t in tables)]
    fig, axes = plt.subplots(2, len(params), figsize=(4.5 * len(params), 6.5), squeeze=False)
    for j, param in enumerate(params):
        for t in (t for t in tables if t["param"] == param):
            for i, k in enumerate(("P@20", "MRR@20")):
                pts = [(r["value"], r[f"degradation {k}"]) for r in t["rows"] if r[f"degradation {k}"] is not None]
                axes[i][j].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=t["title"])
        for i, k in enumerate(("P@20", "MRR@20")):
            ax = axes[i][j]
            ax.set_xlabel(TITLES[param])
            ax.set_ylabel(f"degradation ratio, validation {k}")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.suptitle("Hyper-parameter sensitivity: (best - value) / best on validation, per dataset")
    fig.tight_layout()
    return fig


def report(records: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    merged = merge_json(records)
    tables = sweep_tables(merged, records)
    cols = ["value", "valid P@20", "valid MRR@20", "test P@20", "test MRR@20", "degradation P@20",
            "degradation MRR@20", "seeds", "chosen"]
    md = [f"# Hyper-parameter sensitivity (RQ3, Figure 4): {len(records)} runs", "",
          "One parameter at a time around the default MTD. Metrics x100 at the validation-picked epoch (mean over "
          "seeds); degradation = (best - value) / best of the VALIDATION metric within the sweep; `chosen` = best on "
          "validation. Test metrics are reported, never used to choose.", ""]
    for t in tables:
        rows = [{**r, "seeds": len(r["seeds"]), "chosen": "yes" if r["chosen"] else "",
                 **{c: (f"{r[c]:.4f}" if r[c] is not None else "–") for c in ("degradation P@20",
                                                                               "degradation MRR@20")}}
                for r in t["rows"]]
        md += [f"## {t['title']}: {TITLES[t['param']]}", "", markdown_table(rows, cols, right=cols[:-1]), ""]
    md += [provenance(records), ""]
    text = "\n".join(md)
    out = study.out
    paths = {"markdown": atomic_write_text(out / "sensitivity.md", text),
             "json": atomic_write_json(out / "sensitivity.json", {**merged, "sweeps": tables})}
    if tables:
        paths["figure"] = save_figure(degradation_figure(tables), out / "sensitivity.png")
    return {"paths": paths, "records": records, "markdown": text, "sweeps": tables}
