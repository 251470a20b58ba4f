"""`mtd-fast experiment NAME --status`: where a long, resumable study stands, read from its
folder alone (no data loaded, nothing trained, safe beside a running invocation).

One row per result file (finished; or invalid, to be redone) and per run directory under
`.partial/` (in progress or interrupted: it resumes from its last checkpoint on the next
invocation, "+ N steps" when that is N steps into the next epoch; `.stale*`: set aside,
never resumed). For unfinished runs the best epoch so
far is the trainer's rule (validation P@20, ties by MRR@20); test metrics are not shown.
"""
from __future__ import annotations

import json
import statistics
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

from ..metrics import better
from .merge import valid_at_best
from .ranks import read_ranks
from .report import markdown_table
from .runner import PARTIAL_DIR, read_result

__all__ = ["study_status", "status_markdown"]

COLUMNS = ["run", "state", "epochs", "best epoch", "valid P@20", "valid MRR@20", "s/epoch", "rank file",
           "updated (UTC)"]


def _mtime(*paths: Path) -> str:
    times = [p.stat().st_mtime for p in paths if p.exists()]
    return datetime.fromtimestamp(max(times), timezone.utc).strftime("%Y-%m-%d %H:%M") if times else "–"


def _read_lines(path: Path) -> list[dict[str, Any]]:
    """The epoch records of a run directory; a torn last line (a crash mid-write) is skipped."""
    out = []
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("valid"), dict):
            out.append(rec)
    return out


def _best(history: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The epoch the trainer would keep so far (`metrics.better`: the first of equals)."""
    best = None
    for h in history:
        if better(h["valid"], best["valid"] if best else None):
            best = h
    return best


def _steps_checkpointed(run_dir: Path) -> Optional[int]:
    """The steps of the next epoch that the last checkpoint holds (a mid-epoch checkpoint,
    `train(checkpoint_every=...)`), else None. The file is memory-mapped, its tensors not read."""
    import torch

    from ..rundir import LAST

    try:
        partial = torch.load(run_dir / LAST, map_location="cpu", weights_only=True, mmap=True)["state"].get(
            "partial_epoch")
        return int(partial["steps"]) if partial else None
    except Exception:  # absent, being replaced, torn, or not a checkpoint: nothing to add
        return None


def _partial_row(run_dir: Path) -> dict[str, Any]:
    from ..rundir import EPOCHS_FILE, LAST, RUN_FILE

    try:
        cap = json.loads((run_dir / RUN_FILE).read_text())["identity"]["epochs"]
    except (OSError, ValueError, KeyError, TypeError):
        cap = None
    history = _read_lines(run_dir / EPOCHS_FILE)
    best = _best(history)
    stale = ".stale" in run_dir.name
    name = run_dir.name.split(".stale")[0]
    steps = _steps_checkpointed(run_dir)
    return {"run": name, "state": "set aside (not resumed)" if stale else "in progress or interrupted",
            "epochs": f"{len(history)}/{cap if cap is not None else '?'}"
                      + (f" + {steps} step{'s' if steps > 1 else ''}" if steps is not None else ""),
            "best epoch": best["epoch"] if best else "–",
            "valid P@20": best["valid"].get("P@20") if best else None,
            "valid MRR@20": best["valid"].get("MRR@20") if best else None,
            "s/epoch": history[-1].get("train_seconds") if history else None,
            "updated (UTC)": _mtime(run_dir / EPOCHS_FILE, run_dir / RUN_FILE, run_dir / LAST)}


def _rank_file(runs_dir: Path, rec: dict[str, Any]) -> str:
    """"yes" when the record's rank file reads back (paired comparisons can use the run),
    "none" when it names none (finished before rank files), else "refused" (see `read_ranks`)."""
    if not rec.get("ranks"):
        return "none"
    return "yes" if read_ranks(runs_dir, rec)[1] is None else "refused"


def study_status(runs_dir: Path) -> list[dict[str, Any]]:
    """Rows (dicts over COLUMNS) for every result file and run directory of one study folder
    (OUT/NAME), result files first, each group by name."""
    runs_dir = Path(runs_dir)
    rows = []
    for path in sorted(runs_dir.glob("*.json")) if runs_dir.is_dir() else []:
        rec, problem = read_result(path)
        if rec is None:
            rows.append({"run": path.stem, "state": f"invalid, will be redone: {problem}",
                         "updated (UTC)": _mtime(path)})
            continue
        valid = valid_at_best(rec) or {}
        trained = rec["history"][0].get("train_loss") is not None
        rows.append({"run": path.stem, "state": "finished", "epochs": f"{len(rec['history'])}/{rec['epochs']}",
                     "best epoch": rec["best_epoch"] if trained else "fitted",
                     "valid P@20": valid.get("P@20"), "valid MRR@20": valid.get("MRR@20"),
                     "s/epoch": statistics.median(h["train_seconds"] for h in rec["history"]) if trained
                     else None,
                     "rank file": _rank_file(runs_dir, rec), "updated (UTC)": _mtime(path)})
    partial = runs_dir / PARTIAL_DIR
    for run_dir in sorted(p for p in partial.iterdir() if p.is_dir()) if partial.is_dir() else []:
        rows.append(_partial_row(run_dir))
    return rows


def status_markdown(runs_dir: Path) -> str:
    rows = study_status(runs_dir)
    if not rows:
        return f"{runs_dir}: no result files and no runs in progress"
    states = [r["state"].split(":")[0].split(" (")[0] for r in rows]
    order = ("finished", "invalid, will be redone", "in progress or interrupted", "set aside")
    head = f"{runs_dir}: " + ", ".join(f"{states.count(k)} {k}" for k in order if k in states)
    note = ("finished rows: the validation-picked epoch and its validation metrics, s/epoch the median "
            "training epoch; "
            "unfinished rows: the best epoch so far by the same rule, s/epoch the last one; rank file: whether "
            "the run's per-sample ranks are there for paired comparisons (none: finished before rank files)")
    return head + "\n\n" + markdown_table(rows, COLUMNS, right=COLUMNS[4:7]) + "\n\n" + note
