"""How the Triton branch kernels are cut into programs: tiles, spans and the bound on their partials.

Plain arithmetic on shapes (tested where Triton is missing too), read by ``triton_branch`` to
launch the kernels and by ``kernels`` for its self-check; it imports neither.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple


def interpreting() -> bool:
    """``TRITON_INTERPRET`` is set: the kernels run on the CPU in Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def rank_block(rank: int) -> int:
    """The rank dimension of the kernels' tiles (``tl.dot`` needs >= 16); one compilation each."""
    return max(16, 1 << (rank - 1).bit_length())


# --- The Triton kernels' launch plans (plain arithmetic: tested where triton is missing too) ----

TOKENS, COLS = 64, 64  # tile of X / dY rows and columns (down, up)
SPAN = 512  # default reduction length per program: K for down, T for up
DY_SPAN = 1024  # default tokens per program of the dY pass
PARTIAL_FRACTION = 8  # a kernel's fp32 partials (and their sum) are at most 1/8 of the activation it reads
FP32 = 4


@dataclass(frozen=True)
class Plan:
    """How a kernel cuts its reductions; ``transient_bytes``: its fp32 partials plus their sum."""

    span: int  # reduction length per program (down: K, up: T, dy: tokens)
    splits: int  # programs along that reduction = partial buffers
    col_span: int = 0  # dy only: columns per program (a multiple of ``dy_cols``)
    col_splits: int = 0  # dy only: partial buffers of g
    transient_bytes: int = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dy_cols(rank: int) -> int:
    """Columns per block of the dY kernel: its dB accumulator (cols x rank block) stays in registers."""
    return min(256, max(32, 4096 // rank_block(rank)))


def _split(length: int, tile: int, default: int, per_split: int, budget: int) -> Optional[Tuple[int, int, int]]:
    """(span, splits, bytes): as many spans of ``default`` (a multiple of ``tile``) as the budget
    allows, each split costing ``per_split`` fp32 bytes plus one more for their sum when > 1; None
    when even one does not fit."""
    if per_split > budget:
        return None
    most = 1 if budget < 3 * per_split else budget // per_split - 1
    splits = min(most, cdiv(length, default))
    span = cdiv(cdiv(length, splits), tile) * tile
    splits = cdiv(length, span)
    return span, splits, (splits + (splits > 1)) * per_split


def plan_down(tokens: int, k: int, rank: int, itemsize: int, span: int = SPAN) -> Optional[Plan]:
    """Spans of K; partials [splits, T, r] fp32, at most X's bytes / 8."""
    cut = _split(k, COLS, span, tokens * rank * FP32, tokens * k * itemsize // PARTIAL_FRACTION)
    return None if cut is None else Plan(cut[0], cut[1], transient_bytes=cut[2])


def plan_up(tokens: int, k: int, rank: int, itemsize: int, span: int = SPAN) -> Optional[Plan]:
    """Spans of T; partials [splits, r, K] fp32, at most X's bytes / 8."""
    cut = _split(tokens, TOKENS, span, rank * k * FP32, tokens * k * itemsize // PARTIAL_FRACTION)
    return None if cut is None else Plan(cut[0], cut[1], transient_bytes=cut[2])


def plan_dy(tokens: int, n: int, rank: int, itemsize: int, span: int = DY_SPAN,
            col_span: Optional[int] = None) -> Optional[Plan]:
    """Spans of T (dB partials [splits, N, r]) and of N (g partials [col_splits, T, r]), each at
    most half of dY's bytes / 8. Before this bound the g partials were one per 32-256 columns:
    2r/cols of dY's bytes, 2x dY at r = 64."""
    half = tokens * n * itemsize // PARTIAL_FRACTION // 2
    cols = dy_cols(rank)
    rows = _split(tokens, TOKENS, span, n * rank * FP32, half)
    columns = _split(n, cols, col_span or cols, tokens * rank * FP32, half)
    if rows is None or columns is None:
        return None
    return Plan(rows[0], rows[1], columns[0], columns[1], rows[2] + columns[2])
