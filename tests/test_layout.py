"""The house rules that a reviewer would otherwise check by hand: every package of the
checkout is installed, data flows one way (no import cycles inside `mtd_fast`), and no
module reaches into another one's private names.

Both import rules read the source with `ast`, every `import` / `from ... import` statement
wherever it stands: at module level, under `if TYPE_CHECKING:`, and inside functions. The
package imports inside functions on purpose (the CLI's start-up time, optional dependencies
such as matplotlib, Numba and Triton, torch kept out of graph building); such a lazy import
runs later, so it cannot fail at import time, but a cycle through it is still a back-edge
(module A needs B needs A), so lazy imports count as edges too. Monkeypatching a private
attribute by name (`monkeypatch.setattr(module, "_x", ...)` or `("pkg.module._x", ...)`) in
tests and benches reaches into a module the same way, and is checked too.
"""
from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from typing import Iterator, Optional

import mtd_fast

ROOT = Path(__file__).resolve().parents[1]


def _source_packages() -> list[str]:
    """Dotted names of the package folders in the checkout (kernels/ is mtd_fast.kernels)."""
    out = []
    for init in sorted((ROOT / "mtd_fast").rglob("__init__.py")):
        out.append(".".join(init.parent.relative_to(ROOT).parts))
    if (ROOT / "kernels" / "__init__.py").is_file():
        out.append("mtd_fast.kernels")
    return out


def test_every_package_of_the_checkout_is_installed():
    # conftest.py makes the tests import the INSTALLED package; a package that setup.py does not
    # list is missing there (mtd_fast.experiments was, in non-editable installs)
    installed = Path(mtd_fast.__file__).resolve().parent
    missing = []
    for name in _source_packages():
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            missing.append(name)
        elif name != "mtd_fast.kernels" and installed not in Path(spec.origin).resolve().parents:
            missing.append(f"{name} (found at {spec.origin}, outside the installed package)")
    assert not missing, f"packages of the checkout that the install lacks: {missing}"


# ---- the import rules ---------------------------------------------------------------------------
def _package_modules() -> dict[str, Path]:
    """Dotted module name -> source file, for mtd_fast/ and kernels/ (installed as mtd_fast.kernels)."""
    out = {}
    for top, prefix in ((ROOT / "mtd_fast", ("mtd_fast",)), (ROOT / "kernels", ("mtd_fast", "kernels"))):
        for path in sorted(top.rglob("*.py")):
            parts = prefix + path.relative_to(top).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = _package_modules()


def _module_name(path: Path) -> Optional[str]:
    """The dotted name of a package file; None for files outside the package (tests, benches)."""
    return next((name for name, p in MODULES.items() if p == path), None)


def _import_root(path: Path) -> Path:
    """The folder that a file outside the package is imported from (it is on sys.path): its own,
    or, for a module of a package in it (benches/table4/report.py), the folder above that package."""
    folder = path.parent
    while (folder / "__init__.py").is_file():
        folder = folder.parent
    return folder


def _local_name(path: Path) -> str:
    """The dotted name of a file outside the package as imported from its import root:
    tests/testing.py is `testing`, benches/table4/report.py is `table4.report`."""
    parts = path.with_suffix("").relative_to(_import_root(path)).parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, me: str) -> Iterator[tuple[int, str, Optional[str]]]:
    """(line, module, name) for every import statement of `path` (module `me`): `import m` gives
    (line, m, None), `from m import n` gives (line, m, n); relative imports resolved against `me`."""
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                yield node.lineno, module, alias.name


def _edges(name: str) -> set[str]:
    """The package modules that module `name` imports (a name that is a submodule counts as that
    submodule; importing a package means its __init__; a module's own parents are not edges)."""
    out = set()
    for _, module, imported in _imports(MODULES[name], name):
        if imported is not None and f"{module}.{imported}" in MODULES:
            out.add(f"{module}.{imported}")
        elif module in MODULES:
            out.add(module)
    out.discard(name)
    return out


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each as a cycle path."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(_cycle_path(graph, set(component)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """One cycle through the component, start -> ... -> start (breadth-first back to the start)."""
    start = min(component)
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [start] + path[::-1][1:] + [start] if len(path) > 1 else [start, v, start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return sorted(component)


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}
    assert _cycles(graph) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
    assert "mtd_fast.train" in MODULES and "mtd_fast.kernels" in MODULES
    graph = {name: _edges(name) for name in MODULES}
    assert graph["mtd_fast"] >= {"mtd_fast.train", "mtd_fast.data"}  # the graph is read at all
    cycles = _cycles(graph)
    assert not cycles, "import cycles (module -> imported module): " + "; ".join(" -> ".join(c) for c in cycles)


# (importing file, private module or name) -> why it may
PRIVATE_ALLOWED = {
    ("tests/test_spmm.py", "mtd_fast._spmm_cpp"): "the compiled extension's own tests: its ISA switch and "
                                                  "NumPy-level input checks, which the torch wrapper does not expose",
}


def _private(dotted: str) -> Optional[str]:
    """The first private segment (`_x`, not a dunder) of a dotted name, with what precedes it."""
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if part.startswith("_") and not (part.startswith("__") and part.endswith("__")):
            return ".".join(parts[:i + 1])
    return None


# The compiled extensions setup.py builds (`EXT_NAME = "..."`): modules of the package even in a
# checkout where no build put the .so beside the sources (a fresh clone, CI).
EXTENSIONS = frozenset(re.findall(r'^EXT_NAME\s*=\s*"([\w.]+)"', (ROOT / "setup.py").read_text(), flags=re.M))


def _is_module(dotted: str, folder: Path) -> bool:
    """A module of the package (source or compiled extension), or a module or package found from
    `folder` (the import root of tests and benches: `harness`, `table4`, `table4.report`)."""
    if dotted in MODULES or dotted in EXTENSIONS:
        return True
    parent, _, stem = dotted.rpartition(".")
    base = ROOT if dotted.split(".")[0] == "mtd_fast" else folder
    where = base / parent.replace(".", "/") if parent else folder
    return ((where / f"{stem}.py").is_file() or (where / stem / "__init__.py").is_file()
            or any(where.glob(f"{stem}.*.so")))


def _private_offences(path: Path, me: str) -> list[str]:
    """The imports of `path` (module `me`) that reach a private name of another module of this
    project: `from m import _x` where _x is not a module, or a private module (`_m`) imported from
    outside the package that holds it (tests and benches: from outside its folder). Other
    libraries' private names (torch.utils._pytree) are their business, not checked."""
    bad = []
    rel = path.relative_to(ROOT).as_posix() if ROOT in path.parents else str(path)
    folder = path.parent if me in MODULES else _import_root(path)
    for line, module, name in _imports(path, me):
        dotted = module if name is None else f"{module}.{name}"
        top = dotted.split(".")[0]
        if top != "mtd_fast" and not _is_module(top, folder):
            continue
        private = _private(dotted)
        if private is None or (rel, private) in PRIVATE_ALLOWED:
            continue
        holder = private.rpartition(".")[0]
        if _is_module(private, folder) and (me.startswith(holder + ".") if holder else True):
            continue  # a private module used inside its own package (top level: found in the same folder)
        bad.append(f"{rel}:{line}: {dotted}")
    return bad


def test_no_private_names_imported_across_modules():
    files = sorted(MODULES.values()) + sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benches").rglob("*.py"))
    bad = [b for path in files for b in _private_offences(path, _module_name(path) or _local_name(path))]
    assert not bad, "private names imported from another module (make them public with a docstring, or " \
                    "move them where they belong): " + "; ".join(bad)


def _private_patches(path: Path) -> list[str]:
    """The calls of `path` that set or delete a private attribute named by a string:
    `setattr(obj, "_x", v)`, `monkeypatch.setattr(obj, "_x", v)`, `monkeypatch.setattr("m._x", v)`
    (and `delattr`); what a test replaces there, the code under test looks up as a private name."""
    bad = []
    rel = path.relative_to(ROOT).as_posix() if ROOT in path.parents else str(path)
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call):
            continue
        func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
        if func not in ("setattr", "delattr"):
            continue
        for arg in node.args[:2]:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and _private(arg.value) is not None:
                bad.append(f"{rel}:{node.lineno}: {func}(..., {arg.value!r})")
    return bad


def test_no_private_attributes_patched_by_name():
    files = sorted((ROOT / "tests").rglob("*.py")) + sorted((ROOT / "benches").rglob("*.py"))
    bad = [b for path in files for b in _private_patches(path)]
    assert not bad, "private attributes patched by name (patch a public name, with a docstring or comment " \
                    "saying what it is for, or restructure the test): " + "; ".join(bad)


def test_private_patch_rule_catches_offenders(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("monkeypatch.setattr(tr, '_Run', None)\n"            # offence
                   "monkeypatch.setattr('mtd_fast.train._seed', f)\n"   # offence (dotted target)
                   "monkeypatch.delattr(tr, '_x')\n"                    # offence
                   "setattr(obj, '_cache', {})\n"                       # offence (builtin setattr)
                   "monkeypatch.setattr(tr, 'train_step', f)\n"         # public: fine
                   "monkeypatch.setattr(cls, '__init__', f)\n"          # dunder: fine
                   "monkeypatch.setattr(tr, name, f)\n"                 # not a literal: not checked
                   "monkeypatch.setenv('_X', '1')\n")                   # not an attribute
    assert [b.rpartition(": ")[2] for b in _private_patches(src)] == [
        "setattr(..., '_Run')", "setattr(..., 'mtd_fast.train._seed')", "delattr(..., '_x')",
        "setattr(..., '_cache')"]


def test_private_import_rule_catches_offenders(tmp_path):
    src = tmp_path / "probe.py"
    src.write_text("from mtd_fast.train import _seed, train_step\n"  # a private function: offence
                   "from mtd_fast import _spmm_cpp\n"                # a private module from outside: offence
                   "from mtd_fast import __version__\n"              # dunder: fine
                   "import mtd_fast.graph._numba_cache\n"            # private module from outside: offence
                   "from torch.utils._pytree import tree_map\n")     # another library's: not checked
    assert [b.rpartition(": ")[2] for b in _private_offences(src, "probe")] == [
        "mtd_fast.train._seed", "mtd_fast._spmm_cpp", "mtd_fast.graph._numba_cache"]
    # inside the package: a private module of the package is fine, a private function is not
    assert [b.rpartition(": ")[2] for b in _private_offences(src, "mtd_fast.graph.numba")] == ["mtd_fast.train._seed"]


def test_private_import_rule_covers_packages_of_tests_and_benches(tmp_path):
    # a package beside the benches (benches/table4/): its private names and modules are its own
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    for name in ("__init__.py", "a.py", "b.py", "_c.py"):
        (pkg / name).write_text("")
    (pkg / "a.py").write_text("from . import _c\n"        # a private module inside its package: fine
                              "from .b import _x, y\n"    # a private name of a sibling: offence
                              "from pkg._c import z\n")   # the same module spelled out: fine
    bench = tmp_path / "bench_probe.py"
    bench.write_text("import pkg\n"
                     "from pkg import _c\n"               # the package's private module, from outside: offence
                     "from pkg.b import _x\n")            # a private name: offence
    assert _local_name(pkg / "a.py") == "pkg.a" and _local_name(pkg / "__init__.py") == "pkg"
    assert [b.rpartition(": ")[2] for b in _private_offences(pkg / "a.py", _local_name(pkg / "a.py"))] == [
        "pkg.b._x"]
    assert [b.rpartition(": ")[2] for b in _private_offences(bench, _local_name(bench))] == ["pkg._c", "pkg.b._x"]
