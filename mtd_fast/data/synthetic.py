"""The default dataset for a user with no data: sessions with a planted transition structure.

Each item has a handful of preferred successors (a sparse Markov chain over the catalogue);
a session starts at a popular item and follows those transitions, with some random jumps
to popular items and some returns to an earlier click of the session. A model that learns
transitions therefore beats popularity by a wide, measurable margin, and a model that
also uses the session context (returns) does better still.
"""
from __future__ import annotations

import numpy as np

from .dataset import Dataset
from .store import DataError, Sessions, expand_samples

__all__ = ["make_synthetic"]


def make_synthetic(n_sessions: int = 5000, n_items: int = 500, seed: int = 0, avg_length: float = 5.0,
                   fraction: float = 1.0, valid_fraction: float = 0.1) -> Dataset:
    """Generate `n_sessions` sessions over items 1..n_items, in time order; the last 10%
    of them are the test set (SR-GNN sample rule), the rest the training sessions."""
    if isinstance(n_sessions, bool) or not isinstance(n_sessions, int) or n_sessions < 20:
        raise DataError(f"n_sessions={n_sessions!r} must be an int >= 20")
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 10:
        raise DataError(f"n_items={n_items!r} must be an int >= 10")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DataError(f"seed={seed!r} must be an int >= 0")
    if not isinstance(avg_length, (int, float)) or not 2.0 <= avg_length <= 50.0:
        raise DataError(f"avg_length={avg_length!r} must be a number in [2, 50]")
    rng = np.random.default_rng(seed)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.8
    pop = rng.permutation(pop / pop.sum())  # popularity not tied to the id
    n_succ = 4
    succ = rng.integers(0, n_items, size=(n_items, n_succ))
    succ_p = np.array([0.45, 0.25, 0.18, 0.12])
    max_len = 30
    lengths = np.minimum(2 + rng.poisson(avg_length - 2, size=n_sessions), max_len)
    seqs = np.zeros((n_sessions, max_len), dtype=np.int64)
    seqs[:, 0] = rng.choice(n_items, size=n_sessions, p=pop)
    for t in range(1, max_len):
        prev = seqs[:, t - 1]
        follow = succ[prev, rng.choice(n_succ, size=n_sessions, p=succ_p)]
        jump = rng.choice(n_items, size=n_sessions, p=pop)
        back = seqs[np.arange(n_sessions), rng.integers(0, t, size=n_sessions)]  # revisit an earlier click
        u = rng.random(n_sessions)
        seqs[:, t] = np.where(u < 0.75, follow, np.where(u < 0.9, back, jump))
    seqs += 1  # ids start at 1
    valid = np.arange(max_len)[None, :] < lengths[:, None]
    offsets = np.zeros(n_sessions + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    sessions = Sessions(offsets, seqs[valid].astype(np.int32))
    n_test = max(1, n_sessions // 10)
    train_sessions = sessions.slice(0, n_sessions - n_test)
    test_sessions = sessions.slice(n_sessions - n_test, n_sessions)
    return Dataset("synthetic", train_sessions.most_recent(fraction), expand_samples(test_sessions, 1), n_items=n_items,
                   min_prefix=1, rec_frequency=1, valid_fraction=valid_fraction, test_sessions=test_sessions,
                   source=f"synthetic(n_sessions={n_sessions}, n_items={n_items}, seed={seed})")
