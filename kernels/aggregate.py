"""Fused attentive aggregation + position decay (MTD_SPEC.md section 2, steps 4-5) in Triton.

For each session b with valid positions i < lengths[b] (pos_i = lengths[b] - i):
    e_i     = g . sigmoid(a + hp_i)        (mode "additive", the paper)
            = g . sigmoid(a * hp_i)        (mode "product", the authors' code)
    alpha   = softmax_i(e),                x_s = sum_i alpha_i h_i
    beta    = softmax_i(-gamma * pos_i),   p_s = sum_i beta_i h_i
The truth is `mtd_fast.ops.aggregate.aggregate_ref`.

Design: one program per session streams its rows in chunks of BLOCK_L (a power of two,
BLOCK_L * BLOCK_D <= 2048 elements, so d = 100 -> BLOCK_D = 128 and chunks of 16 rows;
see _MAX_TILE for the register measurements behind it). The forward reads h and hp
once: an online softmax for alpha (running max / sum; the first chunk is peeled so the
loop-carried values have one type) and a closed-form maximum for beta (the logits
-gamma * pos are monotone in pos), and saves per session the two log-sum-exps (B, 2)
fp32. Any seq_len works (no fallback). Chunk loops have a constexpr trip count
(NUM_CHUNKS = cdiv(seq_len, BLOCK_L)): under the interpreter with NumPy 2 a loop to a
runtime bound fails (scalars are 1-element arrays), so each distinct chunk count is one
compiled specialisation (1 for seq_len <= 16 at d = 100, 4 at 50).

Backward (one kernel): with dx, dp the upstream grads and delta_x = dx . x_s,
delta_p = dp . p_s (from the saved outputs, so no second pass over h):
    dh_i  = alpha_i dx + beta_i dp
    de_i  = alpha_i (dx . h_i - delta_x);  dz_i = de_i g * act_i (1 - act_i)
    dhp_i = dz_i (additive) | dz_i * a (product);  da = sum_i dz_i | sum_i dz_i * hp_i
    dg    = sum_b sum_i de_i act_i;  dgamma = sum_b sum_i beta_i (dp . h_i - delta_p) (-pos_i)
dg and dgamma are shared by the batch: each program writes its partial sum (fp32), and
torch sums them (deterministic, no atomics). Padded rows of dh and dhp are written as 0.
All arithmetic is fp32 whatever the input dtype; gamma may be a Python float (passed by
value) or a 0-dim tensor (read on device, no host sync), whose gradient is produced when
it requires one.
"""
from __future__ import annotations

from typing import Union

import torch
import triton
import triton.language as tl

from .common import aot_signature, check_device

__all__ = ["aggregate_triton", "AggregateFunction", "aggregate_forward", "aggregate_backward", "aot_cases"]

# Elements of one BLOCK_L x BLOCK_D chunk. From `ptxas -v` on sm_90a (python -m
# mtd_fast.kernels.aot), fp32, d = 100, L = 50, 8 warps: chunks of 64 x 128 spilled 216 B
# per thread in the backward, 32 x 128 124 B, 16 x 128 none (128 regs; forward 123 regs).
_MAX_TILE = 2048


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
@triton.jit
def _aggregate_scores(hp, a, g, PRODUCT: tl.constexpr):
    """act = sigmoid(a + hp) or sigmoid(a * hp) (BLOCK_L, BLOCK_D) and e = act @ g (BLOCK_L,)."""
    if PRODUCT:
        z = a[None, :] * hp
    else:
        z = a[None, :] + hp
    act = tl.sigmoid(z)
    e = tl.sum(act * g[None, :], axis=1)
    return act, e


@triton.jit
def _aggregate_fwd_chunk(h_base, p_base, rows, n, offs_d, d_ok, stride_hl, stride_hd, stride_pl, stride_pd,
                         a, g, gamma, seq_f, m_b, PRODUCT: tl.constexpr):
    """Softmax statistics of one chunk of rows (at least one valid): its max of e, sum of
    exp(e - max), sum of exp(e - max) h, and the beta sums (relative to the global m_b)."""
    r_ok = rows < n
    ld = r_ok[:, None] & d_ok[None, :]
    h = tl.load(h_base + rows[:, None] * stride_hl + offs_d[None, :] * stride_hd, mask=ld, other=0.0).to(tl.float32)
    hp = tl.load(p_base + rows[:, None] * stride_pl + offs_d[None, :] * stride_pd, mask=ld, other=0.0).to(tl.float32)
    act, e = _aggregate_scores(hp, a, g, PRODUCT)
    e = tl.where(r_ok, e, float("-inf"))
    m_c = tl.max(e, axis=0)
    w = tl.where(r_ok, tl.exp(e - m_c), 0.0)
    # masked before exp: padded rows have pos <= 0 and would overflow
    wb = tl.exp(tl.where(r_ok, -gamma * (seq_f - rows.to(tl.float32)) - m_b, float("-inf")))
    return m_c, tl.sum(w, axis=0), tl.sum(w[:, None] * h, axis=0), tl.sum(wb, axis=0), tl.sum(wb[:, None] * h, axis=0)


@triton.jit
def _aggregate_prologue(b, LENS, GAMMA, A, G, stride_ab, stride_ad, stride_g, L, D,
                        BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, GAMMA_IS_PTR: tl.constexpr):
    """What both aggregation kernels read first for session `b`: its length, the valid rows
    `n` held in the tensor, gamma (a pointer when learned), offsets, and the rows a, g."""
    seq = tl.load(LENS + b).to(tl.int32)
    n = tl.minimum(seq, L)
    if GAMMA_IS_PTR:
        gamma = tl.load(GAMMA).to(tl.float32)
    else:
        gamma = GAMMA
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    a = tl.load(A + b * stride_ab + offs_d * stride_ad, mask=d_ok, other=0.0).to(tl.float32)
    g = tl.load(G + offs_d * stride_g, mask=d_ok, other=0.0).to(tl.float32)
    return seq, n, gamma, offs_l, offs_d, d_ok, a, g


@triton.jit
def _aggregate_fwd_kernel(
    H, HP, A, G, LENS, GAMMA, XS, PS, LSE,
    stride_hb, stride_hl, stride_hd,
    stride_pb, stride_pl, stride_pd,
    stride_ab, stride_ad, stride_g,
    stride_ob, stride_od,  # shared by XS and PS (allocated alike)
    L, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,  # cdiv(L, BLOCK_L)
    PRODUCT: tl.constexpr, GAMMA_IS_PTR: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    seq, n, gamma, offs_l, offs_d, d_ok, a, g = _aggregate_prologue(
        b, LENS, GAMMA, A, G, stride_ab, stride_ad, stride_g, L, D, BLOCK_L, BLOCK_D, GAMMA_IS_PTR)
    seq_f = seq.to(tl.float32)
    # max over valid i of -gamma * pos_i, pos_i in [seq - n + 1, seq]: an end point
    m_b = tl.maximum(-gamma * (seq - n + 1).to(tl.float32), -gamma * seq_f)
    h_base = H + b * stride_hb
    p_base = HP + b * stride_pb
    # chunk 0 is peeled: n >= 1, so it holds a valid row (finite max) and it gives the
    # running values their types before the loop
    m_e, l_e, acc_x, l_b, acc_p = _aggregate_fwd_chunk(
        h_base, p_base, offs_l, n, offs_d, d_ok, stride_hl, stride_hd, stride_pl, stride_pd,
        a, g, gamma, seq_f, m_b, PRODUCT)
    # constexpr trip count: the interpreter (numpy 2) cannot loop to a runtime bound;
    # chunks past the session are skipped by the branch
    for c in range(1, NUM_CHUNKS):
        start = c * BLOCK_L
        if start < n:
            m_c, l_c, x_c, lb_c, p_c = _aggregate_fwd_chunk(
                h_base, p_base, start + offs_l, n, offs_d, d_ok, stride_hl, stride_hd, stride_pl, stride_pd,
                a, g, gamma, seq_f, m_b, PRODUCT)
            m_new = tl.maximum(m_e, m_c)
            s_old = tl.exp(m_e - m_new)
            s_new = tl.exp(m_c - m_new)
            l_e = l_e * s_old + l_c * s_new
            acc_x = acc_x * s_old + x_c * s_new
            m_e = m_new
            l_b += lb_c  # beta needs no rescaling: its maximum m_b is known up front
            acc_p += p_c

    xs = acc_x / l_e
    ps = acc_p / l_b
    tl.store(XS + b * stride_ob + offs_d * stride_od, xs.to(XS.dtype.element_ty), mask=d_ok)
    tl.store(PS + b * stride_ob + offs_d * stride_od, ps.to(PS.dtype.element_ty), mask=d_ok)
    tl.store(LSE + 2 * b, m_e + tl.log(l_e))
    tl.store(LSE + 2 * b + 1, m_b + tl.log(l_b))


@triton.jit
def _aggregate_bwd_kernel(
    H, HP, A, G, LENS, GAMMA, XS, PS, LSE, DXS, DPS,
    DH, DHP, DA, DG_PART, DGAMMA_PART,
    stride_hb, stride_hl, stride_hd,
    stride_pb, stride_pl, stride_pd,
    stride_ab, stride_ad, stride_g,
    stride_ob, stride_od,  # XS, PS
    stride_dxb, stride_dxd,
    stride_dpb, stride_dpd,
    stride_ghb, stride_ghl, stride_ghd,  # DH and DHP (allocated alike, contiguous)
    stride_gab, stride_gad,  # DA
    L, D,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, NUM_CHUNKS: tl.constexpr,  # cdiv(L, BLOCK_L)
    PRODUCT: tl.constexpr, GAMMA_IS_PTR: tl.constexpr,
    NEED_DH: tl.constexpr, NEED_DHP: tl.constexpr, NEED_DA: tl.constexpr,
    NEED_DG: tl.constexpr, NEED_DGAMMA: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    seq, n, gamma, offs_l, offs_d, d_ok, a, g = _aggregate_prologue(
        b, LENS, GAMMA, A, G, stride_ab, stride_ad, stride_g, L, D, BLOCK_L, BLOCK_D, GAMMA_IS_PTR)
    dx = tl.load(DXS + b * stride_dxb + offs_d * stride_dxd, mask=d_ok, other=0.0).to(tl.float32)
    dp = tl.load(DPS + b * stride_dpb + offs_d * stride_dpd, mask=d_ok, other=0.0).to(tl.float32)
    xs = tl.load(XS + b * stride_ob + offs_d * stride_od, mask=d_ok, other=0.0).to(tl.float32)
    ps = tl.load(PS + b * stride_ob + offs_d * stride_od, mask=d_ok, other=0.0).to(tl.float32)
    delta_x = tl.sum(dx * xs, axis=0)  # = sum_i alpha_i (dx . h_i)
    delta_p = tl.sum(dp * ps, axis=0)
    lse_e = tl.load(LSE + 2 * b)
    lse_b = tl.load(LSE + 2 * b + 1)
    seq_f = seq.to(tl.float32)
    h_base = H + b * stride_hb
    p_base = HP + b * stride_pb
    da_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dg_acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    dgam_acc = tl.zeros([BLOCK_L], dtype=tl.float32)
    for c in range(0, NUM_CHUNKS):  # to L, not n: padded rows of dh / dhp get their zeros
        rows = c * BLOCK_L + offs_l
        r_ok = rows < n
        ld = r_ok[:, None] & d_ok[None, :]
        st = (rows < L)[:, None] & d_ok[None, :]
        g_off = b * stride_ghb + rows[:, None] * stride_ghl + offs_d[None, :] * stride_ghd
        if c * BLOCK_L < n:
            h = tl.load(h_base + rows[:, None] * stride_hl + offs_d[None, :] * stride_hd, mask=ld,
                        other=0.0).to(tl.float32)
            hp = tl.load(p_base + rows[:, None] * stride_pl + offs_d[None, :] * stride_pd, mask=ld,
                         other=0.0).to(tl.float32)
            act, e = _aggregate_scores(hp, a, g, PRODUCT)
            # arguments masked before exp: padded rows (pos <= 0) would overflow
            alpha = tl.exp(tl.where(r_ok, e - lse_e, float("-inf")))
            pos = seq_f - rows.to(tl.float32)
            beta = tl.exp(tl.where(r_ok, -gamma * pos - lse_b, float("-inf")))
            if NEED_DH:
                dh = alpha[:, None] * dx[None, :] + beta[:, None] * dp[None, :]
                tl.store(DH + g_off, dh.to(DH.dtype.element_ty), mask=st)
            de = alpha * (tl.sum(h * dx[None, :], axis=1) - delta_x)  # zero on padded rows
            if NEED_DHP or NEED_DA:
                dz = de[:, None] * g[None, :] * act * (1.0 - act)
                if PRODUCT:
                    if NEED_DHP:
                        tl.store(DHP + g_off, (dz * a[None, :]).to(DHP.dtype.element_ty), mask=st)
                    da_acc += tl.sum(dz * hp, axis=0)
                else:
                    if NEED_DHP:
                        tl.store(DHP + g_off, dz.to(DHP.dtype.element_ty), mask=st)
                    da_acc += tl.sum(dz, axis=0)
            if NEED_DG:
                dg_acc += tl.sum(de[:, None] * act, axis=0)
            if NEED_DGAMMA:
                dgam_acc += beta * (tl.sum(h * dp[None, :], axis=1) - delta_p) * (-pos)
        else:  # chunk past the session: only the zeros of dh / dhp
            if NEED_DH:
                tl.store(DH + g_off, tl.zeros([BLOCK_L, BLOCK_D], dtype=DH.dtype.element_ty), mask=st)
            if NEED_DHP:
                tl.store(DHP + g_off, tl.zeros([BLOCK_L, BLOCK_D], dtype=DHP.dtype.element_ty), mask=st)
    if NEED_DA:
        tl.store(DA + b * stride_gab + offs_d * stride_gad, da_acc.to(DA.dtype.element_ty), mask=d_ok)
    if NEED_DG:
        tl.store(DG_PART + b * D + offs_d, dg_acc, mask=d_ok)
    if NEED_DGAMMA:
        tl.store(DGAMMA_PART + b, tl.sum(dgam_acc, axis=0))


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------
def _blocks(seq_len: int, dim: int) -> tuple[int, int]:
    block_d = max(16, triton.next_power_of_2(dim))
    block_l = max(16, min(triton.next_power_of_2(max(seq_len, 1)), max(16, _MAX_TILE // block_d)))
    return block_l, block_d


def _num_warps(block_l: int, block_d: int) -> int:
    # h, hp, act and dz of a chunk live at once in the backward (4 warps at 16 x 128: 254 regs)
    return 4 if block_l * block_d < 2048 else 8


def _gamma_arg(gamma, device):
    if isinstance(gamma, torch.Tensor):
        return gamma.detach().to(device=device, dtype=torch.float32).reshape(1), True
    return float(gamma), False


def aggregate_forward(h: torch.Tensor, hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor,
                      gamma: Union[float, torch.Tensor] = 0.75, mode: str = "additive"):
    """Launch the forward kernel. h, hp: (batch, seq_len, dim); a: (batch, dim); g: (dim,);
    lengths: (batch,) int32 on h's device. Returns x_s, p_s (batch, dim) in float32 (the
    caller casts; the backward reads the unrounded values) and the log-sum-exps (batch, 2)
    fp32 of the two softmaxes."""
    b, L, d = h.shape
    # fp32 whatever h's dtype: the backward's delta = dx . x_s from bf16-rounded outputs
    # gave da / dg / dgamma errors 2-9x the bf16 reference's (interpreter, batch 5, L 50)
    xs = torch.empty((b, d), dtype=torch.float32, device=h.device)
    ps = torch.empty((b, d), dtype=torch.float32, device=h.device)
    lse = torch.empty((b, 2), dtype=torch.float32, device=h.device)
    if b == 0:
        return xs, ps, lse
    block_l, block_d = _blocks(L, d)
    gam, gam_ptr = _gamma_arg(gamma, h.device)
    _aggregate_fwd_kernel[(b,)](
        h, hp, a, g, lengths, gam, xs, ps, lse,
        *h.stride(), *hp.stride(), *a.stride(), g.stride(0), *xs.stride(),
        L, d,
        BLOCK_L=block_l, BLOCK_D=block_d, NUM_CHUNKS=triton.cdiv(L, block_l),
        PRODUCT=(mode == "product"), GAMMA_IS_PTR=gam_ptr,
        num_warps=_num_warps(block_l, block_d),
    )
    return xs, ps, lse


def aggregate_backward(dxs, dps, h, hp, a, g, lengths, gamma, xs, ps, lse, mode="additive",
                       need=(True, True, True, True, True)):
    """Launch the backward kernel. Returns (dh, dhp, da, dg, dgamma); an entry is None where
    `need` (for h, hp, a, g, gamma) is False. dgamma is a 0-dim fp32 tensor."""
    b, L, d = h.shape
    need_dh, need_dhp, need_da, need_dg, need_dgamma = need
    dev = h.device
    dh = torch.empty((b, L, d), dtype=h.dtype, device=dev) if need_dh else None
    dhp = torch.empty((b, L, d), dtype=hp.dtype, device=dev) if need_dhp else None
    da = torch.empty((b, d), dtype=a.dtype, device=dev) if need_da else None
    dg_part = torch.empty((b, d), dtype=torch.float32, device=dev) if need_dg else None
    dgam_part = torch.empty((b,), dtype=torch.float32, device=dev) if need_dgamma else None
    if not any(need):
        return None, None, None, None, None
    if b == 0:
        return (dh, dhp, None if da is None else da.zero_(),
                None if dg_part is None else torch.zeros(d, dtype=torch.float32, device=dev),
                None if dgam_part is None else torch.zeros((), dtype=torch.float32, device=dev))
    block_l, block_d = _blocks(L, d)
    gam, gam_ptr = _gamma_arg(gamma, dev)
    dummy = lse  # stands for an output that is not needed (never written: NEED_* is False)
    da_strides = da.stride() if da is not None else (0, 0)
    _aggregate_bwd_kernel[(b,)](
        h, hp, a, g, lengths, gam, xs, ps, lse, dxs, dps,
        dh if dh is not None else dummy, dhp if dhp is not None else dummy, da if da is not None else dummy,
        dg_part if dg_part is not None else dummy, dgam_part if dgam_part is not None else dummy,
        *h.stride(), *hp.stride(), *a.stride(), g.stride(0), *xs.stride(),
        *dxs.stride(), *dps.stride(), L * d, d, 1,  # dh and dhp are new contiguous (B, L, d)
        *da_strides,
        L, d,
        BLOCK_L=block_l, BLOCK_D=block_d, NUM_CHUNKS=triton.cdiv(L, block_l),
        PRODUCT=(mode == "product"), GAMMA_IS_PTR=gam_ptr,
        NEED_DH=need_dh, NEED_DHP=need_dhp, NEED_DA=need_da, NEED_DG=need_dg, NEED_DGAMMA=need_dgamma,
        num_warps=_num_warps(block_l, block_d),
    )
    dg = dg_part.sum(0) if dg_part is not None else None
    dgamma = dgam_part.sum() if dgam_part is not None else None
    return dh, dhp, da, dg, dgamma


# --------------------------------------------------------------------------------------------
# autograd + public entry
# --------------------------------------------------------------------------------------------
class AggregateFunction(torch.autograd.Function):
    """Autograd wrapper: saves the inputs, the two outputs in fp32 and the (B, 2) log-sum-exps."""

    @staticmethod
    def forward(ctx, h, hp, a, g, lengths, gamma, mode):
        lens = lengths.to(device=h.device, dtype=torch.int32).contiguous()
        xs, ps, lse = aggregate_forward(h, hp, a, g, lens, gamma, mode)
        gamma_t = gamma if isinstance(gamma, torch.Tensor) else None
        ctx.save_for_backward(h, hp, a, g, lens, gamma_t, xs, ps, lse)
        ctx.gamma_float = None if gamma_t is not None else float(gamma)
        ctx.mode = mode
        return xs.to(h.dtype), ps.to(h.dtype)  # no copy for fp32

    @staticmethod
    def backward(ctx, dxs, dps):
        h, hp, a, g, lens, gamma_t, xs, ps, lse = ctx.saved_tensors
        gamma = gamma_t if gamma_t is not None else ctx.gamma_float
        nig = ctx.needs_input_grad
        need = (nig[0], nig[1], nig[2], nig[3], gamma_t is not None and nig[5])
        # an output that did not reach the loss comes back as None: its gradient is zero
        if dxs is None:
            dxs = torch.zeros(xs.shape, dtype=h.dtype, device=h.device)
        if dps is None:
            dps = torch.zeros(ps.shape, dtype=h.dtype, device=h.device)
        dh, dhp, da, dg, dgamma = aggregate_backward(dxs, dps, h, hp, a, g, lens, gamma, xs, ps, lse,
                                                     ctx.mode, need)
        if dg is not None:
            dg = dg.to(g.dtype)
        if dgamma is not None:
            dgamma = dgamma.to(gamma_t.dtype).reshape(gamma_t.shape)
        return dh, dhp, da, dg, None, dgamma, None


def _check(h, hp, a, g, lengths, gamma, mode):
    if mode not in ("additive", "product"):
        raise ValueError(f"unknown aggregation mode {mode!r}: use 'additive' or 'product'")
    if h.dim() != 3 or hp.shape != h.shape:
        raise ValueError(f"aggregate: h and hp must share one (batch, seq_len, dim) shape, got "
                         f"{tuple(h.shape)}, {tuple(hp.shape)}")
    b, L, d = h.shape
    if a.shape != (b, d) or g.shape != (d,):
        raise ValueError(f"aggregate: a must be (batch, dim) = {(b, d)} and g (dim,) = {(d,)}, got "
                         f"{tuple(a.shape)}, {tuple(g.shape)}")
    if lengths.shape != (b,):
        raise ValueError(f"aggregate: lengths must be (batch={b},), got {tuple(lengths.shape)}")
    if isinstance(gamma, torch.Tensor) and gamma.numel() != 1:
        raise ValueError(f"aggregate: gamma must be a float or a 0-dim tensor, got shape {tuple(gamma.shape)}")
    for t in (hp, a, g):
        if t.device != h.device:
            raise ValueError("aggregate: h, hp, a, g must be on one device")
    check_device(h, "aggregate_triton", "packed")


def aggregate_triton(h: torch.Tensor, hp: torch.Tensor, a: torch.Tensor, g: torch.Tensor, lengths: torch.Tensor,
                     gamma: Union[float, torch.Tensor] = 0.75, mode: str = "additive"):
    """Fused aggregation; same signature and semantics as `aggregate_ref`.
    h, hp: (batch, seq_len, dim); a: (batch, dim); g: (dim,); lengths: (batch,) >= 1;
    gamma: float or 0-dim tensor (learnable). Returns x_s, p_s, each (batch, dim)."""
    _check(h, hp, a, g, lengths, gamma, mode)
    if h.shape[1] == 0:
        raise ValueError("aggregate: seq_len 0 (an empty session is an input error)")
    return AggregateFunction.apply(h, hp, a, g, lengths, gamma, mode)


def aot_cases(quick: bool = False):
    """The specialisations `mtd_fast.kernels.aot` compiles: (name, kernel, signature, constexprs, warps)."""
    ptr = ("H", "HP", "A", "G", "XS", "PS", "DXS", "DPS", "DH", "DHP", "DA")
    f32 = ("LSE", "DG_PART", "DGAMMA_PART")
    shapes = ((50, 100),) if quick else ((50, 100), (200, 100), (19, 64), (1, 100))
    for dt in ("fp32", "bf16"):
        for seq, d in shapes:
            bl, bd = _blocks(seq, d)
            for bwd in (False, True):
                fn = _aggregate_bwd_kernel if bwd else _aggregate_fwd_kernel
                for product in ((True,) if quick else (False, True)):
                    for gptr in ((True,) if quick else (False, True)):
                        sig = aot_signature(fn, {**{a: f"*{dt}" for a in ptr}, **{a: "*fp32" for a in f32},
                                                 "LENS": "*i32", "GAMMA": "*fp32" if gptr else "fp32", "L": "i32",
                                                 "D": "i32"})
                        cx = {"BLOCK_L": bl, "BLOCK_D": bd, "NUM_CHUNKS": triton.cdiv(seq, bl),
                              "PRODUCT": product, "GAMMA_IS_PTR": gptr}
                        if bwd:
                            cx.update({n: True for n in fn.arg_names if n.startswith("NEED_")})
                        name = (f"agg_{'bwd' if bwd else 'fwd'} {dt} L={seq} d={d} "
                                f"{'product' if product else 'additive'} gamma={'ptr' if gptr else 'float'}")
                        yield name, fn, sig, cx, _num_warps(bl, bd)
