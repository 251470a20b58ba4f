"""The SR-GNN / MTD pickle layout: `all_train_seq.txt`, `test.txt`, optional `train.txt`.

Pickles can run code when loaded, so they go through a restricted unpickler that refuses
every class: the files of this layout hold only lists, tuples and ints, which pickle
encodes without naming a class. A file that asks for any class is rejected.
"""
from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from .store import DataError, Samples, Sessions

__all__ = ["safe_load_pickle", "read_sessions", "read_samples", "write_pickle_layout"]


class _NoClassUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:  # noqa: D401
        raise pickle.UnpicklingError(
            f"refusing to load class {module}.{name}: these files may hold only lists, tuples and ints"
        )


def safe_load_pickle(path: os.PathLike | str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    data = path.read_bytes()
    try:
        return _NoClassUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: not a safe SR-GNN pickle ({exc})") from None
    except Exception as exc:  # truncated, not a pickle at all, ...
        raise DataError(f"{path}: cannot be read as a pickle ({type(exc).__name__}: {exc})") from None


_MAX_ID = 2**31 - 1


def _check_item(x: Any, path: Path, where: str) -> None:
    if type(x) is not int:
        raise DataError(f"{path}: {where}: item {x!r} is not an int")
    if x < 1:
        raise DataError(f"{path}: {where}: item id {x} is < 1 (ids start at 1; 0 is padding)")
    if x > _MAX_ID:
        raise DataError(f"{path}: {where}: item id {x} does not fit in int32")


def _validate_seqs(seqs: Any, path: Path, what: str) -> Sessions:
    if not isinstance(seqs, (list, tuple)):
        raise DataError(f"{path}: {what} must be a list of sessions, got {type(seqs).__name__}")
    for i, s in enumerate(seqs):
        if not isinstance(s, (list, tuple)):
            raise DataError(f"{path}: {what}[{i}] is a {type(s).__name__}, not a list of item ids")
        if not s:
            raise DataError(f"{path}: {what}[{i}] is an empty session")
        for j, x in enumerate(s):
            if type(x) is not int or not 1 <= x <= _MAX_ID:
                _check_item(x, path, f"{what}[{i}][{j}]")
    return Sessions.from_lists(seqs)


def read_sessions(path: os.PathLike | str) -> Sessions:
    """`all_train_seq.txt`: a pickled list of sessions (lists of item ids >= 1)."""
    path = Path(path)
    obj = safe_load_pickle(path)
    sessions = _validate_seqs(obj, path, "sessions")
    if len(sessions) == 0:
        raise DataError(f"{path}: holds no sessions")
    return sessions


def read_samples(path: os.PathLike | str) -> Samples:
    """`train.txt` / `test.txt`: a pickled pair `(X, Y)` (tuple or 2-element list)."""
    path = Path(path)
    obj = safe_load_pickle(path)
    if not isinstance(obj, (list, tuple)) or len(obj) != 2:
        raise DataError(f"{path}: expected a pair (prefixes, targets), got {type(obj).__name__}"
                        + (f" of length {len(obj)}" if isinstance(obj, (list, tuple)) else ""))
    xs, ys = obj
    prefixes = _validate_seqs(xs, path, "prefixes")
    if not isinstance(ys, (list, tuple)):
        raise DataError(f"{path}: targets must be a list of item ids, got {type(ys).__name__}")
    if len(ys) != len(prefixes):
        raise DataError(f"{path}: {len(prefixes)} prefixes but {len(ys)} targets")
    for k, y in enumerate(ys):
        if type(y) is not int or not 1 <= y <= _MAX_ID:
            _check_item(y, path, f"targets[{k}]")
    return Samples(prefixes, np.asarray(ys, dtype=np.int64).astype(np.int32))


def write_pickle_layout(root: os.PathLike | str, train_sessions: Sessions, test: Samples,
                        train: Samples | None = None) -> Path:
    """Write `all_train_seq.txt` and `test.txt` (and `train.txt` when given), protocol 3."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "all_train_seq.txt", "wb") as f:
        pickle.dump(train_sessions.to_lists(), f, protocol=3)
    with open(root / "test.txt", "wb") as f:
        pickle.dump((test.prefixes.to_lists(), test.targets.tolist()), f, protocol=3)
    if train is not None:
        with open(root / "train.txt", "wb") as f:
            pickle.dump((train.prefixes.to_lists(), train.targets.tolist()), f, protocol=3)
    return root
