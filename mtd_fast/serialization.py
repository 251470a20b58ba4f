"""`save` / `load`: weights, config and catalogue size in one file.

The file is a plain `torch.save` dict read back with `weights_only=True` (no code runs on
load), tagged with a format marker; `load` refuses anything it did not write. Since
format version 2 the file also holds a SHA-256 `digest` of everything else in it
(`state_digest`): a flipped byte in the weights loaded silently before (the zip container
torch writes checks no CRC on read). Version 1 files (no digest) still load. Weights
that are not finite are refused in both versions.

The same digest and the same "does this state fit this model" check serve the training
checkpoints of a run directory (`mtd_fast.rundir`).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from typing import Any, Mapping

import numpy as np
import torch

from .config import LEGACY_VALUES, MTDConfig
from .models import model_class
from .models.base import SessionModel

__all__ = ["save", "load", "FORMAT", "state_digest", "check_state_fits", "check_finite", "check_format",
           "ModelFileError"]

FORMAT = "mtd_fast.model"
VERSION = 2  # 2: + digest (+ original_ids for models trained on load_dataset(compact_ids=True))


class ModelFileError(ValueError):
    """A model or checkpoint file that cannot be used: the message names the file and the problem."""


# ---- digest --------------------------------------------------------------------------------------
def state_digest(obj: Any) -> str:
    """SHA-256 (hex) of a nested structure of dicts, lists, tuples, tensors, NumPy arrays,
    strings, numbers, bools and None. Tensors count by dtype, shape and bytes; dict keys in
    sorted order, so the digest does not depend on insertion order."""
    h = hashlib.sha256()
    _feed(h, obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        if t.numel():
            h.update(t.view(torch.uint8).numpy())  # the raw bytes, no copy
    elif isinstance(obj, np.ndarray):
        a = np.ascontiguousarray(obj)
        h.update(f"A{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size else b"")
    elif isinstance(obj, Mapping):
        h.update(f"D{len(obj)}".encode())
        for k in sorted(obj, key=repr):
            _feed(h, k)
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}".encode())
        for x in obj:
            _feed(h, x)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        h.update(f"S{type(obj).__name__}:{obj!r};".encode())
    else:
        raise TypeError(f"state_digest: cannot hash a {type(obj).__name__}")


# ---- checks shared with the run directory's checkpoints ------------------------------------------
def check_finite(state: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse NaN / inf in floating-point tensors (a diverged run's weights rank nonsense)."""
    for name, t in state.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise ModelFileError(f"{where}: {name} holds {bad} non-finite values (NaN or inf); refusing weights "
                                 "that a diverged run left behind")


def check_state_fits(model: torch.nn.Module, state: Any, where: str) -> None:
    """Raise naming the first key or shape that does not fit `model` (instead of torch's
    raw RuntimeError listing every key)."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(f"{where}: the weights are not a dict of tensors")
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    desc = f"model {getattr(model, 'name', type(model).__name__)!r} with n_items={getattr(model, 'n_items', '?')}"
    if missing or extra:
        parts = ([f"missing {', '.join(missing[:5])}" + (" ..." if len(missing) > 5 else "")] if missing else []) \
            + ([f"unexpected {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else "")] if extra else [])
        raise ModelFileError(f"{where}: the weights do not fit {desc}: {'; '.join(parts)}")
    for k, t in want.items():
        if tuple(state[k].shape) != tuple(t.shape):
            hint = " (a different item catalogue: n_items differs)" if k.endswith("item_emb.weight") else ""
            raise ModelFileError(f"{where}: {k} has shape {tuple(state[k].shape)}, {desc} expects "
                                 f"{tuple(t.shape)}{hint}")


# ---- model files ---------------------------------------------------------------------------------
def save(model: SessionModel, path: os.PathLike | str) -> None:
    """Write `model` (weights, config, catalogue size) to `path`."""
    if not isinstance(model, SessionModel):
        raise TypeError(f"save() takes a mtd_fast model, got {type(model).__name__}")
    payload = _model_payload(model)
    payload["digest"] = state_digest(payload)
    torch.save(payload, path)


def _model_payload(model: SessionModel) -> dict[str, Any]:
    payload: dict[str, Any] = {
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
    ids = getattr(model, "original_ids", None)
    if ids is not None:  # trained on load_dataset(compact_ids=True): recommend translates ids
        payload["original_ids"] = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    return payload


def load(path: os.PathLike | str, map_location: Any = "cpu", backend: Any = None) -> SessionModel:
    """Read a model written by `save`; raises ValueError (`ModelFileError`) naming the problem
    for any other file, a corrupted one, or one whose contents do not make a model."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file")
    payload = read_payload(path, FORMAT, VERSION, "model")
    model = model_from_payload(payload, path, backend)
    model.eval()
    return model.to(map_location) if map_location is not None else model


def read_payload(path: os.PathLike | str, fmt: str, version: int, what: str) -> dict[str, Any]:
    """torch.load(weights_only) + format marker + version + digest (when present)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = (str(exc).splitlines() or [""])[0]
        raise ModelFileError(f"{path}: not a mtd_fast {what} file, or a corrupt or truncated one "
                             f"({type(exc).__name__}: {first})") from None
    v = check_format(payload, fmt, version, f"{path}:", what)
    if "digest" in payload:
        digest = payload.pop("digest")
        if state_digest(payload) != digest:
            raise ModelFileError(f"{path}: checksum mismatch: the file was changed or corrupted after it was "
                                 "written (its stored SHA-256 does not match its contents)")
    elif v >= 2:
        raise ModelFileError(f"{path}: the checksum is missing (format version {v} always stores one)")
    return payload


def check_format(obj: Any, fmt: str, version: int, where: str, what: str,
                 error: type[Exception] = ModelFileError) -> int:
    """The format marker and a version this install reads (<= `version`), or `error` saying
    which is wrong; returns the version."""
    if not isinstance(obj, dict) or obj.get("format") != fmt:
        raise error(f"{where} not a mtd_fast {what} file (no {fmt!r} marker)")
    v = obj.get("version")
    if not isinstance(v, int) or isinstance(v, bool) or v > version:
        raise error(f"{where} written by a newer mtd_fast (format version {v!r}; this install reads versions up to "
                    f"{version}): upgrade mtd_fast to read it")
    return v


def model_from_payload(payload: Mapping[str, Any], path: Any, backend: Any = None) -> SessionModel:
    """Build the model a payload describes, naming the first field that is wrong."""
    for key, typ in (("model", str), ("n_items", int), ("config", dict), ("state_dict", dict)):
        if key not in payload:
            raise ModelFileError(f"{path}: the field {key!r} is missing")
        if not isinstance(payload[key], typ) or isinstance(payload[key], bool):
            raise ModelFileError(f"{path}: the field {key!r} is a {type(payload[key]).__name__}, "
                                 f"expected {typ.__name__}")
    try:
        cls = model_class(payload["model"])
    except ValueError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    if payload["n_items"] < 1:
        raise ModelFileError(f"{path}: n_items={payload['n_items']} must be >= 1")
    known = {f.name for f in dataclasses.fields(MTDConfig)}
    unknown = sorted(set(payload["config"]) - known)
    if unknown:
        raise ModelFileError(f"{path}: unknown config key {unknown[0]!r} (not a field of MTDConfig; written by "
                             "another mtd_fast version?)")
    # a field the file lacks was added later: the value the code had before it (not today's default)
    legacy = {k: v for k, v in LEGACY_VALUES.items() if k in known and k not in payload["config"]}
    try:
        config = MTDConfig(**legacy, **payload["config"])
    except ValueError as exc:
        raise ModelFileError(f"{path}: the stored config is invalid: {exc}") from None
    dropout = payload.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1 \
            or not math.isfinite(dropout):
        raise ModelFileError(f"{path}: dropout={dropout!r} is invalid")
    model = cls(int(payload["n_items"]), config, dropout=float(dropout), backend=backend)
    model.name = payload["model"]
    state = payload["state_dict"]
    check_state_fits(model, state, str(path))
    check_finite(state, str(path))
    model.load_state_dict(state)
    if payload.get("graph") is not None:
        model.set_graph(_graph_from_payload(payload["graph"], path))
    ids = payload.get("original_ids")
    if ids is not None:
        ids = np.asarray(ids.numpy() if isinstance(ids, torch.Tensor) else ids, dtype=np.int64)
        if ids.shape != (model.n_items + 1,):
            raise ModelFileError(f"{path}: original_ids holds {ids.shape[0]} entries, expected n_items + 1 = "
                                 f"{model.n_items + 1}")
        model.original_ids = ids
    return model


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
        raise ModelFileError(f"{path}: the stored item graph is incomplete ({type(exc).__name__}: {exc})") from None
    n = graph.num_nodes
    if graph.indptr.shape != (n + 1,) or graph.degrees.shape != (n,) or graph.indptr[-1] != graph.nnz:
        raise ModelFileError(f"{path}: the stored item graph is inconsistent ({n} nodes, indptr of "
                             f"{graph.indptr.shape[0]}, {graph.nnz} indices)")
    return graph
