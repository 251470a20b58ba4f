"""Raw click logs that cannot be read (`mtd_fast.data.raw.preprocess`): each gets a DataError
naming the file, the line and the field, never a NumPy traceback; and the edge forms that
are valid (a leap day, timestamps with or without milliseconds). The preprocessing rules on
good logs: test_raw.py.
"""
from __future__ import annotations

import re

import pytest

from mtd_fast.data import DataError
from mtd_fast.data.raw import fields, preprocess

from testing import RR_MINI, YOO_MINI

DIGI_HEADER = "session_id;user_id;item_id;timeframe;eventdate\n"


def _write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text) if isinstance(text, str) else p.write_bytes(text)
    return p


def test_missing_and_empty_files(tmp_path):
    missing = tmp_path / "nope.csv"
    with pytest.raises(DataError, match=re.escape(f"{missing}: no such file")):
        preprocess(missing)
    with pytest.raises(DataError, match=re.escape(f"{missing}: no such file")):
        preprocess(missing, "diginetica")
    empty = _write(tmp_path, "empty.csv", "")
    with pytest.raises(DataError, match=re.escape(f"{empty}: empty file")):
        preprocess(empty)
    with pytest.raises(DataError, match=re.escape(f"{empty}: empty file")):
        preprocess(empty, "yoochoose")
    only_header = _write(tmp_path, "h.csv", DIGI_HEADER)
    with pytest.raises(DataError, match=re.escape(f"{only_header}: no data rows after the header")):
        preprocess(only_header)
    rr_header = _write(tmp_path, "events.csv", "timestamp,visitorid,event,itemid,transactionid\n\n")
    with pytest.raises(DataError, match=re.escape(f"{rr_header}: no data rows after the header")):
        preprocess(rr_header)
    with pytest.raises(DataError, match=re.escape(f"{tmp_path}: not a regular file")):
        preprocess(tmp_path, "diginetica")


def test_wrong_or_unknown_header(tmp_path):
    p = _write(tmp_path, "a.csv", "a,b,c\n1,2,3\n")
    with pytest.raises(DataError, match=re.escape(f"{p}, line 1: cannot tell the format from 'a,b,c'; pass format=")):
        preprocess(p)
    with pytest.raises(DataError, match=re.escape(f"{p}, line 1: unknown header 'a,b,c' for format 'retailrocket'; "
                                                  f"expected 'timestamp,visitorid,event,itemid,transactionid'")):
        preprocess(p, "retailrocket")
    q = _write(tmp_path, "b.csv", "session;user;item;timeframe;eventdate\n1;NA;1;1;2016-01-01\n")
    with pytest.raises(DataError, match=re.escape(f"{q}, line 1: unknown header 'session;user;item;timeframe;"
                                                  f"eventdate' for format 'diginetica'")):
        preprocess(q, "diginetica")
    with pytest.raises(DataError,
                       match=re.escape(f"{q}, line 1: unknown header") + ".*'yoochoose'; expected no header"):
        preprocess(q, "yoochoose")
    with pytest.raises(DataError, match=re.escape(f"{RR_MINI}, line 1: unknown header") + ".*'yoochoose_tsv'"):
        preprocess(RR_MINI, "yoochoose_tsv")
    with pytest.raises(DataError, match=re.escape("unknown raw format 'csv': use one of diginetica, yoochoose, "
                                                  "yoochoose_tsv, retailrocket")):
        preprocess(q, "csv")
    with pytest.raises(DataError, match="test_path= is only used by format 'yoochoose_tsv'"):
        preprocess(RR_MINI, test_path=RR_MINI)


def test_row_with_wrong_number_of_fields(tmp_path):
    p = _write(tmp_path, "d.csv", DIGI_HEADER + "1;NA;5;10;2016-01-01\n\n1;NA;6;20\n")
    with pytest.raises(DataError, match=re.escape(f"{p}, line 4: expected 5 fields separated by ';', found 4: "
                                                  f"'1;NA;6;20'")):
        preprocess(p)
    y = _write(tmp_path, "y.dat", "1,2014-04-07T10:51:09.277Z,214536502,0\n1,2014-04-07T10:52:09.277Z,214536502\n")
    with pytest.raises(DataError, match=re.escape(f"{y}, line 2: expected 4 fields separated by ',', found 3")):
        preprocess(y)
    r = _write(tmp_path, "r.csv", "timestamp,visitorid,event,itemid,transactionid\n1433116900000,5,view,201,,\n")
    with pytest.raises(DataError, match=re.escape(f"{r}, line 2: expected 5 fields separated by ',', found 6")):
        preprocess(r)


def test_non_integer_ids(tmp_path):
    p = _write(tmp_path, "d.csv", DIGI_HEADER + "1;NA;5;10;2016-01-01\nx1;NA;6;20;2016-01-01\n")
    with pytest.raises(DataError, match=re.escape(f"{p}, line 3, field 'session_id': 'x1' is not a non-negative "
                                                  f"integer id")):
        preprocess(p)
    p = _write(tmp_path, "d2.csv", DIGI_HEADER + "1;NA;5;-10;2016-01-01\n")
    with pytest.raises(DataError, match=re.escape(f"{p}, line 2, field 'timeframe': '-10' is not a non-negative "
                                                  f"integer")):
        preprocess(p)
    y = _write(tmp_path, "y.dat", "1,2014-04-07T10:51:09.277Z,214536502,0\n2,2014-04-07T10:52:09.277Z,,0\n")
    with pytest.raises(DataError,
                       match=re.escape(f"{y}, line 2, field 'item_id': '' is not a non-negative integer id")):
        preprocess(y)
    r = _write(tmp_path, "r.csv", "timestamp,visitorid,event,itemid,transactionid\n"
                                  "1433116900000,5,view,201,\n1433116900000,5,view,20 1,\n")
    with pytest.raises(DataError, match=re.escape(f"{r}, line 3, field 'itemid': '20 1' is not a non-negative "
                                                  f"integer id")):
        preprocess(r)
    r = _write(tmp_path, "r2.csv", "timestamp,visitorid,event,itemid,transactionid\n1433116900000,abc,view,201,\n")
    with pytest.raises(DataError, match=re.escape(f"{r}, line 2, field 'visitorid': 'abc'")):
        preprocess(r)
    big = _write(tmp_path, "big.csv", DIGI_HEADER + "1;NA;12345678901234567890;10;2016-01-01\n")
    with pytest.raises(DataError, match=re.escape(f"{big}, line 2, field 'item_id': '12345678901234567890'")):
        preprocess(big)


@pytest.mark.parametrize("date", ["2016-13-01", "2016-02-30", "2015-02-29", "16-01-01", "2016/01/01", "NA",
                                  "2016-01-01 "])
def test_unparsable_dates(tmp_path, date):
    p = _write(tmp_path, "d.csv", DIGI_HEADER + f"1;NA;5;10;2016-01-01\n1;NA;6;20;{date}\n")
    with pytest.raises(DataError, match=re.escape(f"{p}, line 3, field 'eventdate': {date!r} is not a date "
                                                  f"YYYY-MM-DD")):
        preprocess(p)


def test_leap_day_is_a_date(tmp_path):
    rows = "".join(f"{s};NA;{i};{i};2016-02-29\n" for s in (1, 2, 3, 4, 5) for i in (7, 8))
    rows += "".join(f"{s};NA;{i};{i};2016-03-09\n" for s in (6, 7) for i in (7, 8))
    ds = preprocess(_write(tmp_path, "d.csv", DIGI_HEADER + rows))
    assert ds.sessions.to_lists() == [[1, 2]] * 5 and ds.test_sessions.to_lists() == [[1, 2]] * 2


@pytest.mark.parametrize("ts", ["2014-04-07 10:51:09.277Z", "2014-04-07T24:00:00Z", "2014-04-07T10:60:00Z",
                                "2014-04-31T10:00:00Z", "2014-04-07T10:51", "2014-04-07T10:51:09+02:00",
                                "2014-04-07T10:51:09.2x7Z", "1396867869"])
def test_unparsable_timestamps(tmp_path, ts):
    y = _write(tmp_path, "y.dat", f"1,2014-04-07T10:51:09.277Z,214536502,0\n1,{ts},214536502,0\n")
    with pytest.raises(DataError, match=re.escape(f"{y}, line 2, field 'timestamp': {ts!r} is not a timestamp "
                                                  f"YYYY-MM-DDTHH:MM:SS[.fff]Z")):
        preprocess(y, "yoochoose")


def test_timestamp_forms_accepted(tmp_path):
    # with or without milliseconds / 'Z'; all truncated to the same second
    rows = []
    for s in range(1, 6):
        rows += [f"{s},2014-04-01T10:00:00Z,1,0", f"{s},2014-04-01T10:00:01.5,2,0"]
    rows += ["6,2014-04-03T10:00:00.999999Z,1,0", "6,2014-04-03T10:00:01,2,0"]
    ds = preprocess(_write(tmp_path, "y.dat", "\n".join(rows) + "\n"))
    assert ds.sessions.to_lists() == [[1, 2]] * 5 and ds.test_sessions.to_lists() == [[1, 2]]


def test_retailrocket_bad_timestamp(tmp_path):
    r = _write(tmp_path, "r.csv", "timestamp,visitorid,event,itemid,transactionid\n"
                                  "1433116900000,5,view,201,\n1.4e12,5,view,201,\n")
    with pytest.raises(DataError, match=re.escape(f"{r}, line 3, field 'timestamp': '1.4e12' is not a timestamp in "
                                                  f"milliseconds")):
        preprocess(r)


def test_nothing_left_after_filtering(tmp_path):
    # every item seen fewer than 5 times
    p = _write(tmp_path, "d.csv", DIGI_HEADER + "1;NA;5;10;2016-01-01\n1;NA;6;20;2016-01-01\n")
    with pytest.raises(DataError, match=re.escape(f"{p}: no session is left after filtering")):
        preprocess(p)
    # only views on one visitor in one session of 2 events: nothing survives the <= 2 rule
    r = _write(tmp_path, "r.csv", "timestamp,visitorid,event,itemid,transactionid\n"
                                  "1433116900000,5,view,201,\n1433116901000,5,view,201,\n"
                                  "1433116902000,5,addtocart,201,\n")
    with pytest.raises(DataError, match=re.escape(f"{r}: no session is left after filtering")):
        preprocess(r)
    r2 = _write(tmp_path, "r2.csv", "timestamp,visitorid,event,itemid,transactionid\n1433116902000,5,addtocart,201,\n")
    with pytest.raises(DataError, match=re.escape(f"{r2}: no 'view' events")):
        preprocess(r2)
    # all sessions in the last week: no training session
    rows = "".join(f"{s};NA;{i};{i};2016-01-0{s}\n" for s in (1, 2, 3, 4, 5) for i in (7, 8))
    q = _write(tmp_path, "q.csv", DIGI_HEADER + rows)
    with pytest.raises(DataError, match=re.escape(f"{q}: no training session is left after filtering")):
        preprocess(q)
    # training sessions but no test session with >= 2 known items
    rows = "".join(f"{s};NA;{i};{i};2016-01-01\n" for s in (1, 2, 3, 4, 5) for i in (7, 8))
    rows += "9;NA;7;1;2016-01-20\n9;NA;9;2;2016-01-20\n" + "".join(f"{s};NA;9;1;2016-01-20\n{s};NA;9;2;2016-01-20\n"
                                                                   for s in (10, 11))
    t = _write(tmp_path, "t.csv", DIGI_HEADER + rows)
    with pytest.raises(DataError, match=re.escape(f"{t}: no test session is left after filtering")):
        preprocess(t)


def test_errors_are_data_errors_not_numpy_tracebacks(tmp_path, monkeypatch):
    monkeypatch.setattr(fields, "CHUNK_BYTES", 256)  # the 5000-byte line below spans many reads
    # binary junk, a very long line, a lone header with the wrong delimiter
    junk = _write(tmp_path, "junk.csv", DIGI_HEADER.encode() + bytes(range(256)) * 3)
    with pytest.raises(DataError, match=re.escape(f"{junk}, line 2: expected 5 fields")):
        preprocess(junk)
    long = _write(tmp_path, "long.csv", DIGI_HEADER + "1;NA;" + "9" * 5000 + ";1;2016-01-01\n")
    with pytest.raises(DataError, match=re.escape(f"{long}, line 2, field 'item_id'")):
        preprocess(long)
    blank = _write(tmp_path, "blank.csv", "\n\n")
    with pytest.raises(DataError, match=re.escape(f"{blank}, line 1: blank first line")):
        preprocess(blank)
    with pytest.raises(DataError, match="valid_fraction=1.0 must be a number in"):
        preprocess(YOO_MINI, valid_fraction=1.0)
