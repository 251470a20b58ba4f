"""Models: MTD, its ablations, and the paper's baselines, one file each."""
from __future__ import annotations

import importlib
from typing import Any

from .base import SessionModel
from .mtd import MTD

__all__ = ["MODELS", "ABLATIONS", "SessionModel", "MTD", "model_class", "ablation_overrides"]

# name -> "module:Class" (imported on first use)
MODELS: dict[str, str] = {
    "mtd": "mtd_fast.models.mtd:MTD",
    "pop": "mtd_fast.models.pop:POP",
    "spop": "mtd_fast.models.spop:SPOP",
    "itemknn": "mtd_fast.models.itemknn:ItemKNN",
    "gru4rec": "mtd_fast.models.gru4rec:GRU4Rec",
    "narm": "mtd_fast.models.narm:NARM",
    "stamp": "mtd_fast.models.stamp:STAMP",
    "sasrec": "mtd_fast.models.sasrec:SASRec",
    "srgnn": "mtd_fast.models.srgnn:SRGNN",
    "csrm": "mtd_fast.models.csrm:CSRM",
    "cosan": "mtd_fast.models.cosan:CoSAN",
}

# Figure 3 ablations: MTD with these fields fixed
ABLATIONS: dict[str, dict[str, Any]] = {
    "mtd-va": {"use_self_attention": False, "use_position_decay": False},
    "mtd-at": {"use_self_attention": False, "use_position_decay": True},
    "mtd-lo": {"graph_phases": 0},
    "mtd-ga": {"graph_encoder": "gat"},
}


def model_class(name: str) -> type:
    """The class of model `name` (an ablation's is MTD's); ValueError for an unknown name.
    Every model module ships with the package: an error while importing one is a bug and
    propagates as it is."""
    key = name.lower()
    if key in ABLATIONS:
        key = "mtd"
    if key not in MODELS:
        raise ValueError(f"unknown model {name!r}: use one of {', '.join([*MODELS, *ABLATIONS])}")
    module, cls = MODELS[key].split(":")
    return getattr(importlib.import_module(module), cls)


def ablation_overrides(name: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """Overrides with the ablation's fixed fields added; a conflicting user value raises."""
    fixed = ABLATIONS.get(name.lower(), {})
    out = dict(overrides)
    for key, value in fixed.items():
        if key in out and out[key] != value:
            raise ValueError(f"model {name!r} fixes {key}={value!r}; it cannot be overridden with {out[key]!r}")
        out[key] = value
    return out
