"""The backend dispatch rules (`mtd_fast.ops.dispatch`), common to every op: what
`available_backends` lists, what `auto`, a string, a dict and $MTD_FAST_BACKEND select,
and that optional backends (Triton, Numba) are absent, never required. Each op's own
dispatch checks (its backend reached through the public function) are in its test module."""
from __future__ import annotations

import os

import pytest
import torch

import mtd_fast
from mtd_fast import ops
from mtd_fast.ops import BackendError, dispatch


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
    assert ops.describe("session_attention", None, "cpu") == ops.describe("session_attention", "auto", "cpu")


def test_auto_never_picks_triton_on_cpu():
    for op in ops.OPS:
        assert ops.describe(op, "auto", "cpu") != "triton"


def test_auto_picks_packed_on_cpu():
    assert ops.describe("session_attention", "auto", "cpu") == "packed"
    assert ops.describe("aggregate", "auto", "cpu") == "packed"
    assert "packed" in ops.available_backends()["session_attention"]


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
        dispatch.unregister("spmm", "ghost")
    with pytest.raises(BackendError, match="unknown backend 'ghost'"):
        ops.validate_spec("ghost")


@pytest.mark.skipif(torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
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
