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

The package, in the order the data flows: `fields` (byte-level parsing: chunked reading
and the vectorized field parsers), `formats` (the table above's formats: rule parameters,
detection, one reader per format), `srgnn` (the common steps: filters, split, renumbering,
test filtering); this module runs them (`preprocess`) and writes the result
(`save_pickle_layout`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from ..dataset import Dataset
from ..pickle_io import write_pickle_layout
from ..store import DataError, expand_samples
from .formats import FORMATS, detect_format, read_diginetica, read_retailrocket, read_yoochoose
from .srgnn import filter_and_split, packed_sessions, renumber, restrict_test, tsv_split

__all__ = ["preprocess", "save_pickle_layout", "detect_format", "FORMATS"]


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
        (tr_off, tr_items), (te_off, te_items), stats, tpath = tsv_split(path, test_path)
        source = f"{path} + {tpath}"
    else:
        reader = {"diginetica": read_diginetica, "yoochoose": read_yoochoose,
                  "retailrocket": read_retailrocket}[format]
        (tr_off, tr_items), (te_off, te_items), stats = filter_and_split(path, format, reader(path))
    uitems = stats.pop("uitems")

    new_id = renumber(tr_off, tr_items, uitems.size)
    n_items = int(new_id.max())
    tr_items = new_id[tr_items]
    te_off, te_items = restrict_test(te_off, te_items, new_id)
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
            again = renumber(tr_off, tr_items, n_items + 1)
            te_off, te_items = restrict_test(te_off, te_items, again)
            if te_off.size == 1:
                raise DataError(f"{path}: no test session is left with fraction={fraction!r} and compact_ids=True")
            tr_items = again[tr_items]
            old = item_ids
            n_items = int(again.max())
            item_ids = np.full(n_items + 1, -1, dtype=np.int64)
            item_ids[again[again > 0]] = old[again > 0]

    train = packed_sessions(tr_off, tr_items)
    test_sessions = packed_sessions(te_off, te_items)
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
