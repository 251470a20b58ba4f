"""The SR-GNN preprocessing rules (`mtd_fast.data.raw` docstring, "Common steps"): length and
item-count filters, the date split and sort, the renumbering of items by first appearance in
training, the test filtering, and the split given by the files of the TSV excerpt.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..store import DataError, Sessions
from .formats import FORMATS, Log, read_tsv

MIN_ITEM_COUNT = 5


# --------------------------------------------------------------------------- pipeline

def _select(offsets: np.ndarray, items: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The sessions at `index` (in that order), packed anew (any per-click array as `items`)."""
    picked = Sessions(offsets, items).select(index)
    return picked.offsets, picked.items


def _mask_clicks(offsets: np.ndarray, items: np.ndarray, keep: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the clicks where `keep` is False; sessions keep their places (maybe empty)."""
    sess_of = np.repeat(np.arange(offsets.size - 1), np.diff(offsets))
    lens = np.bincount(sess_of[keep], minlength=offsets.size - 1)
    new_off = np.zeros(offsets.size, dtype=np.int64)
    np.cumsum(lens, out=new_off[1:])
    return new_off, items[keep]


def renumber(train_off: np.ndarray, train_items: np.ndarray, n_dense: int) -> np.ndarray:
    """dense item index -> new id (1.. by first appearance in the training clicks; 0 = unseen)."""
    n = train_items.size
    first = np.full(n_dense, n, dtype=np.int64)
    np.minimum.at(first, train_items, np.arange(n, dtype=np.int64))
    seen = np.flatnonzero(first < n)
    new = np.zeros(n_dense, dtype=np.int64)
    new[seen[np.argsort(first[seen])]] = np.arange(1, seen.size + 1)
    return new


def restrict_test(test_off: np.ndarray, test_items: np.ndarray, new_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map test items to new ids, drop unseen ones, then sessions left with < 2 clicks."""
    mapped = new_id[test_items]
    off, it = _mask_clicks(test_off, mapped, mapped > 0)
    keep = np.flatnonzero(np.diff(off) >= 2)
    return _select(off, it, keep)


def packed_sessions(off: np.ndarray, items: np.ndarray) -> Sessions:
    return Sessions(off.astype(np.int64), items.astype(np.int32))


def filter_and_split(path: Path, fmt: str, log: Log) -> tuple[tuple, tuple, dict[str, Any]]:
    """Length filter, item-count filter, date split and date sort. Returns the training and
    test sessions (offsets, dense item index), the distinct original ids and counts."""
    _, _, drop_len, window = FORMATS[fmt]
    stats: dict[str, Any] = {"rows": int(log.n_rows), "sessions_read": int(log.lengths.size)}
    uitems, dense = np.unique(log.items, return_inverse=True)
    dense = dense.reshape(-1)
    lens = log.lengths
    keep_sess = lens > drop_len
    stats["sessions_after_length_filter"] = int(keep_sess.sum())
    click_in_kept = np.repeat(keep_sess, lens)
    counts = np.bincount(dense[click_in_kept], minlength=uitems.size)  # counted once, never recomputed
    keep_click = click_in_kept & (counts[dense] >= MIN_ITEM_COUNT)
    off, items = _mask_clicks(log.offsets, dense, keep_click)
    ok = np.diff(off) > drop_len
    stats["sessions_after_item_filter"] = int(ok.sum())
    if not ok.any():
        raise DataError(f"{path}: no session is left after filtering (sessions with <= {drop_len} clicks, then "
                        f"items seen fewer than {MIN_ITEM_COUNT} times, then sessions left with <= {drop_len} clicks)")
    dates = log.dates
    max_date = dates[ok].max()
    split = max_date - window
    stats.update(max_date=max_date.item(), split_date=split.item())
    train_idx = np.flatnonzero(ok & (dates < split))
    test_idx = np.flatnonzero(ok & (dates > split))
    stats["sessions_on_split_date"] = int((ok & (dates == split)).sum())
    train_idx = train_idx[np.argsort(dates[train_idx], kind="stable")]
    test_idx = test_idx[np.argsort(dates[test_idx], kind="stable")]
    if train_idx.size == 0:
        raise DataError(f"{path}: no training session is left after filtering (every kept session is dated on or "
                        f"after the split date)")
    return _select(off, items, train_idx), _select(off, items, test_idx), {"uitems": uitems, **stats}


def _tsv_test_path(path: Path) -> Path:
    name = path.name
    for a, b in (("_train_full", "_test"), ("_train_tr", "_train_valid"), ("_train", "_test")):
        if a in name:
            cand = path.with_name(name.replace(a, b, 1))
            if cand.is_file():
                return cand
            raise DataError(f"{path}: the test file {cand} beside it is missing; pass test_path=")
    raise DataError(f"{path}: cannot find the test file beside it (expected '*_train_full.txt' with "
                    f"'*_test.txt'); pass test_path=")


def tsv_split(path: Path, test_path: Optional[os.PathLike | str]) -> tuple[tuple, tuple, dict[str, Any], Path]:
    train_log = read_tsv(path)
    tpath = Path(test_path) if test_path is not None else _tsv_test_path(path)
    test_log = read_tsv(tpath)
    uitems, dense = np.unique(np.concatenate([train_log.items, test_log.items]), return_inverse=True)
    dense = dense.reshape(-1)
    n_tr = train_log.items.size
    parts = []
    for log, d in ((train_log, dense[:n_tr]), (test_log, dense[n_tr:])):
        idx = np.flatnonzero(log.lengths >= 2)
        idx = idx[np.argsort(log.dates[idx], kind="stable")]
        parts.append(_select(log.offsets, d, idx))
    if parts[0][0].size == 1:
        raise DataError(f"{path}: no training session with >= 2 clicks")
    stats = {"uitems": uitems, "rows": int(train_log.n_rows), "test_rows": int(test_log.n_rows),
             "sessions_read": int(train_log.lengths.size), "test_sessions_read": int(test_log.lengths.size)}
    return parts[0], parts[1], stats, tpath
