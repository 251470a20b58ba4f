"""Common interface of every model (MTD and the baselines).

The trainer only talks to this interface:
- `prepare_batch(items, lengths)`: padded NumPy batch -> dict of tensors on the model's
  device (per-batch structures such as SR-GNN session graphs are built here, by the
  fast builders, never inside `forward`);
- `scores(batch)`: (batch, M) scores of items 1..M; `loss(batch, targets)`: mean
  cross-entropy; `rec_parameters()`: what the recommendation optimizer trains and the
  L2 term covers;
- non-neural models (`neural = False`) are fitted in one pass by `fit(dataset)`.

Models whose scores are a dot product with an item table implement `score_parts(batch)`
-> (q (B, d), table (M, d)) instead of `scores`. Then the loss runs through
`mtd_fast.ops.linear_cross_entropy` and ranking / `recommend` through the chunked
functions of `mtd_fast.metrics`: no (batch, M) logits are ever allocated (at 1M items
they would be 2 GB per batch of 512, and their gradient as much again).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..config import MTDConfig
from ..data.store import DataError, Sessions, pad_batch
from ..metrics import topk_from_parts, topk_from_scores
from .repeat import biased_cross_entropy, biased_cross_entropy_ref, biased_topk, dense_biased_scores

SparseTerm = tuple[torch.Tensor, torch.Tensor]  # (ids (B, U), bias (B, U)): `score_terms`

__all__ = ["SessionModel", "Batch"]

Batch = dict  # name -> tensor


class _HalfSquaredNorm(torch.autograd.Function):
    """0.5 * ||p||^2 without the (p * p) temporary, with gradient grad * p: one elementwise
    pass per step over the item table where autograd through (p * p).sum() makes three (the
    product, then one product per operand in its backward), each a full pass over a table
    of M x d floats (~20 ms per step at 1 thread on Diginetica's 43k x 100). The gradient
    is bit-identical to that of 0.5 * (p * p).sum() (x 0.5 and x 2 are exact)."""

    @staticmethod
    def forward(ctx, p: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(p)
        flat = p.reshape(-1)
        return 0.5 * torch.dot(flat, flat)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (p,) = ctx.saved_tensors
        return grad * p


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
        q, table, extra = self.score_terms(batch)
        if extra is not None:
            return dense_biased_scores(q, table, *extra)
        return q @ table.t()

    def score_terms(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, Optional[SparseTerm]]:
        """`score_parts` and a sparse term on top of them: (q, table, None), or (q, table,
        (ids (B, U), bias (B, U))) when the scores are q @ table.T plus `bias` at the session's
        items `ids` (0 = padding; MTD's `repeat_bias`). The loss, ranking and top-k read this."""
        q, table = self.score_parts(batch)
        return q, table, None

    def fit(self, dataset) -> None:  # non-neural models only
        raise NotImplementedError

    # ---- shared ---------------------------------------------------------------------------
    @property
    def has_score_parts(self) -> bool:
        """True when this model implements `score_parts` (its scores are q @ table.T)."""
        return type(self).score_parts is not SessionModel.score_parts

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
        """Mean full-softmax cross-entropy of the targets (item ids 1..M) over the catalogue."""
        targets = self._check_targets(targets)
        if self.has_score_parts:
            return self.terms_loss(*self.score_terms(batch), targets)
        return F.cross_entropy(self.scores(batch), targets.long() - 1)

    def terms_loss(self, q: torch.Tensor, table: torch.Tensor, extra, targets: torch.Tensor) -> torch.Tensor:
        """`parts_loss`, or with a sparse term (`score_terms`) the exact cross-entropy of the
        biased scores (`models.repeat.biased_cross_entropy`, its log-sum-exp from the Triton
        kernels where the model's backend spec picks the Triton `linear_cross_entropy`; its
        dense formula where it picks the reference)."""
        if extra is None:
            return self.parts_loss(q, table, targets)
        name = ops.describe("linear_cross_entropy", self.backend, q.device)
        if name == "reference":
            return biased_cross_entropy_ref(q, table, targets.long() - 1, *extra)
        return biased_cross_entropy(q, table, targets.long() - 1, *extra, triton=name == "triton")

    def parts_loss(self, q: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of q @ table.T against targets (item ids 1..M), through
        `ops.linear_cross_entropy` (the model's backend spec; no (batch, M) logits on the
        chunked and Triton backends)."""
        return ops.linear_cross_entropy(q, table, targets.long() - 1, backend=self.backend)

    def _check_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """Target ids must be items 1..M: 0 is the padding id. Checked on CPU tensors only
        (on a GPU the op's asynchronous device assert catches them without a sync)."""
        if targets.device.type == "cpu" and targets.numel():
            lo, hi = int(targets.min()), int(targets.max())
            if lo < 1 or hi > self.n_items:
                bad = lo if lo < 1 else hi
                raise DataError(f"target item id {bad} is not an item of this model (ids 1..{self.n_items})"
                                + ("; 0 is the padding id, never a target" if bad == 0 else ""))
        return targets

    def rec_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def l2_penalty(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """0.5 * sum ||theta||^2 (multiplied by `l2` in the trainer); its gradient is theta."""
        return sum(_HalfSquaredNorm.apply(p) for p in params)

    def batch_from_sessions(self, seqs: Sessions, index: np.ndarray) -> Batch:
        items, lengths = pad_batch(seqs, index, self.max_len)
        return self.prepare_batch(items, lengths)

    def _topk(self, batch: Batch, k: int) -> torch.Tensor:
        """Columns (B, k) of the k best items, best first (NaN first, then score descending,
        ties by the smaller id: `mtd_fast.metrics.topk_from_scores`); a running top-k over
        chunks of the catalogue for models with `score_parts`."""
        if self.has_score_parts:
            q, table, extra = self.score_terms(batch)
            if extra is not None:
                return biased_topk(q, table, *extra, k)
            return topk_from_parts(q, table, k)
        return topk_from_scores(self.scores(batch), k)

    @torch.no_grad()
    def recommend(self, sessions: Sequence[Sequence[int]], k: int = 20, batch_size: int = 1024) -> torch.Tensor:
        """Top-k item ids (len(sessions), k), best first, for sessions given as lists of item ids."""
        if not isinstance(k, int) or not 1 <= k <= self.n_items:
            raise ValueError(f"k={k!r} must be an int in [1, n_items={self.n_items}]")
        if isinstance(sessions, np.ndarray) and sessions.ndim == 2:
            sessions = sessions.tolist()  # equal-length sessions as a 2-D array
        if isinstance(sessions, (str, bytes)) or not isinstance(sessions, Sequence):
            raise TypeError("sessions must be a list of lists of item ids (or a 2-D array of equal-length sessions)")
        original_ids = getattr(self, "original_ids", None)  # set when trained on load_dataset(compact_ids=True)
        if original_ids is not None:
            from ..data.ids import to_compact_ids, to_original_ids

            sessions = to_compact_ids(original_ids, sessions)  # original ids in (and out, below)
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
                out.append(self._topk(self.batch_from_sessions(packed, idx), k) + 1)
        finally:
            self.train(was_training)
        top = torch.cat(out).cpu().long() if out else torch.zeros((0, k), dtype=torch.long)
        return top if original_ids is None else to_original_ids(original_ids, top)
