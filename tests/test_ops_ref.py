"""Reference ops against direct per-sample formulas, and the backend dispatch rules."""
from __future__ import annotations

import math

import pytest
import torch

import mtd_fast
from mtd_fast import ops
from mtd_fast.ops import BackendError, aggregate_ref, dispatch, session_attention_ref


def attention_loop(q, k, v, lengths, h, mask=None):
    b, L, d = q.shape
    dh = d // h
    out = torch.zeros_like(q)
    for bi in range(b):
        n = int(lengths[bi])
        for head in range(h):
            sl = slice(head * dh, (head + 1) * dh)
            for i in range(n):
                s = torch.stack([q[bi, i, sl] @ k[bi, j, sl] / math.sqrt(dh) for j in range(i + 1)])
                w = torch.softmax(s, 0)
                if mask is not None:
                    w = w * mask[bi, head, i, :i + 1]
                out[bi, i, sl] = sum(w[j] * v[bi, j, sl] for j in range(i + 1))
    return out


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("with_mask", [False, True])
def test_session_attention_formula(heads, with_mask):
    torch.manual_seed(0)
    lengths = torch.tensor([1, 5, 3])
    q, k, v = (torch.randn(3, 5, 4, dtype=torch.float64) for _ in range(3))
    mask = (torch.rand(3, heads, 5, 5) > 0.3).double() / 0.7 if with_mask else None
    got = session_attention_ref(q, k, v, lengths, heads, mask)
    assert torch.allclose(got, attention_loop(q, k, v, lengths, heads, mask))
    assert torch.all(got[0, 1:] == 0) and torch.all(got[2, 3:] == 0)  # padded queries: zero, not NaN


def test_session_attention_grad_finite_and_gradcheck():
    torch.manual_seed(1)
    lengths = torch.tensor([2, 4])
    q, k, v = (torch.randn(2, 4, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: session_attention_ref(a, b, c, lengths, 2), (q, k, v))
    session_attention_ref(q, k, v, lengths).sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def aggregate_loop(h, hp, a, g, lengths, gamma, mode):
    xs, ps = [], []
    for b in range(h.shape[0]):
        n = int(lengths[b])
        if mode == "additive":
            e = torch.stack([g @ torch.sigmoid(a[b] + hp[b, i]) for i in range(n)])
        else:
            e = torch.stack([g @ torch.sigmoid(a[b] * hp[b, i]) for i in range(n)])
        alpha = torch.exp(e - e.max()) / torch.exp(e - e.max()).sum()
        pos = torch.tensor([n - i for i in range(n)], dtype=h.dtype)
        beta = torch.exp(-gamma * pos) / torch.exp(-gamma * pos).sum()
        xs.append(sum(alpha[i] * h[b, i] for i in range(n)))
        ps.append(sum(beta[i] * h[b, i] for i in range(n)))
    return torch.stack(xs), torch.stack(ps)


@pytest.mark.parametrize("mode", ["additive", "product"])
def test_aggregate_formula(mode):
    torch.manual_seed(2)
    lengths = torch.tensor([1, 6, 3, 6])
    h, hp = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
    h[0, 1:] = 99.0  # padding must be ignored whatever it holds
    a, g = torch.randn(4, 5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    xs, ps = aggregate_ref(h, hp, a, g, lengths, 0.75, mode)
    ex, ep = aggregate_loop(h, hp, a, g, lengths, 0.75, mode)
    assert torch.allclose(xs, ex) and torch.allclose(ps, ep)
    assert torch.allclose(xs[0], h[0, 0]) and torch.allclose(ps[0], h[0, 0])


def test_aggregate_gradcheck_with_learned_gamma():
    torch.manual_seed(3)
    lengths = torch.tensor([2, 4, 1])
    args = [torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(3, dtype=torch.float64, requires_grad=True),
            torch.tensor(0.5, dtype=torch.float64, requires_grad=True)]

    def f(h, hp, a, g, gm):
        return aggregate_ref(h, hp, a, g, lengths, gm, "additive")

    assert torch.autograd.gradcheck(f, args)


# ---- dispatch --------------------------------------------------------------------------

def test_available_backends_shape():
    avail = mtd_fast.available_backends()
    assert set(avail) == {"session_attention", "aggregate", "spmm", "global_graph", "session_graphs",
                          "linear_cross_entropy"}
    for op, names in avail.items():
        assert names[-1] == "reference", (op, names)


def test_reference_string_forces_reference():
    for op in ops.OPS:
        assert ops.describe(op, "reference", "cpu") == "reference"


def test_unknown_backend_raises():
    with pytest.raises(BackendError, match="unknown backend 'cuda-magic'"):
        ops.validate_spec("cuda-magic")
    with pytest.raises(BackendError, match="unknown op"):
        ops.validate_spec({"softmax": "reference"})


def test_dict_is_strict_and_lists_available():
    with pytest.raises(BackendError, match="available here: .*reference"):
        ops.describe("spmm", {"spmm": "triton"}, "cpu")
    assert ops.describe("spmm", {"spmm": "reference"}, "cpu") == "reference"


def test_env_variable_is_the_string_form(monkeypatch):
    monkeypatch.setenv("MTD_FAST_BACKEND", "reference")
    assert all(ops.describe(op, None, "cpu") == "reference" for op in ops.OPS)
    monkeypatch.setenv("MTD_FAST_BACKEND", "auto")
    assert ops.describe("session_attention", None, "cpu") == dispatch._auto("session_attention", "cpu").name


def test_auto_never_picks_triton_on_cpu():
    for op in ops.OPS:
        assert ops.describe(op, "auto", "cpu") != "triton"


def test_string_for_missing_backend_falls_back_with_warning(monkeypatch):
    # a registered backend whose import fails is absent: a string spec leaves the op on auto
    dispatch.register("spmm", "ghost", "mtd_fast.no_such_module:fn", rank=50)
    try:
        with pytest.warns(RuntimeWarning, match="not available for any op"):
            ops.validate_spec("ghost")
        assert ops.describe("spmm", "ghost", "cpu") == ops.describe("spmm", "auto", "cpu")
        with pytest.raises(BackendError, match="ghost"):
            ops.describe("spmm", {"spmm": "ghost"}, "cpu")
    finally:
        del dispatch._REGISTRY["spmm"]["ghost"]


@pytest.mark.skipif(torch.cuda.is_available() or __import__("os").environ.get("TRITON_INTERPRET") == "1",
                    reason="Triton is usable here (CUDA or the interpreter)")
def test_triton_not_listed_where_it_cannot_run():
    avail = mtd_fast.available_backends()
    assert "triton" not in avail["session_attention"] and "triton" not in avail["aggregate"]
    with pytest.raises(BackendError, match="available here: packed, reference|available here: reference"):
        ops.describe("session_attention", {"session_attention": "triton"}, "cpu")
    with pytest.warns(RuntimeWarning, match="not available for any op"):
        ops.validate_spec("triton")


def test_import_and_train_work_without_triton_and_numba():
    """`import mtd_fast` and a training run need neither Triton nor Numba (API contract)."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("triton", "numba"):
                    raise ImportError(f"{name} blocked for the test")
                return None
        sys.meta_path.insert(0, Block())
        import mtd_fast
        avail = mtd_fast.available_backends()
        assert "triton" not in avail["session_attention"] and "numba" not in avail["global_graph"], avail
        ds = mtd_fast.load_dataset("synthetic", n_sessions=200, n_items=40)
        r = mtd_fast.train(ds, epochs=1, quiet=True, hidden_size=8)
        assert r.backends["global_graph"] == "reference"
        assert "triton" not in sys.modules and "numba" not in sys.modules
        print("OK")
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("OK"), res.stdout + res.stderr


def test_string_backend_for_another_device_leaves_the_op_on_auto():
    # "cpp" has no CUDA kernel: a string spec falls back to auto there, a dict raises
    assert ops.describe("spmm", "cpp", "cuda") == ops.describe("spmm", "auto", "cuda")
    if "cpp" in mtd_fast.available_backends()["spmm"]:
        with pytest.raises(BackendError, match="cannot run on cuda tensors"):
            ops.describe("spmm", {"spmm": "cpp"}, "cuda")


def test_empty_sessions_are_an_input_error():
    q = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match="empty session is an input error"):
        ops.session_attention(q, q, q, torch.tensor([2, 0]))
    with pytest.raises(ValueError, match="session lengths must be in 1..3"):
        ops.aggregate(q, q, q[:, 0], q[0, 0], torch.tensor([4, 1]))
