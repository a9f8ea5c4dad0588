"""The LoRA branch's rank-r products in plain torch: the reference, the CPU path and every fallback.

``kernels.select`` returns :class:`TorchKernels` unless Triton is chosen, and the Triton kernels
(``triton_branch``) fall back to it where no launch plan fits; both import it from here, below
them, so neither imports the other to get it.
"""

from __future__ import annotations

from typing import Tuple

import torch


def flat(x: torch.Tensor) -> torch.Tensor:
    """``[..., h]`` as ``[tokens, h]`` (a view where the layout allows)."""
    return x.reshape(-1, x.shape[-1])


def scaled_mm(m1: torch.Tensor, m2: torch.Tensor, scaling: float, like: torch.Tensor) -> torch.Tensor:
    """``scaling * m1 @ m2`` in ONE GEMM: alpha = scaling, beta = 0 (BLAS then ignores the C
    operand, so ``like``, any tensor of the result's shape and dtype, is never read)."""
    if like.shape == (m1.shape[0], m2.shape[1]) and like.dtype == m1.dtype:
        return torch.addmm(like, m1, m2, beta=0, alpha=scaling)
    return torch.mm(m1, m2).mul_(scaling)


class TorchKernels:
    """The reference implementation (CPU, ``auto`` without a measurement, any Triton fallback)."""

    name = "torch"

    @staticmethod
    def down(x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return torch.matmul(x, a.t())

    @staticmethod
    def dy(dy: torch.Tensor, b: torch.Tensor, u: torch.Tensor, scaling: float) -> Tuple[torch.Tensor, torch.Tensor]:
        return torch.matmul(dy, b), scaled_mm(flat(dy).t(), flat(u), scaling, b)

    @staticmethod
    def up(g: torch.Tensor, x: torch.Tensor, scaling: float, like: torch.Tensor) -> torch.Tensor:
        return scaled_mm(flat(g).t(), flat(x), scaling, like)
