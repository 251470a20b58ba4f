"""The hot ops of MTD: one module per op, each with the public function (a `backend=`
argument), the pure-PyTorch reference and the CPU backends, and the registration of its
backends (Triton kernels live in `mtd_fast.kernels`, one module per op too):

| op | module | backends (`auto` picks the first that runs on the tensor's device) |
| --- | --- | --- |
| `session_attention` | `session_attention.py` | triton (CUDA), packed (CPU), reference |
| `aggregate` | `aggregate.py` | triton (CUDA), packed (CPU), reference |
| `spmm` | `spmm.py`, `spmm_cpp.py` | cpp (CPU), reference |
| `global_graph`, `session_graphs` | `graphs.py` (builders in `mtd_fast.graph`) | numba, reference |
| `linear_cross_entropy` | `linear_cross_entropy.py` | triton (CUDA), chunked, reference |

`dispatch.py` holds the registry and the selection rules (an explicit `backend=`, then
`$MTD_FAST_BACKEND`, then `auto`); `common.py` the checks and helpers the op modules share.
Each op's module shares the op's name; the package attribute is the function
(`mtd_fast.ops.spmm(...)`), so reach a module's names as `from mtd_fast.ops.spmm import
spmm_ref`, and the module object itself as `importlib.import_module("mtd_fast.ops.spmm")`
(`import mtd_fast.ops.spmm as m` would bind the function).
"""
from __future__ import annotations

from .aggregate import aggregate, aggregate_ref
from .dispatch import OPS, BackendError, available_backends, describe, validate_spec
from .graphs import global_graph, session_graphs
from .linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_ref
from .session_attention import session_attention, session_attention_ref
from .spmm import spmm, spmm_ref

__all__ = ["session_attention", "aggregate", "spmm", "global_graph", "session_graphs", "available_backends",
           "BackendError", "OPS", "session_attention_ref", "aggregate_ref", "spmm_ref", "describe",
           "validate_spec", "linear_cross_entropy", "linear_cross_entropy_ref"]
