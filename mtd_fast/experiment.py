"""Paper experiments from the command line.

`mtd-fast experiment table2 --dataset NAME [--fraction F] [--models ...]` trains each model
with the shared schedule and writes the paper's Tables 2/3 (P@K and MRR@K, K = 5, 10, 20)
as markdown and JSON. The main figures are the test metrics of the epoch picked on
VALIDATION; the field's published protocol (best epoch on test) is a separate, labelled
column group, for comparison with published tables only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

__all__ = ["run_table2", "run_experiment", "TABLE2_MODELS", "table2_markdown"]

TABLE2_MODELS = ["pop", "spop", "itemknn", "gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan", "mtd"]
KEYS = ["P@5", "P@10", "P@20", "MRR@5", "MRR@10", "MRR@20"]


def table2_markdown(rows: list[dict[str, Any]], title: str) -> str:
    head = ["model", *KEYS, "best epoch", "best-on-test P@20", "best-on-test MRR@20", "s/epoch"]
    lines = [f"### {title}", "",
             "Test metrics (x100) of the epoch chosen on validation. The last columns are the best epoch "
             "on test (the published protocol), for comparison only.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m, bot = r["metrics"], r["metrics"].get("best_on_test") or {}
        cells = [r["model"], *(f"{m[k]:.2f}" for k in KEYS), str(r["best_epoch"]),
                 f"{bot.get('P@20', float('nan')):.2f}", f"{bot.get('MRR@20', float('nan')):.2f}",
                 f"{r['seconds_per_epoch']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_table2(dataset, models: Sequence[str], out: Path, *, epochs: int = 10, seed: int = 0, backend: Any = "auto",
               quiet: bool = False, **overrides: Any) -> list[dict[str, Any]]:
    import mtd_fast

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    stem = f"table2_{dataset.name}"
    stats = dataset.stats()
    for name in models:
        t0 = time.perf_counter()
        res = mtd_fast.train(dataset, model=name, epochs=epochs, seed=seed, backend=backend, quiet=quiet, **overrides)
        wall = time.perf_counter() - t0
        per_epoch = sum(h["train_seconds"] for h in res.history) / max(len(res.history), 1)
        rows.append({"model": name, "metrics": res.metrics, "best_epoch": res.best_epoch,
                     "epochs_run": len(res.history), "seconds_per_epoch": per_epoch, "wall_seconds": wall,
                     "history": res.history, "backends": res.backends})
        # write after every model so a long run leaves partial results behind
        meta = {"dataset": dataset.name, "stats": stats, "epochs": epochs, "seed": seed,
                "overrides": overrides, "torch": __import__("torch").__version__, "machine": platform.platform(),
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        (out / f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2, default=str))
        title = f"Table 2/3 on {dataset.name} ({len(dataset.train)} training samples, {epochs} epochs max, seed {seed})"
        (out / f"{stem}.md").write_text(table2_markdown(rows, title))
    return rows


def run_experiment(args: argparse.Namespace) -> int:
    from .cli import _config_overrides, _load

    if args.name != "table2":  # argparse restricts choices; kept for direct callers
        raise ValueError(f"unknown experiment {args.name!r}")
    ds = _load(args)
    models = args.models or TABLE2_MODELS
    from .models import model_class

    for m in models:
        model_class(m)  # fail on an unknown name before hours of training
    out = Path(args.out)
    run_table2(ds, models, out, epochs=args.epochs, seed=args.seed, backend=args.backend, quiet=args.quiet,
               **_config_overrides(args))
    print((out / f"table2_{ds.name}.md").read_text())
    print(f"written to {out}/table2_{ds.name}.md and .json")
    return 0
