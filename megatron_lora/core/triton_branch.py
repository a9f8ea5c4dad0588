"""The LoRA branch's rank-r products as Triton kernels (see ``kernels.py`` for what and why).

Imported only by ``kernels.select`` when Triton is chosen. ``TRITON_INTERPRET=1`` at import runs
them on the CPU in Triton's interpreter (the CI tests do that).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from megatron_lora.core.kernels import _flat, _interpreting, rank_block

# Decided once, like triton.jit itself decides at import whether to interpret.
INTERPRETED = _interpreting()


@triton.jit
def _dot(a, b, acc, UPCAST: tl.constexpr):
    # Triton's interpreter multiplies bf16 operands as raw integers; fp32 operands give the
    # same products (bf16 x bf16 is exact in fp32) and the same fp32 accumulation. "ieee":
    # fp32 inputs are multiplied in fp32, as torch does by default (no TF32).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision="ieee")


@triton.jit
def down_kernel(x_ptr, a_ptr, u_ptr, T, K, R, stride_x, stride_a,
                BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # One program per token block: u[t, :] = sum_k X[t, k] A[:, k], a single pass over X.
    rt = tl.program_id(0) * BT + tl.arange(0, BT)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BT, BR), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :],
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0)
        a = tl.load(a_ptr + rr[None, :] * stride_a + rk[:, None],
                    mask=(rr[None, :] < R) & (rk[:, None] < K), other=0.0)
        acc = _dot(x, a, acc, UPCAST)
    tl.store(u_ptr + rt[:, None] * R + rr[None, :], acc.to(u_ptr.dtype.element_ty),
             mask=(rt[:, None] < T) & (rr[None, :] < R))


@triton.jit
def dy_kernel(dy_ptr, b_ptr, u_ptr, g_ptr, part_ptr, T, N, R, stride_dy, scaling,
              BT: tl.constexpr, BN: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # One program per token block reads its rows of dY once: g = dY B is complete for those
    # rows, s dY^T u is this block's partial sum of dB (added up by the caller, in order).
    pid = tl.program_id(0)
    rt = pid * BT + tl.arange(0, BT)
    rr = tl.arange(0, BR)
    u = tl.load(u_ptr + rt[:, None] * R + rr[None, :], mask=(rt[:, None] < T) & (rr[None, :] < R), other=0.0)
    g = tl.zeros((BT, BR), dtype=tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        d = tl.load(dy_ptr + rt[:, None] * stride_dy + rn[None, :],
                    mask=(rt[:, None] < T) & (rn[None, :] < N), other=0.0)
        b = tl.load(b_ptr + rn[:, None] * R + rr[None, :], mask=(rn[:, None] < N) & (rr[None, :] < R), other=0.0)
        g = _dot(d, b, g, UPCAST)
        part = _dot(tl.trans(d), u, tl.zeros((BN, BR), dtype=tl.float32), UPCAST)
        tl.store(part_ptr + pid * N * R + rn[:, None] * R + rr[None, :], part * scaling,
                 mask=(rn[:, None] < N) & (rr[None, :] < R))
    tl.store(g_ptr + rt[:, None] * R + rr[None, :], g.to(g_ptr.dtype.element_ty),
             mask=(rt[:, None] < T) & (rr[None, :] < R))


@triton.jit
def up_kernel(g_ptr, x_ptr, da_ptr, T, K, R, stride_x, scaling,
              BT: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr, UPCAST: tl.constexpr):
    # One program per column block of X: dA[:, k] = s sum_t g[t, :] X[t, k], in token order.
    rk = tl.program_id(0) * BK + tl.arange(0, BK)
    rr = tl.arange(0, BR)
    acc = tl.zeros((BR, BK), dtype=tl.float32)
    for t0 in range(0, T, BT):
        rt = t0 + tl.arange(0, BT)
        g = tl.load(g_ptr + rt[None, :] * R + rr[:, None], mask=(rt[None, :] < T) & (rr[:, None] < R), other=0.0)
        x = tl.load(x_ptr + rt[:, None] * stride_x + rk[None, :],
                    mask=(rt[:, None] < T) & (rk[None, :] < K), other=0.0)
        acc = _dot(g, x, acc, UPCAST)
    tl.store(da_ptr + rr[:, None] * K + rk[None, :], (acc * scaling).to(da_ptr.dtype.element_ty),
             mask=(rr[:, None] < R) & (rk[None, :] < K))


def rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as [T, C] with unit column stride (a copy only when it has none)."""
    x = _flat(x)
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonKernels:
    """``kernels.TorchKernels``' interface on the Triton kernels (token / column block 64)."""

    name = "triton"
    TOKENS, COLS = 64, 64

    @staticmethod
    def down(x, a):
        x2, a = rows(x), a.contiguous()
        (t, k), r = x2.shape, a.shape[0]
        u = torch.empty((t, r), dtype=x.dtype, device=x.device)
        down_kernel[(triton.cdiv(t, TritonKernels.TOKENS),)](
            x2, a, u, t, k, r, x2.stride(0), a.stride(0), BT=TritonKernels.TOKENS, BK=TritonKernels.COLS,
            BR=rank_block(r), UPCAST=INTERPRETED)
        return u.view(*x.shape[:-1], r)

    @staticmethod
    def dy(dy, b, u, scaling):
        d2, b, u2 = rows(dy), b.contiguous(), _flat(u).contiguous()
        (t, n), r = d2.shape, b.shape[1]
        blocks = triton.cdiv(t, TritonKernels.TOKENS)
        g = torch.empty((t, r), dtype=dy.dtype, device=dy.device)
        parts = torch.empty((blocks, n, r), dtype=torch.float32, device=dy.device)
        dy_kernel[(blocks,)](d2, b, u2, g, parts, t, n, r, d2.stride(0), float(scaling),
                             BT=TritonKernels.TOKENS, BN=TritonKernels.COLS, BR=rank_block(r),
                             UPCAST=INTERPRETED)
        return g.view(*dy.shape[:-1], r), parts.sum(0).to(b.dtype)

    @staticmethod
    def up(g, x, scaling, like):
        x2, g2 = rows(x), _flat(g).contiguous()
        (t, k), r = x2.shape, g2.shape[1]
        d_a = torch.empty((r, k), dtype=like.dtype, device=x.device)
        up_kernel[(triton.cdiv(k, TritonKernels.COLS),)](
            g2, x2, d_a, t, k, r, x2.stride(0), float(scaling), BT=TritonKernels.TOKENS,
            BK=TritonKernels.COLS, BR=rank_block(r), UPCAST=INTERPRETED)
        return d_a
