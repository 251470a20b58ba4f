"""Seconds per epoch from what was timed: an estimate from timed steps, whole timed
epochs, and a graph phase amortised over the recommendation epochs it serves."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def epoch_estimate(step_seconds: Sequence[float], n_samples: int, batch_size: int) -> dict:
    """Seconds per epoch from timed steps: ceil(n / batch) x median step (the robust
    figure on a shared machine), and x mean (the unbiased one for a sum) beside it."""
    if not step_seconds:
        raise ValueError("no timed steps")
    steps = math.ceil(n_samples / batch_size)
    a = np.asarray(step_seconds, dtype=float)
    med, mean = float(np.median(a)), float(a.mean())
    return {"steps_per_epoch": steps, "timed_steps": int(a.size), "median_step_s": med, "mean_step_s": mean,
            "min_step_s": float(a.min()), "max_step_s": float(a.max()),
            "epoch_s": steps * med, "epoch_s_from_mean": steps * mean}


def measured_epochs(epoch_seconds: Sequence[float], steps_per_epoch: int) -> dict:
    a = np.asarray(epoch_seconds, dtype=float)
    med = float(np.median(a))
    return {"steps_per_epoch": steps_per_epoch, "timed_epochs": int(a.size), "epoch_s": med,
            "epoch_s_from_mean": float(a.mean()), "median_step_s": med / max(steps_per_epoch, 1),
            "epoch_seconds": [float(x) for x in a]}


def amortised(phase_s: float, rec_frequency: int) -> float:
    """Graph-phase seconds per recommendation epoch: one phase every f epochs."""
    if rec_frequency < 1:
        raise ValueError(f"rec_frequency={rec_frequency} must be >= 1")
    return phase_s / rec_frequency
