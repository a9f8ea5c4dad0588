"""The LoRA branch's rank-r products as Triton kernels (see ``kernels.py`` for what and why).

Imported only by ``kernels``, on first use, when Triton is chosen (``branch_kernels="triton"``,
or ``auto`` with a measurement that favours it). ``TRITON_INTERPRET=1`` at import runs them on
the CPU in Triton's interpreter (the CI tests do that).

Offsets are 64-bit: every program id and every row / column index (``tl.arange``, which is
int32, also when added to a loop variable) is widened to int64 before it meets a stride, a span or
T * R, so a [T, N] activation with T * N >= 2^31 elements (Llama-70B's fc1 at TP=1 from 37,450
tokens) is addressed correctly.

Deterministic by construction: no atomics, no program reads what another program writes, the
spans depend on the shapes only (``kernel_plans.plan_*``), and torch adds the fp32 partials in one
fixed order (its sum over the span axis).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_lora.core import kernel_plans
from megatron_lora.core.kernel_plans import COLS, TOKENS, dy_cols, interpreting, rank_block
from megatron_lora.core.torch_kernels import TorchKernels, flat

# Decided once, like triton.jit itself decides at import whether to interpret.
INTERPRETED = interpreting()


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 operands as raw integers; fp32 operands give the
    # same products (bf16 x bf16 is exact in fp32) and the same fp32 accumulation. "ieee":
    # fp32 inputs are multiplied in fp32, as torch does by default (no TF32).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def down_kernel(x_ptr, a_ptr, part_ptr, T, K, R, stride_x, stride_a, span,
                BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # Program (token block, K span): its part of u[t, :] = sum_k X[t, k] A[:, k].
    pid_t, pid_k = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rt = pid_t * BT + tl.arange(0, BT)
    rr = tl.arange(0, BR)
    start = pid_k * span
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    for k0 in range(start, tl.minimum(start + span, K), BK):
        rk = k0 + tl.arange(0, BK).to(tl.int64)
        x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :],
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_a + rk[:, None],
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc = _dot(x, a, acc, UPCAST)
    tl.store(part_ptr + pid_k * T * R + rt[:, None] * R + rr[None, :], acc,
             mask=(rt[:, None] < T) & (rr[None, :] < R))


@triton.jit
def dy_kernel(dy_ptr, b_ptr, u_ptr, g_part_ptr, db_part_ptr, T, N, R, stride_dy, span, col_span, scaling,
              BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # Program (token span, column span) reads its tiles of dY ONCE for both products. For each
    # column block of its span, in order: dB for those columns over the token span (in
    # registers), and g = dY B added into its own rows of g_part (rows no other program touches).
    pid_t, pid_n = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rr = tl.arange(0, BR)
    t_start, n_start = pid_t * span, pid_n * col_span
    t_end = tl.minimum(t_start + span, T)
    for n0 in range(n_start, tl.minimum(n_start + col_span, N), BN):
        rn = n0 + tl.arange(0, BN).to(tl.int64)
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        d_b = tl.zeros((BN, BR), dtype=tl.float32)
        for t0 in range(t_start, t_end, BT):
            rt = t0 + tl.arange(0, BT).to(tl.int64)
            d = tl.load(dy_ptr + rt[:, None] * stride_dy + rn[None, :],
                        mask=(rt[:, None] < T) & (rn[None, :] < N), other=0.0)
            in_rows = (rt[:, None] < T) & (rr[None, :] < R)
            u = tl.load(u_ptr + rt[:, None] * R + rr[None, :], mask=in_rows, other=0.0)
            g_ptrs = g_part_ptr + pid_n * T * R + rt[:, None] * R + rr[None, :]
            g = tl.load(g_ptrs, mask=in_rows & (n0 > n_start), other=0.0)  # earlier blocks of this span
            tl.store(g_ptrs, _dot(d, b, g, UPCAST), mask=in_rows)
            d_b = _dot(tl.trans(d), u, d_b, UPCAST)
        tl.store(db_part_ptr + pid_t * N * R + rn[:, None] * R + rr[None, :], d_b * scaling,
                 mask=(rn[:, None] < N) & (rr[None, :] < R))
        tl.debug_barrier()  # this block's g stores are seen by every thread before the next block reads them


@triton.jit
def up_kernel(g_ptr, x_ptr, part_ptr, T, K, R, stride_x, span, scaling,
              BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # Program (column block, token span): its part of dA[:, k] = s sum_t g[t, :] X[t, k].
    pid_k, pid_t = tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64)
    rk = pid_k * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    start = pid_t * span
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for t0 in range(start, tl.minimum(start + span, T), BT):
        rt = t0 + tl.arange(0, BT).to(tl.int64)
        g = tl.load(g_ptr + rt[None, :] * R + rr[:, None], mask=(rt[None, :] < T) & (rr[:, None] < R), other=0.0)
        x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :],
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0)
        acc = _dot(g, x, acc, UPCAST)
    tl.store(part_ptr + pid_t * R * K + rr[:, None] * K + rk[None, :], acc * scaling,
             mask=(rr[:, None] < R) & (rk[None, :] < K))


def flat_unit_stride(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [T, C] with unit column stride (a copy only when it has none)."""
    x = flat(x)
    return x if x.stride(-1) == 1 else x.contiguous()


def _spans_whole_tiles(span: int, tile: int) -> None:
    if span % tile:
        raise ValueError(f"a kernel's span must be a multiple of its tile {tile}, got {span} (see kernel_plans.plan_*).")


def partials(*shape: int, device) -> torch.Tensor:
    """A kernel's fp32 partial sums (one place, so tests can count what the launchers allocate)."""
    return torch.empty(shape, dtype=torch.float32, device=device)


def ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """The partials added by torch over the span axis, a fixed order (no new buffer for a single one)."""
    return parts[0] if parts.shape[0] == 1 else parts.sum(0)


class TritonKernels:
    """``torch_kernels.TorchKernels``' interface on the Triton kernels.

    Each kernel splits its reductions into the spans of ``kernel_plans.plan_*`` (``plan`` overrides
    them; the self-check does); where no plan keeps the fp32 partials within the bound, that
    product runs in plain torch. Tile sizes are untuned defaults; nothing here has been timed.
    """

    name = "triton"

    @staticmethod
    def down(x, a, plan=None):
        x2, a = flat_unit_stride(x), a.contiguous()
        (t, k), r = x2.shape, a.shape[0]
        plan = plan or kernel_plans.plan_down(t, k, r, x.element_size())
        if plan is None:
            return TorchKernels.down(x, a)
        _spans_whole_tiles(plan.span, COLS)
        parts = partials(plan.splits, t, r, device=x.device)
        down_kernel[(triton.cdiv(t, TOKENS), plan.splits)](
            x2, a, parts, t, k, r, x2.stride(0), a.stride(0), plan.span, BT=TOKENS, BK=COLS, BR=rank_block(r),
            UPCAST=INTERPRETED)
        return ordered_sum(parts).to(x.dtype).view(*x.shape[:-1], r)

    @staticmethod
    def dy(dy, b, u, scaling, plan=None):
        d2, b, u2 = flat_unit_stride(dy), b.contiguous(), flat(u).contiguous()
        (t, n), r = d2.shape, b.shape[1]
        plan = plan or kernel_plans.plan_dy(t, n, r, dy.element_size())
        if plan is None:
            return TorchKernels.dy(dy, b, u, scaling)
        _spans_whole_tiles(plan.span, TOKENS)
        _spans_whole_tiles(plan.col_span, dy_cols(r))
        g_parts = partials(plan.col_splits, t, r, device=dy.device)
        db_parts = partials(plan.splits, n, r, device=dy.device)
        dy_kernel[(plan.splits, plan.col_splits)](
            d2, b, u2, g_parts, db_parts, t, n, r, d2.stride(0), plan.span, plan.col_span, float(scaling),
            BT=TOKENS, BN=dy_cols(r), BR=rank_block(r), UPCAST=INTERPRETED)
        return (ordered_sum(g_parts).to(dy.dtype).view(*dy.shape[:-1], r),
                ordered_sum(db_parts).to(b.dtype))

    @staticmethod
    def up(g, x, scaling, like, plan=None):
        x2, g2 = flat_unit_stride(x), flat(g).contiguous()
        (t, k), r = x2.shape, g2.shape[1]
        plan = plan or kernel_plans.plan_up(t, k, r, x.element_size())
        if plan is None:
            return TorchKernels.up(g, x, scaling, like)
        _spans_whole_tiles(plan.span, TOKENS)
        parts = partials(plan.splits, r, k, device=x.device)
        up_kernel[(triton.cdiv(k, COLS), plan.splits)](
            g2, x2, parts, t, k, r, x2.stride(0), plan.span, float(scaling), BT=TOKENS, BK=COLS,
            BR=rank_block(r), UPCAST=INTERPRETED)
        return ordered_sum(parts).to(like.dtype)
