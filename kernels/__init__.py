"""Triton kernels of mtd_fast, installed as `mtd_fast.kernels` (setuptools package_dir).

One op per module: `session_attention` and `aggregate`, each with `_<op>_fwd_kernel`,
`_<op>_bwd_kernel`, `<op>_forward` / `<op>_backward` launchers, an autograd Function and
`<op>_triton` (the backend entry point registered in `mtd_fast.ops`). `_aot` compiles them
for sm_90 without a GPU. This package imports nothing: Triton is imported only by the kernel
modules, so `import mtd_fast.kernels` works without Triton installed.
"""
