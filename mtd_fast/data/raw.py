"""Raw click logs -> `Dataset`, with the SR-GNN preprocessing (`MTD_SPEC.md` section 1).

Formats (`format=None` guesses from the first line, then from the file extension):

``"diginetica"``
    CIKM Cup 2016 ``train-item-views.csv``: ``;``-separated, header
    ``sessionId;userId;itemId;timeframe;eventdate`` (or the SR-GNN sample's
    ``session_id;user_id;item_id;timeframe;eventdate``; case and underscores are ignored).
    The clicks of a session are sorted by ``timeframe`` (ties keep file order); the session
    date is the ``eventdate`` (a day) of its last row in file order; test = the last 7 days.
``"yoochoose"``
    RecSys 2015 ``yoochoose-clicks.dat``: ``session,timestamp,item,category``, no header
    (a ``session_id,timestamp,item_id,category`` header line is accepted and skipped),
    ISO times such as ``2014-04-07T10:51:09.277Z`` read as UTC and truncated to the second
    (SR-GNN parses ``timestamp[:19]``). Clicks keep file order; the session date is the
    time of its last click in file order; test = the last day (86,400 s).
``"yoochoose_tsv"``
    The GRU4Rec-style excerpt (``SessionId<TAB>ItemId<TAB>Time``, epoch seconds), which
    already holds a split: ``path`` is the training file and the test file is found beside
    it (``*_train_full.txt`` -> ``*_test.txt``, ``*_train_tr.txt`` -> ``*_train_valid.txt``,
    ``*_train.txt`` -> ``*_test.txt``) unless ``test_path=`` is given. No filtering beyond
    dropping sessions with < 2 clicks (the origin already filtered); clicks of a session
    sorted by ``Time`` (stable); sessions ordered by the time of their last click (ties in
    file order); then the renumbering and test filtering below.
``"retailrocket"``
    Kaggle ``events.csv``: ``timestamp,visitorid,event,itemid,transactionid`` (ms). Only
    ``view`` rows are kept; times are truncated to whole seconds (as the MTD script does);
    rows are sorted by (visitor, time), ties in file order; a new session starts at a new
    visitor or after a gap of more than 1,800 s. The session date is the time of its last
    event; sessions are "in file order" in that (visitor, time) order. Sessions with <= 2
    events dropped, items seen < 5 times dropped, sessions left with <= 2 dropped; test =
    the last 7 days (7 * 86,400 s); sample rule with prefixes of length >= 2.

Common steps (SR-GNN ``datasets/preprocess.py``): drop short sessions; count every item's
occurrences ONCE over the surviving sessions (train and test together); drop the clicks on
items seen fewer than 5 times; drop the sessions that became too short (counts are not
recomputed); ``split = max date - window``; training = sessions dated strictly before
``split``, test = strictly after (a session dated exactly ``split`` is dropped); both sorted
by date with a stable sort (ties keep the order in which the sessions first appear in the
file); items renumbered 1.. in order of first appearance in the sorted training sessions;
test clicks on items unseen in training dropped, then test sessions with < 2 clicks.

``fraction`` (SR-GNN's yoochoose1_64 / yoochoose1_4): with ``n`` the number of training
samples of the full training set (dataset's sample rule) and ``k = int(n * fraction)``,
SR-GNN keeps the samples ``tr_seqs[-k:]`` and the sessions ``tra_seqs[tr_ids[-k]:]``. Here
the training sessions kept are exactly those sessions: every session from the one that
produced sample ``n - k`` to the end. When sample ``n - k`` is not the first sample of its
session, the whole session is kept, so the dataset then has up to ``len(s) - 2`` more
samples than SR-GNN's ``train.txt`` (on Yoochoose 1/64 the cut falls on a session
boundary and the counts agree). As in SR-GNN, item ids, ``n_items`` and the test set stay
those of the full training set (ids of items that only occur in the dropped sessions stay
unused). ``compact_ids=True`` instead renumbers the kept sessions from 1 and drops test
clicks on items they do not contain, then test sessions with < 2 clicks (the MTD authors'
``yoochoose`` variant; without ``fraction`` < 1 it changes nothing). ``fraction`` applies
the same way to every format.

Where this follows the spec rather than the origin scripts: (1) MTD's ``preprocess_rr.py``
cuts sessions on ALL event types (an ``addtocart`` can bridge two views) and only then keeps
views, and it does not start a new session at a new visitor (only a time gap, measured with
``abs`` across the visitor boundary); here views are kept first and a new visitor always
starts a new session. (2) SR-GNN converts times with local-time ``time.mktime``; here they
are UTC (the same except across a daylight-saving change). (3) With ``int(n * fraction) ==
0`` SR-GNN's ``tr_seqs[-0:]`` keeps everything; here it is an error.

Parsing is vectorized over byte chunks (no Python object per row), dates included (calendar
arithmetic in NumPy, every date validated). Bad input raises `DataError` naming the file, the
line and the field.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .dataset import Dataset
from .pickle_io import write_pickle_layout
from .store import DataError, Sessions, expand_samples

__all__ = ["preprocess", "save_pickle_layout", "detect_format", "FORMATS"]

# format -> (min prefix of the sample rule, rec_frequency f, drop sessions with length <= this,
#            split window in date units)
FORMATS: dict[str, tuple[int, int, int, int]] = {
    "diginetica": (1, 4, 1, 7),           # dates in days
    "yoochoose": (1, 1, 1, 86_400),       # dates in seconds
    "yoochoose_tsv": (1, 1, 1, 0),        # split given by the files
    "retailrocket": (2, 6, 2, 7 * 86_400),  # dates in seconds
}
MIN_ITEM_COUNT = 5
_CHUNK = 1 << 23  # bytes per parsing chunk (8 MiB)
_BOM = b"\xef\xbb\xbf"
_INT32_MAX = 2**31 - 1

_DIGINETICA_COLS = ["sessionid", "userid", "itemid", "timeframe", "eventdate"]
_YOOCHOOSE_COLS = ["sessionid", "timestamp", "itemid", "category"]
_RETAILROCKET_COLS = ["timestamp", "visitorid", "event", "itemid", "transactionid"]
_TSV_REQUIRED = ["sessionid", "itemid", "time"]


# --------------------------------------------------------------------------- helpers

def _norm(name: str) -> str:
    return name.strip().strip('"').lower().replace("_", "")


def _show(raw: bytes, limit: int = 40) -> str:
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _first_line(path: Path) -> tuple[bytes, int]:
    """The first line without its line break (BOM stripped) and the byte offset after it."""
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if not path.is_file():
        raise DataError(f"{path}: not a regular file")
    with open(path, "rb") as f:
        line = f.readline()
    if not line.strip():
        if not line:
            raise DataError(f"{path}: empty file")
        raise DataError(f"{path}, line 1: blank first line (expected a header or a data row)")
    offset = len(line)
    if line.startswith(_BOM):
        line = line[len(_BOM):]
    return line.rstrip(b"\r\n"), offset


def _is_digits(b: bytes) -> bool:
    return len(b) > 0 and b.isdigit()


@dataclass
class _Chunk:
    """Field boundaries of the data rows of one chunk."""

    buf: np.ndarray      # uint8 bytes of the chunk
    starts: np.ndarray   # (n_fields, rows) int64 field start offsets
    ends: np.ndarray     # (n_fields, rows) int64 field end offsets (exclusive)
    lines: np.ndarray    # (rows,) int64 1-based line number of each row


def _iter_chunks(path: Path, offset: int, first_line_no: int, delim: bytes, n_fields: int):
    """Stream the rows after byte `offset`, `_CHUNK` bytes at a time, split into fields.

    Blank lines are skipped; a row with another number of fields than `n_fields` raises.
    """
    d = ord(delim)
    line_no = first_line_no  # number of the next line to read
    with open(path, "rb") as f:
        f.seek(offset)
        carry = b""
        while True:
            data = f.read(_CHUNK)
            at_eof = not data
            buf = carry + data
            if not buf:
                return
            if not at_eof:
                cut = buf.rfind(b"\n")
                if cut < 0:  # one very long line: read on
                    carry = buf
                    continue
                carry = buf[cut + 1:]
                buf = buf[:cut + 1]
            else:
                carry = b""
            a = np.frombuffer(buf, dtype=np.uint8)
            nl = np.flatnonzero(a == 10)
            ends = nl if (a.size and a[-1] == 10) else np.append(nl, a.size)
            starts = np.empty_like(ends)
            if ends.size:
                starts[0] = 0
                starts[1:] = ends[:-1] + 1
            # strip a '\r' before the line break
            has_cr = (ends > starts) & (a[np.maximum(ends - 1, 0)] == 13)
            ends = ends - has_cr
            blank = ends == starts
            dpos = np.flatnonzero(a == d)
            line_of = np.searchsorted(ends, dpos)
            counts = np.bincount(line_of, minlength=ends.size)
            bad = ~blank & (counts != n_fields - 1)
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                raise DataError(
                    f"{path}, line {line_no + i}: expected {n_fields} fields separated by {delim.decode()!r}, "
                    f"found {int(counts[i]) + 1}: {_show(bytes(a[starts[i]:ends[i]]), 80)}")
            keep = np.flatnonzero(~blank)
            if keep.size:
                dd = dpos.reshape(keep.size, n_fields - 1).T
                fs = np.empty((n_fields, keep.size), dtype=np.int64)
                fe = np.empty((n_fields, keep.size), dtype=np.int64)
                fs[0] = starts[keep]
                fs[1:] = dd + 1
                fe[:-1] = dd
                fe[-1] = ends[keep]
                yield _Chunk(a, fs, fe, line_no + keep)
            line_no += ends.size
            if at_eof:
                return


def _field_error(path: Path, ch: _Chunk, row: int, col: int, field: str, what: str) -> DataError:
    raw = bytes(ch.buf[ch.starts[col, row]:ch.ends[col, row]])
    return DataError(f"{path}, line {int(ch.lines[row])}, field {field!r}: {_show(raw)} {what}")


def _chars(ch: _Chunk, col: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """(width, rows) int16 characters of a field (0 past its end) and the field lengths."""
    s = ch.starts[col]
    n = ch.ends[col] - s
    out = np.zeros((width, n.size), dtype=np.int16)
    last = max(ch.buf.size - 1, 0)
    idx = np.empty_like(s)
    for j in range(width):
        np.add(s, j, out=idx)
        np.minimum(idx, last, out=idx)
        np.copyto(out[j], ch.buf[idx], where=j < n)
    return out, n


def _compact(ids: np.ndarray) -> np.ndarray:
    """int32 when the ids fit (halves the memory of a 33M-row log), else int64."""
    return ids.astype(np.int32) if ids.size and int(ids.max()) <= _INT32_MAX else ids


def _concat(parts: list) -> np.ndarray:
    out = np.concatenate(parts)
    parts.clear()  # free the chunks as soon as they are joined
    return out


def _parse_uint(path: Path, ch: _Chunk, col: int, field: str,
                what: str = "is not a non-negative integer id") -> np.ndarray:
    """Decimal digits only (no sign, no spaces), at most 18 of them -> int64."""
    n = ch.ends[col] - ch.starts[col]
    width = int(n.max()) if n.size else 0
    bad = (n < 1) | (n > 18)
    c, _ = _chars(ch, col, min(max(width, 1), 18))
    inside = np.arange(c.shape[0])[:, None] < n[None, :]
    dig = c - 48
    bad |= np.any(inside & ((dig < 0) | (dig > 9)), axis=0)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise _field_error(path, ch, r, col, field, what)
    val = np.zeros(n.size, dtype=np.int64)
    for j in range(c.shape[0]):
        val = np.where(inside[j], val * 10 + dig[j], val)
    return val


def _check_pattern(path: Path, ch: _Chunk, col: int, field: str, c: np.ndarray, bad: np.ndarray,
                   digit_pos: list[int], fixed: dict[int, str], what: str) -> None:
    for p in digit_pos:
        bad |= (c[p] < 48) | (c[p] > 57)
    for p, sym in fixed.items():
        bad |= c[p] != ord(sym)
    if bad.any():
        r = int(np.flatnonzero(bad)[0])
        raise _field_error(path, ch, r, col, field, what)


def _num(c: np.ndarray, positions: range) -> np.ndarray:
    v = np.zeros(c.shape[1], dtype=np.int64)
    for p in positions:
        v = v * 10 + (c[p] - 48)
    return v


_MONTH_DAYS = np.array([0, 31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], dtype=np.int64)


def _civil_days(path: Path, ch: _Chunk, col: int, field: str, y: np.ndarray, m: np.ndarray, d: np.ndarray,
                what: str) -> np.ndarray:
    """Validated calendar dates -> days since 1970-01-01 (proleptic Gregorian), vectorized."""
    leap = ((y % 4 == 0) & (y % 100 != 0)) | (y % 400 == 0)
    ok_m = (m >= 1) & (m <= 12)
    dim = _MONTH_DAYS[np.where(ok_m, m, 0)] + (leap & (m == 2))
    bad = (y < 1) | ~ok_m | (d < 1) | (d > dim)
    if bad.any():
        raise _field_error(path, ch, int(np.flatnonzero(bad)[0]), col, field, what)
    yy = y - (m <= 2)
    era = yy // 400
    yoe = yy - era * 400
    doy = (153 * np.where(m > 2, m - 3, m + 9) + 2) // 5 + d - 1
    doe = yoe * 365 + yoe // 4 - yoe // 100 + doy
    return era * 146097 + doe - 719468


_DATE_DIGITS = [0, 1, 2, 3, 5, 6, 8, 9]


def _parse_day(path: Path, ch: _Chunk, col: int, field: str) -> np.ndarray:
    """`YYYY-MM-DD` -> days since 1970-01-01."""
    what = "is not a date YYYY-MM-DD"
    c, n = _chars(ch, col, 10)
    bad = n != 10
    _check_pattern(path, ch, col, field, c, bad, _DATE_DIGITS, {4: "-", 7: "-"}, what)
    return _civil_days(path, ch, col, field, _num(c, range(0, 4)), _num(c, range(5, 7)), _num(c, range(8, 10)), what)


def _parse_iso_seconds(path: Path, ch: _Chunk, col: int, field: str) -> np.ndarray:
    """`YYYY-MM-DDTHH:MM:SS[.fff][Z]` (UTC) -> whole seconds since the epoch (fraction dropped)."""
    what = "is not a timestamp YYYY-MM-DDTHH:MM:SS[.fff]Z"
    n = ch.ends[col] - ch.starts[col]
    width = max(int(n.max()) if n.size else 0, 19)
    c, _ = _chars(ch, col, width)
    bad = n < 19
    for j in range(19, width):  # optional tail: '.', digits, final 'Z'
        inside = j < n
        cj = c[j]
        ok = ((cj == ord("Z")) & (j == n - 1)) | ((cj == ord(".")) & (j == 19)) | \
             ((cj >= 48) & (cj <= 57) & (j > 19) & (c[19] == ord(".")))
        bad |= inside & ~ok
    _check_pattern(path, ch, col, field, c, bad, _DATE_DIGITS + [11, 12, 14, 15, 17, 18],
                   {4: "-", 7: "-", 10: "T", 13: ":", 16: ":"}, what)
    hh, mm, ss = _num(c, range(11, 13)), _num(c, range(14, 16)), _num(c, range(17, 19))
    bad = (hh > 23) | (mm > 59) | (ss > 59)
    if bad.any():
        raise _field_error(path, ch, int(np.flatnonzero(bad)[0]), col, field, what)
    days = _civil_days(path, ch, col, field, _num(c, range(0, 4)), _num(c, range(5, 7)), _num(c, range(8, 10)), what)
    return days * 86_400 + hh * 3600 + mm * 60 + ss


def _parse_decimal(path: Path, ch: _Chunk, col: int, field: str) -> np.ndarray:
    """`digits[.digits]` -> float64 (epoch seconds of the TSV excerpt)."""
    n = ch.ends[col] - ch.starts[col]
    width = int(n.max()) if n.size else 1
    c, _ = _chars(ch, col, max(width, 1))
    rows = n.size
    ip = np.zeros(rows, dtype=np.float64)
    fp = np.zeros(rows, dtype=np.float64)
    scale = np.ones(rows, dtype=np.float64)
    dot = np.zeros(rows, dtype=bool)
    n_dig = np.zeros(rows, dtype=np.int64)
    bad = (n < 1) | (n > 40)
    for j in range(c.shape[0]):
        inside = j < n
        cj = c[j]
        is_dig = (cj >= 48) & (cj <= 57)
        is_dot = cj == ord(".")
        bad |= inside & ~(is_dig | (is_dot & ~dot))
        d = (cj - 48).astype(np.float64)
        take = inside & is_dig
        ip = np.where(take & ~dot, ip * 10 + d, ip)
        fp = np.where(take & dot, fp * 10 + d, fp)
        scale = np.where(take & dot, scale * 10, scale)
        n_dig += take
        dot |= inside & is_dot
    bad |= n_dig == 0
    if bad.any():
        raise _field_error(path, ch, int(np.flatnonzero(bad)[0]), col, field, "is not a number of seconds")
    return ip + fp / scale


def _is_word(ch: _Chunk, col: int, word: bytes) -> np.ndarray:
    c, n = _chars(ch, col, len(word))
    out = n == len(word)
    for j, b in enumerate(word):
        out &= c[j] == b
    return out


# --------------------------------------------------------------------------- format detection

def _split_header(line: bytes, delim: bytes) -> list[str]:
    return [_norm(t) for t in line.decode("utf-8", errors="replace").split(delim.decode())]


def _looks_like_yoochoose_row(line: bytes) -> bool:
    parts = line.split(b",")
    return len(parts) == 4 and _is_digits(parts[0]) and len(parts[1]) >= 19 and parts[1][10:11] == b"T"


def detect_format(path: os.PathLike | str) -> str:
    """Guess the raw format of `path` from its first line (then its extension)."""
    path = Path(path)
    line, _ = _first_line(path)
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
    raise DataError(f"{path}, line 1: cannot tell the format from {_show(line, 80)}; pass format= one of "
                    f"{', '.join(FORMATS)}")


# --------------------------------------------------------------------------- readers

@dataclass
class _Log:
    """Sessions of original ids, sessions in their file order."""

    offsets: np.ndarray  # int64 (n + 1,)
    items: np.ndarray    # int64 original item ids, clicks in session order
    dates: np.ndarray    # (n,) session date (int64 days/seconds, or float64 seconds)
    n_rows: int

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def _group(sess: np.ndarray, items: np.ndarray, row_date: np.ndarray,
           within: Optional[np.ndarray] = None, date_of_sorted_last: bool = False) -> _Log:
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
    return _Log(offsets, items[order], row_date[last_row], n_rows)


def _header_columns(path: Path, line: bytes, delim: bytes, fmt: str, expected: list[list[str]],
                    shown: list[str]) -> None:
    cols = _split_header(line, delim)
    if cols not in expected:
        raise DataError(f"{path}, line 1: unknown header {_show(line, 80)} for format {fmt!r}; expected "
                        + " or ".join(repr(s) for s in shown))


def _read_diginetica(path: Path) -> _Log:
    line, offset = _first_line(path)
    _header_columns(path, line, b";", "diginetica", [_DIGINETICA_COLS],
                    ["sessionId;userId;itemId;timeframe;eventdate", "session_id;user_id;item_id;timeframe;eventdate"])
    names = line.decode("utf-8", errors="replace").split(";")
    sess, items, tf, day = [], [], [], []
    for ch in _iter_chunks(path, offset, 2, b";", 5):
        sess.append(_compact(_parse_uint(path, ch, 0, names[0].strip())))
        items.append(_compact(_parse_uint(path, ch, 2, names[2].strip())))
        tf.append(_parse_uint(path, ch, 3, names[3].strip(), "is not a non-negative integer"))
        day.append(_parse_day(path, ch, 4, names[4].strip()))
    if not sess:
        raise DataError(f"{path}: no data rows after the header")
    return _group(_concat(sess), _concat(items), _concat(day), within=_concat(tf))


def _read_yoochoose(path: Path) -> _Log:
    line, offset = _first_line(path)
    first = line.split(b",")
    names = ["session_id", "timestamp", "item_id", "category"]
    if first and not _is_digits(first[0]):  # a header line
        if _split_header(line, b",") != _YOOCHOOSE_COLS:
            raise DataError(f"{path}, line 1: unknown header {_show(line, 80)} for format 'yoochoose'; expected no "
                            f"header (rows session,timestamp,item,category) or 'session_id,timestamp,item_id,category'")
        start_line = 2
    else:
        with open(path, "rb") as f:
            offset = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
        start_line = 1
    sess, items, ts = [], [], []
    for ch in _iter_chunks(path, offset, start_line, b",", 4):
        sess.append(_compact(_parse_uint(path, ch, 0, names[0])))
        ts.append(_parse_iso_seconds(path, ch, 1, names[1]))
        items.append(_compact(_parse_uint(path, ch, 2, names[2])))
    if not sess:
        raise DataError(f"{path}: no data rows")
    return _group(_concat(sess), _concat(items), _concat(ts))


def _read_retailrocket(path: Path) -> _Log:
    line, offset = _first_line(path)
    _header_columns(path, line, b",", "retailrocket", [_RETAILROCKET_COLS],
                    ["timestamp,visitorid,event,itemid,transactionid"])
    ts, vis, items = [], [], []
    n_rows = 0
    for ch in _iter_chunks(path, offset, 2, b",", 5):
        t = _parse_uint(path, ch, 0, "timestamp", "is not a timestamp in milliseconds")
        v = _parse_uint(path, ch, 1, "visitorid")
        it = _parse_uint(path, ch, 3, "itemid")
        view = _is_word(ch, 2, b"view")
        n_rows += t.size
        ts.append(t[view] // 1000)
        vis.append(_compact(v[view]))
        items.append(_compact(it[view]))
    if n_rows == 0:
        raise DataError(f"{path}: no data rows after the header")
    t, v, it = _concat(ts), _concat(vis), _concat(items)
    if t.size == 0:
        raise DataError(f"{path}: no 'view' events")
    order = np.lexsort((t, v))  # stable: ties keep file order
    t, v, it = t[order], v[order], it[order]
    new = np.ones(t.size, dtype=bool)
    new[1:] = (v[1:] != v[:-1]) | (t[1:] - t[:-1] > 1800)
    starts = np.flatnonzero(new)
    offsets = np.append(starts, t.size).astype(np.int64)
    return _Log(offsets, it, t[offsets[1:] - 1], n_rows)


def _read_tsv(path: Path) -> _Log:
    line, offset = _first_line(path)
    raw_names = line.decode("utf-8", errors="replace").split("\t")
    cols = [_norm(t) for t in raw_names]
    if not set(_TSV_REQUIRED) <= set(cols) or len(set(cols)) != len(cols):
        raise DataError(f"{path}, line 1: unknown header {_show(line, 80)} for format 'yoochoose_tsv'; expected "
                        f"tab-separated columns 'SessionId', 'ItemId', 'Time'")
    ci = {c: cols.index(c) for c in _TSV_REQUIRED}
    sess, items, tm = [], [], []
    for ch in _iter_chunks(path, offset, 2, b"\t", len(cols)):
        sess.append(_compact(_parse_uint(path, ch, ci["sessionid"], raw_names[ci["sessionid"]].strip())))
        items.append(_compact(_parse_uint(path, ch, ci["itemid"], raw_names[ci["itemid"]].strip())))
        tm.append(_parse_decimal(path, ch, ci["time"], raw_names[ci["time"]].strip()))
    if not sess:
        raise DataError(f"{path}: no data rows after the header")
    t = _concat(tm)
    return _group(_concat(sess), _concat(items), t, within=t, date_of_sorted_last=True)


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


def _renumber(train_off: np.ndarray, train_items: np.ndarray, n_dense: int) -> np.ndarray:
    """dense item index -> new id (1.. by first appearance in the training clicks; 0 = unseen)."""
    n = train_items.size
    first = np.full(n_dense, n, dtype=np.int64)
    np.minimum.at(first, train_items, np.arange(n, dtype=np.int64))
    seen = np.flatnonzero(first < n)
    new = np.zeros(n_dense, dtype=np.int64)
    new[seen[np.argsort(first[seen])]] = np.arange(1, seen.size + 1)
    return new


def _restrict_test(test_off: np.ndarray, test_items: np.ndarray, new_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Map test items to new ids, drop unseen ones, then sessions left with < 2 clicks."""
    mapped = new_id[test_items]
    off, it = _mask_clicks(test_off, mapped, mapped > 0)
    keep = np.flatnonzero(np.diff(off) >= 2)
    return _select(off, it, keep)


def _sessions(off: np.ndarray, items: np.ndarray) -> Sessions:
    return Sessions(off.astype(np.int64), items.astype(np.int32))


def _filter_and_split(path: Path, fmt: str, log: _Log) -> tuple[tuple, tuple, dict[str, Any]]:
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


def _tsv_split(path: Path, test_path: Optional[os.PathLike | str]) -> tuple[tuple, tuple, dict[str, Any], Path]:
    train_log = _read_tsv(path)
    tpath = Path(test_path) if test_path is not None else _tsv_test_path(path)
    test_log = _read_tsv(tpath)
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


def _default_name(fmt: str, fraction: float) -> str:
    if fraction < 1.0:
        inv = 1.0 / fraction
        if abs(inv - round(inv)) < 1e-9:
            return f"{fmt}1_{int(round(inv))}"  # yoochoose1_64, yoochoose1_4
        return f"{fmt}_{fraction:g}"
    return fmt


def preprocess(path: os.PathLike | str, format: Optional[str] = None, *, fraction: float = 1.0,
               valid_fraction: float = 0.1, name: Optional[str] = None,
               test_path: Optional[os.PathLike | str] = None, compact_ids: bool = False) -> Dataset:
    """Read a raw click log and apply the SR-GNN preprocessing (module docstring).

    Returns a `Dataset` with three extra attributes:

    - ``item_map``: ``dict`` original item id -> new id (1..n_items);
    - ``item_ids``: ``int64`` array, ``item_ids[new_id]`` = original id (``item_ids[0] = -1``);
    - ``preprocess_stats``: counts of the run, SR-GNN's printout included: ``train_sessions``,
      ``train_samples`` and ``test_samples`` (SR-GNN's rule over the full training set,
      before ``fraction``), ``items`` (distinct training items), and ``avg_length`` =
      clicks / sessions over the training plus the filtered test sessions (what SR-GNN
      prints as ``avg length``).
    """
    path = Path(path)
    if format is None:
        format = detect_format(path)
    if format not in FORMATS:
        raise DataError(f"unknown raw format {format!r}: use one of {', '.join(FORMATS)} (or None to detect it)")
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction={fraction!r} must be a number in (0, 1]")
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or \
            not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction={valid_fraction!r} must be a number in [0, 1)")
    if test_path is not None and format != "yoochoose_tsv":
        raise DataError(f"test_path= is only used by format 'yoochoose_tsv' (this file is {format!r})")
    min_prefix, rec_freq, _, _ = FORMATS[format]

    source = str(path)
    if format == "yoochoose_tsv":
        (tr_off, tr_items), (te_off, te_items), stats, tpath = _tsv_split(path, test_path)
        source = f"{path} + {tpath}"
    else:
        reader = {"diginetica": _read_diginetica, "yoochoose": _read_yoochoose,
                  "retailrocket": _read_retailrocket}[format]
        (tr_off, tr_items), (te_off, te_items), stats = _filter_and_split(path, format, reader(path))
    uitems = stats.pop("uitems")

    new_id = _renumber(tr_off, tr_items, uitems.size)
    n_items = int(new_id.max())
    tr_items = new_id[tr_items]
    te_off, te_items = _restrict_test(te_off, te_items, new_id)
    if te_off.size == 1:
        raise DataError(f"{path}: no test session is left after filtering (none after the split date has >= 2 "
                        f"clicks on training items)")

    n_tr, n_te = tr_off.size - 1, te_off.size - 1
    tr_counts = np.maximum(np.diff(tr_off) - min_prefix, 0)
    n_samples = int(tr_counts.sum())
    stats.update(train_sessions=n_tr, test_sessions=n_te, train_samples=n_samples,
                 test_samples=int(np.maximum(np.diff(te_off) - min_prefix, 0).sum()), items=n_items,
                 clicks=int(tr_off[-1] + te_off[-1]),
                 avg_length=float(tr_off[-1] + te_off[-1]) / (n_tr + n_te))

    item_ids = np.full(n_items + 1, -1, dtype=np.int64)
    item_ids[new_id[new_id > 0]] = uitems[new_id > 0]

    if fraction < 1.0:
        k = int(n_samples * fraction)
        if k <= 0:
            raise DataError(f"fraction={fraction!r} keeps no training sample (int({n_samples} * {fraction!r}) = 0)")
        first_kept = int(np.searchsorted(np.cumsum(tr_counts), n_samples - k, side="right"))
        cut = int(tr_off[first_kept])
        tr_off, tr_items = tr_off[first_kept:] - cut, tr_items[cut:]
        stats.update(fraction=fraction, fraction_samples_srgnn=k, fraction_first_session=first_kept)
        if compact_ids:
            again = _renumber(tr_off, tr_items, n_items + 1)
            te_off, te_items = _restrict_test(te_off, te_items, again)
            if te_off.size == 1:
                raise DataError(f"{path}: no test session is left with fraction={fraction!r} and compact_ids=True")
            tr_items = again[tr_items]
            old = item_ids
            n_items = int(again.max())
            item_ids = np.full(n_items + 1, -1, dtype=np.int64)
            item_ids[again[again > 0]] = old[again > 0]

    train = _sessions(tr_off, tr_items)
    test_sessions = _sessions(te_off, te_items)
    ds = Dataset(name or _default_name(format, fraction), train, expand_samples(test_sessions, min_prefix),
                 n_items=n_items, min_prefix=min_prefix, rec_frequency=rec_freq, valid_fraction=valid_fraction,
                 test_sessions=test_sessions, source=source)
    ds.item_ids = item_ids
    ds.item_map = dict(zip(item_ids[1:].tolist(), range(1, n_items + 1)))
    ds.preprocess_stats = stats
    ds.raw_format = format
    return ds


def save_pickle_layout(ds: Dataset, root: os.PathLike | str, *, with_train: bool = False) -> Path:
    """Write `ds` in the SR-GNN pickle layout (`all_train_seq.txt`, `test.txt`, and
    `train.txt` with `with_train=True`) under `root`; `load_dataset(root=...)` reads it back.
    The training samples written are those of all training sessions (validation included),
    as in SR-GNN."""
    train = expand_samples(ds.sessions, ds.min_prefix) if with_train else None
    return write_pickle_layout(root, ds.sessions, ds.test, train=train)
