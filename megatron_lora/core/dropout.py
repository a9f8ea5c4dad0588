"""The LoRA dropout mask of a layer's logical branch input (docs/design.md §6).

Every mask is a function of the default generator's state and the LOGICAL (unsharded) shape only,
so no TP size changes it, and restoring the generator state (activation recomputation, a resume)
redraws it bitwise. Megatron seeds the default generator identically across the TP group.

- A column layer's branch input is replicated: every rank draws the whole mask,
  ``torch.rand(shape) >= p``.
- A row layer's rank holds the columns ``[i*in/t, (i+1)*in/t)``. The logical mask is drawn in
  ``COLUMN_BLOCKS`` column blocks; block j is ``torch.rand`` of its own generator, seeded from a
  key taken once per call from the default generator and from j. A rank draws only the blocks
  that cover its columns and keeps exactly those columns, contiguous:

      logical mask [..., in]     | block 0 | block 1 | ... | block 7 |
      rank 1 of 4 draws, keeps             | b2 | b3 |      (in/8 columns each)

  Saved for backward: ``s*b*in/t`` bytes of bool, not the whole mask; drawn: the kept slice and
  the fp32 of one block. With t dividing 8 the blocks tile the slices exactly; at other t a rank
  also draws the parts of the (at most two) blocks its slice edges cut, and keeps its columns.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from megatron_lora.core.init import name_seed

# Eight: the largest TP group in one NVLink domain, so up to TP = 8 a rank draws nothing beyond its
# own columns, and TP = 1 pays 8 small draws instead of one. Changing it changes every row mask.
COLUMN_BLOCKS = 8


def column_block_bounds(width: int) -> list:
    """The column boundaries of the logical mask's blocks: ``COLUMN_BLOCKS`` (fewer for a narrower
    input) blocks of ``width // COLUMN_BLOCKS`` columns, the remainder spread as ``j*width//k``."""
    k = min(COLUMN_BLOCKS, width)
    return [j * width // k for j in range(k + 1)]


def _stream_key(device: torch.device) -> int:
    """A 62-bit key: one integer drawn from the generator a plain ``torch.rand(device=device)``
    draws from (so it advances it, and a restored state redraws it).

    On an accelerator reading it synchronises once per row layer and call. Reading the CUDA
    generator's Philox seed and offset on the host would avoid that, but has never run on a GPU:
    unmeasured GPU code is never a default here.
    """
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        raise RuntimeError(
            "LoRA dropout on a row layer cannot be captured in a CUDA graph: its mask's block seeds "
            "are host values, so every replay would reuse one mask. Set LoRAConfig.dropout = 0 or "
            "leave these layers out of the captured region.")
    return int(torch.randint(0, 2 ** 62, (), device=device))


def dropout_mask(shape: Sequence[int], p: float, device: torch.device,
                 columns: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """Keep-mask (True = keep) of the logical branch input of ``shape``.

    Args:
        shape: the logical input's shape ``[..., in]``.
        p: the drop probability.
        columns: ``(start, length)``: draw and return only these columns of the last dim (a row
            layer's slice) from the column blocks; None: the whole mask from one draw (column layers).

    Returns:
        A contiguous bool tensor ``[..., length]`` (``[..., in]`` when ``columns`` is None).
    """
    shape = list(shape)
    if columns is None:
        return torch.rand(shape, device=device) >= p
    start, length = columns
    width = shape[-1]
    if not (0 <= start and length > 0 and start + length <= width):
        raise ValueError(f"dropout_mask: columns (start {start}, length {length}) must lie within the "
                         f"logical width {width}; pass this rank's slice of the layer's input features.")
    key = _stream_key(device)
    mask = torch.empty(shape[:-1] + [length], dtype=torch.bool, device=device)
    gen = torch.Generator(device=device)
    bounds = column_block_bounds(width)
    for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        first, last = max(lo, start), min(hi, start + length)
        if first >= last:
            continue  # another rank's block
        gen.manual_seed(name_seed(key, f"block {j}"))
        block = torch.rand(shape[:-1] + [hi - lo], generator=gen, device=device)
        torch.ge(block[..., first - lo:last - lo], p, out=mask[..., first - start:last - start])
        del block  # one block's fp32 alive at a time
    return mask
