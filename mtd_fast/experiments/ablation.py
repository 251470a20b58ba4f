"""`mtd-fast experiment ablation` (RQ2, the paper's Figure 3): MTD against its ablations.

MTD-va (no self-attention, no position decay), MTD-at (MTD-va plus position decay), MTD-lo
(no cross-session graph), MTD-ga (graph attention instead of the GCN), each over 3 seeds
by default. Writes `out/ablation/*.json`, `out/ablation.md` (validation and test metrics
of the validation-picked epoch, mean ± sd; MTD minus each ablation paired over the same
samples, from the rank files), `out/ablation.json` and `out/ablation.png` (test P@20 and
MRR@20 bars per dataset, error bars = sample sd over seeds).
"""
from __future__ import annotations

from typing import Any, Sequence

from .merge import merge_json
from .paired import paired_json, paired_markdown
from .report import atomic_write_json, atomic_write_text, display_name, fmt_mean_sd, markdown_table
from .runner import load_results
from .study import Study, provenance, pyplot, save_figure

__all__ = ["MODELS", "DEFAULT_SEEDS", "run", "report", "bars_figure"]

MODELS = ("mtd", "mtd-va", "mtd-at", "mtd-lo", "mtd-ga")
DEFAULT_SEEDS = (0, 1, 2)
WHAT = {"mtd": "full model", "mtd-va": "no self-attention, no position decay",
        "mtd-at": "no self-attention (position decay kept)", "mtd-lo": "no cross-session graph",
        "mtd-ga": "graph attention layer instead of the GCN"}


def specs(study: Study):
    return [study.paper_spec(m, s) for m in (study.models or MODELS) for s in study.seeds_or(DEFAULT_SEEDS)]


def run(study: Study) -> dict[str, Any]:
    pyplot()
    study.run(specs(study))
    return report(load_results(study.runs_dir), study)


def table_rows(merged_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Markdown rows (validation then test, P@20 and MRR@20 of the picked epoch)."""
    out = []
    for r in merged_rows:
        row = {"model": display_name(r["label"]), "what": WHAT.get(r["label"], ""), "seeds": len(r["seeds"])}
        for part, name in (("valid", "valid"), ("metrics", "test")):
            for k in ("P@20", "MRR@20"):
                cell = r[part].get(k)
                row[f"{name} {k}"] = fmt_mean_sd(cell["values"]) if cell else "–"
        out.append(row)
    return out


def bars_figure(merged: dict[str, Any]):
    """Columns = datasets, rows = test P@20 / MRR@20; one bar per model, sd error bars."""
    plt = pyplot()
    dsets = merged["datasets"]
    fig, axes = plt.subplots(2, max(len(dsets), 1), figsize=(4.5 * max(len(dsets), 1), 6.5), squeeze=False)
    for j, ds in enumerate(dsets):
        names = [display_name(r["label"]) for r in ds["rows"]]
        for i, k in enumerate(("P@20", "MRR@20")):
            ax = axes[i][j]
            means = [r["metrics"][k]["mean"] for r in ds["rows"]]
            sds = [r["metrics"][k]["sd"] or 0.0 for r in ds["rows"]]
            ax.bar(names, means, yerr=sds, capsize=4, color=[f"C{n}" for n in range(len(names))])
            lo = min(m - s for m, s in zip(means, sds))
            ax.set_ylim(max(0.0, lo - 0.15 * abs(lo) - 1), None)  # bars differ by a few points: zoom in
            ax.set_ylabel(f"test {k}")
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
            if i == 0:
                ax.set_title(ds["title"], fontsize=9)
    fig.suptitle("Ablations: test metrics at the validation-picked epoch, mean ± sd over seeds (y axes zoomed)")
    fig.tight_layout()
    return fig


def report(records: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    merged = merge_json(records, MODELS)
    cols = ["model", "what", "valid P@20", "valid MRR@20", "test P@20", "test MRR@20", "seeds"]
    md = [f"# Ablations (RQ2, Figure 3): {len(records)} runs", "",
          "Validation and test metrics (x100) of the epoch picked on validation; mean ± sample sd over seeds.", ""]
    for ds in merged["datasets"]:
        md += [f"## {ds['title']}", "", markdown_table(table_rows(ds["rows"]), cols, right=cols[2:]), ""]
    merged["paired"] = paired_json(records, study.runs_dir, MODELS)
    md += [paired_markdown(merged["paired"]), provenance(records), ""]
    text = "\n".join(md)
    out = study.out
    paths = {"markdown": atomic_write_text(out / "ablation.md", text),
             "json": atomic_write_json(out / "ablation.json", merged)}
    if records:
        paths["figure"] = save_figure(bars_figure(merged), out / "ablation.png")
    return {"paths": paths, "records": records, "markdown": text, "merged": merged}
