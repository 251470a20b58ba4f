"""Raw click logs -> Dataset (`mtd_fast.data.raw`): the SR-GNN preprocessing rules.

Real files come from the shared data folder (skipped when absent); the formats with no real file here
(yoochoose-clicks.dat, Retailrocket events.csv) are checked on small handmade fixtures whose
expected output is worked out by hand in the comments below. Malformed logs and the errors
they get: test_raw_bad_input.py.
"""
from __future__ import annotations

import csv
import datetime
import pickle
import re
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import mtd_fast.data as data_pkg
from mtd_fast.data import DataError, load_dataset
from mtd_fast.data.raw import detect_format, fields, preprocess, save_pickle_layout

from testing import RR_MINI, SHARED_DATA, YOO_MINI

DATA = SHARED_DATA
DIGI_SAMPLE = DATA / "diginetica_sample_raw" / "sample_train-item-views.csv"
TSV_DIR = DATA / "yoochoose_100k_sessionrec"
TSV_TRAIN = TSV_DIR / "yoochoose-clicks-100k_train_full.txt"
TSV_TEST = TSV_DIR / "yoochoose-clicks-100k_test.txt"

needs_sample = pytest.mark.skipif(not DIGI_SAMPLE.is_file(), reason=f"shared data absent: {DIGI_SAMPLE} not found")
needs_tsv = pytest.mark.skipif(not (TSV_TRAIN.is_file() and TSV_TEST.is_file()),
                               reason=f"shared data absent: {TSV_DIR} not found")


def lists(sessions):
    return sessions.to_lists()


def samples(s):
    return list(zip(s.prefixes.to_lists(), s.targets.tolist()))


# --------------------------------------------------------------------------- Diginetica sample (real file)

def _srgnn_reference_diginetica(path: Path):
    """A plain-Python, dict-based rendering of the rules (written independently of mtd_fast.data.raw)."""
    clicks: dict[str, list[tuple[int, str]]] = {}
    last_day: dict[str, str] = {}
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter=";")
        next(rows)
        for sid, _user, item, tf, day in rows:
            clicks.setdefault(sid, []).append((int(tf), item))
            last_day[sid] = day  # insertion order = first appearance; value = last row in file order
    seqs = {s: [it for _, it in sorted(c, key=lambda x: x[0])] for s, c in clicks.items()}
    seqs = {s: q for s, q in seqs.items() if len(q) > 1}
    count = Counter(i for q in seqs.values() for i in q)
    seqs = {s: [i for i in q if count[i] >= 5] for s, q in seqs.items()}
    seqs = {s: q for s, q in seqs.items() if len(q) >= 2}
    day = {s: datetime.date.fromisoformat(last_day[s]) for s in seqs}
    split = max(day.values()) - datetime.timedelta(days=7)
    train = sorted((s for s in seqs if day[s] < split), key=day.__getitem__)
    test = sorted((s for s in seqs if day[s] > split), key=day.__getitem__)
    ids: dict[str, int] = {}
    train_seqs = [[ids.setdefault(i, len(ids) + 1) for i in seqs[s]] for s in train]
    test_seqs = [[ids[i] for i in seqs[s] if i in ids] for s in test]
    test_seqs = [q for q in test_seqs if len(q) >= 2]
    return train_seqs, test_seqs, ids


@needs_sample
def test_diginetica_sample_reproduces_srgnn_counts():
    ds = preprocess(DIGI_SAMPLE)
    assert ds.raw_format == "diginetica" and ds.name == "diginetica"
    # SOURCE.md: SR-GNN's preprocess.py --dataset sample on this exact file
    assert len(ds.sessions) == 469
    assert len(ds.train) + len(ds.valid) == 1205
    assert len(ds.test) == 99
    assert ds.n_items == 309
    assert np.unique(ds.sessions.items).size == 309
    # SR-GNN's "avg length": clicks / sessions over training AND (filtered) test sessions
    clicks = ds.sessions.n_clicks + ds.test_sessions.n_clicks
    assert clicks / (len(ds.sessions) + len(ds.test_sessions)) == pytest.approx(ds.preprocess_stats["avg_length"])
    assert round(ds.preprocess_stats["avg_length"], 3) == 3.567
    # ... which is not the training-only average (3.569) that Dataset.stats() reports
    assert round(float(ds.sessions.lengths.mean()), 3) == 3.569
    st = ds.preprocess_stats
    assert (st["rows"], st["sessions_read"], st["train_sessions"], st["train_samples"], st["test_samples"]) == \
        (12391, 2986, 469, 1205, 99)
    # Dataset conventions: validation = last 10% of the training sessions, Diginetica f = 4
    assert len(ds.valid_sessions) == 46 and len(ds.train_sessions) == 423
    assert ds.rec_frequency == 4 and ds.min_prefix == 1


@needs_sample
def test_diginetica_sample_matches_independent_reference():
    ds = preprocess(DIGI_SAMPLE, "diginetica")
    train_seqs, test_seqs, ids = _srgnn_reference_diginetica(DIGI_SAMPLE)
    assert lists(ds.sessions) == train_seqs
    assert lists(ds.test_sessions) == test_seqs
    assert ds.item_map == {int(k): v for k, v in ids.items()}
    assert ds.item_ids[0] == -1
    assert all(ds.item_map[int(orig)] == new for new, orig in enumerate(ds.item_ids[1:].tolist(), start=1))
    # test samples: SR-GNN rule, longest prefix first
    expect = [(q[:-i], q[-i]) for q in test_seqs for i in range(1, len(q))]
    assert samples(ds.test) == expect


@needs_sample
@pytest.mark.parametrize("header", ["sessionId;userId;itemId;timeframe;eventdate",
                                    "session_id;user_id;item_id;timeframe;eventdate"])
def test_diginetica_both_header_spellings_and_crlf(tmp_path, header):
    body = DIGI_SAMPLE.read_bytes().split(b"\n", 1)[1]
    plain = tmp_path / "train-item-views.csv"
    plain.write_bytes(header.encode() + b"\n" + body)
    crlf = tmp_path / "crlf.csv"
    crlf.write_bytes((header.encode() + b"\n" + body).replace(b"\n", b"\r\n"))
    ref = preprocess(DIGI_SAMPLE)
    for p in (plain, crlf):
        assert detect_format(p) == "diginetica"
        ds = preprocess(p)
        assert lists(ds.sessions) == lists(ref.sessions)
        assert samples(ds.test) == samples(ref.test)
    # the field is named as the file's header spells it
    bad = tmp_path / "bad.csv"
    bad.write_text(header + "\n1;NA;12;5;2016-01-01\n1;NA;1e3;6;2016-01-01\n")
    item_col = header.split(";")[2]
    with pytest.raises(DataError, match=re.escape(f"{bad}, line 3, field '{item_col}': '1e3' is not a "
                                                  f"non-negative integer id")):
        preprocess(bad)


@needs_sample
def test_small_chunks_give_the_same_result(monkeypatch, tmp_path):
    ref = preprocess(DIGI_SAMPLE)
    monkeypatch.setattr(fields, "CHUNK_BYTES", 1000)  # ~400 chunk boundaries, lines cut across reads
    ds = preprocess(DIGI_SAMPLE)
    assert lists(ds.sessions) == lists(ref.sessions) and samples(ds.test) == samples(ref.test)
    # line numbers stay right across chunks, blank lines included in the count
    lines = DIGI_SAMPLE.read_text().split("\n")
    lines.insert(5, "")
    lines[900] = "77;NA;123;45;2016-05-32"
    p = tmp_path / "x.csv"
    p.write_text("\n".join(lines))
    with pytest.raises(DataError, match=re.escape(f"{p}, line 901, field 'eventdate': '2016-05-32' is not a date")):
        preprocess(p)


def test_diginetica_handmade_rules(tmp_path):
    """Clicks sorted by timeframe (ties in file order); the session date is the eventdate of
    its LAST ROW IN FILE ORDER; max date over the kept sessions; 7-day split; a session dated
    exactly on the split date is dropped; ties between session dates keep file order."""
    rows = [
        # s1: rows out of timeframe order -> [11, 12, 10]; last row says 01-01 (earlier rows 01-09)
        "1;NA;10;300;2016-01-09", "1;NA;11;100;2016-01-09", "1;NA;12;200;2016-01-01",
        # s2: timeframe tie 13/10 at 50 -> file order: [13, 10, 11]; 01-02
        "2;5;13;50;2016-01-02", "2;5;10;50;2016-01-02", "2;5;11;60;2016-01-02",
        # s3: [10, 11] dated 01-03, the split date -> dropped
        "3;NA;10;1;2016-01-03", "3;NA;11;2;2016-01-03",
        # s4: test (01-10, the max date): [12, 99, 13]; 99 is unseen in training
        "4;NA;12;1;2016-01-10", "4;NA;99;2;2016-01-10", "4;NA;13;3;2016-01-10",
        # s5: test (01-08): [99, 10] -> [10] after dropping 99 -> dropped
        "5;NA;99;1;2016-01-08", "5;NA;10;2;2016-01-08",
        # s6: [11, 13, 12], 01-01: a date tie with s1, after it in file order
        "6;NA;11;7;2016-01-01", "6;NA;13;8;2016-01-01", "6;NA;12;9;2016-01-01",
        # s7: test (01-09): only 99 -> dropped
        "7;NA;99;1;2016-01-09", "7;NA;99;2;2016-01-09", "7;NA;99;3;2016-01-09", "7;NA;99;4;2016-01-09",
        # s8: one click dated 01-11: dropped by the length filter BEFORE the max date is taken
        #     (otherwise split = 01-04 and s3 would be training data)
        "8;NA;14;1;2016-01-11",
        # s9: [10, 12, 11], 01-02
        "9;NA;10;1;2016-01-02", "9;NA;12;2;2016-01-02", "9;NA;11;3;2016-01-02",
        # s10: timeframes 5, 4, 6 -> [13, 12, 13], 01-02
        "10;NA;12;5;2016-01-02", "10;NA;13;4;2016-01-02", "10;NA;13;6;2016-01-02",
    ]
    # item counts after the length filter: 10: s1 s2 s3 s5 s9 = 5; 11: s1 s2 s3 s6 s9 = 5;
    # 12: s1 s4 s6 s9 s10 = 5; 13: s2 s4 s6 s10 s10 = 5; 99: s4 s5 s7x4 = 6 -> nothing dropped.
    # max date 01-10 (s4) -> split 01-03. Train (< 01-03) by date, ties in file order:
    #   s1 (01-01), s6 (01-01), s2 (01-02), s9 (01-02), s10 (01-02)
    # ids by first appearance: 11->1, 12->2, 10->3 (s1), 13->4 (s6)
    # test (> 01-03) by date: s5 (01-08) [10] dropped, s7 (01-09) [] dropped, s4 (01-10) [12, 13] -> [2, 4]
    p = tmp_path / "digi.csv"
    p.write_text("sessionId;userId;itemId;timeframe;eventdate\n" + "\n".join(rows))  # no final newline
    ds = preprocess(p)
    assert lists(ds.sessions) == [[1, 2, 3], [1, 4, 2], [4, 3, 1], [3, 2, 1], [4, 2, 4]]
    assert ds.item_map == {11: 1, 12: 2, 10: 3, 13: 4}
    assert ds.item_ids.tolist() == [-1, 11, 12, 10, 13]
    assert lists(ds.test_sessions) == [[2, 4]]
    assert samples(ds.test) == [([2], 4)]
    assert ds.n_items == 4
    st = ds.preprocess_stats
    assert st["sessions_on_split_date"] == 1 and st["sessions_read"] == 10
    assert st["split_date"] == (datetime.date(2016, 1, 3) - datetime.date(1970, 1, 1)).days


# --------------------------------------------------------------------------- GRU4Rec-style TSV excerpt (real file)

def _read_tsv_sessions(path: Path):
    """SessionId -> [(time, item)] in file order, and each session's first row."""
    sess: dict[str, list[tuple[float, int]]] = {}
    with open(path, newline="") as f:
        rows = csv.reader(f, delimiter="\t")
        assert next(rows) == ["SessionId", "ItemId", "Time"]
        for sid, item, t in rows:
            sess.setdefault(sid, []).append((float(t), int(item)))
    return {s: [it for _, it in sorted(c, key=lambda x: x[0])] for s, c in sess.items()}, \
        {s: max(t for t, _ in c) for s, c in sess.items()}


@needs_tsv
def test_tsv_excerpt_keeps_its_split():
    ds = preprocess(TSV_TRAIN)
    assert ds.raw_format == "yoochoose_tsv" and ds.name == "yoochoose_tsv"
    train, train_end = _read_tsv_sessions(TSV_TRAIN)
    test, test_end = _read_tsv_sessions(TSV_TEST)
    train = {s: q for s, q in train.items() if len(q) >= 2}
    order = sorted(train, key=train_end.__getitem__)  # by last click, ties in file order (stable)
    train_items = {i for q in train.values() for i in q}
    test_kept = {s: [i for i in q if i in train_items] for s, q in test.items()}
    test_kept = {s: q for s, q in test_kept.items() if len(q) >= 2}
    test_order = sorted(test_kept, key=test_end.__getitem__)
    # SOURCE.md: 17,794 training sessions, 2,933 items, 3,416 test sessions (all items known)
    assert len(train) == 17794 and len(train_items) == 2933 and len(test_kept) == 3416
    assert len(ds.sessions) == len(train) == 17794
    assert ds.n_items == len(train_items) == 2933
    assert len(ds.test_sessions) == len(test_kept) == 3416
    assert len(ds.train) + len(ds.valid) == sum(len(q) - 1 for q in train.values()) == 52484
    assert len(ds.test) == sum(len(q) - 1 for q in test_kept.values()) == 10152
    # the provided split is kept: the same sessions on each side, mapped back to original ids
    back = ds.item_ids
    assert [back[s].tolist() for s in ds.sessions] == [train[s] for s in order]
    assert [back[s].tolist() for s in ds.test_sessions] == [test_kept[s] for s in test_order]
    # ids are numbered by first appearance in the time-sorted training sessions
    first = list(dict.fromkeys(i for s in order for i in train[s]))
    assert [ds.item_map[i] for i in first] == list(range(1, 2934))
    assert ds.rec_frequency == 1 and ds.min_prefix == 1
    # explicit test_path gives the same
    ds2 = preprocess(TSV_TRAIN, "yoochoose_tsv", test_path=TSV_TEST)
    assert lists(ds2.sessions) == lists(ds.sessions) and samples(ds2.test) == samples(ds.test)


@needs_tsv
def test_tsv_test_file_must_be_found(tmp_path):
    lone = tmp_path / "yoochoose-clicks-100k_train_full.txt"
    shutil.copy(TSV_TRAIN, lone)
    with pytest.raises(DataError, match=re.escape(f"{lone}: the test file {tmp_path / 'yoochoose-clicks-100k_test.txt'}"
                                                  f" beside it is missing; pass test_path=")):
        preprocess(lone)
    ds = preprocess(lone, test_path=TSV_TEST)
    assert len(ds.test_sessions) == 3416


def test_tsv_handmade(tmp_path):
    tr = tmp_path / "x_train_full.txt"
    te = tmp_path / "x_test.txt"
    # session 7 ends at 30.5, session 3 at 20.0 -> 3 first; session 7's rows are out of time order;
    # session 9 has one click -> dropped
    tr.write_text("SessionId\tItemId\tTime\n7\t500\t30.5\n7\t400\t10.25\n3\t400\t12\n3\t600\t20.0\n9\t500\t1\n")
    # test: session 1 -> [400, 500]; session 2 -> [600] after dropping 800 -> dropped
    te.write_text("SessionId\tItemId\tTime\n2\t800\t41\n2\t600\t42\n1\t400\t40\n1\t500\t40.5\n")
    ds = preprocess(tr)
    assert lists(ds.sessions) == [[1, 2], [1, 3]]  # 3: [400, 600]; 7: [400, 500]
    assert ds.item_map == {400: 1, 600: 2, 500: 3}
    assert lists(ds.test_sessions) == [[1, 3]] and samples(ds.test) == [([1], 3)]
    te.write_text("SessionId\tItemId\tTime\n1\t400\t40\n1\t500\t4O.5\n")
    with pytest.raises(DataError, match=re.escape(f"{te}, line 3, field 'Time': '4O.5' is not a number of seconds")):
        preprocess(tr)


# --------------------------------------------------------------------------- yoochoose-clicks.dat (handmade)
#
# tests/fixtures/yoochoose-clicks-mini.dat, 43 rows, no header (session,timestamp,item,category).
# Sessions in file order (s20's rows are split in two runs):
#   s11 [101,102,101] 04-01T10:02:00      s12 [108] (one click)
#   s13 [102,103,104] 04-02T09:06:00      s14 [103,901] 04-02T12:01:00
#   s15 [104,105] 04-05T08:10:00          s16 [105,101,102] 04-03T10:01:00
#   s18 [103,104] 04-04T10:05:00          s17 [102,105] 04-04T10:05:00 (same date as s18)
#   s27 [104,108,105] 04-05T09:02:00      s29 [108,108] 04-03T15:01:00
#   s19 [101,105] 04-06T12:00:00.500 -> 12:00:00 (SR-GNN reads timestamp[:19])
#   s20 [104,101,103]: rows at 04-06T13:00, 13:01, then (after s21) 04-06T10:00 -> its date is
#       the LAST ROW IN FILE ORDER, 04-06T10:00 (not its latest time 13:01)
#   s21 [101,102] 04-07T09:40   s22 [107,101,107] 04-07T08:02   s23 [107,107] 04-07T08:31
#   s24 [102,107,103] 04-07T07:02   s25 [104,105] 04-07T12:00:00.999 -> 12:00:00 (the max)
#   s28 [108,101,104] 04-07T10:06
# 1. length filter: s12 dropped (its 108 is NOT counted).
# 2. counts over the 17 others, once: 101: s11 x2, s16, s19, s20, s21, s22, s28 = 8;
#    102: s11 s13 s16 s17 s21 s24 = 6; 103: s13 s14 s18 s20 s24 = 5; 104: s13 s15 s18 s20 s25 s27
#    s28 = 7; 105: s15 s16 s17 s19 s25 s27 = 6; 107: s22 x2, s23 x2, s24 = 5; 108: s27 s28 s29 x2
#    = 4 (5 in the file) -> dropped; 901: 1 -> dropped.
#    s14 -> [103] and s29 -> [] are dropped. 103 stays although only 4 of its 5 counted clicks
#    remain (counts are not recomputed).
# 3. max date 04-07T12:00:00 (s25) -> split 04-06T12:00:00; s19 is exactly on it -> dropped.
#    train (< split), by date, ties in file order: s11, s13, s16, s18, s17, s15, s27, s20
#    test (> split) by date: s24 07:02, s22 08:02, s23 08:31, s21 09:40, s28 10:06, s25 12:00
# 4. ids by first appearance: 101->1, 102->2 (s11), 103->3, 104->4 (s13), 105->5 (s16)
#    train: [1,2,1] [2,3,4] [5,1,2] [3,4] [2,5] [4,5] [4,5] [4,1,3]  (12 samples)
# 5. test: s24 [102,103]->[2,3]; s22 [101]->dropped; s23 []->dropped; s21 [1,2]; s28 [101,104]->[1,4];
#    s25 [4,5].

YOO_TRAIN = [[1, 2, 1], [2, 3, 4], [5, 1, 2], [3, 4], [2, 5], [4, 5], [4, 5], [4, 1, 3]]
YOO_TEST = [[2, 3], [1, 2], [1, 4], [4, 5]]


def test_yoochoose_handmade():
    assert detect_format(YOO_MINI) == "yoochoose"
    ds = preprocess(YOO_MINI)
    assert ds.raw_format == "yoochoose" and ds.name == "yoochoose"
    assert lists(ds.sessions) == YOO_TRAIN
    assert lists(ds.test_sessions) == YOO_TEST
    assert samples(ds.test) == [([2], 3), ([1], 2), ([1], 4), ([4], 5)]
    assert ds.item_map == {101: 1, 102: 2, 103: 3, 104: 4, 105: 5}
    assert ds.n_items == 5 and ds.rec_frequency == 1 and ds.min_prefix == 1
    assert len(ds.train) + len(ds.valid) == 12
    st = ds.preprocess_stats
    assert st["rows"] == 43 and st["sessions_read"] == 18
    assert st["sessions_after_length_filter"] == 17 and st["sessions_after_item_filter"] == 15
    assert st["sessions_on_split_date"] == 1
    max_date = int(datetime.datetime(2014, 4, 7, 12, 0, 0, tzinfo=datetime.timezone.utc).timestamp())
    assert st["max_date"] == max_date and st["split_date"] == max_date - 86400
    assert st["avg_length"] == pytest.approx((20 + 8) / 12)


def test_yoochoose_header_line_is_accepted(tmp_path):
    p = tmp_path / "clicks.dat"
    p.write_text("session_id,timestamp,item_id,category\n" + YOO_MINI.read_text())
    ds = preprocess(p)
    assert lists(ds.sessions) == YOO_TRAIN and lists(ds.test_sessions) == YOO_TEST


def test_yoochoose_fraction_srgnn_way():
    # samples per training session (SR-GNN rule): 2 2 2 1 1 1 1 2 -> 12; cumulative 2 4 6 7 8 9 10 12
    # 1/4: k = int(12/4) = 3 -> samples 9..11 = s27's one and s20's two -> sessions s27, s20
    ds = preprocess(YOO_MINI, fraction=0.25)
    assert ds.name == "yoochoose1_4"
    assert lists(ds.sessions) == [[4, 5], [4, 1, 3]] and len(ds.train) + len(ds.valid) == 3
    # ids, n_items and the test set are those of the full training set
    assert ds.n_items == 5 and lists(ds.test_sessions) == YOO_TEST
    assert ds.item_map == {101: 1, 102: 2, 103: 3, 104: 4, 105: 5}
    # 1/6: k = 2 -> samples 10, 11 = s20's two
    assert lists(preprocess(YOO_MINI, fraction=1 / 6).sessions) == [[4, 1, 3]]
    # 0.1: k = int(1.2) = 1 -> sample 11 is s20's SECOND sample: the whole session s20 is kept
    # (2 samples where SR-GNN's train.txt would have 1; all_train_seq.txt is the same)
    ds = preprocess(YOO_MINI, fraction=0.1)
    assert lists(ds.sessions) == [[4, 1, 3]] and len(ds.train) + len(ds.valid) == 2
    assert ds.preprocess_stats["fraction_samples_srgnn"] == 1
    # compact_ids: renumber the kept sessions (104->1, 101->2, 103->3) and restrict the test set:
    # [2,3]->[3] dropped, [1,2]->[2] dropped, [1,4]->[2,1], [4,5]->[1] dropped
    ds = preprocess(YOO_MINI, fraction=0.1, compact_ids=True)
    assert lists(ds.sessions) == [[1, 2, 3]] and lists(ds.test_sessions) == [[2, 1]]
    assert ds.n_items == 3 and ds.item_map == {104: 1, 101: 2, 103: 3}
    with pytest.raises(DataError, match=re.escape("fraction=0.01 keeps no training sample (int(12 * 0.01) = 0)")):
        preprocess(YOO_MINI, fraction=0.01)
    for bad in (0, 1.5, "1/64", True):
        with pytest.raises(DataError, match="must be a number in"):
            preprocess(YOO_MINI, fraction=bad)


# --------------------------------------------------------------------------- Retailrocket events.csv (handmade)
#
# tests/fixtures/retailrocket-events-mini.csv, 56 rows; times below are seconds after
# S = 1433116800 (2015-06-01T00:00:00Z), D = 86400; ".500" = extra milliseconds.
# View events by visitor (file order differs: v9's rows come before v7's, v5's 201@3900 row
# comes before its 204@3801 row, v11/v12 are interleaved):
#   v5:  201@100, 202@1900.500, 203@2000 | 204@3801, 201@3900, 205@3950, 204@4000 |
#        202@6000, 203@6100, 206@6200
#        - 100 -> 1900.500 is 1800.5 s, but times are truncated to seconds first: gap 1800, not
#          > 1800 -> same session; 2000 -> 3801 is 1801 s -> new session
#        - an addtocart at 5000 and a transaction at 6250 are not views: they are dropped BEFORE
#          sessionizing, so 4000 -> 6000 (2000 s) starts a new session
#   v7:  203@D, 207@D+5, 204@D+10, 203@D+20          v8: 205@D+30, 201@D+40, 202@D+50
#        (v8 starts 10 s after v7 ends: a new visitor is a new session)
#   v9:  201@D, 205@D+10, 204@D+20 (date D+20 like v7: tie -> visitor order, v7 first)
#   v10: 206@2D.700, 201@2D.100, 202@2D+5 -> 206 and 201 both at second 2D: file order [206, 201]
#   v20: 206, 999, 999 (2D+100..300)    v21: 207, 201 (length 2)    v22: 207, 201, 206, 207 (2D+2000..2200)
#   v11: 201@3D-20, 202@3D-10, 203@3D.999 -> date 3D
#   v12: 201@3D-100, 205@3D-80, 203@3D-50, 202@3D+1 -> date 3D+1
#   v13: 204, 206, 207, 204 (5D..5D+30)    v14: 205, 208, 208 (9D..)    v15: 208 x3 (9D+100..)
#   v16: 202@10D-20, 203@10D-10, 208@10D | 201@10D+1900 (gap 1900 -> a one-event session)
#   v30: one addtocart only -> nothing
# 1. sessions with <= 2 events dropped: v21 and v16's last one (so 10D+1900 is not the max date)
# 2. counts once: 201: v5 v5 v8 v9 v10 v22 v11 v12 = 8; 202: 7; 203: 7; 204: 6;
#    205: v5 v8 v9 v12 v14 = 5; 206: v5 v10 v20 v22 v13 = 5; 207: v7 v22 x2 v13 = 4 (5 in the file,
#    v21's is not counted) -> dropped; 208: 6; 999: 2 -> dropped.
#    v20 -> [206] and v22 -> [201, 206] have <= 2 left -> dropped (206 keeps its count of 5).
# 3. max date 10D (v16) -> split 3D; v11 (3D, its .999 truncated) is on the split date -> dropped.
#    train by date, ties in (visitor, time) order: v5a, v5b, v5c, v7, v9, v8, v10
#    test by date: v12 (3D+1), v13 (5D+30), v14 (9D+20), v15 (9D+120), v16 (10D)
# 4. ids: 201->1, 202->2, 203->3, 204->4, 205->5, 206->6
#    train: [1,2,3] [4,1,5,4] [2,3,6] [3,4,3] [1,5,4] [5,1,2] [6,1,2]
# 5. test: v12 [1,5,3,2]; v13 [4,6,4]; v14 [205,208,208] -> [5] dropped; v15 -> [] dropped;
#    v16 [202,203,208] -> [2,3] kept (2 clicks) but gives no sample with prefixes >= 2.

RR_TRAIN = [[1, 2, 3], [4, 1, 5, 4], [2, 3, 6], [3, 4, 3], [1, 5, 4], [5, 1, 2], [6, 1, 2]]
RR_TEST = [[1, 5, 3, 2], [4, 6, 4], [2, 3]]


def test_retailrocket_handmade():
    assert detect_format(RR_MINI) == "retailrocket"
    ds = preprocess(RR_MINI)
    assert ds.raw_format == "retailrocket" and ds.name == "retailrocket"
    assert lists(ds.sessions) == RR_TRAIN
    assert lists(ds.test_sessions) == RR_TEST
    assert samples(ds.test) == [([1, 5, 3], 2), ([1, 5], 3), ([4, 6], 4)]
    assert ds.item_map == {201: 1, 202: 2, 203: 3, 204: 4, 205: 5, 206: 6}
    assert ds.n_items == 6 and ds.rec_frequency == 6 and ds.min_prefix == 2
    assert len(ds.train) + len(ds.valid) == 8  # len - 2 per session
    st = ds.preprocess_stats
    assert st["rows"] == 56 and st["sessions_read"] == 17
    assert st["sessions_after_length_filter"] == 15 and st["sessions_after_item_filter"] == 13
    assert st["sessions_on_split_date"] == 1
    assert st["max_date"] == 1433116800 + 10 * 86400 and st["split_date"] == 1433116800 + 3 * 86400
    assert st["test_samples"] == 3 and st["train_samples"] == 8


# --------------------------------------------------------------------------- pickle layout round trip

@pytest.mark.parametrize("path,name", [(YOO_MINI, None), (RR_MINI, "retailrocket"), (DIGI_SAMPLE, None)])
def test_pickle_layout_round_trip(tmp_path, path, name):
    if not path.is_file():
        pytest.skip(f"shared data absent: {path} not found")
    ds = preprocess(path)
    root = save_pickle_layout(ds, tmp_path / "out", with_train=True)
    with open(root / "all_train_seq.txt", "rb") as f:
        assert pickle.load(f) == lists(ds.sessions)
    back = load_dataset(name, root=root)
    assert lists(back.sessions) == lists(ds.sessions)
    assert samples(back.test) == samples(ds.test)
    assert len(back.train) == len(ds.train) and len(back.valid) == len(ds.valid)
    assert back.min_prefix == ds.min_prefix
    # without train.txt too
    root2 = save_pickle_layout(ds, tmp_path / "out2")
    assert not (root2 / "train.txt").exists()
    assert lists(load_dataset(name, root=root2).sessions) == lists(ds.sessions)


def test_package_level_preprocess_delegates():
    ds = data_pkg.preprocess(RR_MINI, valid_fraction=0.3, name="rr-mini")
    assert ds.name == "rr-mini" and lists(ds.sessions) == RR_TRAIN
    assert len(ds.valid_sessions) == 2  # floor(7 * 0.3)
