"""`MTD.explain`: the weights are the reference ops' and agree with a direct computation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mtd_fast import MTD, MTDConfig
from mtd_fast.data import DataError, Sessions
from mtd_fast.models.explain import attention_weights
from mtd_fast.ops.session_attention import session_attention_ref

SESSIONS = [[3], [5, 5, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [30, 1]]  # 12 > d / heads = 4 key columns


def perturbed_mtd(**cfg) -> MTD:
    """A small MTD whose every weight (LayerNorm biases too) is moved off its init."""
    torch.manual_seed(0)
    m = MTD(30, MTDConfig(hidden_size=8, **cfg), dropout=0.3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
        m.item_emb.weight[0].zero_()
        m.pos_emb.weight[0].zero_()
    return m.train()


def direct_attention(blk, x: torch.Tensor) -> torch.Tensor:
    """softmax(Q K^T / sqrt(d_h)) with the causal mask, per head, for one session x (n, d)."""
    n, d = x.shape
    h = blk.num_heads
    q, k = blk.wq(x).view(n, h, d // h).transpose(0, 1), blk.wk(x).view(n, h, d // h).transpose(0, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // h)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)  # (h, n, n)


@pytest.mark.parametrize("cfg", [dict(num_blocks=2, num_heads=2), dict(item_attention="product"),
                                 dict(use_self_attention=False), dict(use_self_attention=False,
                                                                      use_position_decay=False)],
                         ids=["mtd-2blocks-2heads", "product", "mtd-at", "mtd-va"])
def test_explain_weights_sum_to_one_and_match_a_direct_computation(cfg):
    model = perturbed_mtd(**cfg)
    out = model.explain(SESSIONS)
    assert model.training  # the mode is restored
    assert out["sessions"] == SESSIONS
    with torch.no_grad():
        model.eval()
        for i, s in enumerate(SESSIONS):
            n = len(s)
            items = torch.tensor(s)
            x = model.item_emb.weight[items]
            if model.config.use_self_attention:
                x = x + model.pos_emb(torch.arange(n, 0, -1))
                att = out["self_attention"][i]
                assert att.shape == (len(model.blocks), model.config.num_heads, n, n)
                torch.testing.assert_close(att.sum(-1), torch.ones(att.shape[:-1]), atol=1e-6, rtol=0)
                assert torch.all(att.triu(1) == 0)  # causal
                for j, blk in enumerate(model.blocks):
                    torch.testing.assert_close(att[j], direct_attention(blk, x), atol=1e-6, rtol=1e-5)
                    x = blk(x[None], torch.tensor([n]))[0]  # the model's own block (fast backend)
            else:
                assert out["self_attention"] is None
            a = model.att_last(x[-1])
            e = torch.sigmoid(a + model.att_item(x) if model.config.item_attention == "additive"
                              else a * model.att_item(x)) @ model.att_vec
            torch.testing.assert_close(out["alpha"][i], torch.softmax(e, 0), atol=1e-6, rtol=1e-5)
            if model.config.use_position_decay:
                beta = torch.softmax(-model.config.position_decay * torch.arange(n, 0, -1).float(), 0)
                torch.testing.assert_close(out["position_decay"][i], beta, atol=1e-7, rtol=1e-6)
                assert out["position_decay"][i].argmax() == n - 1  # the most recent click weighs most
            else:
                assert out["position_decay"] is None
            assert abs(float(out["alpha"][i].sum()) - 1) < 1e-6
        batch = model.batch_from_sessions(Sessions.from_lists(SESSIONS), np.arange(len(SESSIONS)))
        torch.testing.assert_close(out["representation"], model.encode(batch["items"], batch["lengths"]),
                                   atol=1e-5, rtol=1e-5)


def test_attention_weights_are_the_reference_ops():
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 7, 6) for _ in range(3))
    lengths = torch.tensor([7, 2, 5])
    w = attention_weights(q, k, lengths, num_heads=3)  # d / heads = 2 < 7: several one-hot calls
    assert w.shape == (3, 3, 7, 7)
    assert torch.all(w[1, :, 2:] == 0)  # padded queries have no weights
    vh = v.view(3, 7, 3, 2).transpose(1, 2)
    torch.testing.assert_close((w @ vh).transpose(1, 2).reshape(3, 7, 6), session_attention_ref(q, k, v, lengths, 3))


def test_explain_rejects_bad_sessions():
    model = perturbed_mtd()
    with pytest.raises(DataError, match="non-empty"):
        model.explain([[1, 2], []])
    with pytest.raises(DataError, match="outside 1..30"):
        model.explain([[31]])
    with pytest.raises(TypeError):
        model.explain("12")
