"""Triton kernels of mtd_fast, installed as `mtd_fast.kernels` (setuptools package_dir).

One op per module, each with `_<op>_fwd_kernel` / `_<op>_bwd_kernel`, `<op>_forward` /
`<op>_backward` launchers, an autograd Function, `<op>_triton` (the backend registered by
the op's module in `mtd_fast.ops`) and `aot_cases()` (its specialisations for `aot`):

- `session_attention` (whole rows, seq_len <= 128, and the entry point) with
  `session_attention_tiled` (longer sessions);
- `aggregate`;
- `linear_cross_entropy`.

`common` holds what they share (launch helpers, two device functions); `aot` compiles every
kernel for sm_90 without a GPU. This package imports nothing: Triton is imported only by
the kernel modules, so `import mtd_fast.kernels` works without Triton installed.
"""
