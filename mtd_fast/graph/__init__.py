"""Session -> graph builders. `reference.py` is the executable spec (NumPy); `numba.py`
(@njit) returns the same arrays. Use `mtd_fast.ops.global_graph` / `session_graphs` to get
the fastest available one."""
from .reference import (
    GlobalGraph,
    GraphTensors,
    PackedSessionGraphs,
    SessionGraphs,
    global_graph_ref,
    pack_session_graphs,
    session_graphs_ref,
    transition_pairs,
)

__all__ = ["GlobalGraph", "GraphTensors", "SessionGraphs", "PackedSessionGraphs", "global_graph_ref",
           "session_graphs_ref", "pack_session_graphs", "transition_pairs"]
