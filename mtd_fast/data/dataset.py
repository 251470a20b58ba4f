"""`Dataset`: training sessions, validation split, samples, test samples, catalogue size.

Validation is the chronologically last `valid_fraction` (10%) of the kept training
sessions; the global graph and all training use the other sessions only, and model
selection never looks at the test set (`MTD_SPEC.md` section 1).
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Optional, Union

import numpy as np

from .store import DataError, Samples, Sessions, expand_samples

__all__ = ["Dataset", "DataWarning", "SPARSE_RATIO", "SPARSE_MIN_WASTE"]


class DataWarning(UserWarning):
    """Loaded data that is valid but probably not what the user expects (filterable)."""


# A catalogue whose largest id implies more than SPARSE_RATIO x the distinct items (and at least
# SPARSE_MIN_WASTE unused rows) is refused by `train` before the model is allocated: one stray id
# of 1,000,000 among 300 sessions allocated a 1M-row model and ran out of memory 48 s later. The
# floor keeps legitimate gaps (fraction=, yoochoose1_64's unseen test items: ~20k rows) allowed.
SPARSE_RATIO = 10
SPARSE_MIN_WASTE = 100_000

class Dataset:
    """Sessions and samples of one dataset, split for honest evaluation.

    Attributes
    ----------
    name, n_items (M: item ids are 1..M, 0 is padding), rec_frequency (f default),
    min_prefix (sample rule), sessions (all kept training sessions, chronological),
    train_sessions / valid_sessions (the split), train / valid / test (`Samples`).
    """

    def __init__(self, name: str, sessions: Sessions, test: Samples, *, n_items: Optional[int] = None,
                 min_prefix: int = 1, rec_frequency: int = 1, valid_fraction: float = 0.1,
                 test_sessions: Union[None, Sessions, Callable[[], Sessions]] = None, source: str = "") -> None:
        if len(sessions) == 0:
            raise DataError(f"dataset {name!r}: no training sessions")
        if np.any(sessions.lengths == 0):
            bad = int(np.flatnonzero(sessions.lengths == 0)[0])
            raise DataError(f"dataset {name!r}: training session {bad} is empty")
        if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) \
                or not 0.0 <= valid_fraction < 1.0:
            raise DataError(f"valid_fraction={valid_fraction!r} must be a number in [0, 1)")
        if sessions.items.size and sessions.items.min() < 1:
            raise DataError(f"dataset {name!r}: training sessions hold item ids < 1")
        if len(test) and np.any(test.prefixes.lengths == 0):
            bad = int(np.flatnonzero(test.prefixes.lengths == 0)[0])
            raise DataError(f"dataset {name!r}: test sample {bad} has an empty prefix")
        if len(test) and (test.targets.min() < 1 or (test.prefixes.items.size and test.prefixes.items.min() < 1)):
            raise DataError(f"dataset {name!r}: test samples hold item ids < 1")
        self.name = name
        self.sessions = sessions
        self.test = test
        self._test_sessions = test_sessions  # a Sessions, or a loader called by stats() only
        self.min_prefix = int(min_prefix)
        self.rec_frequency = int(rec_frequency)
        self.valid_fraction = float(valid_fraction)
        self.source = source
        seen = max(sessions.max_item(), test.max_item() if len(test) else 0)
        if n_items is None:
            n_items = seen
        elif seen > n_items:
            raise DataError(f"dataset {name!r}: item id {seen} is out of range for n_items={n_items}")
        self.n_items = int(n_items)
        self.original_ids: Optional[np.ndarray] = None  # set by compact(): new id -> original id ([0] = 0)
        self._distinct: Optional[int] = None
        n = len(sessions)
        n_valid = int(math.floor(n * self.valid_fraction)) if n > 1 else 0
        self.train_sessions = sessions.slice(0, n - n_valid)
        self.valid_sessions = sessions.slice(n - n_valid, n)
        self.train = expand_samples(self.train_sessions, self.min_prefix)
        self.valid = expand_samples(self.valid_sessions, self.min_prefix)
        if len(self.train) == 0:
            raise DataError(f"dataset {name!r}: the training sessions yield no samples "
                            f"(every session is shorter than {self.min_prefix + 1} clicks)")
        self._warn_unseen_test_items()

    def _warn_unseen_test_items(self) -> None:
        """Test targets never clicked in the training sessions cannot be learned; SR-GNN's
        preprocessing (`mtd_fast.data.preprocess`) drops such items from the test set, but
        files in the pickle layout may keep them (yoochoose1_64 does, by the standard split)."""
        if len(self.test) == 0:
            return
        unseen = ~np.isin(self.test.targets, self.sessions.items)
        k = int(unseen.sum())
        if k:
            items = np.unique(self.test.targets[unseen]).size
            share = 100 * k / len(self.test)
            warnings.warn(f"dataset {self.name!r}: {k} of {len(self.test)} test samples ({share:.1f}%) "
                          f"have a target never clicked in the training sessions ({items} distinct items); they stay "
                          "in the test set and count as misses for every model (SR-GNN's preprocessing, "
                          "mtd_fast.data.preprocess, drops such items)", DataWarning, stacklevel=2)

    @property
    def distinct_items(self) -> int:
        """How many different item ids the training sessions and test samples hold."""
        if self._distinct is None:
            self._distinct = int(self._all_ids().size)
        return self._distinct

    def _all_ids(self) -> np.ndarray:
        parts = [self.sessions.items, self.test.prefixes.items, self.test.targets]
        return np.unique(np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]))

    def check_catalogue(self) -> None:
        """Refuse sparse ids before a model is allocated (`SPARSE_RATIO`): the model has one
        row per id up to the largest, so ids must be (nearly) dense."""
        d = self.distinct_items
        if self.n_items > SPARSE_RATIO * d and self.n_items - d >= SPARSE_MIN_WASTE:
            raise DataError(
                f"dataset {self.name!r}: the largest item id is {self.n_items}, so a model needs {self.n_items:,} "
                f"item rows, but only {d:,} distinct items occur ({self.n_items - d:,} rows would never be used). "
                f"Load it with load_dataset(..., compact_ids=True) (CLI: --compact-ids), which renumbers the items "
                f"1..{d} and keeps the mapping: recommend() then takes and returns the original ids")

    def compact(self) -> "Dataset":
        """This dataset with item ids renumbered 1..D (D distinct items, in increasing order of
        the original id, so ties between items rank the same) and `original_ids` (new id ->
        original id) kept; a model trained on it translates in `recommend`."""
        ids = self._all_ids()
        ts = self.test_sessions
        if ts is not None and ts.items.size:  # full test sessions (stats only) may hold other items
            ids = np.union1d(ids, ts.items.astype(np.int64))
        ids = ids[ids > 0]

        def remap(x: Sessions) -> Sessions:
            return Sessions(x.offsets, (np.searchsorted(ids, x.items) + 1).astype(np.int32))

        test = Samples(remap(self.test.prefixes), (np.searchsorted(ids, self.test.targets) + 1).astype(np.int32))
        with warnings.catch_warnings():  # the unseen-test-items warning was given for the original ids
            warnings.simplefilter("ignore", DataWarning)
            out = Dataset(self.name, remap(self.sessions), test, n_items=int(ids.size), min_prefix=self.min_prefix,
                          rec_frequency=self.rec_frequency, valid_fraction=self.valid_fraction,
                          test_sessions=None if ts is None else remap(ts), source=self.source)
        out.original_ids = np.concatenate([[0], ids]).astype(np.int64)
        return out

    def empty_valid_reason(self) -> str:
        """Why the validation split holds no sample (for the trainer's warning)."""
        n, vf = len(self.sessions), self.valid_fraction
        if vf == 0:
            return "valid_fraction=0"
        if len(self.valid_sessions) == 0:
            return (f"valid_fraction={vf:g} of {n} training sessions rounds down to 0 sessions")
        return (f"the {len(self.valid_sessions)} validation sessions (the last {vf:.0%} of the training sessions) "
                f"all have fewer than {self.min_prefix + 1} clicks, so the prefix rule yields no sample from them")

    def split(self, name: str) -> Samples:
        if name in ("valid", "validation"):
            return self.valid
        if name == "test":
            return self.test
        if name == "train":
            return self.train
        raise ValueError(f"unknown split {name!r}: use 'train', 'valid' or 'test'")

    @property
    def test_sessions(self) -> Optional[Sessions]:
        """Full test sessions when known (raw preprocessing, synthetic data, or an
        `all_test_seq_time.txt` beside the pickles, read on first use)."""
        if callable(self._test_sessions):
            self._test_sessions = self._test_sessions()
        return self._test_sessions

    def stats(self) -> dict[str, Any]:
        """Table 1 of the paper: counts of this dataset as loaded."""
        test_sessions = self.test_sessions if self.test_sessions is not None else self.test.to_sessions()
        items = np.union1d(np.unique(self.sessions.items), np.unique(test_sessions.items))
        clicks = self.sessions.n_clicks + test_sessions.n_clicks
        return {
            "dataset": self.name,
            "train_sessions": len(self.sessions),
            "train_samples": len(self.train),
            "valid_samples": len(self.valid),
            "test_samples": len(self.test),
            "items": int(items.size),
            "clicks": int(clicks),
            "avg_session_length": round(float(self.sessions.lengths.mean()), 3),
        }

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, n_items={self.n_items}, train={len(self.train)}, "
                f"valid={len(self.valid)}, test={len(self.test)})")
