"""`cache=True` for the Numba builders, without ever breaking `import`.

Numba picks a cache folder when a function is *decorated* (at import time), trying in
order: `$NUMBA_CACHE_DIR`, `__pycache__` next to the source file, then the user-wide
`$XDG_CACHE_HOME/numba` (or `~/.cache/numba`). When none of them is writable (an install
in a read-only site-packages, run by a user without a writable home: containers, CI,
shared clusters) the decorator raises `RuntimeError: cannot cache function ...: no locator
available` and the whole module fails to import (measured, see TOOLCHAIN.md).

`cached_njit` lets Numba choose first, so a user-set `NUMBA_CACHE_DIR` and the usual
locations keep their normal meaning. Only when Numba finds no location does it point
*our* dispatchers at a fallback folder it has checked is writable and private (a
`mtd_fast/numba` folder in the user cache dir, else a per-user folder in the temp dir),
by overriding `numba.config.CACHE_DIR` for the duration of the decoration only: the
locator is fixed per function at decoration, so other Numba users in the process are
not moved. If even that fails the function is compiled without a disk cache and a
warning says so; import still works.

This module imports Numba; only `mtd_fast.graph.numba` imports it.
"""
from __future__ import annotations

import logging
import os
import stat
import tempfile
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import numba
from numba.core import config as _numba_config

__all__ = ["cached_njit", "fallback_cache_dir", "cache_location"]

log = logging.getLogger("mtd_fast")

_NO_LOCATOR = "no locator available"
_fallback: Optional[str] = None
# how each decorated function got its cache: "numba" (Numba's own locators),
# "fallback:<dir>" or "disabled"
_how: dict[str, str] = {}


def _private_writable_dir(path: str) -> bool:
    """Create `path` (mode 0700) if needed; True when it is a directory we own, that no one
    else can write to, and in which we can create a file.

    Numba's cache holds pickles that are loaded back, so a folder another user could write
    to (a predictable name in a shared /tmp) must not be used.
    """
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.stat(path)
        if not stat.S_ISDIR(st.st_mode):
            return False
        if hasattr(os, "getuid") and st.st_uid != os.getuid():
            return False
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            return False
        tempfile.TemporaryFile(dir=path).close()
        return True
    except OSError:
        return False


def _candidates() -> Iterator[str]:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    yield os.path.join(base, "mtd_fast", "numba")
    uid = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    yield os.path.join(tempfile.gettempdir(), f"mtd_fast-numba-cache-{uid}")


def fallback_cache_dir() -> Optional[str]:
    """A writable, private folder for Numba's cache when its own locators all fail.

    The first usable of: `$XDG_CACHE_HOME/mtd_fast/numba` (or `~/.cache/...`), then
    `<tempdir>/mtd_fast-numba-cache-<uid>`, then a fresh `tempfile.mkdtemp` folder (not
    reused across processes, but at least the module imports and caches within the run).
    None when nothing at all is writable.
    """
    global _fallback
    if _fallback is not None:
        return _fallback
    for path in _candidates():
        if _private_writable_dir(path):
            _fallback = path
            return path
    try:
        _fallback = tempfile.mkdtemp(prefix="mtd_fast-numba-cache-")
    except OSError:
        return None
    return _fallback


@contextmanager
def _cache_dir_override(path: str):
    old = _numba_config.CACHE_DIR
    _numba_config.CACHE_DIR = path
    try:
        yield
    finally:
        _numba_config.CACHE_DIR = old


def cached_njit(**options) -> Callable:
    """`numba.njit(cache=True, **options)` that falls back instead of failing at import."""

    def decorate(fn: Callable) -> Callable:
        name = f"{fn.__module__}.{fn.__qualname__}"
        try:
            disp = numba.njit(cache=True, **options)(fn)
            _how[name] = "numba"
            return disp
        except RuntimeError as exc:
            if _NO_LOCATOR not in str(exc):
                raise
        path = fallback_cache_dir()
        if path is not None:
            try:
                with _cache_dir_override(path):
                    disp = numba.njit(cache=True, **options)(fn)
                _how[name] = f"fallback:{path}"
                log.debug("numba cache for %s: no default location is writable, using %s", name, path)
                return disp
            except RuntimeError as exc:
                if _NO_LOCATOR not in str(exc):
                    raise
        _how[name] = "disabled"
        warnings.warn(f"mtd_fast: no writable folder for Numba's cache; {name} will be compiled again "
                      f"in every process (set NUMBA_CACHE_DIR to a writable folder)", RuntimeWarning,
                      stacklevel=2)
        return numba.njit(cache=False, **options)(fn)

    return decorate


def cache_location(disp) -> Optional[str]:
    """The folder a dispatcher's cache lives in (None without a disk cache or without JIT)."""
    cache = getattr(disp, "_cache", None)
    path = getattr(cache, "cache_path", None)
    return path if isinstance(path, str) else None
