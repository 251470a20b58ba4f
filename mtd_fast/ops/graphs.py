"""The graph-building ops `global_graph` (the CSR of A + I over the training sessions, once
per dataset) and `session_graphs` (SR-GNN's per-batch session graphs). Their
implementations live in `mtd_fast.graph`: `reference.py` (NumPy, the executable spec) and
`numba.py` (backend "numba", `auto` everywhere: the builders run on the host).

Tests: tests/test_graph_ref.py (against hand-computed graphs), tests/test_graph_numba.py
(numba against the reference). Bench: benches/bench_graph.py.
"""
from __future__ import annotations

import numpy as np

from .dispatch import register, resolve

__all__ = ["global_graph", "session_graphs"]


def global_graph(sessions, n_items: int, directed: bool = False, weighted: bool = False, backend=None):
    """Unnormalized CSR of `A + I` of the training sessions (`GlobalGraph`)."""
    return resolve("global_graph", backend, "cpu")(sessions, n_items, directed=directed, weighted=weighted)


def session_graphs(items: np.ndarray, lengths: np.ndarray, packed: bool = False, backend=None):
    """Per-session SR-GNN graphs of a padded batch: `SessionGraphs` (B x n x n adjacency), or
    with `packed=True` the same graphs as node and edge lists (`PackedSessionGraphs`)."""
    return resolve("session_graphs", backend, "cpu")(np.asarray(items), np.asarray(lengths), packed=packed)


# ---- backends: rank orders auto's preference (lower first); reference is the fallback -------
register("global_graph", "reference", "mtd_fast.graph.reference:global_graph_ref", rank=100)
register("global_graph", "numba", "mtd_fast.graph.numba:global_graph_numba", rank=0, auto_devices=("cpu", "cuda"))
register("session_graphs", "reference", "mtd_fast.graph.reference:session_graphs_ref", rank=100)
register("session_graphs", "numba", "mtd_fast.graph.numba:session_graphs_numba", rank=0,
         auto_devices=("cpu", "cuda"))
