"""The LoRA branch's rank-r products as Triton kernels (see ``kernels.py`` for what and why).

Imported only by ``kernels.select`` when Triton is chosen. ``TRITON_INTERPRET=1`` at import runs
them on the CPU in Triton's interpreter (the CI tests do that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_lora.core.kernels import flat, interpreting, rank_block

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
    # Program (token block, column span): its part of u[t, :] = sum_k X[t, k] A[:, k].
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    rr = tl.arange(0, BR)
    start = tl.program_id(1) * span
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    for k0 in range(start, tl.minimum(start + span, K), BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :],
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_a + rk[:, None],
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc = _dot(x, a, acc, UPCAST)
    tl.store(part_ptr + tl.program_id(1) * T * R + rt[:, None] * R + rr[None, :], acc,
             mask=(rt[:, None] < T) & (rr[None, :] < R))


@triton.jit
def dy_kernel(dy_ptr, b_ptr, u_ptr, g_part_ptr, db_part_ptr, T, N, R, stride_dy, span, scaling,
              BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # Program (token span, column block) reads its tiles of dY ONCE for both products: its
    # column block's part of g = dY B for each token block, and its token span's part of
    # dB = s dY^T u for its columns (kept in registers across the span).
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    rr = tl.arange(0, BR)
    b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
    d_b = tl.zeros((BN, BR), dtype=tl.float32)
    start = tl.program_id(0) * span
    for t0 in range(start, tl.minimum(start + span, T), BT):
        rt = t0 + tl.arange(0, BT)
        d = tl.load(dy_ptr + rt[:, None] * stride_dy + rn[None, :],
                    mask=(rt[:, None] < T) & (rn[None, :] < N), other=0.0)
        u = tl.load(u_ptr + rt[:, None] * R + rr[None, :], mask=(rt[:, None] < T) & (rr[None, :] < R), other=0.0)
        g = _dot(d, b, tl.zeros((BT, BR), dtype=tl.float32), UPCAST)
        tl.store(g_part_ptr + tl.program_id(1) * T * R + rt[:, None] * R + rr[None, :], g,
                 mask=(rt[:, None] < T) & (rr[None, :] < R))
        d_b = _dot(tl.trans(d), u, d_b, UPCAST)
    tl.store(db_part_ptr + tl.program_id(0) * N * R + rn[:, None] * R + rr[None, :], d_b * scaling,
             mask=(rn[:, None] < N) & (rr[None, :] < R))


@triton.jit
def up_kernel(g_ptr, x_ptr, part_ptr, T, K, R, stride_x, span, scaling,
              BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # Program (column block, token span): its part of dA[:, k] = s sum_t g[t, :] X[t, k].
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    start = tl.program_id(1) * span
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for t0 in range(start, tl.minimum(start + span, T), BT):
        rt = t0 + tl.arange(0, BT)
        g = tl.load(g_ptr + rt[None, :] * R + rr[:, None], mask=(rt[None, :] < T) & (rr[:, None] < R), other=0.0)
        x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :],
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0)
        acc = _dot(g, x, acc, UPCAST)
    tl.store(part_ptr + tl.program_id(1) * R * K + rr[:, None] * K + rk[None, :], acc * scaling,
             mask=(rr[:, None] < R) & (rk[None, :] < K))


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [T, C] with unit column stride (a copy only when it has none)."""
    x = flat(x)
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonKernels:
    """``kernels.TorchKernels``' interface on the Triton kernels.

    Each kernel splits its reduction into spans so that a 4k-token micro-batch still fills the
    GPU (a token block per program alone would give 64 programs); the fp32 partial sums are
    added by torch, in order (deterministic), and cast once. Spans are chosen so the partials
    stay a few percent of the activation they summarise; tile sizes are untuned defaults.
    """

    name = "triton"
    TOKENS, COLS = 64, 64  # tile of X / dY rows and columns
    SPAN = 512  # reduction length per program: K for down, T for up
    DY_SPAN = 1024  # tokens per program of the dY pass: its dB partials are N x r per 1024 tokens

    @staticmethod
    def down(x, a):
        x2, a = rows(x), a.contiguous()
        (t, k), r = x2.shape, a.shape[0]
        splits = triton.cdiv(k, TritonKernels.SPAN)
        parts = torch.empty((splits, t, r), dtype=torch.float32, device=x.device)
        down_kernel[(triton.cdiv(t, TritonKernels.TOKENS), splits)](
            x2, a, parts, t, k, r, x2.stride(0), a.stride(0), TritonKernels.SPAN, BT=TritonKernels.TOKENS,
            BK=TritonKernels.COLS, BR=rank_block(r), UPCAST=INTERPRETED)
        return parts.sum(0).to(x.dtype).view(*x.shape[:-1], r)

    @staticmethod
    def dy(dy, b, u, scaling):
        d2, b, u2 = rows(dy), b.contiguous(), flat(u).contiguous()
        (t, n), r = d2.shape, b.shape[1]
        block = rank_block(r)
        cols = min(256, max(32, 4096 // block))  # the dB accumulator (cols x block) stays in registers
        grid = (triton.cdiv(t, TritonKernels.DY_SPAN), triton.cdiv(n, cols))
        g_parts = torch.empty((grid[1], t, r), dtype=torch.float32, device=dy.device)
        db_parts = torch.empty((grid[0], n, r), dtype=torch.float32, device=dy.device)
        dy_kernel[grid](d2, b, u2, g_parts, db_parts, t, n, r, d2.stride(0), TritonKernels.DY_SPAN, float(scaling),
                        BT=TritonKernels.TOKENS, BN=cols, BR=block, UPCAST=INTERPRETED)
        return g_parts.sum(0).to(dy.dtype).view(*dy.shape[:-1], r), db_parts.sum(0).to(b.dtype)

    @staticmethod
    def up(g, x, scaling, like):
        x2, g2 = rows(x), flat(g).contiguous()
        (t, k), r = x2.shape, g2.shape[1]
        splits = triton.cdiv(t, TritonKernels.SPAN)
        parts = torch.empty((splits, r, k), dtype=torch.float32, device=x.device)
        up_kernel[(triton.cdiv(k, TritonKernels.COLS), splits)](
            g2, x2, parts, t, k, r, x2.stride(0), TritonKernels.SPAN, float(scaling), BT=TritonKernels.TOKENS,
            BK=TritonKernels.COLS, BR=rank_block(r), UPCAST=INTERPRETED)
        return parts.sum(0).to(like.dtype)
