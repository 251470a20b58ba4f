"""Byte-level parsing of raw click logs: chunked reading split into fields, and vectorized
field parsers (unsigned integers, dates, ISO times, decimals, words), each validating every
row and raising `DataError` naming the file, the line and the field. No Python object per row.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..store import DataError

CHUNK_BYTES = 1 << 23  # bytes per parsing chunk (8 MiB); tests shrink it to cut lines across reads
BOM = b"\xef\xbb\xbf"
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- helpers

def norm(name: str) -> str:
    return name.strip().strip('"').lower().replace("_", "")


def show(raw: bytes, limit: int = 40) -> str:
    text = raw.decode("utf-8", errors="replace")
    return repr(text if len(text) <= limit else text[:limit] + "...")


def first_line(path: Path) -> tuple[bytes, int]:
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
    if line.startswith(BOM):
        line = line[len(BOM):]
    return line.rstrip(b"\r\n"), offset


def is_digits(b: bytes) -> bool:
    return len(b) > 0 and b.isdigit()


@dataclass
class _Chunk:
    """Field boundaries of the data rows of one chunk."""

    buf: np.ndarray      # uint8 bytes of the chunk
    starts: np.ndarray   # (n_fields, rows) int64 field start offsets
    ends: np.ndarray     # (n_fields, rows) int64 field end offsets (exclusive)
    lines: np.ndarray    # (rows,) int64 1-based line number of each row


def iter_chunks(path: Path, offset: int, first_line_no: int, delim: bytes, n_fields: int):
    """Stream the rows after byte `offset`, `CHUNK_BYTES` bytes at a time, split into fields.

    Blank lines are skipped; a row with another number of fields than `n_fields` raises.
    """
    d = ord(delim)
    line_no = first_line_no  # number of the next line to read
    with open(path, "rb") as f:
        f.seek(offset)
        carry = b""
        while True:
            data = f.read(CHUNK_BYTES)
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
                    f"found {int(counts[i]) + 1}: {show(bytes(a[starts[i]:ends[i]]), 80)}")
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
    return DataError(f"{path}, line {int(ch.lines[row])}, field {field!r}: {show(raw)} {what}")


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


def compact(ids: np.ndarray) -> np.ndarray:
    """int32 when the ids fit (halves the memory of a 33M-row log), else int64."""
    return ids.astype(np.int32) if ids.size and int(ids.max()) <= _INT32_MAX else ids


def concat(parts: list) -> np.ndarray:
    out = np.concatenate(parts)
    parts.clear()  # free the chunks as soon as they are joined
    return out


def parse_uint(path: Path, ch: _Chunk, col: int, field: str,
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


def parse_day(path: Path, ch: _Chunk, col: int, field: str) -> np.ndarray:
    """`YYYY-MM-DD` -> days since 1970-01-01."""
    what = "is not a date YYYY-MM-DD"
    c, n = _chars(ch, col, 10)
    bad = n != 10
    _check_pattern(path, ch, col, field, c, bad, _DATE_DIGITS, {4: "-", 7: "-"}, what)
    return _civil_days(path, ch, col, field, _num(c, range(0, 4)), _num(c, range(5, 7)), _num(c, range(8, 10)), what)


def parse_iso_seconds(path: Path, ch: _Chunk, col: int, field: str) -> np.ndarray:
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


def parse_decimal(path: Path, ch: _Chunk, col: int, field: str) -> np.ndarray:
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


def is_word(ch: _Chunk, col: int, word: bytes) -> np.ndarray:
    c, n = _chars(ch, col, len(word))
    out = n == len(word)
    for j, b in enumerate(word):
        out &= c[j] == b
    return out
