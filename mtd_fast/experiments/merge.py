"""Merging result records (`runner.load_results`) into the paper's tables: grouped by
dataset and label over seeds (`group_records`), as JSON (`merge_json`: per-seed values,
mean and sd of every metric, best epochs, seconds per epoch, the published figures) and
as markdown (`merge_table`: the paper's Tables 2/3).
"""
from __future__ import annotations

import json
import statistics
from typing import Any, Iterable, Optional, Sequence

from ..metrics import METRIC_KEYS
from .report import display_name, fmt_mean_sd, markdown_table, mean_sd

__all__ = ["group_records", "dataset_title", "valid_at_best", "merge_json", "merge_table", "TABLE_KEYS", "PUBLISHED",
           "stopped_by_cap"]

TABLE_KEYS = ("P@5", "P@10", "P@20", "MRR@5", "MRR@10", "MRR@20")  # the paper's Tables 2/3

# MTD_SPEC.md section 7: published P@20 / MRR@20 (SR-GNN protocol: best epoch on TEST,
# full training data, the standard split). Shown beside our rows, never mixed into them.
PUBLISHED: dict[str, dict[str, tuple[float, float]]] = {
    "diginetica": {"srgnn": (50.73, 17.59), "narm": (49.70, 16.17), "stamp": (45.64, 14.32)},
    "yoochoose1_64": {"srgnn": (70.57, 30.94), "narm": (68.32, 28.63), "stamp": (68.74, 29.67)},
}
PUBLISHED["yoochoose1_64_mtd"] = PUBLISHED["yoochoose1_64"]  # same sessions, relabelled ids


def group_records(records: Iterable[dict[str, Any]], order: Sequence[str] = ()
                  ) -> list[tuple[tuple, list[tuple[str, list[dict[str, Any]]]]]]:
    """[(dataset key, [(label, [records over seeds, by seed])...])...]: datasets in order of
    first appearance, labels in `order` first, then by first appearance. The dataset key is
    (dataset, fraction, dataset_kwargs as sorted pairs). Raises ValueError when one row would
    mix runs: two records of the same seed, or seeds run with different epoch caps or
    overrides (a row's mean over seeds must be over one setting)."""
    datasets: dict[tuple, dict[str, list]] = {}
    for r in records:
        key = (r["dataset"], float(r["fraction"]), tuple(sorted((r.get("dataset_kwargs") or {}).items())))
        datasets.setdefault(key, {}).setdefault(r["label"], []).append(r)
    for key, labels in datasets.items():
        for label, recs in labels.items():
            _check_one_setting(dataset_title(key), label, recs)
    rank = {lab: i for i, lab in enumerate(order)}
    out = []
    for key, labels in datasets.items():
        names = sorted(labels, key=lambda lab: (rank.get(lab, len(rank)), list(labels).index(lab)))
        out.append((key, [(lab, sorted(labels[lab], key=lambda r: r["seed"])) for lab in names]))
    return out


def _check_one_setting(title: str, label: str, recs: list[dict[str, Any]]) -> None:
    seeds = [r["seed"] for r in recs]
    dup = sorted({s for s in seeds if seeds.count(s) > 1})
    if dup:
        raise ValueError(f"{title} / {label}: more than one result for seed(s) {dup}; "
                         "keep one file per (dataset, label, seed)")
    settings = {(r.get("epochs"), json.dumps(r.get("overrides") or {}, sort_keys=True)): r["seed"] for r in recs}
    if len(settings) > 1:
        what = "; ".join(f"seed {seed}: epochs {e}, overrides {o}" for (e, o), seed in settings.items())
        raise ValueError(f"{title} / {label}: the seeds were run with different settings ({what}); "
                         "a row averages one setting: merge them from separate folders")


def dataset_title(key: tuple) -> str:
    name, fraction, kwargs = key
    title = name
    if fraction != 1:
        title += f", most recent {fraction:g} of the training sessions"
    if kwargs:
        title += " (" + ", ".join(f"{k}={v}" for k, v in kwargs) + ")"
    return title


def valid_at_best(rec: dict[str, Any]) -> Optional[dict[str, float]]:
    """The validation metrics of the epoch that validation picked (None without validation)."""
    return next((h.get("valid") for h in rec["history"] if h["epoch"] == rec["best_epoch"]), None)


def stopped_by_cap(rec: dict[str, Any]) -> bool:
    """True when the epochs cap, not early stopping, ended a trained run: it ran every epoch
    of the cap and validation improved within its last `patience` epochs, so more epochs
    could still have helped. Runs fitted in one pass (no training loss) are never capped."""
    if rec["history"][0].get("train_loss") is None or rec.get("epochs") is None:
        return False
    if not valid_at_best(rec):
        return False  # no validation: the best epoch is not a validation pick, so "still improving" says nothing
    patience = (rec.get("train_config") or {}).get("patience") or 0
    return len(rec["history"]) >= rec["epochs"] and rec["epochs"] - rec["best_epoch"] < max(patience, 1)


def _median_epoch_seconds(rec: dict[str, Any]) -> Optional[float]:
    if rec["history"][0].get("train_loss") is None:
        return None  # fitted in one pass, not trained by epochs
    return statistics.median(h["train_seconds"] for h in rec["history"])


def merge_json(records: Iterable[dict[str, Any]], order: Sequence[str] = ()) -> dict[str, Any]:
    """The merged table as JSON: per dataset, per label, each metric's per-seed values, mean
    and sd (test at the validation-picked epoch under "metrics", the best-on-test figures,
    and the validation metrics of the picked epoch under "valid"), best epochs, seconds per
    epoch and the seeds of the files."""
    out = []
    for key, labels in group_records(records, order):
        rows = []
        for label, recs in labels:
            row = {"label": label, "model": recs[0]["model"], "seeds": [r["seed"] for r in recs],
                   "best_epoch": [r["best_epoch"] for r in recs], "epochs_run": [len(r["history"]) for r in recs],
                   "stopped_by_cap": [stopped_by_cap(r) for r in recs],
                   "metrics": {}, "best_on_test": {}, "valid": {}}
            valid = [valid_at_best(r) or {} for r in recs]
            for k in METRIC_KEYS:
                for part, vals in (("metrics", [r["metrics"][k] for r in recs]),
                                   ("best_on_test", [(r["metrics"].get("best_on_test") or {}).get(k) for r in recs]),
                                   ("valid", [v.get(k) for v in valid])):
                    if all(v is not None for v in vals):
                        m, sd = mean_sd(vals)
                        row[part][k] = {"mean": m, "sd": sd, "values": vals}
            secs = [_median_epoch_seconds(r) for r in recs]
            row["seconds_per_epoch"] = None if None in secs else statistics.fmean(secs)
            pub = PUBLISHED.get(key[0], {}).get(recs[0]["model"]) if key[1] == 1 else None
            row["published"] = {"P@20": pub[0], "MRR@20": pub[1]} if pub else None
            rows.append(row)
        out.append({"dataset": key[0], "fraction": key[1], "dataset_kwargs": dict(key[2]),
                    "title": dataset_title(key), "stats": labels[0][1][0]["stats"], "rows": rows})
    return {"format": "mtd_fast/merged-table", "format_version": 1, "datasets": out}


def merge_table(records: Iterable[dict[str, Any]], order: Sequence[str] = (), heading: str = "###") -> str:
    """The paper's Tables 2/3 as markdown, one table per dataset: test P@5/10/20 and
    MRR@5/10/20 (x100) at the epoch picked on validation (mean ± sample sd over seeds when
    there are several), the validation P@20 / MRR@20 of that epoch, the best-epoch-on-test
    figures in their own columns, the picked epoch (capped runs marked), and the
    published figures (best epoch on test, full data) where MTD_SPEC.md section 7 has them."""
    merged = merge_json(records, order)
    parts = []
    cols = ["model", *TABLE_KEYS, "valid P@20", "valid MRR@20", "best-on-test P@20", "best-on-test MRR@20",
            "picked epoch", "seeds", "s/epoch", "published P@20 / MRR@20"]
    for ds in merged["datasets"]:
        rows = []
        for r in ds["rows"]:
            cells = {"model": display_name(r["label"]), "seeds": len(r["seeds"]),
                     "picked epoch": "fitted" if r["seconds_per_epoch"] is None else ", ".join(
                         _picked(*e) for e in zip(r["best_epoch"], r["epochs_run"], r["stopped_by_cap"])),
                     "s/epoch": "–" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.1f}",
                     "published P@20 / MRR@20": (f"{r['published']['P@20']:.2f} / {r['published']['MRR@20']:.2f}"
                                                 if r["published"] else "")}
            for k in TABLE_KEYS:
                cells[k] = fmt_mean_sd(r["metrics"][k]["values"])
            for k in ("P@20", "MRR@20"):
                for part, name in (("valid", "valid"), ("best_on_test", "best-on-test")):
                    b = r[part].get(k)
                    cells[f"{name} {k}"] = fmt_mean_sd(b["values"]) if b else "–"
            rows.append(cells)
        s = ds["stats"]
        parts.append(f"{heading} {ds['title']}\n\n{s.get('train_samples')} training samples, "
                     f"{s.get('valid_samples')} validation, {s.get('test_samples')} test, {s.get('items')} items.\n\n"
                     + markdown_table(rows, cols, right=[c for c in cols if c not in ("model", "picked epoch",
                                                                                        "published P@20 / MRR@20")]))
    note = ("Test metrics (x100) at the epoch picked on VALIDATION (mean ± sample sd over seeds when several). "
            "'valid': the validation metrics of that epoch. "
            "'best-on-test' is the field's protocol (best epoch on the test set), for comparison only; "
            "'published' are the papers' figures under that protocol on full data (MTD_SPEC.md section 7). "
            "'picked epoch': the validation-picked epoch of the epochs run (early stopping on validation; "
            "'fitted': a model fitted in one pass); "
            "'cap' marks a run the epochs cap stopped while validation was still improving (not converged). "
            "s/epoch: median training seconds per epoch (evaluation and separate graph phases excluded; "
            "the mean of the seeds' medians when several).")
    return note + "\n\n" + "\n\n".join(parts) + "\n"


def _picked(best: int, run: int, capped: bool) -> str:
    return f"{best} of {run}" + (" (cap)" if capped else "")
