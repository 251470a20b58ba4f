"""`Dataset`: training sessions, validation split, samples, test samples, catalogue size.

Validation is the chronologically last `valid_fraction` (10%) of the kept training
sessions; the global graph and all training use the other sessions only, and model
selection never looks at the test set (`MTD_SPEC.md` section 1).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

import numpy as np

from .pickle_io import read_samples, read_sessions, safe_load_pickle
from .store import DataError, Samples, Sessions, expand_samples

__all__ = ["Dataset", "load_dataset", "DATASETS"]

# name -> (sub-folder under $MTD_FAST_DATA, min prefix length of the sample rule, rec_frequency f)
DATASETS: dict[str, tuple[str, int, int]] = {
    "diginetica": ("diginetica", 1, 4),
    "retailrocket": ("retailrocket", 2, 6),
    "yoochoose1_64": ("yoochoose1_64", 1, 1),
    "yoochoose1_64_mtd": ("yoochoose1_64/mtd_compact_ids", 1, 1),
    "yoochoose1_4": ("yoochoose1_4", 1, 1),
}


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
        n = len(sessions)
        n_valid = int(math.floor(n * self.valid_fraction)) if n > 1 else 0
        self.train_sessions = sessions.slice(0, n - n_valid)
        self.valid_sessions = sessions.slice(n - n_valid, n)
        self.train = expand_samples(self.train_sessions, self.min_prefix)
        self.valid = expand_samples(self.valid_sessions, self.min_prefix)
        if len(self.train) == 0:
            raise DataError(f"dataset {name!r}: the training sessions yield no samples "
                            f"(every session is shorter than {self.min_prefix + 1} clicks)")

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


def _resolve_root(name: str, root: Optional[os.PathLike | str]) -> Path:
    if root is not None:
        return Path(root)
    base = os.environ.get("MTD_FAST_DATA")
    if not base:
        raise DataError(f"dataset {name!r}: pass root=PATH or set MTD_FAST_DATA to the folder holding {name}/")
    return Path(base) / DATASETS[name][0]


def _read_timed_sessions(path: Path) -> Sessions:
    raw = safe_load_pickle(path)
    try:
        return Sessions.from_lists([[int(c[0]) for c in s] for s in raw])
    except (TypeError, IndexError, ValueError):
        raise DataError(f"{path}: expected a list of sessions of (item, time) pairs") from None


def _load_pickle_layout(name: str, root: Path, min_prefix: int, rec_frequency: int, fraction: float,
                        valid_fraction: float) -> Dataset:
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (dataset {name!r})")
    seq_path, train_path, test_path = root / "all_train_seq.txt", root / "train.txt", root / "test.txt"
    if not test_path.is_file():
        raise DataError(f"{root}: test.txt is missing (expected the SR-GNN layout: all_train_seq.txt, test.txt)")
    if seq_path.is_file():
        sessions = read_sessions(seq_path)
        if train_path.is_file():
            given = read_samples(train_path)
            derived = expand_samples(sessions, min_prefix)
            if len(given) != len(derived) or not np.array_equal(given.targets, derived.targets):
                raise DataError(
                    f"{train_path}: {len(given)} samples do not match the {len(derived)} that the sample rule "
                    f"(prefixes >= {min_prefix}) gives from {seq_path.name}; remove one of the two files")
    elif train_path.is_file():
        # Only samples: rebuild the sessions (longest prefix + target) for the graph and the split.
        sessions = read_samples(train_path).to_sessions()
    else:
        raise DataError(f"{root}: neither all_train_seq.txt nor train.txt is present")
    test = read_samples(test_path)
    test_sessions = None
    time_path = root / "all_test_seq_time.txt"
    if time_path.is_file():  # full test sessions with times: exact click counts for stats(), read lazily
        test_sessions = lambda: _read_timed_sessions(time_path)  # noqa: E731
    n_items = max(sessions.max_item(), test.max_item())  # before `fraction`: ids and M stay those of the full set
    return Dataset(name, sessions.most_recent(fraction), test, n_items=n_items, min_prefix=min_prefix,
                   rec_frequency=rec_frequency, valid_fraction=valid_fraction, test_sessions=test_sessions,
                   source=str(root))


def load_dataset(name: Optional[str] = None, *, root: Optional[os.PathLike | str] = None, fraction: float = 1.0,
                 **kwargs: Any) -> Dataset:
    """Load a dataset by name (`diginetica`, `retailrocket`, `yoochoose1_64`,
    `yoochoose1_64_mtd`, `synthetic`) or any folder in the SR-GNN pickle layout (`root=`).

    `fraction` keeps the most recent `ceil(fraction * n)` training sessions (item ids, M and
    the test set unchanged). Synthetic kwargs: `n_sessions=5000, n_items=500, seed=0`.
    Every dataset accepts `valid_fraction=0.1`.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction={fraction!r} must be a number in (0, 1]")
    valid_fraction = kwargs.pop("valid_fraction", 0.1)
    if name is None and root is None:
        name = "synthetic"
    if name == "synthetic":
        from .synthetic import make_synthetic

        if root is not None:
            raise DataError(f"load_dataset('synthetic') generates its data; root={str(root)!r} would be ignored "
                            "(pass name=None with root=PATH to load a folder)")
        allowed = {"n_sessions", "n_items", "seed", "avg_length"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"load_dataset('synthetic') got unknown option {unknown[0]!r}; it takes {sorted(allowed)}")
        return make_synthetic(fraction=fraction, valid_fraction=valid_fraction, **kwargs)
    if kwargs:
        raise TypeError(f"load_dataset({name!r}) got unknown option {sorted(kwargs)[0]!r}")
    if name is None:
        return _load_pickle_layout(Path(root).name or "custom", Path(root), 1, 1, fraction, valid_fraction)
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(['synthetic', *DATASETS])}, "
                        f"or root=PATH for any folder in the SR-GNN pickle layout")
    _, min_prefix, freq = DATASETS[name]
    return _load_pickle_layout(name, _resolve_root(name, root), min_prefix, freq, fraction, valid_fraction)
