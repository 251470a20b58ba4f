"""`MTD.explain(sessions)`: the weights MTD puts on a session's clicks (paper Figure 5).

The forward of `MTD.encode` is replayed in evaluation mode on the padded batch, with the
model's own layers and the REFERENCE ops (`mtd_fast.ops.*_ref`), whatever backend the
model trains with. The weights themselves are read out of the reference ops rather than
recomputed beside them: attending over one-hot values gives `session_attention_ref`'s
attention matrix column by column (output_i = sum_j A_ij e_j = A_i), and aggregating
one-hot rows gives `aggregate_ref`'s alpha and beta (x_s = sum_i alpha_i e_i = alpha). So
these are exactly the weights the reference forward uses, never a second formula.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..data.store import DataError, Sessions
from ..ops.aggregate import aggregate_ref
from ..ops.common import position_index
from ..ops.session_attention import session_attention_ref

__all__ = ["explain", "attention_weights", "aggregation_weights"]


def attention_weights(q: torch.Tensor, k: torch.Tensor, lengths: torch.Tensor, num_heads: int = 1) -> torch.Tensor:
    """The softmax weights (batch, heads, seq_len, seq_len) of `session_attention_ref`
    (causal, key-padded; rows of padded queries are 0), read out of the op itself by
    attending over one-hot values. q, k: (batch, seq_len, dim)."""
    b, L, d = q.shape
    dh = d // num_heads
    out = q.new_zeros(b, num_heads, L, L)
    for start in range(0, L, dh):  # dh key positions per call (one call while L <= d / heads)
        n = min(dh, L - start)
        v = q.new_zeros(b, L, num_heads, dh)
        v[:, torch.arange(start, start + n), :, torch.arange(n)] = 1.0  # key start+j -> value component j
        o = session_attention_ref(q, k, v.reshape(b, L, d), lengths, num_heads=num_heads)  # (B, L, d)
        out[..., start:start + n] = o.reshape(b, L, num_heads, dh)[..., :n].permute(0, 2, 1, 3)
    return out


def aggregation_weights(hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor, gamma: Any,
                        mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(alpha, beta), each (batch, seq_len) and 0 on padding: the attentive-aggregation and
    position-decay weights of `aggregate_ref` for projected items hp (B, L, d) and the
    projected last state a (B, d), read out by aggregating one-hot rows."""
    b, L, _ = hp.shape
    onehot = torch.eye(L, dtype=hp.dtype, device=hp.device).expand(b, L, L)
    return aggregate_ref(onehot, hp, a, g, lengths, gamma=gamma, mode=mode)


def _as_sessions(model, sessions: Sequence[Sequence[int]]) -> Sessions:
    if isinstance(sessions, np.ndarray) and sessions.ndim == 2:
        sessions = sessions.tolist()
    if isinstance(sessions, (str, bytes)) or not isinstance(sessions, Sequence) or len(sessions) == 0:
        raise TypeError("explain() takes a non-empty list of sessions, each a list of item ids")
    lists = []
    for i, s in enumerate(sessions):
        ids = [int(x) for x in s] if isinstance(s, (Sequence, np.ndarray)) and not isinstance(s, (str, bytes)) else None
        if not ids:
            raise DataError(f"sessions[{i}] must be a non-empty list of item ids, got {s!r}")
        if min(ids) < 1 or max(ids) > model.n_items:
            raise DataError(f"sessions[{i}] holds an id outside 1..{model.n_items}")
        lists.append(ids)
    return Sessions.from_lists(lists)


@torch.no_grad()
def explain(model, sessions: Sequence[Sequence[int]]) -> dict[str, Any]:
    """Per-session weights of an MTD model (evaluation mode, reference ops).

    Returns a dict:
    - "sessions": the item ids explained, oldest first (the most recent
      `max_session_length` when the model truncates);
    - "self_attention": per session a (num_blocks, num_heads, n, n) tensor, row i the
      causal attention of click i over clicks 0..i (each row sums to 1); None for models
      without self-attention (MTD-va, MTD-at);
    - "alpha": per session (n,), the attentive-aggregation weights (sum 1);
    - "position_decay": per session (n,), beta_i = softmax(-gamma * pos_i) (sum 1); None
      when the model has no position-decay branch (MTD-va);
    - "gamma": the decay rate; "representation": (B, d) the session vectors q that these
      weights produce, equal to `model.encode` in evaluation mode.
    """
    cfg = model.config
    packed = _as_sessions(model, sessions)
    batch = model.batch_from_sessions(packed, np.arange(len(packed)))
    items, lengths = batch["items"], batch["lengths"]
    was_training = model.training
    model.eval()
    try:
        table = model.item_table() if callable(getattr(model, "item_table", None)) else model.item_emb.weight
        b, L = items.shape
        valid = (torch.arange(L, device=items.device)[None, :] < lengths[:, None])[..., None]  # (B, L, 1)
        x = table[items]  # (B, L, d)
        attention = []
        if cfg.use_self_attention:
            pos = position_index(lengths, L).clamp_max(cfg.max_position)
            x = (x + model.pos_emb(pos)) * valid  # X0
            for blk in model.blocks:
                q, k, v = blk.wq(x), blk.wk(x), blk.wv(x)
                attention.append(attention_weights(q, k, lengths, blk.num_heads))  # (B, h, L, L)
                h1 = blk.ln1(x + session_attention_ref(q, k, v, lengths, num_heads=blk.num_heads))
                x = blk.ln2(h1 + blk.w2(F.relu(blk.w1(h1)))) * valid  # padded rows back to 0
        else:
            x = x * valid
        last = x[torch.arange(b, device=x.device), lengths - 1]  # x_t (B, d)
        hp, a = model.att_item(x) * valid, model.att_last(last)
        alpha, beta = aggregation_weights(hp, a, model.att_vec, lengths, model.gamma, cfg.item_attention)
        x_s, p_s = aggregate_ref(x, hp, a, model.att_vec, lengths, gamma=model.gamma, mode=cfg.item_attention)
        parts = [last, x_s, p_s] if cfg.use_position_decay else [last, x_s]
        rep = model.combine(torch.cat(parts, dim=-1))
    finally:
        model.train(was_training)
    ns = lengths.tolist()
    att = torch.stack(attention, 1) if attention else None  # (B, blocks, h, L, L)
    return {
        "sessions": [items[i, :n].tolist() for i, n in enumerate(ns)],
        "self_attention": None if att is None else [att[i, :, :, :n, :n].cpu() for i, n in enumerate(ns)],
        "alpha": [alpha[i, :n].cpu() for i, n in enumerate(ns)],
        "position_decay": [beta[i, :n].cpu() for i, n in enumerate(ns)] if cfg.use_position_decay else None,
        "gamma": float(model.gamma),
        "representation": rep.cpu(),
    }
