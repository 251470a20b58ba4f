"""The Numba graph builders against the NumPy references, bit for bit, plus the
import/caching contract of `mtd_fast.graph.numba` (read-only installs, NUMBA_CACHE_DIR,
compile-cost reporting, `import mtd_fast` without Numba)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from mtd_fast.data import Sessions, load_dataset, pad_batch
from mtd_fast.graph import GlobalGraph, PackedSessionGraphs, SessionGraphs, global_graph_ref, session_graphs_ref

from testing import shared_path

pytest.importorskip("numba", reason="numba is not installed: the numba backend is unavailable")
gn = pytest.importorskip("mtd_fast.graph.numba", reason="mtd_fast.graph.numba failed to import")

PROJECT = Path(__file__).resolve().parents[1]

COMBOS = [(False, False), (False, True), (True, False), (True, True)]  # (directed, weighted)


# --------------------------------------------------------------------------- helpers
# the kernels called from Python: global graph (scan + build), padded and packed session graphs
N_KERNELS = 4


def assert_same_array(a: np.ndarray, b: np.ndarray, name: str) -> None:
    assert isinstance(b, np.ndarray), f"{name}: {type(b)}"
    assert a.dtype == b.dtype, f"{name}: dtype {b.dtype} != reference {a.dtype}"
    assert a.shape == b.shape, f"{name}: shape {b.shape} != reference {a.shape}"
    # bit for bit: compare the raw bytes (tells -0.0 from 0.0, and NaN payloads)
    assert a.tobytes() == b.tobytes(), f"{name}: values differ at {np.flatnonzero(a.ravel() != b.ravel())[:10]}"


def assert_same_graph(ref: GlobalGraph, got: GlobalGraph) -> None:
    assert isinstance(got, GlobalGraph)
    for name in ("indptr", "indices", "degrees", "nodes"):
        assert_same_array(getattr(ref, name), getattr(got, name), name)
    if ref.values is None:
        assert got.values is None, "binary graph must have values=None"
    else:
        assert_same_array(ref.values, got.values, "values")
    assert (got.n_items, got.directed, got.weighted) == (ref.n_items, ref.directed, ref.weighted)


def assert_same_session_graphs(ref, got) -> None:
    assert type(got) is type(ref) and type(ref) in (SessionGraphs, PackedSessionGraphs)
    for name in ref.__dataclass_fields__:
        assert_same_array(getattr(ref, name), getattr(got, name), name)


def assert_numba_matches_reference(items, lengths) -> SessionGraphs:
    """The Numba builder equals the reference bit for bit, padded and packed; the padded Numba graphs."""
    for packed in (False, True):
        got = gn.session_graphs_numba(items, lengths, packed=packed)
        assert_same_session_graphs(session_graphs_ref(items, lengths, packed=packed), got)
        if not packed:
            dense = got
    return dense


def random_sessions(rng: np.random.Generator, n_sessions: int, n_items: int, *, max_len: int = 12,
                    p_repeat: float = 0.25, huge: int = 0) -> Sessions:
    """Sessions with consecutive repeats, length-0 and length-1 sessions, and optionally
    one huge session (at a random position)."""
    seqs = []
    for _ in range(n_sessions):
        n = int(rng.integers(0, max_len + 1))
        s = []
        for _ in range(n):
            if s and rng.random() < p_repeat:
                s.append(s[-1] if rng.random() < 0.7 else s[int(rng.integers(len(s)))])
            else:
                s.append(int(rng.integers(1, n_items + 1)))
        seqs.append(s)
    if huge:
        big = rng.integers(1, n_items + 1, size=huge)
        big[1::7] = big[0::7][:big[1::7].size]  # plenty of repeats inside it too
        seqs.insert(int(rng.integers(len(seqs) + 1)), big.tolist())
    return Sessions.from_lists(seqs)


def random_batch(rng: np.random.Generator, b: int, L: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    lengths = rng.integers(1, L + 1, size=b)
    lengths[rng.random(b) < 0.2] = 1  # plenty of length-1 rows
    lengths[0] = L
    items = np.zeros((b, L), dtype=np.int64)
    for k in range(b):
        row = rng.integers(1, n_items + 1, size=lengths[k])
        rep = rng.random(lengths[k]) < 0.3  # repeated items, adjacent and not
        for t in np.flatnonzero(rep):
            if t:
                row[t] = row[t - 1] if rng.random() < 0.5 else row[int(rng.integers(t))]
        items[k, :lengths[k]] = row
    return items, lengths.astype(np.int64)


# --------------------------------------------------------------------------- global graph
@pytest.mark.parametrize("directed,weighted", COMBOS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_global_graph_random_matches_reference(seed, directed, weighted):
    rng = np.random.default_rng(seed)
    n_items = [7, 50, 997][seed]  # tiny catalogue = dense rows and many duplicate edges
    sessions = random_sessions(rng, 400, n_items)
    ref = global_graph_ref(sessions, n_items, directed=directed, weighted=weighted)
    assert ref.nnz > ref.num_nodes > 0  # the case is not degenerate
    assert_same_graph(ref, gn.global_graph_numba(sessions, n_items, directed=directed, weighted=weighted))


@pytest.mark.parametrize("directed,weighted", COMBOS)
def test_global_graph_one_huge_session(directed, weighted):
    rng = np.random.default_rng(7)
    sessions = random_sessions(rng, 50, 3000, huge=50_000)
    assert sessions.lengths.max() == 50_000
    ref = global_graph_ref(sessions, 3000, directed=directed, weighted=weighted)
    got = gn.global_graph_numba(sessions, 3000, directed=directed, weighted=weighted)
    assert_same_graph(ref, got)
    if weighted:
        assert got.values.max() > 1  # repeated transitions were counted


@pytest.mark.parametrize("directed,weighted", COMBOS)
@pytest.mark.parametrize("case", ["no_sessions", "only_length_1", "only_repeats", "only_empty"])
def test_global_graph_without_edges(case, directed, weighted):
    sessions = {
        "no_sessions": Sessions.empty(),
        "only_length_1": Sessions.from_lists([[3], [1], [5]]),
        "only_repeats": Sessions.from_lists([[2, 2, 2], [4], [4, 4]]),
        "only_empty": Sessions.from_lists([[], [], []]),
    }[case]
    ref = global_graph_ref(sessions, 5, directed=directed, weighted=weighted)
    got = gn.global_graph_numba(sessions, 5, directed=directed, weighted=weighted)
    assert got.num_nodes == 0 and got.nnz == 0 and got.indptr.tolist() == [0]
    assert_same_graph(ref, got)


@pytest.mark.parametrize("directed,weighted", COMBOS)
def test_global_graph_small_hand_checked(directed, weighted):
    # 1->2 twice, 2->1 once, 2->3 once; 3->3 is a repeat (no edge); 9 has no edge
    sessions = Sessions.from_lists([[1, 2, 1, 2], [2, 3, 3], [9]])
    got = gn.global_graph_numba(sessions, 9, directed=directed, weighted=weighted)
    assert got.nodes.tolist() == [1, 2, 3]
    dense = np.zeros((3, 3))
    rows = np.repeat(np.arange(3), np.diff(got.indptr))
    dense[rows, got.indices] = 1.0 if got.values is None else got.values
    if directed:
        want = [[1, 2, 0], [1, 1, 1], [0, 0, 1]] if weighted else [[1, 1, 0], [1, 1, 1], [0, 0, 1]]
    else:
        want = [[1, 3, 0], [3, 1, 1], [0, 1, 1]] if weighted else [[1, 1, 0], [1, 1, 1], [0, 1, 1]]
    np.testing.assert_array_equal(dense, np.array(want, dtype=float))
    np.testing.assert_array_equal(got.degrees, np.array(want, dtype=np.float32).sum(1))
    assert_same_graph(global_graph_ref(sessions, 9, directed=directed, weighted=weighted), got)


def test_global_graph_item_zero_and_top_id_are_nodes():
    sessions = Sessions.from_lists([[0, 6], [6, 3]])
    assert_same_graph(global_graph_ref(sessions, 6), gn.global_graph_numba(sessions, 6))


def test_global_graph_out_of_range_raises_like_reference():
    sessions = Sessions.from_lists([[1, 2], [3, 11]])
    with pytest.raises(ValueError, match="out of range"):
        global_graph_ref(sessions, 10)
    with pytest.raises(ValueError, match="item id 11 is out of range for n_items=10"):
        gn.global_graph_numba(sessions, 10)
    # an out-of-range id that is on no edge is not an error, for either builder
    alone = Sessions.from_lists([[1, 2], [50], [7, 7]])
    assert_same_graph(global_graph_ref(alone, 10), gn.global_graph_numba(alone, 10))


def test_global_graph_accepts_read_only_and_int64_inputs():
    rng = np.random.default_rng(3)
    s = random_sessions(rng, 200, 40)
    offsets, items = s.offsets.copy(), s.items.astype(np.int64)
    offsets.setflags(write=False)
    items.setflags(write=False)
    assert_same_graph(global_graph_ref(s, 40), gn.global_graph_numba(Sessions(offsets, items), 40))


def test_global_graph_through_ops_dispatch():
    from mtd_fast import ops

    rng = np.random.default_rng(4)
    s = random_sessions(rng, 100, 30)
    assert "numba" in ops.available_backends()["global_graph"]
    assert_same_graph(global_graph_ref(s, 30, weighted=True), ops.global_graph(s, 30, weighted=True, backend="numba"))


# (directed, weighted) -> (stored entries of A + I, their sum) on Diginetica's training sessions
DIGINETICA_GRAPH = {(False, False): (762_502, 762_502), (False, True): (762_502, 1_223_580),
                    (True, False): (470_601, 470_601), (True, True): (470_601, 633_232)}


@pytest.fixture(scope="module")
def diginetica():
    return load_dataset("diginetica", root=shared_path("diginetica"))


@pytest.mark.parametrize("directed,weighted", COMBOS)
def test_global_graph_diginetica_matches_reference(diginetica, directed, weighted):
    ds = diginetica
    ref = global_graph_ref(ds.train_sessions, ds.n_items, directed=directed, weighted=weighted)
    # exact sizes of the full training graph (weighted: the sum of the stored transition counts)
    nnz, total = DIGINETICA_GRAPH[directed, weighted]
    assert (ref.num_nodes, ref.nnz) == (42_884, nnz)
    assert (float(ref.values.sum()) if weighted else ref.nnz) == total
    assert_same_graph(ref, gn.global_graph_numba(ds.train_sessions, ds.n_items, directed=directed, weighted=weighted))


# --------------------------------------------------------------------------- session graphs
@pytest.mark.parametrize("b,L,n_items,seed", [(1, 1, 5, 0), (7, 3, 4, 1), (64, 13, 9, 2), (128, 50, 40, 3),
                                              (33, 97, 500, 4)])
def test_session_graphs_random_matches_reference(b, L, n_items, seed):
    # L = 50 and 97 take the np.sort path (rows longer than the insertion-sort cutoff)
    items, lengths = random_batch(np.random.default_rng(seed), b, L, n_items)
    got = assert_numba_matches_reference(items, lengths)
    if L > 1:
        assert (got.adj_out > 0).any() and (got.adj_out < 1).any()  # normalization is exercised


def test_session_graphs_hand_checked():
    # session 2 -> 5 -> 2 -> 2 -> 7: nodes [2, 5, 7]; edges 2->5, 5->2, 2->2, 2->7
    items = np.array([[2, 5, 2, 2, 7], [4, 0, 0, 0, 0]], dtype=np.int64)
    lengths = np.array([5, 1])
    got = gn.session_graphs_numba(items, lengths)
    assert got.nodes.tolist() == [[2, 5, 7], [4, 0, 0]]
    assert got.alias.tolist() == [[0, 1, 0, 0, 2], [0, 0, 0, 0, 0]]
    assert got.n_nodes.tolist() == [3, 1]
    third = np.float32(1) / np.float32(3)
    np.testing.assert_array_equal(got.adj_out[0], np.array([[third, third, third], [1, 0, 0], [0, 0, 0]], np.float32))
    # in-neighbours: of 2 are {2, 5}; of 5 is {2}; of 7 is {2}
    np.testing.assert_array_equal(got.adj_in[0], np.array([[0.5, 0.5, 0], [1, 0, 0], [1, 0, 0]], np.float32))
    assert not got.adj_in[1].any() and not got.adj_out[1].any()
    assert_numba_matches_reference(items, lengths)
    p = gn.session_graphs_numba(items, lengths, packed=True)  # the same graphs without padding
    assert p.node_ids.tolist() == [2, 5, 7, 4] and p.node_ptr.tolist() == [0, 3, 4]
    assert p.click_node.tolist() == [0, 1, 0, 0, 2, 3] and p.click_session.tolist() == [0, 0, 0, 0, 0, 1]
    assert list(zip(p.edge_src.tolist(), p.edge_dst.tolist())) == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert p.out_degree.tolist() == [3, 1, 0, 0] and p.in_degree.tolist() == [2, 1, 1, 0]


def test_session_graphs_padding_is_ignored_and_dtypes_normalized():
    items = np.array([[3, 1, 99, 99], [5, 5, 99, 99]], dtype=np.int32)  # garbage past the lengths
    lengths = np.array([2, 2], dtype=np.int32)
    assert 99 not in assert_numba_matches_reference(items, lengths).nodes
    assert 99 not in gn.session_graphs_numba(items, lengths, packed=True).node_ids


@pytest.mark.parametrize("shape", [(0, 0), (0, 5), (3, 4)])
def test_session_graphs_degenerate_batches(shape):
    items = np.zeros(shape, dtype=np.int64)
    lengths = np.zeros(shape[0], dtype=np.int64)  # all rows fully padded
    assert_numba_matches_reference(items, lengths)


@pytest.mark.parametrize("build", [gn.session_graphs_numba, session_graphs_ref], ids=["numba", "reference"])
@pytest.mark.parametrize("packed", [False, True])
def test_session_graphs_reject_bad_lengths(build, packed):
    items = np.ones((2, 3), dtype=np.int64)
    with pytest.raises(ValueError, match="lengths"):
        build(items, np.array([1, 4]), packed=packed)
    with pytest.raises(ValueError, match="lengths"):
        build(items, np.array([1, -1]), packed=packed)
    with pytest.raises(ValueError, match="lengths"):
        build(items, np.array([1, 2, 3]), packed=packed)
    with pytest.raises(ValueError, match="items"):
        build(np.ones(3, dtype=np.int64), np.array([1, 2, 3]), packed=packed)
    with pytest.raises(TypeError, match="integer"):
        build(items.astype(np.float32), np.array([1, 2]), packed=packed)


def test_session_graphs_diginetica_batches(diginetica):
    prefixes = diginetica.train.prefixes
    rng = np.random.default_rng(0)
    for _ in range(3):
        idx = rng.choice(len(prefixes), 512, replace=False)
        items, lengths = pad_batch(prefixes, idx)
        assert_numba_matches_reference(items, lengths)
    longest = np.argsort(prefixes.lengths)[-64:]  # the longest prefixes (up to 69 clicks)
    items, lengths = pad_batch(prefixes, longest)
    assert lengths.max() > 40
    assert_numba_matches_reference(items, lengths)


def test_session_graphs_through_ops_dispatch():
    from mtd_fast import ops

    items, lengths = random_batch(np.random.default_rng(5), 16, 6, 10)
    for packed in (False, True):
        assert_same_session_graphs(session_graphs_ref(items, lengths, packed=packed),
                                   ops.session_graphs(items, lengths, packed=packed, backend="numba"))


# --------------------------------------------------------------------------- compile cost
def test_warmup_reports_compile_cost(caplog):
    caplog.set_level(logging.INFO, logger="mtd_fast")
    gn.warmup()
    report = gn.compile_report()
    assert report is not None and report["seconds"] > 0
    assert report["cache_hits"] + report["cache_misses"] == len(gn._KERNELS) == N_KERNELS  # one signature each
    assert gn.warmup() < 0.5 * report["seconds"] + 0.01  # already warm: no second compile


# --------------------------------------------------------------------------- import / cache contract
def _env(**extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
    env.update(extra)
    return env


def _run(code: str, env: dict, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=str(cwd),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_import_mtd_fast_does_not_import_numba(tmp_path):
    code = """
        import json, sys
        import mtd_fast, mtd_fast.graph, mtd_fast.data, mtd_fast.ops
        print(json.dumps({"numba": "numba" in sys.modules,
                          "graph_numba": "mtd_fast.graph.numba" in sys.modules}))
    """
    out = _run(code, _env(), tmp_path)
    assert out == {"numba": False, "graph_numba": False}


_CALL_AND_REPORT = """
    import json, logging, sys
    records = []
    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())
    logger = logging.getLogger("mtd_fast")
    logger.setLevel(logging.INFO)
    logger.addHandler(Keep())
    import numpy as np
    from mtd_fast.data import Sessions
    import mtd_fast.graph.numba as gn
    seconds = gn.warmup()
    g = gn.global_graph_numba(Sessions.from_lists([[1, 2, 3], [3, 1]]), 3)
    sg = gn.session_graphs_numba(np.array([[1, 2, 1]]), np.array([3]))
    print(json.dumps({"file": gn.__file__, "seconds": seconds, "again": gn.warmup(),
                      "report": gn.compile_report(), "log": records,
                      "indices": g.indices.tolist(), "n_nodes": sg.n_nodes.tolist()}))
"""


def _copy_package(dst: Path) -> Path:
    shutil.copytree(PROJECT / "mtd_fast", dst / "mtd_fast",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.pyd"))
    return dst / "mtd_fast"


def test_read_only_install_falls_back_to_a_writable_cache(tmp_path):
    """The package folder and the home cache are unwritable: import, call and reuse still work."""
    site = tmp_path / "site"
    pkg = _copy_package(site)
    graph_dir = pkg / "graph"
    # Numba's in-tree locator needs graph/__pycache__ to be a writable folder. A plain file
    # in its place defeats it even for root (which ignores permission bits); we also drop
    # write permission, which is what a real read-only install looks like.
    (graph_dir / "__pycache__").write_text("not a folder")
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, so nothing can be created below it")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = _env(PYTHONPATH=str(site), HOME=str(blocker / "home"), XDG_CACHE_HOME=str(blocker / "cache"),
               TMPDIR=str(tmpdir), PYTHONDONTWRITEBYTECODE="1")
    modes = {p: p.stat().st_mode for p in [graph_dir, pkg]}
    for p in modes:
        p.chmod(0o555)
    try:
        first = _run(_CALL_AND_REPORT, env, tmp_path)
        second = _run(_CALL_AND_REPORT, env, tmp_path)
    finally:
        for p, m in modes.items():
            p.chmod(stat.S_IMODE(m))
    assert Path(first["file"]).resolve().is_relative_to(site.resolve())  # the copy ran, not the checkout
    assert first["indices"] == [0, 1, 2, 0, 1, 2, 0, 1, 2] and first["n_nodes"] == [2]
    # the cache went to the private fallback folder in the temp dir
    want = tmpdir / f"mtd_fast-numba-cache-{os.getuid()}"
    assert first["report"]["cache_dirs"] and all(Path(d).is_relative_to(want) for d in first["report"]["cache_dirs"])
    assert list(want.rglob("*.nbi")), "nothing was written to the fallback cache"
    assert stat.S_IMODE(want.stat().st_mode) == 0o700
    # first process compiled and said so; the second loaded from the fallback cache
    assert first["report"]["cache_misses"] == N_KERNELS and first["seconds"] > 0
    assert any("compiled" in m and "kernels" in m for m in first["log"])
    assert second["report"]["cache_hits"] == N_KERNELS and second["report"]["cache_misses"] == 0
    assert any("loaded from cache" in m for m in second["log"])
    assert second["again"] < second["seconds"]


def test_user_numba_cache_dir_is_respected(tmp_path):
    user_cache = tmp_path / "user-cache"
    code = """
        import json
        import mtd_fast.graph.numba as gn
        from mtd_fast.graph._numba_cache import cache_location
        print(json.dumps([cache_location(k) for k in gn._KERNELS]))
    """
    paths = _run(code, _env(NUMBA_CACHE_DIR=str(user_cache)), tmp_path)
    assert len(paths) == N_KERNELS and all(Path(p).is_relative_to(user_cache) for p in paths)
