"""The four raw formats (`mtd_fast.data.raw` docstring): their table of rule parameters,
header checks and format detection, and one reader per format, each turning a file into a
`Log` (sessions of original item ids in file order, with their dates).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from ..store import DataError
from .fields import (
    BOM,
    compact,
    concat,
    first_line,
    is_digits,
    is_word,
    iter_chunks,
    norm,
    parse_day,
    parse_decimal,
    parse_iso_seconds,
    parse_uint,
    show,
)

# format -> (min prefix of the sample rule, rec_frequency f, drop sessions with length <= this,
#            split window in date units)
FORMATS: dict[str, tuple[int, int, int, int]] = {
    "diginetica": (1, 4, 1, 7),           # dates in days
    "yoochoose": (1, 1, 1, 86_400),       # dates in seconds
    "yoochoose_tsv": (1, 1, 1, 0),        # split given by the files
    "retailrocket": (2, 6, 2, 7 * 86_400),  # dates in seconds
}

_DIGINETICA_COLS = ["sessionid", "userid", "itemid", "timeframe", "eventdate"]
_YOOCHOOSE_COLS = ["sessionid", "timestamp", "itemid", "category"]
_RETAILROCKET_COLS = ["timestamp", "visitorid", "event", "itemid", "transactionid"]
_TSV_REQUIRED = ["sessionid", "itemid", "time"]


# --------------------------------------------------------------------------- format detection

def _split_header(line: bytes, delim: bytes) -> list[str]:
    return [norm(t) for t in line.decode("utf-8", errors="replace").split(delim.decode())]


def _looks_like_yoochoose_row(line: bytes) -> bool:
    parts = line.split(b",")
    return len(parts) == 4 and is_digits(parts[0]) and len(parts[1]) >= 19 and parts[1][10:11] == b"T"


def detect_format(path: os.PathLike | str) -> str:
    """Guess the raw format of `path` from its first line (then its extension)."""
    path = Path(path)
    line, _ = first_line(path)
    if b";" in line and _split_header(line, b";") == _DIGINETICA_COLS:
        return "diginetica"
    if b"\t" in line and set(_TSV_REQUIRED) <= set(_split_header(line, b"\t")):
        return "yoochoose_tsv"
    if b"," in line:
        cols = _split_header(line, b",")
        if cols == _RETAILROCKET_COLS:
            return "retailrocket"
        if cols == _YOOCHOOSE_COLS or _looks_like_yoochoose_row(line):
            return "yoochoose"
    if path.suffix.lower() == ".dat":
        return "yoochoose"
    raise DataError(f"{path}, line 1: cannot tell the format from {show(line, 80)}; pass format= one of "
                    f"{', '.join(FORMATS)}")


# --------------------------------------------------------------------------- readers

@dataclass
class Log:
    """Sessions of original ids, sessions in their file order."""

    offsets: np.ndarray  # int64 (n + 1,)
    items: np.ndarray    # int64 original item ids, clicks in session order
    dates: np.ndarray    # (n,) session date (int64 days/seconds, or float64 seconds)
    n_rows: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _group(sess: np.ndarray, items: np.ndarray, row_date: np.ndarray,
           within: Optional[np.ndarray] = None, date_of_sorted_last: bool = False) -> Log:
    """Group rows by session id. Sessions in order of first appearance; clicks in file
    order, or stably sorted by `within`. The date of a session is `row_date` of its last
    row in file order (or, with `date_of_sorted_last`, of its last row after sorting)."""
    n_rows = sess.size
    # runs of equal ids first: a log grouped by session (the usual case) needs no big sort
    run_starts = np.flatnonzero(np.concatenate(([True], sess[1:] != sess[:-1])))
    run_ids = sess[run_starts]
    uniq, first, inv = np.unique(run_ids, return_index=True, return_inverse=True)
    rank = np.empty(uniq.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(uniq.size)
    run_lens = np.diff(np.append(run_starts, n_rows))
    sorder = np.repeat(rank[inv.reshape(-1)], run_lens)
    if uniq.size == run_ids.size:  # every session is one run: already in first-appearance order
        file_order = np.arange(n_rows)
        offsets = np.append(run_starts, n_rows).astype(np.int64)
    else:
        file_order = np.argsort(sorder, kind="stable")
        offsets = np.zeros(uniq.size + 1, dtype=np.int64)
        np.cumsum(np.bincount(sorder, minlength=uniq.size), out=offsets[1:])
    order = file_order if within is None else np.lexsort((within, sorder))
    last_row = (order if date_of_sorted_last else file_order)[offsets[1:] - 1]
    return Log(offsets, items[order], row_date[last_row], n_rows)


def _header_columns(path: Path, line: bytes, delim: bytes, fmt: str, expected: list[list[str]],
                    shown: list[str]) -> None:
    cols = _split_header(line, delim)
    if cols not in expected:
        raise DataError(f"{path}, line 1: unknown header {show(line, 80)} for format {fmt!r}; expected "
                        + " or ".join(repr(s) for s in shown))


def read_diginetica(path: Path) -> Log:
    line, offset = first_line(path)
    _header_columns(path, line, b";", "diginetica", [_DIGINETICA_COLS],
                    ["sessionId;userId;itemId;timeframe;eventdate", "session_id;user_id;item_id;timeframe;eventdate"])
    names = line.decode("utf-8", errors="replace").split(";")
    sess, items, tf, day = [], [], [], []
    for ch in iter_chunks(path, offset, 2, b";", 5):
        sess.append(compact(parse_uint(path, ch, 0, names[0].strip())))
        items.append(compact(parse_uint(path, ch, 2, names[2].strip())))
        tf.append(parse_uint(path, ch, 3, names[3].strip(), "is not a non-negative integer"))
        day.append(parse_day(path, ch, 4, names[4].strip()))
    if not sess:
        raise DataError(f"{path}: no data rows after the header")
    return _group(concat(sess), concat(items), concat(day), within=concat(tf))


def read_yoochoose(path: Path) -> Log:
    line, offset = first_line(path)
    first = line.split(b",")
    names = ["session_id", "timestamp", "item_id", "category"]
    if first and not is_digits(first[0]):  # a header line
        if _split_header(line, b",") != _YOOCHOOSE_COLS:
            raise DataError(f"{path}, line 1: unknown header {show(line, 80)} for format 'yoochoose'; expected no "
                            f"header (rows session,timestamp,item,category) or 'session_id,timestamp,item_id,category'")
        start_line = 2
    else:
        with open(path, "rb") as f:
            offset = len(BOM) if f.read(len(BOM)) == BOM else 0
        start_line = 1
    sess, items, ts = [], [], []
    for ch in iter_chunks(path, offset, start_line, b",", 4):
        sess.append(compact(parse_uint(path, ch, 0, names[0])))
        ts.append(parse_iso_seconds(path, ch, 1, names[1]))
        items.append(compact(parse_uint(path, ch, 2, names[2])))
    if not sess:
        raise DataError(f"{path}: no data rows")
    return _group(concat(sess), concat(items), concat(ts))


def read_retailrocket(path: Path) -> Log:
    line, offset = first_line(path)
    _header_columns(path, line, b",", "retailrocket", [_RETAILROCKET_COLS],
                    ["timestamp,visitorid,event,itemid,transactionid"])
    ts, vis, items = [], [], []
    n_rows = 0
    for ch in iter_chunks(path, offset, 2, b",", 5):
        t = parse_uint(path, ch, 0, "timestamp", "is not a timestamp in milliseconds")
        v = parse_uint(path, ch, 1, "visitorid")
        it = parse_uint(path, ch, 3, "itemid")
        view = is_word(ch, 2, b"view")
        n_rows += t.size
        ts.append(t[view] // 1000)
        vis.append(compact(v[view]))
        items.append(compact(it[view]))
    if n_rows == 0:
        raise DataError(f"{path}: no data rows after the header")
    t, v, it = concat(ts), concat(vis), concat(items)
    if t.size == 0:
        raise DataError(f"{path}: no 'view' events")
    order = np.lexsort((t, v))  # stable: ties keep file order
    t, v, it = t[order], v[order], it[order]
    new = np.ones(t.size, dtype=bool)
    new[1:] = (v[1:] != v[:-1]) | (t[1:] - t[:-1] > 1800)
    starts = np.flatnonzero(new)
    offsets = np.append(starts, t.size).astype(np.int64)
    return Log(offsets, it, t[offsets[1:] - 1], n_rows)


def read_tsv(path: Path) -> Log:
    line, offset = first_line(path)
    raw_names = line.decode("utf-8", errors="replace").split("\t")
    cols = [norm(t) for t in raw_names]
    if not set(_TSV_REQUIRED) <= set(cols) or len(set(cols)) != len(cols):
        raise DataError(f"{path}, line 1: unknown header {show(line, 80)} for format 'yoochoose_tsv'; expected "
                        f"tab-separated columns 'SessionId', 'ItemId', 'Time'")
    ci = {c: cols.index(c) for c in _TSV_REQUIRED}
    sess, items, tm = [], [], []
    for ch in iter_chunks(path, offset, 2, b"\t", len(cols)):
        sess.append(compact(parse_uint(path, ch, ci["sessionid"], raw_names[ci["sessionid"]].strip())))
        items.append(compact(parse_uint(path, ch, ci["itemid"], raw_names[ci["itemid"]].strip())))
        tm.append(parse_decimal(path, ch, ci["time"], raw_names[ci["time"]].strip()))
    if not sess:
        raise DataError(f"{path}: no data rows after the header")
    t = concat(tm)
    return _group(concat(sess), concat(items), t, within=t, date_of_sorted_last=True)
