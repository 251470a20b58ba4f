"""Ahead-of-time compile check of the kernels for an NVIDIA target, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the ptxas Triton ships) on a
machine with no GPU and no driver. That catches what the interpreter cannot: type errors
of loop-carried values, tl.dot shape rules (K >= 16), unsupported casts, and, through
`ptxas -v`, register use and spills of the chosen block sizes / warp counts.

Run: `python -m mtd_fast.kernels.aot [arch]` (default 90 = H100/H200), WITHOUT
TRITON_INTERPRET (under the interpreter `triton.jit` returns interpreted functions that
cannot be compiled). tests/test_kernels.py runs it in a subprocess. The specialisations
are each kernel module's `aot_cases()`.
"""
from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import re
import sys
import time

__all__ = ["compile_kernel", "compile_all", "main"]


def _ptxas_stats(text: str) -> dict:
    regs = re.search(r"Used (\d+) registers", text)
    spill_st = re.search(r"(\d+) bytes spill stores", text)
    spill_ld = re.search(r"(\d+) bytes spill loads", text)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill_st.group(1)) if spill_st else None,
            "spill_loads": int(spill_ld.group(1)) if spill_ld else None}


def compile_kernel(fn, signature: dict, constexprs: dict, num_warps: int, arch: int = 90) -> dict:
    """Compile one specialisation; return shared memory, registers and spill bytes."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    # Triton runs `ptxas -v` itself; dump_ptxas_log prints its report, which we capture
    buf = io.StringIO()
    old = triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile
    triton.knobs.nvidia.dump_ptxas_log = True
    triton.knobs.compilation.always_compile = True  # a cache hit would skip ptxas and its report
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(buf):
            c = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    finally:
        triton.knobs.nvidia.dump_ptxas_log, triton.knobs.compilation.always_compile = old
    out = {"shared": c.metadata.shared, "num_warps": num_warps, "compile_s": round(time.perf_counter() - t0, 1)}
    out.update(_ptxas_stats(buf.getvalue()))
    return out


# H100/H200: 227 KB of shared memory per block at most (a config above it fails to launch)
MAX_SHARED_SM90 = 232448
# name on the command line -> the kernel module whose `aot_cases()` it compiles
KERNELS = {"attention": "session_attention", "attention_tiled": "session_attention_tiled", "aggregate": "aggregate",
           "linear_cross_entropy": "linear_cross_entropy"}


def _cases(which: str, quick: bool):
    return importlib.import_module(f"{__package__}.{KERNELS[which]}").aot_cases(quick)


def compile_all(arch: int = 90, which=tuple(KERNELS),
                quick: bool = False) -> list[dict]:
    """Compile every specialisation of `which`; one row per case (errors are rows too)."""
    rows = []
    for w in which:
        for name, fn, sig, cx, nw in _cases(w, quick):
            try:
                info = compile_kernel(fn, sig, cx, nw, arch)
                info["ok"] = info["shared"] <= MAX_SHARED_SM90
                if not info["ok"]:
                    info["error"] = f"shared memory {info['shared']} B > {MAX_SHARED_SM90} B"
            except Exception as exc:  # report every failing specialisation, not just the first
                info = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:2000]}"}
            info["case"] = name
            rows.append(info)
            _print_row(info)
    return rows


def _print_row(r: dict) -> None:
    if r["ok"]:
        print(f"ok   {r['case']:<58} warps={r['num_warps']:<2} regs={r['regs']} "
              f"spill={r['spill_stores']}/{r['spill_loads']} B smem={r['shared']} ({r['compile_s']} s)", flush=True)
    else:
        print(f"FAIL {r['case']}: {r['error']}", flush=True)


def main(argv=None) -> int:
    """python -m mtd_fast.kernels.aot [--quick] [--json PATH] [arch]
    [attention|attention_tiled|aggregate|linear_cross_entropy ...]"""
    argv = list(sys.argv[1:] if argv is None else argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("unset TRITON_INTERPRET to compile for a GPU target", file=sys.stderr)
        return 2
    quick = "--quick" in argv
    argv = [a for a in argv if a != "--quick"]
    json_path = None
    if "--json" in argv:
        i = argv.index("--json")
        json_path = argv[i + 1]
        del argv[i:i + 2]
    arch = int(argv.pop(0)) if argv and argv[0].isdigit() else 90
    which = tuple(argv) or tuple(KERNELS)
    rows = compile_all(arch, which, quick)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} specialisations compiled for sm_{arch}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
