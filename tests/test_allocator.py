"""mtd_fast.allocator: freed blocks are reused (no page faults on the next allocation of the
same size), the opt-out leaves malloc alone, a bad setting is refused, and train() applies it.
Each measurement runs in a fresh process: the setting is process-wide and cannot be undone."""
from __future__ import annotations

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from mtd_fast import allocator

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="the tuning is for glibc malloc only")

# 48 MiB blocks: above the largest mmap threshold glibc sets for itself (32 MiB), so without the
# tuning every allocation is a fresh mmap whose pages fault in again
FAULTS = textwrap.dedent("""
    import resource, sys, torch
    from mtd_fast.allocator import keep_freed_memory
    applied = keep_freed_memory() if sys.argv[1] == "call" else None
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    n = 48 * 2**20 // 4
    for _ in range(4):  # warm-up: the heap reaches its steady size
        xs = [torch.ones(n) for _ in range(3)]
        del xs
    f0 = faults()
    for _ in range(3):
        xs = [torch.ones(n) for _ in range(3)]
        del xs
    print(applied, (faults() - f0) / 3)
""")
PAGES_PER_ROUND = 3 * 48 * 2**20 // 4096


def _faults(call: bool, **env: str) -> tuple[str, float]:
    res = subprocess.run([sys.executable, "-c", FAULTS, "call" if call else "no"], capture_output=True, text=True,
                         timeout=300, env={**os.environ, **env})
    assert res.returncode == 0, res.stderr[-3000:]
    applied, faults = res.stdout.split()
    return applied, float(faults)


@needs_glibc
def test_freed_blocks_are_reused():
    applied, tuned = _faults(True)
    _, untuned = _faults(False)
    assert applied == "True"
    assert untuned >= 0.5 * PAGES_PER_ROUND, untuned  # the baseline does fault every page in
    assert tuned <= 0.02 * untuned, (tuned, untuned)


@needs_glibc
def test_system_setting_leaves_malloc_alone():
    applied, faults = _faults(True, MTD_FAST_MALLOC="system")
    assert applied == "False"
    assert faults >= 0.5 * PAGES_PER_ROUND, faults


def test_bad_setting_is_refused(monkeypatch):
    monkeypatch.setenv("MTD_FAST_MALLOC", "jemalloc")
    with pytest.raises(ValueError, match="MTD_FAST_MALLOC='jemalloc'.*'keep'.*'system'"):
        allocator.keep_freed_memory()


@needs_glibc
def test_train_applies_it():
    code = textwrap.dedent("""
        import mtd_fast
        from mtd_fast import allocator
        assert not allocator.in_effect()
        ds = mtd_fast.load_dataset("synthetic", n_sessions=200, n_items=30)
        mtd_fast.train(ds, model="mtd-lo", epochs=1, quiet=True, hidden_size=8)
        from mtd_fast.provenance import machine
        print(machine()["malloc_keeps_freed"], allocator.in_effect())
    """)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-2:] == ["True", "True"]
