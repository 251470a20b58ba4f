"""`mtd-fast experiment table2`: the paper's Tables 2/3 (RQ1) and training curves.

Rows: every model, MTD and MTD-lo as defaulted (with the re-click term), and the paper's
MTD and MTD-lo without it (`mtd-norep`, `mtd-lo-norep`); a file made under an older default
is left out (`outdated`). Every model is trained with early stopping on validation
(`epochs` is a cap, `patience` decides); the table reports test metrics at the validation-picked epoch, the
best-epoch-on-test protocol in its own columns and the published figures beside.
Writes `out/table2/*.json` (one per dataset, model, seed), `out/table2.md`,
`out/table2.json` and `out/table2_curves.png` (validation P@20 per epoch).
"""
from __future__ import annotations

import re
import shutil
import statistics
from pathlib import Path
from typing import Any, Optional, Sequence

from .merge import dataset_title, group_records, merge_json, merge_table
from .paired import paired_json, paired_markdown
from .ranks import read_ranks
from .report import atomic_write_json, atomic_write_text, display_name
from .runner import RunSpec, config_mismatch, load_results, read_result
from .study import Study, provenance, pyplot, save_figure

__all__ = ["MODELS", "DEFAULT_SEEDS", "REQUIRED", "STRETCH", "run", "report", "curves_figure", "targets",
           "readme_block", "publish"]

# the paper's MTD and MTD-lo (without our re-click term, MTDConfig.repeat_bias) as rows of their
# own beside the defaults: label -> (model, fixed overrides)
PAPER_ROWS: dict[str, tuple[str, dict[str, Any]]] = {"mtd-norep": ("mtd", {"repeat_bias": False}),
                                                     "mtd-lo-norep": ("mtd-lo", {"repeat_bias": False})}
MODELS = ("pop", "spop", "itemknn", "gru4rec", "narm", "stamp", "sasrec", "srgnn", "csrm", "cosan", "mtd", "mtd-lo",
          *PAPER_ROWS)
ORDER = (*MODELS, "mtd-va", "mtd-at", "mtd-ga")
DEFAULT_SEEDS = (0,)
# the targets: the models every dataset needs, the extra ones Yoochoose 1/64 needs,
# and the stretch figures for MTD (test P@20 / MRR@20 at the validation-picked epoch)
REQUIRED = ("mtd", "mtd-lo", "srgnn", "narm", "stamp", "sasrec", "csrm")
REQUIRED_YOOCHOOSE = MODELS
STRETCH = {"diginetica": (54.5, 19.0), "yoochoose1_64": (71.5, 31.5), "yoochoose1_64_mtd": (71.5, 31.5)}
TARGET_KEYS = ("P@20", "MRR@20")


def specs(study: Study):
    out = []
    for label in study.models or MODELS:
        model, fixed = PAPER_ROWS.get(label, (label, None))
        study.check_fixed(label, fixed or {}, "row")
        out += [study.spec(model, seed, label=label if fixed else None, extra=fixed)
                for seed in study.seeds_or(DEFAULT_SEEDS)]
    return out


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


def line_style(label: str, order: Sequence[str] = ORDER) -> dict[str, Any]:
    """A model's colour and line in every panel: MTD, MTD-lo, then the rest of `order` take
    the 10 strong colours of tab20 and then its 10 light ones, the paper's rows without the
    re-click term are dashed in their default's colour, and MTD's lines are drawn thicker,
    so no two models of `order` share a line."""
    from matplotlib import colormaps

    base = PAPER_ROWS[label][0] if label in PAPER_ROWS else label
    bases = list(dict.fromkeys(["mtd", "mtd-lo", *(lab for lab in order if lab not in PAPER_ROWS)]))
    # a label outside `order`: a colour from its spelling (Python's str hash changes per process)
    index = (bases.index(base) if base in bases else len(bases) + sum(map(ord, base))) % 20
    return {"color": colormaps["tab20"](2 * (index % 10) + index // 10),
            "linestyle": "--" if label in PAPER_ROWS else "-", "linewidth": 2.2 if base == "mtd" else 1.3}


def curves_figure(records: Sequence[dict[str, Any]], order: Sequence[str] = ORDER):
    """One panel per dataset, one line per model: validation P@20 per epoch (mean over
    seeds), each model in its own colour in every panel (`line_style`). The y axis spans
    the trained models' curves, so converged models can be told apart; models fitted in one
    pass (no epochs) are dotted horizontal lines when inside that range, and their value is
    in the legend either way."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    groups = group_records(records, order)
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(6 * max(len(groups), 1), 4.2), squeeze=False)
    for ax, (key, labels) in zip(axes[0], groups):
        last = max((h["epoch"] for _, recs in labels for r in recs for h in r["history"]), default=1)
        curves = [(label, *_curve(recs), recs[0]["history"][0].get("train_loss") is None) for label, recs in labels]
        trained = [y for _, xs, ys, fitted in curves if not fitted for y in ys]
        lo, hi = (min(trained), max(trained)) if trained else (None, None)
        for label, xs, ys, fitted in curves:
            if not xs:
                continue
            if fitted:  # fitted, not trained by epochs
                inside = lo is None or lo - 1 <= ys[0] <= hi + 1
                ax.plot([1, max(last, 2)], [ys[0], ys[0]], **{**line_style(label, order), "linestyle": ":"},
                        alpha=1.0 if inside else 0.0, label=f"{display_name(label)} (fitted) {ys[0]:.2f}")
            else:
                ax.plot(xs, ys, marker="o", markersize=3, label=display_name(label), **line_style(label, order))
        if trained:
            margin = max(0.5, 0.05 * (hi - lo))
            ax.set_ylim(lo - margin, hi + margin)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(dataset_title(key))
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation P@20")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.suptitle("Training curves (validation P@20 per epoch; mean over seeds)")
    return fig


def targets(merged: dict[str, Any]) -> str:
    """Markdown: per dataset, where default MTD stands against every other finished model
    (MTD-lo included) on validation and test P@20 / MRR@20 (means over seeds), the stretch
    figures, runs the epochs cap stopped, and the required models not finished yet. Computed
    from the merged files, never written by hand."""
    lines = ["## Targets (computed from the files)", ""]
    for ds in merged["datasets"]:
        title, rows = ds["title"], {r["label"]: r for r in ds["rows"]}
        lines.append(f"- **{title}**")
        required = REQUIRED_YOOCHOOSE if ds["dataset"].startswith("yoochoose") else REQUIRED
        missing = [display_name(m) for m in required if m not in rows]
        mtd = rows.get("mtd")
        if mtd is None:
            lines.append("  - MTD: not finished.")
        else:
            others = [r for lab, r in rows.items() if lab != "mtd"]
            behind, unknown = [], []
            for part, split in (("valid", "validation"), ("metrics", "test")):
                for k in TARGET_KEYS:
                    ours = (mtd[part].get(k) or {}).get("mean")
                    for r in others:
                        theirs = (r[part].get(k) or {}).get("mean")
                        if ours is None or theirs is None:
                            side = "MTD's" if ours is None else f"{display_name(r['label'])}'s"
                            unknown.append(f"{display_name(r['label'])} on {split} {k} ({side} missing)")
                        elif theirs >= ours:
                            behind.append(f"{display_name(r['label'])} on {split} {k} ({theirs:.2f} vs {ours:.2f})")
            names = ", ".join(display_name(r["label"]) for r in others) or "none"
            if behind:
                lines.append(f"  - MTD is **not** ahead of every other finished model ({names}): "
                             + "; ".join(behind) + ".")
            elif not unknown:
                lines.append(f"  - MTD is ahead of every other finished model ({names}) on validation and test "
                             "P@20 and MRR@20.")
            if unknown:  # a comparison that could not be made is never counted as MTD ahead
                lines.append("  - Not comparable (a metric is missing): " + "; ".join(unknown) + ".")
            stretch = STRETCH.get(ds["dataset"]) if ds["fraction"] == 1 else None
            if stretch:
                got = [mtd["metrics"][k]["mean"] for k in TARGET_KEYS]
                verdict = "; ".join(f"{k} {g:.2f} against {t:.1f} ({'met' if g >= t else f'{t - g:.2f} short'})"
                                    for k, g, t in zip(TARGET_KEYS, got, stretch))
                lines.append(f"  - Stretch (test, validation-picked epoch): {verdict}.")
        capped = [display_name(lab) for lab, r in rows.items() if any(r.get("stopped_by_cap") or [])]
        if capped:
            lines.append(f"  - Stopped by the epochs cap while still improving (not converged): {', '.join(capped)}.")
        lines.append(f"  - Required, not finished: {', '.join(missing)}." if missing
                     else "  - Every required model has finished.")
    return "\n".join(lines) + "\n"


def outdated(rec: dict[str, Any]) -> Optional[str]:
    """None when `rec` is still a run of its row (its label's model and fixed overrides under
    today's defaults, `runner.config_mismatch`), else why not: a file made before a default
    changed (MTD with repeat_bias=False under the label "mtd") is not the row's model now."""
    model, fixed = PAPER_ROWS.get(rec["label"], (rec["label"], {}))
    if model != rec["model"]:
        return None  # a label of another experiment (ablation variants merged here): its own spec
    try:
        spec = RunSpec(dataset=rec["dataset"], root=rec.get("root"), fraction=rec["fraction"], model=model,
                       seed=rec["seed"], epochs=rec["epochs"], overrides={**rec["overrides"], **fixed},
                       label=rec["label"], dataset_kwargs=rec.get("dataset_kwargs") or {})
    except (TypeError, ValueError) as exc:  # ExperimentError and ConfigError are ValueErrors
        return f"its settings are not valid today ({exc})"
    why = config_mismatch(rec, spec)
    return None if why is None else f"made under another default ({why})"


def report(records: list[dict[str, Any]], study: Study) -> dict[str, Any]:
    out = study.out
    out.mkdir(parents=True, exist_ok=True)
    whys = [outdated(r) for r in records]
    old = {f"{r['dataset']}/{r['label']}/seed{r['seed']}": why for r, why in zip(records, whys) if why}
    records = [r for r, why in zip(records, whys) if not why]
    merged = merge_json(records, ORDER)
    md = f"# Tables 2/3: accuracy ({len(records)} runs)\n\n" + merge_table(records, ORDER)
    paired = paired_json(records, study.runs_dir, ORDER)
    merged["paired"] = paired
    merged["left_out"] = old
    md += "\n" + targets(merged) + "\n" + paired_markdown(paired) + "\n"
    if old:
        md += "## Left out\n\n" + "".join(f"- {name}: {why}\n" for name, why in sorted(old.items())) + "\n"
    md += PROVENANCE + provenance(records) + "\n"
    merged["files"] = sorted(f"{r['dataset']}/{r['label']}/seed{r['seed']}" for r in records)
    paths = {"markdown": atomic_write_text(out / "table2.md", md),
             "json": atomic_write_json(out / "table2.json", merged)}
    if records:
        paths["curves"] = save_figure(curves_figure(records), out / "table2_curves.png")
    return {"paths": paths, "records": records, "markdown": md}


# ---- publishing finished runs ---------------------------------------------------------------
README_MARKERS = ("<!-- table2 -->\n", "\n<!-- /table2 -->")
PROVENANCE = "## Provenance\n\n"
PAIRED_HEADING = "## Paired differences"


def readme_block(md: str) -> str:
    """The part of table2.md a README shows: the per-dataset tables (their headings one level
    down), the computed targets list and the paired differences (their heading in bold),
    without the title, column notes and provenance."""
    start = md.index("\n### ") + 1
    end = md.index("\n", md.index("## Targets"))  # keep the targets list, drop its heading line
    tables, targets_list = md[start:md.index("## Targets")].rstrip(), md[end:].split("\n\n")[1]
    tables = re.sub(r"^### ", "#### ", tables, flags=re.M)
    block = tables + "\n\n" + targets_list.rstrip()
    if PAIRED_HEADING in md:
        start = md.index(PAIRED_HEADING)
        paired = md[start:md.index("\n## ", start) + 1].rstrip()  # up to the next section
        heading, rest = paired.split("\n", 1)
        block += "\n\n**" + heading.removeprefix("## ") + "**\n" + rest
    return block


def _setting(rec: dict[str, Any]) -> dict[str, Any]:
    """What makes two result files of one (dataset, label, seed) the same experiment."""
    return {"epochs": rec["epochs"], "overrides": rec.get("overrides") or {}, "fraction": float(rec["fraction"]),
            "dataset_kwargs": rec.get("dataset_kwargs") or {}}


def publish(source: Path, out: Path, readme: Optional[Path] = None, force: bool = False) -> dict[str, Any]:
    """Copy the valid result files of `source/table2/` that `out/table2/` lacks or holds in
    another version, merge every file there into out/table2.{md,json} and the curves PNG
    (nothing is trained), and, with `readme`, replace the text between its table2 markers by
    `readme_block` of the new table2.md. A record's rank file (`runner.ranks_path`) is copied
    with it when it is the file the record names (else listed as skipped). A published file
    made with another setting (epochs cap, overrides, fraction: a 3-epoch smoke run over a
    converged one) is not replaced unless `force`. Returns {"copied": [names], "skipped":
    {name: problem}, "paths": the report's paths}. Raises ValueError when `readme` lacks the
    markers or nothing is valid, before writing anything."""
    source, out = Path(source) / "table2", Path(out)
    dest = out / "table2"
    if readme is not None:
        text = Path(readme).read_text()
        open_, close = README_MARKERS
        if open_ not in text or close not in text:
            raise ValueError(f"{readme}: no {open_.strip()} ... {close.strip()} block to replace")
    copied, skipped, plan, rank_files = [], {}, [], []
    for path in sorted(source.glob("*.json")):
        rec, problem = read_result(path)
        problem = problem or outdated(rec)
        if problem:
            skipped[path.name] = problem
            continue
        target = dest / path.name
        same = target.is_file() and target.read_bytes() == path.read_bytes()
        old, _ = read_result(target) if target.is_file() and not same else (None, None)
        if old is not None and _setting(old) != _setting(rec) and not force:
            skipped[path.name] = (f"would replace the published run of another setting ({_setting(old)} there, "
                                  f"{_setting(rec)} here); force=True (--force) replaces it")
            continue
        if not same:
            plan.append((path, target, rec))
        if rec.get("ranks"):  # its rank file goes with it, when it is the one the record names
            name = str(rec["ranks"].get("file"))
            _, problem = read_ranks(source, rec)
            if problem:
                skipped[name] = problem
            elif not ((dest / name).is_file() and (dest / name).read_bytes() == (source / name).read_bytes()):
                rank_files.append(name)
    records = {p.name: r for p in sorted(dest.glob("*.json")) for r in [read_result(p)[0]] if r is not None}
    records.update({target.name: rec for _, target, rec in plan})
    if not records:
        raise ValueError(f"no valid result file in {source} or {dest}: nothing to publish")
    group_records(records.values())  # raises on rows that would mix settings, before any write
    dest.mkdir(parents=True, exist_ok=True)
    for name in rank_files:  # before the records that name them
        shutil.copyfile(source / name, dest / name)
        copied.append(name)
    for path, target, _ in plan:
        shutil.copyfile(path, target)
        copied.append(path.name)
    result = report([records[name] for name in sorted(records)], Study("table2", out=out))  # load_results' order
    if readme is not None:
        head, rest = text.split(open_, 1)
        tail = rest.split(close, 1)[1]
        atomic_write_text(readme, head + open_ + readme_block(result["markdown"]) + close + tail)
    return {"copied": copied, "skipped": skipped, "paths": result["paths"]}
