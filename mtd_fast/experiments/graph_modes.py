"""`mtd-fast experiment graph_modes`: which graph integration MTD should use, chosen on validation.

Every `graph_mode` (overwrite, rescaled, joint, residual and three residual variants), each
with plain dot-product and cosine scoring (`score_norm`), against MTD-lo (no graph) with
the same scoring, on the datasets found in `out/graph_modes/` (run one invocation per
dataset; files add up). The report ranks the variants by their mean VALIDATION P@20 gain
over MTD-lo across the datasets that every variant has run on; test metrics are reported
beside and never used for the choice. Writes `out/graph_modes.md`, `.json` and `.png`.

    mtd-fast experiment graph_modes --dataset diginetica --data-dir ../shared/data/diginetica \\
        --fraction 0.25 --epochs 4                          # every variant, seed 0
    mtd-fast experiment graph_modes ... --models residual+cos mtd-lo+cos --seeds 1 2   # more seeds for some
"""
from __future__ import annotations

import statistics
from typing import Any, Optional, Sequence

from .merge import merge_json
from .report import ExperimentError, atomic_write_json, atomic_write_text, fmt_mean_sd, markdown_table
from .runner import load_results
from .study import Study, provenance, pyplot, save_figure

__all__ = ["VARIANTS", "DEFAULT_SEEDS", "specs", "run", "report", "select"]

DEFAULT_SEEDS = (0,)
# label -> (model, overrides); "+cos" adds cosine scoring. MTD-lo ignores graph_mode (no graph).
_BASE: dict[str, tuple[str, dict[str, Any]]] = {
    "mtd-lo": ("mtd-lo", {}),
    "overwrite": ("mtd", {"graph_mode": "overwrite"}),
    "rescaled": ("mtd", {"graph_mode": "rescaled"}),
    "joint": ("mtd", {"graph_mode": "joint", "graph_weight": 1.0}),
    "residual": ("mtd", {"graph_mode": "residual", "graph_weight": 1.0}),
    "residual-w0": ("mtd", {"graph_mode": "residual", "graph_weight": 0.0}),
    "residual-light": ("mtd", {"graph_mode": "residual", "residual_form": "light", "graph_weight": 0.0}),
    "residual-gdrop": ("mtd", {"graph_mode": "residual", "graph_weight": 1.0, "graph_dropout": 0.5}),
}
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {}
for _label, (_model, _kw) in _BASE.items():  # without the re-click bias (the study predates it)
    VARIANTS[_label] = (_model, {**_kw, "score_norm": False, "repeat_bias": False})
    VARIANTS[_label + "+cos"] = (_model, {**_kw, "score_norm": True, "repeat_bias": False})
# the default and MTD-lo with the learned bias on the session's own items (models/repeat.py)
VARIANTS["residual-rep+cos"] = ("mtd", {**_BASE["residual"][1], "score_norm": True, "repeat_bias": True})
VARIANTS["mtd-lo-rep+cos"] = ("mtd-lo", {"score_norm": True, "repeat_bias": True})
# ... with the learned weight on scoring re-clicks by the item's own embedding (its MTD-lo is
# mtd-lo-rep+cos: without a graph the term is 0)
VARIANTS["residual-repid+cos"] = ("mtd", {**_BASE["residual"][1], "score_norm": True, "repeat_bias": True,
                                          "repeat_identity": True})
# the default with a learned cosine scale (the softmax temperature; starts at score_scale): cosine
# scoring only, so no dot-product twin
VARIANTS["residual-ls+cos"] = ("mtd", {**_BASE["residual"][1], "score_norm": True, "learn_score_scale": True,
                                       "repeat_bias": False})
WHAT = {"mtd-lo": "no graph", "overwrite": "E[nodes] = H after each graph phase (authors' code)",
        "rescaled": "write-back at the rows' previous norms", "joint": "CE + DGI every step, no write-back",
        "residual": "T = E + GCN(E) for items and candidates, + DGI", "residual-w0": "T = E + GCN(E), no DGI term",
        "residual-light": "T = mean_l A^l E (LightGCN), no DGI term",
        "residual-gdrop": "T = E + dropout_0.5(GCN(E)) in training (GCE-GNN's global dropout), + DGI",
        "residual-ls": "the default with the cosine scale learned (from 12)",
        "residual-rep": "the default + a learned bias on the session's own items (re-clicks)",
        "mtd-lo-rep": "no graph, + the learned bias on the session's own items",
        "residual-repid": "the default + the bias, + a learned weight on scoring the session's items by E"}


def baseline_of(label: str) -> str:
    """The MTD-lo variant with the same scoring as `label`."""
    base = "mtd-lo-rep" if label.split("+")[0].endswith(("-rep", "-repid")) else "mtd-lo"
    return base + "+cos" if label.endswith("+cos") else base


def specs(study: Study):
    labels = list(study.models or VARIANTS)
    unknown = [lab for lab in labels if lab not in VARIANTS]
    if unknown:
        raise ExperimentError(f"unknown graph_modes variant(s) {', '.join(unknown)}: use {', '.join(VARIANTS)}")
    out = []
    for label in labels:
        model, kw = VARIANTS[label]
        study.check_fixed(label, kw, "variant")
        for seed in study.seeds_or(DEFAULT_SEEDS):
            out.append(study.spec(model, seed, label=label, extra=kw))
    return out


def run(study: Study) -> dict[str, Any]:
    pyplot()
    study.run(specs(study))
    return report(load_results(study.runs_dir), study)


def _mean(cell: Optional[dict[str, Any]]) -> Optional[float]:
    return None if cell is None else cell["mean"]


def select(merged: dict[str, Any]) -> dict[str, Any]:
    """Rank the variants by their validation P@20 gain over the MTD-lo with the same scoring,
    averaged over the datasets where both ran (only variants present on every dataset rank).
    Returns {"ranking": [(label, mean gain)...], "chosen": label or None, "datasets": [...]}."""
    gains: dict[str, dict[str, float]] = {}
    names = []
    for ds in merged["datasets"]:
        names.append(ds["title"])
        rows = {r["label"]: r for r in ds["rows"]}
        for label, r in rows.items():
            base = rows.get(baseline_of(label))
            v, b = _mean(r["valid"].get("P@20")), _mean(base["valid"].get("P@20")) if base else None
            if v is not None and b is not None:
                gains.setdefault(label, {})[ds["title"]] = v - b
    full = {lab: g for lab, g in gains.items() if len(g) == len(names)}
    ranking = sorted(((lab, statistics.fmean(g.values())) for lab, g in full.items()), key=lambda t: -t[1])
    # the choice is among graph variants; MTD-lo rows (gain 0 by definition) are the yardstick
    graph = [t for t in ranking if not t[0].startswith("mtd-lo")]
    return {"ranking": ranking, "chosen": graph[0][0] if graph else None, "datasets": names, "gains": gains}


def _rows(ds: dict[str, Any]) -> list[dict[str, Any]]:
    rows = {r["label"]: r for r in ds["rows"]}
    out = []
    for label, r in rows.items():
        base = rows.get(baseline_of(label))
        cell: dict[str, Any] = {"variant": label, "what": WHAT.get(label.removesuffix("+cos"), ""),
                                "cosine": "yes" if label.endswith("+cos") else "no", "seeds": len(r["seeds"])}
        for part, name in (("valid", "valid"), ("metrics", "test")):
            for k in ("P@20", "MRR@20"):
                c = r[part].get(k)
                cell[f"{name} {k}"] = fmt_mean_sd(c["values"]) if c else "–"
            b, v = (_mean(base[part].get("P@20")) if base else None), _mean(r[part].get("P@20"))
            cell[f"{name} P@20 vs MTD-lo"] = "–" if b is None or v is None else f"{v - b:+.2f}"
        spread = [r[p]["P@20"]["sd"] for p in ("valid", "metrics") if r[p].get("P@20") and r[p]["P@20"]["sd"]]
        cell["sd"] = f"{max(spread):.2f}" if spread else "–"
        cell["best / run epochs"] = ", ".join(f"{b}/{n}" for b, n in zip(r["best_epoch"], r["epochs_run"]))
        cell["s/epoch"] = "–" if r["seconds_per_epoch"] is None else f"{r['seconds_per_epoch']:.0f}"
        out.append(cell)
    return out


def gains_figure(merged: dict[str, Any], choice: dict[str, Any]):
    plt = pyplot()
    labels = [lab for lab, _ in choice["ranking"] if not lab.startswith("mtd-lo")]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.7 * len(labels) + 2), 4))
    width = 0.8 / max(len(choice["datasets"]), 1)
    for j, title in enumerate(choice["datasets"]):
        ys = [choice["gains"][lab].get(title, 0.0) for lab in labels]
        ax.bar([i + j * width for i in range(len(labels))], ys, width, label=title)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks([i + width * (len(choice["datasets"]) - 1) / 2 for i in range(len(labels))], labels, rotation=35,
                  ha="right", fontsize=8)
    ax.set_ylabel("validation P@20 minus MTD-lo's (same scoring)")
    ax.set_title("Graph integration: gain over the no-graph model, chosen on validation", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def report(records: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    merged = merge_json(records, list(VARIANTS))
    choice = select(merged)
    cols = ["variant", "what", "cosine", "valid P@20", "valid MRR@20", "valid P@20 vs MTD-lo", "test P@20",
            "test MRR@20", "test P@20 vs MTD-lo", "sd", "seeds", "best / run epochs", "s/epoch"]
    md = [f"# Graph integration study: {len(records)} runs", "",
          "Validation and test metrics (x100) at the epoch picked on validation, mean ± sample sd over seeds; "
          "'vs MTD-lo' is the difference to the no-graph model with the same scoring; 'sd' the larger seed-to-seed "
          "sd of P@20 (validation or test) where several seeds ran. The choice uses validation only.", ""]
    for ds in merged["datasets"]:
        md += [f"## {ds['title']}", "", markdown_table(_rows(ds), cols, right=cols[3:]), ""]
    md += ["## Ranking (mean validation P@20 gain over MTD-lo across " + ", ".join(choice["datasets"]) + ")", ""]
    md += [markdown_table([{"rank": i + 1, "variant": lab, "mean gain": f"{g:+.2f}"}
                           for i, (lab, g) in enumerate(choice["ranking"])], ["rank", "variant", "mean gain"],
                          right=["rank", "mean gain"]), ""]
    md += [f"Best graph variant on validation: **{choice['chosen']}**." if choice["chosen"] else
           "No graph variant has run on every dataset yet.", ""]
    md += [provenance(records), ""]
    text = "\n".join(md)
    merged["selection"] = choice
    out = study.out
    paths = {"markdown": atomic_write_text(out / "graph_modes.md", text),
             "json": atomic_write_json(out / "graph_modes.json", merged)}
    if choice["ranking"]:
        paths["figure"] = save_figure(gains_figure(merged, choice), out / "graph_modes.png")
    return {"paths": paths, "records": records, "markdown": text, "merged": merged, "selection": choice}
