"""Packed session storage: one `offsets` array and one `items` array, never lists of lists.

`Sessions` holds variable-length sequences of item ids (`items[offsets[i]:offsets[i+1]]`
is sequence `i`); `Samples` is a `Sessions` of prefixes plus one target per prefix.
Everything that touches every click (sample expansion, padding a batch) is vectorized
NumPy, so a 720k-sample epoch never runs a Python loop per sample.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["Sessions", "Samples", "DataError", "expand_samples", "pad_batch"]


class DataError(ValueError):
    """Bad input data: the message names the file, the record and the field."""


@dataclass(frozen=True)
class Sessions:
    """Variable-length item sequences, packed.

    offsets: int64 (n + 1,), offsets[0] == 0, non-decreasing.
    items:   int32 (offsets[-1],) item ids >= 1.
    """

    offsets: np.ndarray
    items: np.ndarray

    def __post_init__(self) -> None:
        if self.offsets.ndim != 1 or self.offsets.size == 0 or self.offsets[0] != 0:
            raise DataError("Sessions.offsets must be a 1-D array starting at 0")
        if self.items.ndim != 1 or self.offsets[-1] != self.items.size:
            raise DataError(f"Sessions.offsets[-1]={int(self.offsets[-1])} does not match len(items)={self.items.size}")

    @classmethod
    def from_lists(cls, seqs: Sequence[Sequence[int]]) -> "Sessions":
        lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        items = np.fromiter((x for s in seqs for x in s), dtype=np.int64, count=int(offsets[-1]))
        return cls(offsets, items.astype(np.int32))

    @classmethod
    def empty(cls) -> "Sessions":
        return cls(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int32))

    def __len__(self) -> int:
        return self.offsets.size - 1

    def __getitem__(self, i: int) -> np.ndarray:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.items[self.offsets[i]:self.offsets[i + 1]]

    def __iter__(self):
        for i in range(len(self)):
            yield self[i]

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def n_clicks(self) -> int:
        return int(self.offsets[-1])

    def to_lists(self) -> list[list[int]]:
        flat = self.items.tolist()
        off = self.offsets.tolist()
        return [flat[off[i]:off[i + 1]] for i in range(len(self))]

    def select(self, index: np.ndarray) -> "Sessions":
        """The sequences at `index` (any order), packed anew."""
        index = np.asarray(index, dtype=np.int64)
        lens = self.lengths[index]
        offsets = np.zeros(index.size + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        starts = self.offsets[index]
        # position of every output click in the source array
        src = np.repeat(starts - offsets[:-1], lens) + np.arange(offsets[-1], dtype=np.int64)
        return Sessions(offsets, self.items[src])

    def slice(self, start: int, stop: int) -> "Sessions":
        a, b = int(self.offsets[start]), int(self.offsets[stop])
        return Sessions(self.offsets[start:stop + 1] - a, self.items[a:b])

    def max_item(self) -> int:
        return int(self.items.max()) if self.items.size else 0

    def most_recent(self, fraction: float) -> "Sessions":
        """The last ceil(fraction * n) sequences (at least one): the most recent sessions
        of a chronological training set (the `fraction=` of `load_dataset`)."""
        n = len(self)
        return self.slice(n - max(1, math.ceil(fraction * n)), n)


@dataclass(frozen=True)
class Samples:
    """Next-item samples: `prefixes[k]` is the session so far, `targets[k]` the next click."""

    prefixes: Sessions
    targets: np.ndarray  # int32 (n,)

    def __post_init__(self) -> None:
        if self.targets.shape != (len(self.prefixes),):
            raise DataError(f"{len(self.prefixes)} prefixes but {self.targets.shape[0]} targets")

    def __len__(self) -> int:
        return self.targets.size

    @classmethod
    def from_lists(cls, xs: Sequence[Sequence[int]], ys: Sequence[int]) -> "Samples":
        return cls(Sessions.from_lists(xs), np.asarray(ys, dtype=np.int64).astype(np.int32))

    def select(self, index: np.ndarray) -> "Samples":
        return Samples(self.prefixes.select(index), self.targets[index])

    def max_item(self) -> int:
        return max(self.prefixes.max_item(), int(self.targets.max()) if self.targets.size else 0)

    def to_sessions(self) -> Sessions:
        """Rebuild the sessions these samples were cut from (prefix rule, longest first).

        Sample k continues the session of sample k-1 when its prefix is the previous prefix
        minus its last click and its target is that click. Used for statistics of split
        files that ship only samples (SR-GNN `test.txt`).
        """
        n = len(self)
        if n == 0:
            return Sessions.empty()
        lens = self.prefixes.lengths
        starts = self.prefixes.offsets[:-1]
        items = self.prefixes.items
        same = np.zeros(n, dtype=bool)
        cand = np.flatnonzero((lens[1:] == lens[:-1] - 1) & (lens[1:] >= 1)) + 1
        for k in cand:  # only candidates are compared; cheap
            p, c = starts[k - 1], starts[k]
            lk = lens[k]
            if self.targets[k] == items[p + lk] and np.array_equal(items[c:c + lk], items[p:p + lk]):
                same[k] = True
        heads = np.flatnonzero(~same)
        seqs = [np.append(self.prefixes[h], self.targets[h]) for h in heads]
        return Sessions.from_lists([s.tolist() for s in seqs])


def expand_samples(sessions: Sessions, min_prefix: int = 1) -> Samples:
    """Prefix augmentation: for every session s, (s[:-i], s[-i]) for prefixes of length
    len(s)-1 down to `min_prefix`, longest prefix first (SR-GNN `process_seqs`;
    Retailrocket in the MTD code uses min_prefix=2)."""
    lens = sessions.lengths
    counts = np.maximum(lens - min_prefix, 0)  # samples per session
    n = int(counts.sum())
    sess = np.repeat(np.arange(len(sessions)), counts)
    # rank within session: 0 for the longest prefix
    first = np.zeros(len(sessions) + 1, dtype=np.int64)
    np.cumsum(counts, out=first[1:])
    rank = np.arange(n, dtype=np.int64) - np.repeat(first[:-1], counts)
    plen = lens[sess] - 1 - rank
    starts = sessions.offsets[:-1][sess]
    targets = sessions.items[starts + plen]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(plen, out=offsets[1:])
    src = np.repeat(starts - offsets[:-1], plen) + np.arange(offsets[-1], dtype=np.int64)
    return Samples(Sessions(offsets, sessions.items[src]), targets.astype(np.int32))


def pad_batch(seqs: Sessions, index: np.ndarray, max_len: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Left-aligned, 0-padded batch of the sequences at `index`.

    Returns items (B, L) int64 and lengths (B,) int64, with L the longest kept length in
    the batch. With `max_len`, longer sequences keep their most recent `max_len` items.
    """
    index = np.asarray(index, dtype=np.int64)
    starts = seqs.offsets[index]
    lens = seqs.offsets[index + 1] - starts
    if max_len is not None:
        cut = np.maximum(lens - max_len, 0)
        starts = starts + cut
        lens = lens - cut
    width = int(lens.max()) if lens.size else 0
    pos = np.arange(width, dtype=np.int64)
    valid = pos[None, :] < lens[:, None]
    src = np.where(valid, starts[:, None] + pos[None, :], 0)
    out = np.where(valid, seqs.items[src] if seqs.items.size else 0, 0).astype(np.int64)
    return out, lens


def iter_batches(n: int, batch_size: int, rng: Optional[np.random.Generator] = None) -> Iterable[np.ndarray]:
    """Index batches over range(n), shuffled when `rng` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    for s in range(0, n, batch_size):
        yield order[s:s + batch_size]
