"""`mtd-fast experiment table2`: the paper's Tables 2/3 (RQ1) and training curves.

Every model is trained with early stopping on validation (`epochs` is a cap, `patience`
decides); the table reports test metrics at the validation-picked epoch, the
best-epoch-on-test protocol in its own columns and the published figures beside.
Writes `out/table2/*.json` (one per dataset, model, seed), `out/table2.md`,
`out/table2.json` and `out/table2_curves.png` (validation P@20 per epoch).
"""
from __future__ import annotations

import statistics
from typing import Any, Sequence

from .merge import dataset_title, group_records, merge_json, merge_table
from .report import atomic_write_json, atomic_write_text, display_name
from .runner import load_results
from .study import Study, provenance, pyplot, save_figure

__all__ = ["MODELS", "DEFAULT_SEEDS", "run", "report", "curves_figure"]

MODELS = ("pop", "spop", "itemknn", "gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan", "mtd", "mtd-lo")
ORDER = (*MODELS, "mtd-va", "mtd-at", "mtd-ga")
DEFAULT_SEEDS = (0,)


def specs(study: Study):
    models = list(study.models or MODELS)
    return [study.spec(m, seed) for m in models for seed in study.seeds_or(DEFAULT_SEEDS)]


def run(study: Study) -> dict[str, Any]:
    pyplot()  # matplotlib present, before any training
    study.run(specs(study))
    return report(load_results(study.runs_dir), study)


def _curve(recs: Sequence[dict[str, Any]]) -> tuple[list[int], list[float]]:
    """Validation P@20 per epoch, averaged over the seeds that reached that epoch."""
    by_epoch: dict[int, list[float]] = {}
    for r in recs:
        for h in r["history"]:
            if h.get("valid"):
                by_epoch.setdefault(h["epoch"], []).append(h["valid"]["P@20"])
    epochs = sorted(by_epoch)
    return epochs, [statistics.fmean(by_epoch[e]) for e in epochs]


def curves_figure(records: Sequence[dict[str, Any]], order: Sequence[str] = ORDER):
    """One panel per dataset, one line per model: validation P@20 per epoch (mean over
    seeds). Models fitted in one pass (no epochs) are dotted horizontal lines."""
    plt = pyplot()
    groups = group_records(records, order)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(6 * max(len(groups), 1), 4.2), squeeze=False)
    for ax, (key, labels) in zip(axes[0], groups):
        last = max((h["epoch"] for _, recs in labels for r in recs for h in r["history"]), default=1)
        for label, recs in labels:
            xs, ys = _curve(recs)
            if not xs:
                continue
            if recs[0]["history"][0].get("train_loss") is None:  # fitted, not trained by epochs
                ax.plot([1, max(last, 2)], [ys[0], ys[0]], linestyle=":", label=display_name(label))
            else:
                ax.plot(xs, ys, marker="o", markersize=3, label=display_name(label))
        ax.set_title(dataset_title(key))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation P@20")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Training curves (validation P@20 per epoch; mean over seeds)")
    return fig


def report(records: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    out = study.out
    out.mkdir(parents=True, exist_ok=True)
    md = f"# Tables 2/3: accuracy ({len(records)} runs)\n\n" + merge_table(records, ORDER)
    md += "\n" + provenance(records) + "\n"
    merged = merge_json(records, ORDER)
    merged["files"] = sorted(f"{r['dataset']}/{r['label']}/seed{r['seed']}" for r in records)
    paths = {"markdown": atomic_write_text(out / "table2.md", md),
             "json": atomic_write_json(out / "table2.json", merged)}
    if records:
        paths["curves"] = save_figure(curves_figure(records), out / "table2_curves.png")
    return {"paths": paths, "records": records, "markdown": md}
