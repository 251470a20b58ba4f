"""Loading a `Dataset`: by name from the shared data folder, from any folder in the SR-GNN
pickle layout, or generated (`synthetic`). The one place that knows where the shared
datasets live (`data_root`, `$MTD_FAST_DATA`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from .dataset import Dataset
from .pickle_io import read_samples, read_sessions, safe_load_pickle
from .store import DataError, Sessions, expand_samples
from .synthetic import make_synthetic

__all__ = ["load_dataset", "data_root", "dataset_dir", "DATASETS", "DATA_ENV"]

DATA_ENV = "MTD_FAST_DATA"

# name -> (sub-folder under $MTD_FAST_DATA, min prefix length of the sample rule, rec_frequency f)
DATASETS: dict[str, tuple[str, int, int]] = {
    "diginetica": ("diginetica", 1, 4),
    "retailrocket": ("retailrocket", 2, 6),
    "yoochoose1_64": ("yoochoose1_64", 1, 1),
    "yoochoose1_64_mtd": ("yoochoose1_64/mtd_compact_ids", 1, 1),
    "yoochoose1_4": ("yoochoose1_4", 1, 1),
}


def data_root(project: Optional[os.PathLike | str] = None) -> Optional[Path]:
    """The folder that holds the shared datasets, one sub-folder each (`DATASETS`).

    `$MTD_FAST_DATA` when it is set (the one variable: the library, the CLI, tests, benches
    and scripts all read it here). Otherwise, given a project checkout (tests, benches and
    scripts pass theirs), `<project>/../shared/data`, the layout of this project's
    machines; else None: the library has no default folder."""
    base = os.environ.get(DATA_ENV)
    if base:
        return Path(base)
    if project is not None:
        return Path(project).resolve().parent / "shared" / "data"
    return None


def dataset_dir(name: str, project: Optional[os.PathLike | str] = None) -> Path:
    """The folder of dataset `name` (a key of `DATASETS`) under `data_root(project)`; a
    DataError asking for root=PATH or $MTD_FAST_DATA when there is no data root."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: use one of {', '.join(['synthetic', *DATASETS])}")
    base = data_root(project)
    if base is None:
        raise DataError(f"dataset {name!r}: pass root=PATH (--data-dir) or set {DATA_ENV} to the folder "
                        f"holding {DATASETS[name][0]}/")
    return base / DATASETS[name][0]


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
    Every dataset accepts `valid_fraction=0.1` and `compact_ids=False`: True renumbers the
    items that occur (after `fraction`) to 1..D and keeps the original ids in
    `Dataset.original_ids`; a model trained on it takes and returns original ids in
    `recommend`. Use it when ids are sparse (`train` refuses a catalogue that is mostly
    unused rows, see `Dataset.check_catalogue`).
    """
    compact_ids = kwargs.pop("compact_ids", False)
    if not isinstance(compact_ids, bool):
        raise DataError(f"compact_ids={compact_ids!r} must be True or False")
    ds = _load_dataset(name, root, fraction, kwargs)
    return ds.compact() if compact_ids else ds


def _load_dataset(name: Optional[str], root: Optional[os.PathLike | str], fraction: float,
                  kwargs: dict[str, Any]) -> Dataset:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0.0 < fraction <= 1.0:
        raise DataError(f"fraction={fraction!r} must be a number in (0, 1]")
    valid_fraction = kwargs.pop("valid_fraction", 0.1)
    if name is None and root is None:
        name = "synthetic"
    if name == "synthetic":
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
    return _load_pickle_layout(name, Path(root) if root is not None else dataset_dir(name), min_prefix, freq,
                               fraction, valid_fraction)
