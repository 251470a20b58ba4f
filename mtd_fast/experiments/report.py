"""Shared pieces of the experiment reports: the markdown-table renderer (also used by the
CLI), mean ± spread over seeds, atomic file writes and the optional-dependency check.

Nothing here imports matplotlib or scikit-learn at module level: `import mtd_fast` and the
CLI stay usable without them, and `require` turns their absence into one clear error
before any training starts.
"""
from __future__ import annotations

import importlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

__all__ = ["ExperimentError", "markdown_table", "mean_sd", "fmt_mean_sd", "atomic_write_text", "atomic_write_json",
           "atomic_save", "require", "display_name", "MODEL_NAMES"]


class ExperimentError(ValueError):
    """Bad experiment input (unknown name, unwritable folder, missing optional package):
    the CLI prints it as one line, before any training."""


MODEL_NAMES = {"pop": "POP", "spop": "S-POP", "itemknn": "ItemKNN", "gru4rec": "GRU4Rec", "narm": "NARM",
               "stamp": "STAMP", "sasrec": "SASRec", "srgnn": "SR-GNN", "csrm": "CSRM", "cosan": "CoSAN",
               "mtd": "MTD", "mtd-va": "MTD-va", "mtd-at": "MTD-at", "mtd-lo": "MTD-lo", "mtd-ga": "MTD-ga",
               "mtd-norep": "MTD (no re-click term)", "mtd-lo-norep": "MTD-lo (no re-click term)"}


def display_name(label: str) -> str:
    """The paper's spelling of a model name; other labels unchanged."""
    return MODEL_NAMES.get(label, label)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.2f}" if abs(v) < 1e5 else f"{v:.0f}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[dict[str, Any]], cols: Sequence[str], right: Iterable[str] = ()) -> str:
    """A markdown table of `rows` (dicts) over `cols`; floats get 2 decimals, missing cells
    are empty, columns named in `right` are right-aligned."""
    right = set(right)
    out = ["| " + " | ".join(cols) + " |", "|" + "|".join(" ---: " if c in right else " --- " for c in cols) + "|"]
    out += ["| " + " | ".join(_cell(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def mean_sd(values: Sequence[float]) -> tuple[float, Optional[float]]:
    """Mean and sample standard deviation (None for a single value)."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_sd of no values")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1))


def fmt_mean_sd(values: Sequence[float], digits: int = 2) -> str:
    """"64.73" for one value, "64.73 ± 0.12" (sample sd) for several."""
    m, sd = mean_sd(values)
    return f"{m:.{digits}f}" if sd is None else f"{m:.{digits}f} ± {sd:.{digits}f}"


def _atomic(path: os.PathLike | str, write: Callable[[str], None]) -> Path:
    """Call write(temp_path) for a temp file in the destination folder, fsync it, then
    os.replace it onto `path`: readers see the old file or the whole new one, never a part."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as fh:
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: os.PathLike | str, text: str) -> Path:
    return _atomic(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: os.PathLike | str, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def atomic_save(path: os.PathLike | str, save: Callable[[str], None]) -> Path:
    """Atomic write through a saver that takes a file name (matplotlib savefig, mtd_fast.save)."""
    return _atomic(path, save)


def require(module: str, package: str, extra: str = "experiments"):
    """Import an optional package or raise ExperimentError saying how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExperimentError(f"this experiment needs {package}, which is not installed: "
                              f"pip install {package} (or the project's [{extra}] extra)") from None
