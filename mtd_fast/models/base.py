"""Common interface of every model (MTD and the baselines).

The trainer only talks to this interface:
- `prepare_batch(items, lengths)`: padded NumPy batch -> dict of tensors on the model's
  device (per-batch structures such as SR-GNN session graphs are built here, by the
  fast builders, never inside `forward`);
- `scores(batch)`: (batch, M) scores of items 1..M; `loss(batch, targets)`: mean
  cross-entropy; `rec_parameters()`: what the recommendation optimizer trains and the
  L2 term covers;
- non-neural models (`neural = False`) are fitted in one pass by `fit(dataset)`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

from ..config import MTDConfig
from ..data.store import DataError, Sessions, pad_batch

__all__ = ["SessionModel", "Batch"]

Batch = dict  # name -> tensor


class SessionModel(nn.Module):
    """Base class: an item catalogue 1..M, a session encoder and full-catalogue scoring."""

    name = "base"
    neural = True  # False: fitted by `fit(dataset)` in one pass, no optimizer
    uses_global_graph = False

    def __init__(self, n_items: int, config: Optional[MTDConfig] = None, dropout: float = 0.3,
                 backend: Any = None) -> None:
        super().__init__()
        if not isinstance(n_items, int) or n_items < 1:
            raise ValueError(f"n_items={n_items!r} must be a positive int")
        self.n_items = n_items
        self.config = config or MTDConfig()
        self.dropout_p = float(dropout)
        self.backend = backend
        # an empty buffer that moves with .to(device): tells `device` even for models without parameters
        self.register_buffer("_device_probe", torch.zeros(0), persistent=False)

    # ---- to implement -------------------------------------------------------------------
    def score_parts(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries (batch, dim), item table (M, dim)) such that scores = queries @ table.T,
        row j of the table being item j+1. Models that score by a dot product with an item
        table implement this, so the loss and the ranking can work on it without the full
        (batch, M) logits; the others override `scores` instead."""
        raise NotImplementedError

    def scores(self, batch: Batch) -> torch.Tensor:
        """(batch, M) scores for item ids 1..M."""
        q, table = self.score_parts(batch)
        return q @ table.t()

    def fit(self, dataset) -> None:  # non-neural models only
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self._device_probe.device

    @property
    def max_len(self) -> Optional[int]:
        return self.config.max_session_length

    def prepare_batch(self, items: np.ndarray, lengths: np.ndarray) -> Batch:
        dev = self.device
        return {"items": torch.from_numpy(items).to(dev), "lengths": torch.from_numpy(lengths).to(dev)}

    def loss(self, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.scores(batch), targets.long() - 1)

    def rec_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def l2_penalty(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """0.5 * sum ||theta||^2 (multiplied by `l2` in the trainer)."""
        return 0.5 * sum((p * p).sum() for p in params)

    def batch_from_sessions(self, seqs: Sessions, index: np.ndarray) -> Batch:
        items, lengths = pad_batch(seqs, index, self.max_len)
        return self.prepare_batch(items, lengths)

    @torch.no_grad()
    def recommend(self, sessions: Sequence[Sequence[int]], k: int = 20, batch_size: int = 1024) -> torch.Tensor:
        """Top-k item ids (len(sessions), k), best first, for sessions given as lists of item ids."""
        if not isinstance(k, int) or not 1 <= k <= self.n_items:
            raise ValueError(f"k={k!r} must be an int in [1, n_items={self.n_items}]")
        if isinstance(sessions, np.ndarray) and sessions.ndim == 2:
            sessions = sessions.tolist()  # equal-length sessions as a 2-D array
        if isinstance(sessions, (str, bytes)) or not isinstance(sessions, Sequence):
            raise TypeError("sessions must be a list of lists of item ids (or a 2-D array of equal-length sessions)")
        for i, s in enumerate(sessions):
            if isinstance(s, (str, bytes)) or not isinstance(s, (Sequence, np.ndarray)):
                raise TypeError(f"sessions[{i}] must be a list of item ids, got {type(s).__name__}")
            if len(s) == 0:
                raise DataError(f"sessions[{i}] is empty: a session needs at least one click")
            for j, x in enumerate(s):
                if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or not 1 <= x <= self.n_items:
                    raise DataError(f"sessions[{i}][{j}] = {x!r} is not an item id in 1..{self.n_items}")
        packed = Sessions.from_lists([list(map(int, s)) for s in sessions])
        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(packed), batch_size):
                idx = np.arange(start, min(start + batch_size, len(packed)))
                sc = self.scores(self.batch_from_sessions(packed, idx))
                out.append(sc.topk(k, dim=1).indices + 1)
        finally:
            self.train(was_training)
        return torch.cat(out).cpu().long() if out else torch.zeros((0, k), dtype=torch.long)
