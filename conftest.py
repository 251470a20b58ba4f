"""pytest, for tests/ and benches/: test the INSTALLED package.

`python -m pytest` puts the checkout first on sys.path, where `mtd_fast/` is only the
source tree: it lacks `mtd_fast.kernels` (installed from `kernels/`) and the compiled
C++ extension (built into the installed copy), so tests would silently run a degraded
package. Drop the checkout from sys.path before anything imports `mtd_fast`; an editable
install still maps `mtd_fast` to this tree through its own import hook.
"""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent

if "mtd_fast" not in sys.modules:
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
    try:
        import mtd_fast  # noqa: F401
    except ImportError as exc:  # pragma: no cover - a setup error, said plainly
        raise SystemExit(f"mtd_fast is not installed in this environment ({exc}); "
                         "run the README's install command first (pip install \".[triton,test]\")") from None
