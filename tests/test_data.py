"""Data layer: packed storage, sample rules, pickle layout, loaders, bad input."""
from __future__ import annotations

import math
import pickle

import numpy as np
import pytest

from mtd_fast.data import (
    DataError,
    Samples,
    Sessions,
    expand_samples,
    load_dataset,
    pad_batch,
    read_samples,
    read_sessions,
    write_pickle_layout,
)

from testing import shared_path


def sr_gnn_rule(seqs, min_prefix=1):
    """The rule as a plain loop (SR-GNN process_seqs), to check the vectorized one."""
    xs, ys = [], []
    for s in seqs:
        for i in range(1, len(s) - min_prefix + 1):
            xs.append(s[:-i])
            ys.append(s[-i])
    return xs, ys


def test_sessions_roundtrip_and_select():
    seqs = [[1, 2, 3], [4], [5, 6], [7, 8, 9, 10]]
    s = Sessions.from_lists(seqs)
    assert s.offsets.tolist() == [0, 3, 4, 6, 10]
    assert s.items.dtype == np.int32 and s.to_lists() == seqs
    assert s.select(np.array([3, 1])).to_lists() == [[7, 8, 9, 10], [4]]
    assert s.slice(1, 3).to_lists() == [[4], [5, 6]]
    assert s[-1].tolist() == [7, 8, 9, 10]


@pytest.mark.parametrize("min_prefix", [1, 2])
def test_expand_samples_matches_loop(min_prefix):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 50, size=rng.integers(1, 9)).tolist() for _ in range(300)]
    xs, ys = sr_gnn_rule(seqs, min_prefix)
    got = expand_samples(Sessions.from_lists(seqs), min_prefix)
    assert got.prefixes.to_lists() == xs
    assert got.targets.tolist() == ys


def test_expand_samples_longest_first():
    got = expand_samples(Sessions.from_lists([[1, 2, 3, 4]]))
    assert got.prefixes.to_lists() == [[1, 2, 3], [1, 2], [1]]
    assert got.targets.tolist() == [4, 3, 2]
    rr = expand_samples(Sessions.from_lists([[1, 2, 3, 4], [5, 6]]), min_prefix=2)
    assert rr.prefixes.to_lists() == [[1, 2, 3], [1, 2]] and rr.targets.tolist() == [4, 3]


def test_pad_batch_and_truncation():
    s = Sessions.from_lists([[1, 2, 3, 4, 5], [6], [7, 8]])
    items, lengths = pad_batch(s, np.array([0, 1, 2]))
    assert items.tolist() == [[1, 2, 3, 4, 5], [6, 0, 0, 0, 0], [7, 8, 0, 0, 0]]
    assert lengths.tolist() == [5, 1, 2]
    items, lengths = pad_batch(s, np.array([0, 2]), max_len=3)
    assert items.tolist() == [[3, 4, 5], [7, 8, 0]]  # most recent items kept
    assert lengths.tolist() == [3, 2]


def test_samples_to_sessions_inverts_the_rule():
    seqs = [[1, 2, 3], [3, 4], [5, 5, 6, 2], [9, 8]]
    assert expand_samples(Sessions.from_lists(seqs)).to_sessions().to_lists() == seqs


def _write(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=3)


def test_pickle_layout_roundtrip(tmp_path):
    train = Sessions.from_lists([[1, 2, 3], [2, 3], [4, 1, 2], [3, 4, 4], [1, 4]])
    test = Samples.from_lists([[1, 2], [3]], [4, 1])
    write_pickle_layout(tmp_path, train, test)
    ds = load_dataset(root=tmp_path)
    assert ds.sessions.to_lists() == train.to_lists()
    assert ds.test.prefixes.to_lists() == [[1, 2], [3]] and ds.test.targets.tolist() == [4, 1]
    assert ds.n_items == 4 and ds.rec_frequency == 1
    # 10% of 5 sessions rounds down to no validation session
    assert len(ds.valid_sessions) == 0 and ds.train_sessions.to_lists() == train.to_lists()


def test_validation_is_last_ten_percent(tmp_path):
    seqs = [[i % 7 + 1, (i + 1) % 7 + 1, (i + 3) % 7 + 1] for i in range(40)]
    write_pickle_layout(tmp_path, Sessions.from_lists(seqs), Samples.from_lists([[1]], [2]))
    ds = load_dataset(root=tmp_path)
    assert ds.valid_sessions.to_lists() == seqs[36:]
    assert ds.train_sessions.to_lists() == seqs[:36]
    assert len(ds.train) == 36 * 2 and len(ds.valid) == 4 * 2


def test_train_txt_accepted_alone_and_checked(tmp_path):
    seqs = [[1, 2, 3], [2, 3], [4, 1, 2]]
    xs, ys = sr_gnn_rule(seqs)
    _write(tmp_path / "train.txt", (xs, ys))
    _write(tmp_path / "test.txt", [[[1]], [2]])
    ds = load_dataset(root=tmp_path, valid_fraction=0.0)
    assert ds.sessions.to_lists() == seqs
    # with all_train_seq beside it, an inconsistent train.txt is an error, not a silent choice
    _write(tmp_path / "all_train_seq.txt", seqs + [[1, 4]])
    with pytest.raises(DataError, match="train.txt"):
        load_dataset(root=tmp_path)


class Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    _write(tmp_path / "all_train_seq.txt", [[1, 2], Evil()])
    with pytest.raises(DataError, match="refusing to load class"):
        read_sessions(tmp_path / "all_train_seq.txt")


@pytest.mark.parametrize("obj,msg", [
    ([[1, 2], []], r"sessions\[1\] is an empty session"),
    ([[1, 0]], r"sessions\[0\]\[1\]: item id 0 is < 1"),
    ([[1, "a"]], r"sessions\[0\]\[1\]: item 'a' is not an int"),
    ([[1, 2.0]], r"is not an int"),
    ({"a": 1}, "must be a list of sessions"),
    ([[1, 2**40]], "does not fit in int32"),
])
def test_bad_sessions_named(tmp_path, obj, msg):
    _write(tmp_path / "s.txt", obj)
    with pytest.raises(DataError, match=msg):
        read_sessions(tmp_path / "s.txt")


def test_bad_samples_named(tmp_path):
    _write(tmp_path / "t.txt", ([[1], [2]], [3]))
    with pytest.raises(DataError, match="2 prefixes but 1 targets"):
        read_samples(tmp_path / "t.txt")
    _write(tmp_path / "t.txt", ([[1]], [-3]))
    with pytest.raises(DataError, match=r"targets\[0\]"):
        read_samples(tmp_path / "t.txt")
    (tmp_path / "garbage.txt").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="garbage.txt"):
        read_samples(tmp_path / "garbage.txt")


def test_loader_errors(tmp_path):
    with pytest.raises(DataError, match="unknown dataset 'nope'"):
        load_dataset("nope", root=tmp_path)
    with pytest.raises(DataError, match="no such folder"):
        load_dataset("diginetica", root=tmp_path / "missing")
    with pytest.raises(DataError, match="test.txt is missing"):
        load_dataset(root=tmp_path)
    with pytest.raises(DataError, match="fraction"):
        load_dataset("synthetic", fraction=0)
    with pytest.raises(TypeError, match="unknown option 'colour'"):
        load_dataset("synthetic", colour="red")
    with pytest.raises(DataError, match="would be ignored"):
        load_dataset("synthetic", root=tmp_path)
    with pytest.raises(DataError, match="valid_fraction='0.1'"):
        load_dataset("synthetic", valid_fraction="0.1")
    with pytest.raises(DataError, match="seed='a'"):
        load_dataset("synthetic", seed="a")


def test_env_root(tmp_path, monkeypatch):
    monkeypatch.delenv("MTD_FAST_DATA", raising=False)
    with pytest.raises(DataError, match="MTD_FAST_DATA"):
        load_dataset("diginetica")
    write_pickle_layout(tmp_path / "diginetica", Sessions.from_lists([[1, 2], [2, 3]]), Samples.from_lists([[1]], [2]))
    monkeypatch.setenv("MTD_FAST_DATA", str(tmp_path))
    ds = load_dataset("diginetica")
    assert ds.rec_frequency == 4 and ds.n_items == 3


def test_synthetic_is_deterministic_and_structured():
    a = load_dataset("synthetic", n_sessions=800, n_items=100, seed=3)
    b = load_dataset("synthetic", n_sessions=800, n_items=100, seed=3)
    c = load_dataset("synthetic", n_sessions=800, n_items=100, seed=4)
    assert np.array_equal(a.sessions.items, b.sessions.items)
    assert not np.array_equal(a.sessions.items, c.sessions.items)
    assert len(a.test_sessions) == 80 and len(a.sessions) == 720
    assert a.n_items == 100 and a.sessions.items.max() <= 100 and a.sessions.items.min() >= 1
    # planted structure: the most frequent successor of an item is far more likely than chance
    s = a.sessions
    src = np.concatenate([s[i][:-1] for i in range(len(s))])
    dst = np.concatenate([s[i][1:] for i in range(len(s))])
    pairs = np.unique(src * 1000 + dst, return_counts=True)[1]
    assert pairs.max() > 10 * len(src) / 100 ** 2


def test_fraction_keeps_most_recent_sessions(tmp_path):
    seqs = [[i + 1, i + 2] for i in range(10)]
    write_pickle_layout(tmp_path, Sessions.from_lists(seqs), Samples.from_lists([[1]], [12]))
    ds = load_dataset(root=tmp_path, fraction=0.25)
    assert ds.sessions.to_lists() == seqs[-3:]  # ceil(0.25 * 10) = 3
    assert ds.n_items == 12  # ids and M unchanged


@pytest.mark.parametrize("name,folder,sessions,samples,test,items,clicks", [
    ("diginetica", "diginetica", 186670, 719470, 60858, 43097, 982961),
    ("yoochoose1_64", "yoochoose1_64", 116167, 369859, 55898, 17745, 557248),
    ("yoochoose1_64_mtd", "yoochoose1_64/mtd_compact_ids", 116167, 369859, 55400, 17376, 556659),
    ("retailrocket", "retailrocket", 126168, 433648, 15132, 36968, 710666),
])
def test_real_datasets_reproduce_published_counts(name, folder, sessions, samples, test, items, clicks):
    ds = load_dataset(name, root=shared_path(folder))
    st = ds.stats()
    assert st["train_sessions"] == sessions
    assert st["train_samples"] + st["valid_samples"] == samples
    assert st["test_samples"] == test and st["items"] == items and st["clicks"] == clicks
    assert st["valid_samples"] == len(expand_samples(ds.sessions.slice(len(ds.sessions) - math.floor(0.1 * sessions),
                                                                       len(ds.sessions)), ds.min_prefix))


def test_real_fraction():
    ds = load_dataset("diginetica", root=shared_path("diginetica"), fraction=1 / 4)
    assert len(ds.sessions) == math.ceil(186670 / 4) and ds.n_items == 43097 and len(ds.test) == 60858
