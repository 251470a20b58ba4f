"""Where a result came from: the package version, the source commit and the machine.

A leaf module (standard library; torch only when `machine` runs): the run directory's
provenance (`rundir.provenance`) and the experiment runner's result records read it, so
neither has to import the other.
"""
from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any, Optional

__version__ = "0.1.0"

__all__ = ["__version__", "source_commit", "machine"]


@functools.lru_cache(maxsize=1)
def source_commit() -> tuple[Optional[str], Optional[bool]]:
    """(HEAD commit, uncommitted changes under the package) when the package runs from a git
    checkout that tracks it (an editable install); (None, None) for an installed copy."""
    pkg = Path(__file__).resolve().parent
    try:
        def git(*a: str) -> str:
            return subprocess.run(["git", "-C", str(pkg), *a], capture_output=True, text=True, timeout=10,
                                  check=True).stdout.strip()

        git("ls-files", "--error-unmatch", "__init__.py")  # the package files are tracked here
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--", "."))
        return commit, dirty
    except (OSError, subprocess.SubprocessError):
        return None, None


def machine() -> dict[str, Any]:
    """Platform, processor, CPU count, torch's thread count, the Python version, and whether
    freed memory is kept for reuse (`mtd_fast.allocator`: it changes seconds per step)."""
    import torch

    from .allocator import in_effect

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "malloc_keeps_freed": in_effect()}
