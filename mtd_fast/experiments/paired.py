"""Paired comparisons of finished runs over the same samples, from their rank files.

Two models' test P@20 may differ by 0.1 point on 55,000 samples: whether that is a
difference or a coin's throw depends on how often the two models disagree on the same
samples, which the metrics alone do not tell. The runner writes, beside each result file,
the rank of every validation and test sample's target under the picked model
(`runner.write_ranks`); here, for a reference model (MTD) and each other model of a dataset,
the per-sample differences give the metric's difference with a 95% interval:

    d_i = mean over the seeds both models have of (m_ref(sample i) - m_other(sample i)),
    difference = mean_i d_i,   half-width = 1.96 * sd(d) / sqrt(n)     (x100, like the metrics)

with m = hit (P@20) or reciprocal rank within 20 (MRR@20). The interval is over the samples
only (the normal approximation of a paired test, n in the tens of thousands); how much a
retraining with another seed moves the figure is not in it. An interval that contains 0 is
a tie at this sample size.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np

from .merge import dataset_title, group_records
from .ranks import RANK_SPLITS, read_ranks, samples_digest
from .report import ExperimentError, display_name, markdown_table
from .runner import read_result

__all__ = ["per_sample", "paired_difference", "paired_json", "paired_markdown", "compare_files", "by_length",
           "by_repeat", "repeat_mask", "record_dataset", "KEYS", "Z95", "LENGTH_BUCKETS"]

KEYS = ("P@20", "MRR@20")
# prefix-length buckets of `by_length` (clicks before the target): (label, lowest, highest or None)
LENGTH_BUCKETS = (("1", 1, 1), ("2", 2, 2), ("3-4", 3, 4), ("5-9", 5, 9), ("10+", 10, None))
Z95 = 1.959963984540054  # the two-sided 95% quantile of the standard normal


def per_sample(ranks: np.ndarray, key: str) -> np.ndarray:
    """Each sample's contribution to `key` ("P@K" / "MRR@K" / "NDCG@K", 0..1, not x100)."""
    name, k = key.split("@")
    r = ranks.astype(np.float64)
    hit = r <= int(k)
    if name == "P":
        return hit.astype(np.float64)
    if name == "MRR":
        return np.where(hit, 1.0 / r, 0.0)
    if name == "NDCG":
        return np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)
    raise ValueError(f"unknown metric {key!r}")


def paired_difference(ref: Sequence[np.ndarray], other: Sequence[np.ndarray], key: str) -> dict[str, float]:
    """{"diff", "half"}: the mean of `key` under `ref` minus under `other` (x100) and the
    half-width of its 95% interval, from the per-sample differences averaged over the seeds
    (`ref[s]` and `other[s]` rank the same samples in the same order)."""
    if not ref or len(ref) != len(other) or len({len(a) for a in (*ref, *other)}) != 1:
        raise ValueError("paired_difference needs one rank array per seed on each side, all of one length")
    d = np.mean([per_sample(a, key) - per_sample(b, key) for a, b in zip(ref, other)], axis=0)
    n = len(d)
    half = Z95 * float(np.std(d, ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return {"diff": 100.0 * float(d.mean()), "half": 100.0 * half}


def _ranked(folder: Path, recs: list[dict[str, Any]]) -> tuple[dict[int, tuple[dict, dict]], list[str]]:
    """{seed: (ranks, the record's ranks info)} of the records whose rank file reads back, and
    why the others' do not."""
    out, problems = {}, []
    for r in recs:
        ranks, problem = read_ranks(folder, r)
        if ranks is None:
            problems.append(f"seed {r['seed']}: {problem}")
        else:
            out[r["seed"]] = (ranks, r["ranks"]["samples"])
    return out, problems


def paired_json(records: Sequence[dict[str, Any]], folder: Path, order: Sequence[str] = (),
                reference: str = "mtd") -> list[dict[str, Any]]:
    """Per dataset: {"dataset", "title", "reference", "rows": [{"label", "seeds", "valid": {key:
    {"diff", "half"}}, "test": {...}}], "unpaired": {label: why}}. `folder` holds the result
    files and their rank files. A model is paired over the seeds both it and the reference
    have rank files for, on the same samples (the files' sample digests); otherwise it is
    listed in "unpaired" with the reason."""
    out = []
    for key, labels in group_records(records, order):
        by_label = dict(labels)
        entry = {"dataset": key[0], "title": dataset_title(key), "reference": reference, "rows": [], "unpaired": {}}
        out.append(entry)
        if reference not in by_label:
            continue
        ref, ref_problems = _ranked(folder, by_label[reference])
        for label, recs in labels:
            if label == reference:
                continue
            if not ref:
                entry["unpaired"][label] = f"{display_name(reference)} has no rank file ({'; '.join(ref_problems)})"
                continue
            mine, problems = _ranked(folder, recs)
            seeds = sorted(s for s in mine if s in ref and mine[s][1] == ref[s][1])
            if not seeds:
                why = "; ".join(problems) if problems else "no seed ranked on the same samples as the reference's"
                entry["unpaired"][label] = why
                continue
            row = {"label": label, "seeds": seeds}
            for split in RANK_SPLITS:
                row[split] = {k: paired_difference([ref[s][0][split] for s in seeds],
                                                   [mine[s][0][split] for s in seeds], k) for k in KEYS}
            entry["rows"].append(row)
    return out


def _cell(v: dict[str, float]) -> str:
    return f"{v['diff']:+.2f} ± {v['half']:.2f}"


def paired_markdown(paired: Sequence[dict[str, Any]]) -> str:
    """The `paired_json` tables: per dataset, the reference minus each model, 95% intervals."""
    lines = ["## Paired differences (computed from the rank files)", "",
             "MTD minus each model over the same samples (x100), ± the half-width of a 95% interval over the "
             "samples (seed-to-seed variation not included); an interval that contains 0 is a tie at this "
             "sample size.", ""]
    for entry in paired:
        lines += [f"**{entry['title']}**", ""]
        if entry["rows"]:
            cols = {(s, k): f"{s} {k}" for s in RANK_SPLITS for k in KEYS}
            rows = [{"model": display_name(r["label"]), "seeds": ", ".join(map(str, r["seeds"])),
                     **{name: _cell(r[s][k]) for (s, k), name in cols.items()}} for r in entry["rows"]]
            lines += [markdown_table(rows, ["model", "seeds", *cols.values()], right=cols.values()), ""]
        if entry["unpaired"]:
            names = ", ".join(display_name(lab) for lab in entry["unpaired"])
            lines += [f"Not paired (no usable rank file on one side; files finished before rank files were written "
                      f"have none): {names}.", ""]
        elif not entry["rows"]:
            lines += [f"{display_name(entry['reference'])} has not finished.", ""]
    return "\n".join(lines).rstrip() + "\n"


def _read_side(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    rec, problem = read_result(path) if path.is_file() else (None, "no such file")
    if rec is None:
        raise ExperimentError(f"{path}: {problem}")
    ranks, problem = read_ranks(path.parent, rec)
    if ranks is None:
        raise ExperimentError(f"{path}: {problem}")
    return rec, ranks


def _paired_sides(a: Path, b: Path):
    (ra, xa), (rb, xb) = _read_side(a), _read_side(b)
    if ra["ranks"]["samples"] != rb["ranks"]["samples"]:
        raise ExperimentError(f"{a} and {b} ranked different samples (other data or split): no paired comparison")
    return (ra, xa), (rb, xb)


def compare_files(a: Path, b: Path, keys: Sequence[str] = KEYS) -> list[dict[str, Any]]:
    """Two result files (any experiment), each with its rank file beside it: per split and
    metric, A's and B's value and A - B with the half-width of its 95% interval (rows of
    {"split", "metric", "A", "B", "A - B", "95% half-width"}). Raises ExperimentError naming
    the file when a record or its rank file cannot be used, or when the two runs did not rank
    the same samples."""
    (ra, xa), (rb, xb) = _paired_sides(Path(a), Path(b))
    rows = []
    for split in RANK_SPLITS:
        for k in keys:
            d = paired_difference([xa[split]], [xb[split]], k)
            rows.append({"split": split, "metric": k, "A": 100.0 * float(per_sample(xa[split], k).mean()),
                         "B": 100.0 * float(per_sample(xb[split], k).mean()), "A - B": d["diff"],
                         "95% half-width": d["half"]})
    return rows


def record_dataset(record: dict[str, Any], root: Optional[Path] = None):
    """The dataset a result record was trained on, loaded again (its name, data folder or
    `root`, fraction and synthetic options); ExperimentError unless its validation and test
    samples are the ones the record's rank file ranked (same digests)."""
    from ..data import DATASETS, load_dataset

    folder = root if root is not None else (record.get("data_folder") or record.get("root"))
    name = record["dataset"] if record["dataset"] in (*DATASETS, "synthetic") else None
    if name == "synthetic":
        folder = None
    ds = load_dataset(name, root=folder, fraction=record["fraction"], **(record.get("dataset_kwargs") or {}))
    for split in RANK_SPLITS:
        if samples_digest(ds.split(split)) != (record["ranks"]["samples"].get(split) or {}).get("samples_sha256"):
            raise ExperimentError(f"the data loaded from {folder or name} is not what the run ranked ({split} "
                                  "samples differ): pass the run's data folder")
    return ds


def repeat_mask(samples) -> np.ndarray:
    """bool per sample: the target is one of the items already clicked in its prefix (a
    re-click, what S-POP predicts), against an item new to the session."""
    lengths = np.diff(samples.prefixes.offsets)
    owner = np.repeat(np.arange(len(samples)), lengths)
    hit = samples.prefixes.items == samples.targets[owner]
    return np.bincount(owner[hit], minlength=len(samples)) > 0


def _grouped(a: Path, b: Path, split: str, keys: Sequence[str], root: Optional[Path], column: str,
             groups) -> list[dict[str, Any]]:
    """`compare_files` per group of one split's samples: `groups(samples)` yields (label,
    bool mask); rows of {column, "samples", then per metric "A", "B", "A - B" and the 95%
    half-width}, empty groups left out. The dataset is loaded again from A's record (or
    `root`) and checked against the rank files' sample digests."""
    if split not in RANK_SPLITS:
        raise ExperimentError(f"split {split!r}: use one of {', '.join(RANK_SPLITS)}")
    (ra, xa), (_, xb) = _paired_sides(Path(a), Path(b))
    rows = []
    for label, sel in groups(record_dataset(ra, root).split(split)):
        if not sel.any():
            continue
        row: dict[str, Any] = {column: label, "samples": int(sel.sum())}
        for k in keys:
            d = paired_difference([xa[split][sel]], [xb[split][sel]], k)
            row.update({f"A {k}": 100.0 * float(per_sample(xa[split][sel], k).mean()),
                        f"B {k}": 100.0 * float(per_sample(xb[split][sel], k).mean()),
                        f"A - B {k}": d["diff"], f"± {k}": d["half"]})
        rows.append(row)
    return rows


def _length_groups(samples):
    lengths = np.diff(samples.prefixes.offsets)
    for label, lo, hi in LENGTH_BUCKETS:
        yield label, (lengths >= lo) if hi is None else (lengths >= lo) & (lengths <= hi)


def _repeat_groups(samples):
    rep = repeat_mask(samples)
    yield "repeat", rep
    yield "new", ~rep


def by_length(a: Path, b: Path, split: str = "test", keys: Sequence[str] = KEYS,
              root: Optional[Path] = None) -> list[dict[str, Any]]:
    """`compare_files` per prefix-length bucket (LENGTH_BUCKETS: clicks before the target) of
    one split: rows of {"length", "samples", then per metric "A", "B", "A - B" and the 95%
    half-width}. The dataset is loaded again from A's record (or `root`) and checked against
    the rank files' sample digests."""
    return _grouped(a, b, split, keys, root, "length", _length_groups)


def by_repeat(a: Path, b: Path, split: str = "test", keys: Sequence[str] = KEYS,
              root: Optional[Path] = None) -> list[dict[str, Any]]:
    """`compare_files` over the samples whose target re-clicks an item of its prefix
    ("repeat") and the rest ("new"): rows as `by_length`'s with "target" for "length"."""
    return _grouped(a, b, split, keys, root, "target", _repeat_groups)
