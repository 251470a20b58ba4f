"""Build script: the pure-Python package, `kernels/` installed as `mtd_fast.kernels`, and
the optional C++ extension `mtd_fast._spmm_cpp` (pybind11 over NumPy buffers, built by
CMakeLists.txt through cmake, with ninja when present).

The extension is optional: `import mtd_fast` works without it and the `spmm` op then runs
its reference. So this script never fails because of it. It installs the pure-Python
package with a warning when
  - MTD_FAST_NO_EXT=1 is set (the extension is not even attempted),
  - cmake (>= 3.18) or pybind11 cannot be found (for example an offline
    `pip install --no-build-isolation --no-deps .` on a machine without them),
  - configuring or compiling fails (no compiler, no Python headers, ...).
Switches:
  MTD_FAST_NO_EXT=1       skip the extension
  MTD_FAST_REQUIRE_EXT=1  fail the install instead of skipping (CI: a broken build must show)
  MTD_FAST_NO_OPENMP=1    build without OpenMP (one thread)
  MTD_FAST_NO_SIMD=1      build only the baseline kernel (no AVX2 variant)
  MTD_FAST_CMAKE_ARGS     extra arguments for the cmake configure step
No torch at build time (see pyproject.toml).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
EXT_NAME = "mtd_fast._spmm_cpp"
MIN_CMAKE = (3, 18)


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _warn(msg: str) -> None:
    text = (f"mtd_fast: {msg}\nmtd_fast: installing WITHOUT the C++ extension; "
            "the 'spmm' op falls back to its reference.")
    bar = "!" * 78
    print(f"\n{bar}\n{text}\n{bar}\n", file=sys.stderr, flush=True)
    warnings.warn(text, RuntimeWarning, stacklevel=2)


class ExtensionUnavailable(RuntimeError):
    """A build prerequisite is missing (not a compile error)."""


class CMakeExtension(Extension):
    """An extension built by CMake from `sourcedir` (no sources for setuptools to compile)."""

    def __init__(self, name: str, sourcedir: Path) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str(sourcedir)


def _cmake_version(exe: str) -> tuple[int, ...]:
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"(\d+)\.(\d+)", out)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _find_cmake() -> str:
    candidates = []
    try:  # the `cmake` PyPI package (what build isolation installs)
        import cmake

        candidates.append(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))
    except Exception:
        pass
    if shutil.which("cmake"):
        candidates.append(shutil.which("cmake"))
    seen = []
    for exe in candidates:
        try:
            ver = _cmake_version(exe)
        except Exception:
            continue
        if ver >= MIN_CMAKE:
            return exe
        seen.append(f"{exe} {'.'.join(map(str, ver))}")
    raise ExtensionUnavailable("no cmake >= %d.%d found%s (pip install cmake)" % (
        *MIN_CMAKE, f" (found {', '.join(seen)})" if seen else ""))


def _find_ninja() -> str | None:
    try:
        import ninja

        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(exe):
            return exe
    except Exception:
        pass
    return shutil.which("ninja")


def _pybind11_dir() -> str:
    try:
        import pybind11
    except Exception as exc:
        raise ExtensionUnavailable(f"pybind11 is not importable ({exc}); pip install pybind11") from None
    return pybind11.get_cmake_dir()


class CMakeBuild(build_ext):
    """Runs cmake for CMakeExtensions; a failure drops the extension with a warning."""

    def build_extensions(self) -> None:
        for ext in list(self.extensions):
            try:
                self.build_extension(ext)
            except Exception as exc:
                if _flag("MTD_FAST_REQUIRE_EXT"):
                    raise
                _warn(f"building {ext.name} failed: {exc}")
                # drop it, so the copy to the source tree (editable installs) and the
                # list of installed files do not ask for a file that was never built
                self.extensions.remove(ext)
                if ext in (self.distribution.ext_modules or []):
                    self.distribution.ext_modules.remove(ext)

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        cmake = _find_cmake()
        pybind11_dir = _pybind11_dir()
        ninja = _find_ninja()
        fullpath = Path(self.get_ext_fullpath(ext.name)).resolve()
        extdir = fullpath.parent
        basename = ext.name.split(".")[-1]
        suffix = fullpath.name[len(basename):]  # EXT_SUFFIX, e.g. .cpython-311-x86_64-linux-gnu.so
        # one build folder per generator: a cache made by one generator refuses another
        build_dir = Path(self.build_temp).resolve() / f"cmake-{'ninja' if ninja else 'default'}"
        build_dir.mkdir(parents=True, exist_ok=True)
        cfg = "Debug" if self.debug else "Release"
        configure = [
            cmake, "-S", ext.sourcedir, "-B", str(build_dir),
            f"-DCMAKE_BUILD_TYPE={cfg}",
            f"-DMTD_FAST_EXT_DIR={extdir}",
            f"-DMTD_FAST_EXT_SUFFIX={suffix}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11_dir}",
            f"-DMTD_FAST_USE_OPENMP={'OFF' if _flag('MTD_FAST_NO_OPENMP') else 'ON'}",
            f"-DMTD_FAST_SIMD_VARIANTS={'OFF' if _flag('MTD_FAST_NO_SIMD') else 'ON'}",
        ]
        if ninja:
            configure += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        configure += shlex.split(os.environ.get("MTD_FAST_CMAKE_ARGS", ""))
        jobs = self.parallel if isinstance(self.parallel, int) and self.parallel > 0 else (os.cpu_count() or 1)
        build = [cmake, "--build", str(build_dir), "--config", cfg, "-j", str(jobs)]
        for cmd in (configure, build):
            print("mtd_fast:", " ".join(shlex.quote(c) for c in cmd), flush=True)
            proc = subprocess.run(cmd, cwd=ext.sourcedir, capture_output=True, text=True)
            print(proc.stdout, end="", flush=True)
            if proc.returncode != 0:
                tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
                raise RuntimeError(f"`{' '.join(cmd[:2])} ...` exited with {proc.returncode}:\n{tail}")
            if proc.stderr:
                print(proc.stderr, end="", file=sys.stderr, flush=True)
        if not fullpath.exists():
            raise RuntimeError(f"cmake finished but {fullpath} was not produced")


def _ext_modules() -> list[Extension]:
    if _flag("MTD_FAST_NO_EXT"):
        print("mtd_fast: MTD_FAST_NO_EXT is set; building the pure-Python package only", file=sys.stderr)
        return []
    return [CMakeExtension(EXT_NAME, ROOT)]


setup(
    # every package under mtd_fast/ (a hand-kept list once left out mtd_fast.experiments), and
    # kernels/ installed as mtd_fast.kernels
    packages=find_packages(include=["mtd_fast", "mtd_fast.*"]) + ["mtd_fast.kernels"],
    package_dir={"mtd_fast.kernels": "kernels"},
    ext_modules=_ext_modules(),
    cmdclass={"build_ext": CMakeBuild},
    zip_safe=False,
)
