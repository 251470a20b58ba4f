"""`save` / `load`: weights, config and catalogue size in one file.

The file is a plain `torch.save` dict read back with `weights_only=True` (no code runs on
load), tagged with a format marker; `load` refuses anything it did not write.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch

from .config import MTDConfig
from .models import model_class
from .models.base import SessionModel

__all__ = ["save", "load", "FORMAT"]

FORMAT = "mtd_fast.model"
VERSION = 1


def save(model: SessionModel, path: os.PathLike | str) -> None:
    """Write `model` (weights, config, catalogue size) to `path`."""
    if not isinstance(model, SessionModel):
        raise TypeError(f"save() takes a mtd_fast model, got {type(model).__name__}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "model": model.name,
        "n_items": model.n_items,
        "config": dataclasses.asdict(model.config),
        "dropout": model.dropout_p,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    torch.save(payload, path)


def load(path: os.PathLike | str, map_location: Any = "cpu", backend: Any = None) -> SessionModel:
    """Read a model written by `save`; raises ValueError for any other file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise ValueError(f"{path}: not a mtd_fast model file ({type(exc).__name__}: {str(exc).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"{path}: not a mtd_fast model file (no {FORMAT!r} marker)")
    if payload.get("version") != VERSION:
        raise ValueError(f"{path}: written by format version {payload.get('version')}, this install reads {VERSION}")
    cls = model_class(payload["model"])
    config = MTDConfig(**payload["config"])
    model = cls(int(payload["n_items"]), config, dropout=float(payload["dropout"]), backend=backend)
    model.name = payload["model"]
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model.to(map_location) if map_location is not None else model
