"""The paper's experiments on one resumable runner (`mtd-fast experiment NAME`).

- `runner`: `RunSpec`, `run_all` (one JSON result file per dataset, label and seed; a
  finished run is never retrained), `load_results`.
- `adoption`: `adopt` (another study's finished run of the same spec as a row, `--adopt`).
- `merge`: `merge_table` / `merge_json` (the records of every seed merged into the paper's
  tables), `group_records`.
- one module per experiment: `table2` (Tables 2/3 and training curves), `ablation`
  (Figure 3), `sensitivity` (Figure 4), `interpret` (Figure 5), `graph_modes` (the
  graph-integration study behind MTD's default `graph_mode`).

`run_experiment(name, **settings)` runs one of them; the CLI is a thin layer over it.
"""
from __future__ import annotations

import importlib
from typing import Any

from .merge import merge_json, merge_table
from .report import ExperimentError, markdown_table
from .runner import RunSpec, load_results, result_path, run_all
from .study import Study

__all__ = ["EXPERIMENTS", "run_experiment", "RunSpec", "run_all", "result_path", "load_results", "merge_table",
           "merge_json", "Study", "ExperimentError", "markdown_table"]

EXPERIMENTS = {
    "table2": "accuracy of every model: the paper's Tables 2/3, plus training curves",
    "ablation": "MTD against MTD-va, MTD-at, MTD-lo, MTD-ga (Figure 3)",
    "sensitivity": "hidden size, training frequency and GCN depth (Figure 4)",
    "interpret": "attention and aggregation weights, t-SNE of session representations (Figure 5)",
    "graph_modes": "how the graph reaches the recommender: every graph_mode, cosine on/off, against MTD-lo",
}


def run_experiment(name: str, **settings: Any) -> dict[str, Any]:
    """Run experiment `name` with `Study` settings (dataset, root, fraction, dataset_kwargs,
    models, seeds, epochs, overrides, out, quiet, backend, command, options). Returns
    {"paths": files written, "records": the result records behind them, ...}."""
    if name not in EXPERIMENTS:
        raise ExperimentError(f"unknown experiment {name!r}: use one of {', '.join(EXPERIMENTS)}")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.run(Study(name=name, **settings))
