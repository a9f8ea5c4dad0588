"""The rank-r products of the LoRA branch: Triton kernels on a GPU, plain torch as the reference.

The branch's work is three skinny products per layer, each of which a GEMM library runs far
from memory bandwidth (an N = r output is a poor tile shape), plus the dY pass that today reads
the output gradient twice:

    down    u   = X A^T                 [T, K] x [r, K]^T -> [T, r]   (forward; a row layer too)
    dy      g   = dY B,  dB = s dY^T u  ONE pass over dY [T, N]       (backward)
    up      dA  = s g^T X               [T, r]^T x [T, K] -> [r, K]   (backward)

The scaling ``s`` is folded into the product that needs it (the GEMM's alpha, or the kernel's
epilogue), never a separate pass. Rank-r updates of an activation-sized tensor
(``Y += s u B^T``, ``dX += s g A``) stay with the GEMM library: they are bandwidth-bound
reads-and-writes of Y / dX that no kernel of ours would do faster.

``select(mode, tensor, rank)`` picks the implementation per call: ``"auto"`` takes Triton for a
CUDA tensor when triton imports and, on its first use per dtype / device / rank block, the kernels
compile and agree with plain torch on a random problem (else plain torch, with one warning: a
Triton or driver problem costs speed, never a run); plain torch otherwise (the CPU path).
``"triton"`` insists (on a CPU tensor it needs Triton's interpreter, ``TRITON_INTERPRET=1``,
which is how CI tests the kernels).

Every Triton kernel is deterministic: no atomics, each output element is summed in a fixed order
(the dB partial sums per token block are added by torch in a fixed order), so a replicated factor's
gradient stays bitwise identical on every TP rank. Accumulation is fp32, one cast at the end.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from typing import Tuple

import torch

logger = logging.getLogger(__name__)

MODES = ("auto", "torch", "triton")


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
    """The reference implementation (CPU, and any tensor Triton does not take)."""

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


@functools.lru_cache(maxsize=None)
def triton_missing_reason():
    """None when Triton imports, else why not."""
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton does not import ({error})"
    return None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select(mode: str, tensor: torch.Tensor, rank: int):
    """The kernels for ``mode`` (``LoRAConfig.branch_kernels``), this call's tensors and LoRA rank."""
    if mode == "torch" or (mode == "auto" and (not tensor.is_cuda or triton_missing_reason())):
        return TorchKernels
    if mode == "auto":
        return _triton_kernels() if triton_agrees(tensor.dtype, str(tensor.device), rank_block(rank)) else TorchKernels
    if mode not in MODES:
        raise ValueError(f"branch kernels must be one of {MODES}, got {mode!r}.")
    reason = triton_missing_reason()
    if reason is None and not tensor.is_cuda and not interpreting():
        reason = "the tensors are on the CPU; set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
    if reason is not None:
        raise RuntimeError(f"LoRAConfig.branch_kernels='triton' (--lora-branch-kernels triton), but {reason}. "
                           "Use 'auto' to fall back to plain torch.")
    return _triton_kernels()


def rank_block(rank: int) -> int:
    """The rank dimension of the kernels' tiles (``tl.dot`` needs >= 16); one compilation each."""
    return max(16, 1 << (rank - 1).bit_length())


@functools.lru_cache(maxsize=None)
def triton_agrees(dtype: torch.dtype, device: str, block: int) -> bool:
    """Do the Triton kernels compile and match plain torch here (``auto``'s one-time check)?"""
    try:
        kernels = _triton_kernels()
        g = torch.Generator(device=device).manual_seed(0)
        rnd = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
        x, a, dy, b, u = rnd(130, 96), rnd(block, 96), rnd(130, 80), rnd(80, block), rnd(130, block)
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for impl_out, ref_out in ((kernels.down(x, a), TorchKernels.down(x, a)),
                                  *zip(kernels.dy(dy, b, u, 0.5), TorchKernels.dy(dy, b, u, 0.5)),
                                  (kernels.up(u, x, 0.5, a), TorchKernels.up(u, x, 0.5, a))):
            error = (impl_out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()
            if not error <= tolerance:
                raise ArithmeticError(f"relative error {float(error):.2e} against plain torch")
    except Exception as error:  # noqa: BLE001 (any failure means: use plain torch)
        logger.warning("LoRA branch kernels: Triton on %s (%s, rank block %d) failed its check (%s); "
                       "using plain torch. --lora-branch-kernels torch silences this.", device, dtype, block, error)
        return False
    return True


@functools.lru_cache(maxsize=None)
def _triton_kernels():
    """Import the Triton kernels on first use (``triton.jit`` reads TRITON_INTERPRET at import)."""
    from megatron_lora.core import triton_branch

    return triton_branch.TritonKernels
