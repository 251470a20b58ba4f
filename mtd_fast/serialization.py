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
    graph = getattr(model, "graph", None)
    if graph is not None:  # graph_mode="residual" reads it at inference
        payload["graph"] = _graph_payload(graph)
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
    if payload.get("graph") is not None:
        model.set_graph(_graph_from_payload(payload["graph"], path))
    model.eval()
    return model.to(map_location) if map_location is not None else model


def _graph_payload(graph) -> dict[str, Any]:
    arrays = {name: torch.from_numpy(getattr(graph, name).copy()) for name in ("indptr", "indices", "degrees", "nodes")}
    arrays["values"] = None if graph.values is None else torch.from_numpy(graph.values.copy())
    return {**arrays, "n_items": graph.n_items, "directed": graph.directed, "weighted": graph.weighted}


def _graph_from_payload(g: dict[str, Any], path) -> Any:
    from .graph.reference import GlobalGraph

    try:
        graph = GlobalGraph(g["indptr"].numpy(), g["indices"].numpy(),
                            None if g["values"] is None else g["values"].numpy(), g["degrees"].numpy(),
                            g["nodes"].numpy(), int(g["n_items"]), directed=bool(g["directed"]),
                            weighted=bool(g["weighted"]))
    except (KeyError, AttributeError, TypeError) as exc:
        raise ValueError(f"{path}: the stored item graph is incomplete ({type(exc).__name__}: {exc})") from None
    n = graph.num_nodes
    if graph.indptr.shape != (n + 1,) or graph.degrees.shape != (n,) or graph.indptr[-1] != graph.nnz:
        raise ValueError(f"{path}: the stored item graph is inconsistent ({n} nodes, indptr of "
                         f"{graph.indptr.shape[0]}, {graph.nnz} indices)")
    return graph
