"""Backend registry and dispatch for the hot ops.

Choice order: the explicit `backend=` argument, then `$MTD_FAST_BACKEND`, then "auto".
- "auto": the best available backend whose `auto_devices` include the tensor's device,
  else the reference, silently.
- a string ("cpp", "triton", "reference", ...): every op that has that backend, for the
  tensor's device, uses it; the others stay on auto. An unknown name raises.
- a dict {op: name}: strict; an op named there must run that backend or it raises,
  listing what is available. Ops not named stay on auto.

Backends register lazily (module path + attribute), so `import mtd_fast` never imports
Triton, Numba or the compiled extension; a backend whose import fails is simply absent.
"""
from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Optional, Union

__all__ = ["OPS", "BackendError", "register", "unregister", "resolve", "available_backends", "BackendSpec", "describe",
           "validate_spec"]

OPS = ("session_attention", "aggregate", "spmm", "global_graph", "session_graphs", "linear_cross_entropy")

BackendSpec = Union[None, str, Mapping[str, str]]


class BackendError(RuntimeError):
    """A backend was asked for that this install or this device cannot run."""


@dataclass
class _Impl:
    op: str
    name: str
    target: str  # "package.module:function"
    rank: int  # lower is preferred by auto
    auto_devices: tuple[str, ...]  # devices on which auto may pick it
    devices: Callable[[], tuple[str, ...]]  # devices it can run on at all (checked when asked for)
    probe: Optional[Callable[[], bool]] = None
    _fn: Optional[Callable] = field(default=None, repr=False)
    _ok: Optional[bool] = field(default=None, repr=False)
    _why: str = ""

    def available(self) -> bool:
        if self._ok is None:
            try:
                if self.probe is not None and not self.probe():
                    raise ImportError("probe failed")
                mod, attr = self.target.split(":")
                self._fn = getattr(importlib.import_module(mod), attr)
                self._ok = True
            except Exception as exc:  # missing optional dependency, unbuilt extension, ...
                self._ok, self._why = False, f"{type(exc).__name__}: {exc}"
        return self._ok

    @property
    def fn(self) -> Callable:
        if not self.available():
            raise BackendError(f"backend {self.name!r} for {self.op} is not available: {self._why}")
        return self._fn


_REGISTRY: dict[str, dict[str, _Impl]] = {op: {} for op in OPS}


def _always(*devs: str) -> Callable[[], tuple[str, ...]]:
    return lambda: devs


def register(op: str, name: str, target: str, *, rank: int, auto_devices: tuple[str, ...] = (),
             devices: Optional[Callable[[], tuple[str, ...]]] = None,
             probe: Optional[Callable[[], bool]] = None) -> None:
    """Register backend `name` for `op`, implemented by `target` ("module:function")."""
    if op not in _REGISTRY:
        raise ValueError(f"unknown op {op!r}; ops are {OPS}")
    _REGISTRY[op][name] = _Impl(op, name, target, rank, tuple(auto_devices),
                                devices or _always("cpu", "cuda"), probe)


def unregister(op: str, name: str) -> None:
    """Remove backend `name` of `op` (tests register stand-ins and take them out again)."""
    if name not in _REGISTRY.get(op, {}):
        raise ValueError(f"{op!r} has no backend {name!r} to unregister")
    del _REGISTRY[op][name]


def _known_names() -> set[str]:
    return {name for impls in _REGISTRY.values() for name in impls}


def available_backends() -> dict[str, list[str]]:
    """For each hot op, the backends this install can run, best first (reference last)."""
    out = {}
    for op, impls in _REGISTRY.items():
        ok = [impl for impl in impls.values() if impl.available()]
        out[op] = [impl.name for impl in sorted(ok, key=lambda i: (i.name == "reference", i.rank))]
    return out


def _device_type(device: Any) -> str:
    if device is None:
        return "cpu"
    return getattr(device, "type", None) or str(device).split(":")[0]


def _auto(op: str, dev: str) -> _Impl:
    cands = [i for i in _REGISTRY[op].values() if dev in i.auto_devices and i.available()]
    if cands:
        return min(cands, key=lambda i: i.rank)
    return _REGISTRY[op]["reference"]


def _available_impl(op: str, name: str, strict: bool) -> Optional[_Impl]:
    """The registered, importable backend `name` of `op`; None (or raise, if strict) otherwise."""
    impl = _REGISTRY[op].get(name)
    if impl is not None and impl.available():
        return impl
    if strict:
        listing = ", ".join(available_backends()[op])
        why = "has no such backend" if impl is None else f"cannot use it in this install ({impl._why})"
        raise BackendError(f"backend {name!r} was asked for {op}, which {why}; available here: {listing}")
    return None


def _explicit(op: str, name: str, dev: str, strict: bool) -> Optional[_Impl]:
    """Backend `name` of `op` for `dev`; None (string form: the op stays on auto) or raise (dict form)."""
    impl = _available_impl(op, name, strict)
    if impl is not None and dev not in impl.devices():
        if not strict:
            return None
        runnable = [i.name for i in _REGISTRY[op].values() if i.available() and dev in i.devices()]
        raise BackendError(f"backend {name!r} for {op} cannot run on {dev} tensors"
                           + (" (Triton runs on CPU tensors only under TRITON_INTERPRET=1)" if name == "triton" else "")
                           + f"; available for {dev} here: {', '.join(runnable)}")
    return impl


def _spec_from_env(spec: BackendSpec) -> BackendSpec:
    if spec is None:
        spec = os.environ.get("MTD_FAST_BACKEND") or "auto"
    return spec


def validate_spec(spec: BackendSpec) -> BackendSpec:
    """Check a backend spec early (names, ops) and return it with the env default applied."""
    spec = _spec_from_env(spec)
    known = _known_names() | {"auto"}
    if isinstance(spec, str):
        if spec not in known:
            raise BackendError(f"unknown backend {spec!r}: known backends are {sorted(known)}")
        if spec != "auto" and not any(spec in available_backends()[op] for op in OPS):
            warnings.warn(f"backend {spec!r} is not available for any op in this install; "
                          f"every op runs on auto ({available_backends()})", RuntimeWarning, stacklevel=3)
    elif isinstance(spec, Mapping):
        for op, name in spec.items():
            if op not in OPS:
                raise BackendError(f"backend dict names unknown op {op!r}; ops are {OPS}")
            if name != "auto":
                _available_impl(op, name, strict=True)
    else:
        raise BackendError(f"backend must be None, a string or a dict {{op: name}}, got {type(spec).__name__}")
    return spec


def resolve(op: str, spec: BackendSpec = None, device: Any = None) -> Callable:
    """The implementation of `op` that `spec` selects for tensors on `device`."""
    return _resolve_impl(op, spec, device).fn


def describe(op: str, spec: BackendSpec = None, device: Any = None) -> str:
    """Name of the backend `resolve` would pick (for logs and benches)."""
    return _resolve_impl(op, spec, device).name


def _resolve_impl(op: str, spec: BackendSpec, device: Any) -> _Impl:
    spec = _spec_from_env(spec)
    dev = _device_type(device)
    if isinstance(spec, Mapping):
        name = spec.get(op, "auto")
        if name != "auto":
            return _explicit(op, name, dev, strict=True)
        return _auto(op, dev)
    if spec == "auto":
        return _auto(op, dev)
    if spec not in _known_names():
        raise BackendError(f"unknown backend {spec!r}: known backends are {sorted(_known_names() | {'auto'})}")
    return _explicit(op, spec, dev, strict=False) or _auto(op, dev)
