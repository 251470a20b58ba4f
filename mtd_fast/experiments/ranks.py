"""Rank files: beside each result file, the target's rank of every validation and test sample
under the run's picked model (`runner.ranks_path`, written by `runner.run_all`), which paired
comparisons between runs read (`experiments.paired`).

The file is `np.savez_compressed` of uint8 arrays "valid" and "test", ranks beyond the largest
metric cut-off stored as RANKS_CLIP (21), so every metric at K <= 20 is exact from it at one
byte a sample. The result record says which file (name, sha256) and which samples (count and
a digest of prefixes and targets per split); `read_ranks` uses a file only when all of that
holds and its ranks give the record's metrics back.
"""
from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..metrics import METRIC_KEYS
from .report import atomic_save

__all__ = ["RANKS_CLIP", "RANKS_SUFFIX", "RANK_SPLITS", "samples_digest", "write_ranks", "metrics_from_ranks",
           "read_ranks"]

RANKS_CLIP = 21
RANKS_SUFFIX = ".ranks.npz"
RANK_SPLITS = ("valid", "test")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def samples_digest(samples) -> str:
    """Which samples, in which order (prefixes and targets): a paired comparison needs both
    runs to have ranked the same ones."""
    h = hashlib.sha256()
    for a in (samples.prefixes.offsets, samples.prefixes.items, samples.targets):
        h.update(np.ascontiguousarray(a, dtype=np.int64).tobytes())
    return h.hexdigest()


def write_ranks(path: Path, model, ds, batch_size: int) -> dict[str, Any]:
    """Rank every validation and test sample's target under `model` (`train.sample_ranks`),
    write them to `path` (uint8, clipped at RANKS_CLIP, compressed) and return what the
    result record says of the file: its name, sha256, clip value, and per split the sample
    count and a digest of the samples (so two files are paired only over the same samples)."""
    from ..train import sample_ranks

    arrays, samples = {}, {}
    for split in RANK_SPLITS:
        part = ds.split(split)
        arrays[split] = np.minimum(sample_ranks(model, part, batch_size), RANKS_CLIP).astype(np.uint8)
        samples[split] = {"n": int(len(part)), "samples_sha256": samples_digest(part)}
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    atomic_save(path, lambda tmp: Path(tmp).write_bytes(data))
    return {"file": path.name, "sha256": _sha256(data), "clip": RANKS_CLIP, "samples": samples}


def metrics_from_ranks(ranks) -> dict[str, float]:
    """P/MRR/NDCG @5/10/20 (x100) of an array of ranks, as `MetricAccumulator` computes them."""
    import torch

    from ..metrics import MetricAccumulator

    acc = MetricAccumulator()
    acc.add(torch.from_numpy(np.asarray(ranks, dtype=np.int64)))
    return acc.result()


def read_ranks(folder: os.PathLike | str, record: dict[str, Any]) -> tuple[Optional[dict[str, Any]], Optional[str]]:
    """({split: uint8 ranks}, None) for the rank file a result record names in `folder`, or
    (None, why not): the record names none, the file is missing or not the one recorded
    (sha256), or its ranks do not give the record's metrics (test: `metrics`; validation:
    the picked epoch's validation metrics), within 1e-6."""
    info = record.get("ranks")
    if not isinstance(info, dict) or not isinstance(info.get("file"), str):
        return None, "the record names no rank file"
    path = Path(folder) / info["file"]
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"{path}: unreadable ({exc.strerror or type(exc).__name__})"
    if _sha256(data) != info.get("sha256"):
        return None, f"{path}: not the file its record names (sha256 differs)"
    try:
        with np.load(io.BytesIO(data)) as z:
            ranks = {split: z[split] for split in RANK_SPLITS}
    except (OSError, ValueError, KeyError) as exc:
        return None, f"{path}: unreadable rank file ({exc})"
    picked = next((h for h in record["history"] if h.get("epoch") == record.get("best_epoch")), {})
    want = {"valid": picked.get("valid"), "test": record["metrics"]}
    for split, r in ranks.items():
        n = (info.get("samples") or {}).get(split, {}).get("n")
        if r.dtype != np.uint8 or r.ndim != 1 or len(r) != n or (len(r) and (r.min() < 1 or r.max() > RANKS_CLIP)):
            return None, f"{path}: the {split} ranks are not {n} values in 1..{RANKS_CLIP}"
        got = metrics_from_ranks(r)
        if want[split] is not None and any(abs(got[k] - want[split][k]) > 1e-6 for k in METRIC_KEYS):
            return None, f"{path}: the {split} ranks do not give the record's {split} metrics"
    return ranks, None
