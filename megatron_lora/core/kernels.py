"""The rank-r products of the LoRA branch: plain torch by default, Triton kernels on request.

The branch's work is three skinny products per layer, each of which a GEMM library runs far
from memory bandwidth (an N = r output is a poor tile shape), plus the dY pass that plain torch
makes twice:

    down    u   = X A^T                 [T, K] x [r, K]^T -> [T, r]   (forward; a row layer too)
    dy      g   = dY B,  dB = s dY^T u  ONE pass over dY [T, N]       (backward)
    up      dA  = s g^T X               [T, r]^T x [T, K] -> [r, K]   (backward)

The scaling ``s`` is folded into the product that needs it (the GEMM's alpha, or the kernel's
epilogue), never a separate pass. Rank-r updates of an activation-sized tensor
(``Y += s u B^T``, ``dX += s g A``) stay with the GEMM library.

``select(mode, tensor, rank, group)`` picks the implementation (docs/design.md §15):

- ``"torch"``: plain torch, the reference and the CPU path.
- ``"auto"`` (the default): plain torch, unless ``MEASURED`` holds a GPU benchmark row for this
  GPU, dtype, rank and width near this call's token count in which Triton was faster. A kernel
  that compiles is not a kernel that is faster, and no measurement exists yet: ``MEASURED`` is
  empty, so ``auto`` is plain torch on every device. ``benchmarks/bench_gpu.py --kernel-table``
  produces the rows.
- ``"triton"``: the Triton kernels, an explicit opt-in (on a CPU tensor it needs Triton's
  interpreter, ``TRITON_INTERPRET=1``, which is how CI tests them).

Whenever Triton is chosen, the layer's model-parallel group agrees first: at the first call per
dtype / rank block / group every rank runs the kernels' self-check (``triton_agrees``) and one
all-reduce (MIN) of two 0/1 flags decides for all. One rank failing its check puts every rank on
plain torch (one warning), so a replicated factor's gradient stays bitwise equal across TP ranks
(§3). Every Triton kernel is deterministic: no atomics, fixed spans, partials summed by torch in
a fixed order; accumulation is fp32, one cast at the end. Their fp32 partials are bounded by
``plan_down`` / ``plan_dy`` / ``plan_up`` to 1/8 of the activation they read; where no split fits
that bound the product runs in plain torch.

Below this module: ``torch_kernels`` (the plain-torch products) and ``kernel_plans`` (tiles and
spans), which ``triton_branch`` reads too; ``triton_branch`` is imported on first use only.
"""

from __future__ import annotations

import functools
import importlib
import logging
import math
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.distributed as dist

from megatron_lora.core.config import BRANCH_KERNEL_CHOICES
from megatron_lora.core.kernel_plans import Plan, cdiv, dy_cols, interpreting, rank_block
from megatron_lora.core.torch_kernels import TorchKernels

logger = logging.getLogger(__name__)


# --- What `auto` knows: measured shapes ---------------------------------------------------------

@dataclass(frozen=True)
class Measurement:
    """One product timed both ways on one GPU by ``benchmarks/bench_gpu.py --kernel-table``.

    ``width`` is the activation's last dim the product reads (K for down / up, N for dy) on one
    rank; ``tokens`` its rows; times are medians in microseconds.
    """

    device: str  # torch.cuda.get_device_name()
    date: str
    product: str  # "down", "dy" or "up"
    dtype: str  # "bfloat16", "float16", "float32"
    rank: int
    width: int
    tokens: int
    torch_us: float
    triton_us: float

    @property
    def winner(self) -> str:
        return "triton" if self.triton_us < self.torch_us else "torch"


# Rows pasted from `bench_gpu.py --kernel-table` runs on real GPUs (docs/design.md §15). None has
# been measured, so `auto` is plain torch everywhere.
MEASURED: Tuple[Measurement, ...] = ()


def measured_winner(product: str, device: str, dtype: torch.dtype, rank: int, width: int, tokens: int,
                    table: Tuple[Measurement, ...] = None) -> str:
    """"triton" when the row of the same GPU, product, dtype, rank and width with the nearest token
    count (within a factor of 2) measured Triton faster; "torch" otherwise (no such row)."""
    name = str(dtype).replace("torch.", "")
    candidates = [m for m in (MEASURED if table is None else table)
            if (m.device, m.product, m.dtype, m.rank, m.width) == (device, product, name, rank, width)
            and m.tokens / 2 <= tokens <= m.tokens * 2]
    if not candidates:
        return "torch"
    return min(candidates, key=lambda m: (abs(math.log(tokens / m.tokens)), m.tokens)).winner


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device)


class ByMeasurement:
    """``auto`` where ``MEASURED`` has rows for this GPU: each product takes the kernel its nearest
    measured shape found faster (Triton only after the group agreed, see ``_agreed``)."""

    name = "auto"

    def __init__(self, group):
        self.group = group

    def _pick(self, product: str, t: torch.Tensor, rank: int):
        width = t.shape[-1]
        if measured_winner(product, device_name(t.device), t.dtype, rank, width, t.numel() // width) == "triton":
            return _agreed(t, rank, self.group, insist=False)
        return TorchKernels

    def down(self, x, a):
        return self._pick("down", x, a.shape[0]).down(x, a)

    def dy(self, dy, b, u, scaling):
        return self._pick("dy", dy, b.shape[1]).dy(dy, b, u, scaling)

    def up(self, g, x, scaling, like):
        return self._pick("up", x, g.shape[-1]).up(g, x, scaling, like)


# --- Choosing ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def triton_missing_reason():
    """None when Triton imports, else why not."""
    try:
        importlib.import_module("triton")
    except ImportError as error:
        return f"triton does not import ({error})"
    return None


def select(mode: str, tensor: torch.Tensor, rank: int, group=None):
    """The kernels for ``mode`` (``LoRAConfig.branch_kernels``), this call's tensors, LoRA rank and
    the layer's model-parallel group (the ranks that must make the same choice)."""
    if mode not in BRANCH_KERNEL_CHOICES:
        raise ValueError(f"branch kernels must be one of {BRANCH_KERNEL_CHOICES}, got {mode!r}.")
    if mode == "torch":
        return TorchKernels
    if mode == "auto":
        if not tensor.is_cuda or triton_missing_reason() or not _has_rows(device_name(tensor.device)):
            return TorchKernels
        return ByMeasurement(group)
    return _agreed(tensor, rank, group, insist=True)


@functools.lru_cache(maxsize=None)
def _has_rows(device: str) -> bool:
    return any(m.device == device for m in MEASURED)


def _unavailable_reason(tensor: torch.Tensor) -> Optional[str]:
    reason = triton_missing_reason()
    if reason is None and not tensor.is_cuda and not interpreting():
        reason = "the tensors are on the CPU; set TRITON_INTERPRET=1 to run the kernels in Triton's interpreter"
    return reason


def agree(flags: Tuple[bool, ...], group, device: torch.device) -> Tuple[bool, ...]:
    """Each flag AND-ed over ``group``: one all-reduce (MIN) of a few int32s, on ``device``.

    The only collective of this module, issued once per ``_agreed`` key (the first call, which
    every rank of the group reaches at the same layer), never per step."""
    if group is None or not dist.is_initialized() or dist.get_world_size(group) == 1:
        return tuple(flags)
    t = torch.tensor([int(f) for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return tuple(bool(v) for v in t.tolist())


_AGREED: dict = {}  # (dtype, device type, rank block, group, interpreting) -> (available, passed, reason)


def _agreed(tensor: torch.Tensor, rank: int, group, insist: bool):
    """Triton if every rank of ``group`` can run it and passed its self-check, else plain torch
    (``insist``, i.e. an explicit "triton": a rank that cannot run Triton at all is an error)."""
    block = rank_block(rank)
    key = (tensor.dtype, tensor.device.type, block, group, interpreting())
    if key not in _AGREED:
        reason = _unavailable_reason(tensor)
        passed = reason is None and triton_agrees(tensor.dtype, str(tensor.device), block)
        available, all_passed = agree((reason is None, passed), group, tensor.device)
        if available and passed and not all_passed:
            logger.warning("LoRA branch kernels: another rank of the model-parallel group failed the Triton "
                           "self-check (%s, rank block %d); every rank uses plain torch.", tensor.dtype, block)
        _AGREED[key] = (available, all_passed, reason)
    available, all_passed, reason = _AGREED[key]
    if not available:
        if insist:
            raise RuntimeError(
                "LoRAConfig.branch_kernels='triton' (--lora-branch-kernels triton), but "
                f"{reason or 'another rank of the layer model-parallel group cannot run Triton'}. "
                "Use 'torch' (or 'auto').")
        return TorchKernels
    return _triton_kernels() if all_passed else TorchKernels


# --- The self-check ------------------------------------------------------------------------------

CHECK_SPAN = 64  # the self-check's spans: several per reduction on its small shapes
LARGE_STRIDE = 2 ** 30 + 64  # row 2 of such a view sits past 2^31 elements: int32 offsets would wrap


def _check_cases(dtype: torch.dtype, device: str, block: int):
    """(name, tensors, plans) the self-check runs: several spans with a partial last one (and dY's
    column spans of two blocks), a rank below the block, and, where the tensors are in host memory
    (the interpreter), rows at offsets past 2^31 elements through a view whose untouched pages
    cost nothing."""
    g = torch.Generator(device=device).manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    rank = block // 2 + 1
    cols = dy_cols(rank)
    t, k, n = 2 * CHECK_SPAN + 3, 2 * CHECK_SPAN + 22, 2 * cols + 37
    spans = dict(down=Plan(CHECK_SPAN, cdiv(k, CHECK_SPAN)), up=Plan(CHECK_SPAN, cdiv(t, CHECK_SPAN)),
                 dy=Plan(CHECK_SPAN, cdiv(t, CHECK_SPAN), 2 * cols, cdiv(n, 2 * cols)))
    yield "multi-span", (rnd(t, k), rnd(rank, k), rnd(t, n), rnd(n, rank), rnd(t, rank)), spans
    if device == "cpu":  # one span each: these tiny shapes are below the partials' bound
        one = dict(down=Plan(CHECK_SPAN, 1), up=Plan(CHECK_SPAN, 1), dy=Plan(CHECK_SPAN, 1, cols, 1))
        yield "large offsets", (_far_rows(rnd(3, 40)), rnd(rank, 40), _far_rows(rnd(3, 24)), rnd(24, rank),
                                rnd(3, rank)), one


def _far_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a view with row stride ``LARGE_STRIDE`` (in host memory only the pages it touches
    are committed; on a GPU the whole 2^31 elements are allocated, which only tests do)."""
    storage = torch.empty((x.shape[0] - 1) * LARGE_STRIDE + x.shape[1], dtype=x.dtype, device=x.device)
    view = storage.as_strided(x.shape, (LARGE_STRIDE, 1))
    view.copy_(x)
    return view


@functools.lru_cache(maxsize=None)
def triton_agrees(dtype: torch.dtype, device: str, block: int) -> bool:
    """Do the Triton kernels compile and match plain torch here (this rank's one-time check)?"""
    try:
        kernels = _triton_kernels()
        tolerance = 1e-4 if dtype == torch.float32 else 2e-2
        for case, (x, a, dy, b, u), plans in _check_cases(dtype, device, block):
            got = (kernels.down(x, a, plans.get("down")), *kernels.dy(dy, b, u, 0.5, plans.get("dy")),
                   kernels.up(u, x, 0.5, a, plans.get("up")))
            ref = (TorchKernels.down(x, a), *TorchKernels.dy(dy, b, u, 0.5), TorchKernels.up(u, x, 0.5, a))
            for name, impl_out, ref_out in zip(("down", "dy: g", "dy: dB", "up"), got, ref):
                error = (impl_out.float() - ref_out.float()).abs().max() / ref_out.float().abs().max()
                if not error <= tolerance:
                    raise ArithmeticError(f"{case}, {name}: relative error {float(error):.2e} against plain torch")
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
