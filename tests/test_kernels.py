"""The Triton kernels as a whole (`mtd_fast.kernels`): every specialisation compiles for
sm_90 without a GPU (`mtd_fast.kernels.aot`), and the one-shot GPU script
`benches/gpu_check.py` runs at toy size through the interpreter. Each kernel against its
reference: the op's test module (tests/test_session_attention.py, test_aggregate.py,
test_linear_cross_entropy.py). Like those, this module runs under
`TRITON_INTERPRET=1 pytest tests -m triton` (or on CUDA)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from testing import CUDA, INTERPRET, triton_only

pytestmark = pytest.mark.triton


@triton_only
@pytest.mark.skipif(not INTERPRET, reason="on a GPU, run benches/gpu_check.py itself")
def test_gpu_check_script_runs_in_smoke_mode(tmp_path):
    # benches/gpu_check.py at tiny sizes on the CPU through the interpreter: the one-shot GPU
    # script (strict backend dicts, the installed package) cannot rot between GPU sessions
    script = Path(__file__).resolve().parents[1] / "benches" / "gpu_check.py"
    env = dict(os.environ, MTD_GPU_CHECK_SMOKE="1", TRITON_INTERPRET="1")
    out = tmp_path / "gpu_check.json"
    res = subprocess.run([sys.executable, str(script), str(out)], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    data = json.loads(out.read_text())
    assert data["ok"] and data["meta"]["smoke"]
    assert any(c["case"].startswith("linear_cross_entropy") for c in data["checks"])
    assert {r["impl"] for r in data["lce_timings"]} == {"triton", "chunked", "reference"}
    # the repeat bias's loss: checked on both paths, timed on all three
    assert any(c["case"].startswith("biased_cross_entropy") for c in data["checks"])
    assert {r["impl"] for r in data["lce_timings"] if r["op"] == "biased_cross_entropy"} == {
        "triton", "chunked", "reference"}
    assert "triton_ms" in data["mtd_step"], data["mtd_step"]


@triton_only
@pytest.mark.skipif(CUDA, reason="on a GPU the real launches of the op tests already compile every kernel")
def test_kernels_compile_for_sm90(tmp_path):
    # The interpreter cannot catch compile-time errors (loop-carried types, tl.dot shape rules,
    # shared-memory limits); Triton compiles to sm_90 cubin without a GPU (python -m
    # mtd_fast.kernels.aot). Runs in a subprocess without TRITON_INTERPRET.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # cwd outside the checkout: `-m` puts the cwd on sys.path, and the checkout's source tree
    # has no mtd_fast.kernels (kernels/ is mapped there at install time)
    res = subprocess.run([sys.executable, "-m", "mtd_fast.kernels.aot", "--quick"], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "FAIL" not in res.stdout
