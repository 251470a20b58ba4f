"""Ahead-of-time compile check of the kernels for an NVIDIA target, without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))` runs the whole
pipeline (TTIR -> TTGIR -> LLVM IR -> PTX -> cubin with the ptxas Triton ships) on a
machine with no GPU and no driver. That catches what the interpreter cannot: type errors
of loop-carried values, tl.dot shape rules (K >= 16), unsupported casts, and, through
`ptxas -v`, register use and spills of the chosen block sizes / warp counts.

Run: `python -m mtd_fast.kernels._aot [arch]` (default 90 = H100/H200), WITHOUT
TRITON_INTERPRET (under the interpreter `triton.jit` returns interpreted functions that
cannot be compiled). tests/test_triton_kernels.py runs it in a subprocess.
"""
from __future__ import annotations

import contextlib
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


_DT = {"fp32": "float32", "bf16": "bfloat16"}
# H100/H200: 227 KB of shared memory per block at most (a config above it fails to launch)
MAX_SHARED_SM90 = 232448


def _attention_cases(quick: bool = False):
    import torch

    from . import session_attention as sa

    ptr = ("Q", "K", "V", "DMASK", "O", "DO", "DQ", "DK", "DV")
    shapes = ((50, 100),) if quick else ((50, 100), (20, 100), (128, 128), (50, 25), (16, 8), (1, 100))
    for dt in ("fp32", "bf16"):
        tdt = getattr(torch, _DT[dt])
        for seq, hd in shapes:
            bl, bdk, nch = sa._blocks(seq, hd, tdt)
            for bwd in (False, True):
                fn = sa._session_attention_bwd_kernel if bwd else sa._session_attention_fwd_kernel
                sig = {}
                for a in fn.arg_names:
                    if a in ptr:
                        sig[a] = f"*{dt}"
                    elif a == "LENS":
                        sig[a] = "*i32"
                    elif a.startswith("stride"):
                        sig[a] = "i64"
                    elif a in ("L", "HEAD_DIM"):
                        sig[a] = "i32"
                    elif a in ("qk_scale", "sm_scale"):
                        sig[a] = "fp32"
                for drop in ((True,) if quick else (False, True)):
                    cx = {"BLOCK_L": bl, "BLOCK_DK": bdk, "NUM_DCHUNKS": nch, "HAS_DROPOUT": drop,
                          "DOT_PRECISION": os.environ.get("AOT_PREC", "ieee")}
                    if bwd:
                        cx.update({"NEED_DQ": True, "NEED_DK": True, "NEED_DV": True})
                    name = f"attn_{'bwd' if bwd else 'fwd'} {dt} L={seq} hd={hd} drop={drop}"
                    yield name, fn, sig, cx, sa._num_warps(bl, bwd, tdt)


def _attention_tiled_cases(quick: bool = False):
    import torch

    from . import session_attention as sa

    ptr = ("Q", "K", "V", "DMASK", "O", "DO", "DQ", "DK", "DV")
    shapes = ((164, 100),) if quick else ((164, 100), (300, 100), (150, 25))
    kernels = (("fwd", sa._session_attention_fwd_tiled_kernel, "NUM_KTILES"),
               ("bwd_dkdv", sa._session_attention_bwd_dkdv_tiled_kernel, "NUM_QTILES"),
               ("bwd_dq", sa._session_attention_bwd_dq_tiled_kernel, "NUM_KTILES"))
    for dt in ("fp32", "bf16"):
        tdt = getattr(torch, _DT[dt])
        for seq, hd in shapes:
            block, block_d, n_tiles, warps = sa._tiled_blocks(seq, hd, tdt)
            for kname, fn, tiles_arg in kernels:
                sig = {}
                for a in fn.arg_names:
                    if a in ptr:
                        sig[a] = f"*{dt}"
                    elif a in ("LSE", "DELTA"):
                        sig[a] = "*fp32"
                    elif a == "LENS":
                        sig[a] = "*i32"
                    elif a.startswith("stride"):
                        sig[a] = "i64"
                    elif a in ("L", "HEAD_DIM", "NUM_HEADS"):
                        sig[a] = "i32"
                    elif a in ("qk_scale", "sm_scale"):
                        sig[a] = "fp32"
                cx = {"BLOCK_M": block, "BLOCK_N": block, "BLOCK_D": block_d, tiles_arg: n_tiles,
                      "HAS_DROPOUT": True, "DOT_PRECISION": os.environ.get("AOT_PREC", "ieee")}
                if kname == "bwd_dkdv":
                    cx.update({"NEED_DK": True, "NEED_DV": True})
                yield f"attn_tiled_{kname} {dt} L={seq} hd={hd} drop=True", fn, sig, cx, warps


def _aggregate_cases(quick: bool = False):
    import triton

    from . import aggregate as ag

    ptr = ("H", "HP", "A", "G", "XS", "PS", "DXS", "DPS", "DH", "DHP", "DA")
    f32 = ("LSE", "DG_PART", "DGAMMA_PART")
    shapes = ((50, 100),) if quick else ((50, 100), (200, 100), (19, 64), (1, 100))
    for dt in ("fp32", "bf16"):
        for seq, d in shapes:
            bl, bd = ag._blocks(seq, d)
            for bwd in (False, True):
                fn = ag._aggregate_bwd_kernel if bwd else ag._aggregate_fwd_kernel
                for product in ((True,) if quick else (False, True)):
                    for gptr in ((True,) if quick else (False, True)):
                        sig = {}
                        for a in fn.arg_names:
                            if a in ptr:
                                sig[a] = f"*{dt}"
                            elif a in f32:
                                sig[a] = "*fp32"
                            elif a == "LENS":
                                sig[a] = "*i32"
                            elif a == "GAMMA":
                                sig[a] = "*fp32" if gptr else "fp32"
                            elif a.startswith("stride"):
                                sig[a] = "i64"
                            elif a in ("L", "D"):
                                sig[a] = "i32"
                        cx = {"BLOCK_L": bl, "BLOCK_D": bd, "NUM_CHUNKS": triton.cdiv(seq, bl),
                              "PRODUCT": product, "GAMMA_IS_PTR": gptr}
                        if bwd:
                            cx.update({n: True for n in fn.arg_names if n.startswith("NEED_")})
                        name = (f"agg_{'bwd' if bwd else 'fwd'} {dt} L={seq} d={d} "
                                f"{'product' if product else 'additive'} gamma={'ptr' if gptr else 'float'}")
                        yield name, fn, sig, cx, ag._num_warps(bl, bd)


def _signature(fn, types: dict) -> dict:
    """Triton signature of `fn`'s runtime arguments: `types` by name, i64 for strides;
    the rest (constexprs) are filled in by compile_kernel."""
    return {a: types.get(a, "i64" if a.startswith("stride") else None) for a in fn.arg_names
            if a in types or a.startswith("stride")}


def _lce_cases(quick: bool = False):
    import torch
    import triton

    from . import linear_cross_entropy as lce

    f32 = ("M_PART", "S_PART", "XT_PART", "LSE", "SCALE", "DT", "DQ_PART")
    # (batch, M, dim): Diginetica at batch 512 (and its last, smaller batch), 1M items, odd dims
    shapes = ((512, 43097, 100),) if quick else ((512, 43097, 100), (217, 43097, 100), (512, 1_000_000, 100),
                                                 (512, 43097, 64), (64, 5000, 256), (3, 17, 8))
    for dt in ("fp32", "bf16"):
        tdt = getattr(torch, _DT[dt])
        for b, m, d in shapes:
            bb, bn, bdk, nch = lce._blocks(d, tdt)
            n_tiles = triton.cdiv(m, bn)
            for bwd in (False, True):
                fn = lce._lce_bwd_kernel if bwd else lce._lce_fwd_kernel
                sig = _signature(fn, {"Q": f"*{dt}", "T": f"*{dt}", "TGT": "*i64", "B": "i32", "M": "i32",
                                      "D": "i32", **{a: "*fp32" for a in f32}})
                tiles = lce._tiles(n_tiles, 1 if bwd else triton.cdiv(b, bb))
                cx = {"BLOCK_B": bb, "BLOCK_N": bn, "BLOCK_DK": bdk, "NUM_DCHUNKS": nch, "TILES": tiles,
                      "DOT_PRECISION": os.environ.get("AOT_PREC", "ieee") if dt == "fp32" else "ieee"}
                if bwd:
                    cx.update({"ROW_BLOCKS": triton.cdiv(b, bb), "NEED_DQ": True, "NEED_DT": True})
                name = f"lce_{'bwd' if bwd else 'fwd'} {dt} B={b} M={m} d={d}"
                yield name, fn, sig, cx, lce._num_warps(bwd, tdt)


def compile_all(arch: int = 90, which=("attention", "attention_tiled", "aggregate", "linear_cross_entropy"),
                quick: bool = False) -> list[dict]:
    """Compile every specialisation of `which`; one row per case (errors are rows too)."""
    rows = []
    gens = {"attention": _attention_cases, "attention_tiled": _attention_tiled_cases, "aggregate": _aggregate_cases,
            "linear_cross_entropy": _lce_cases}
    for w in which:
        for name, fn, sig, cx, nw in gens[w](quick):
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
    """python -m mtd_fast.kernels._aot [--quick] [--json PATH] [arch]
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
    which = tuple(argv) or ("attention", "attention_tiled", "aggregate", "linear_cross_entropy")
    rows = compile_all(arch, which, quick)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=1)
    bad = [r for r in rows if not r["ok"]]
    print(f"{len(rows) - len(bad)}/{len(rows)} specialisations compiled for sm_{arch}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
