"""mtd_fast: fast MTD (AAAI 2021) session-based recommendation.

    import mtd_fast
    ds = mtd_fast.load_dataset("synthetic")
    result = mtd_fast.train(ds, model="mtd", epochs=3)
    result.metrics["P@20"], result.metrics["MRR@20"]
"""
from __future__ import annotations

from .config import MTDConfig, TrainConfig
from .data import Dataset, load_dataset
from .models import MTD
from .ops import available_backends
from .provenance import __version__
from .serialization import load, save
from .train import TrainResult, evaluate, train

__all__ = ["train", "evaluate", "load_dataset", "Dataset", "MTDConfig", "TrainConfig", "MTD", "TrainResult",
           "save", "load", "available_backends", "__version__"]
