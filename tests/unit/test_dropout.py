"""The column-block dropout mask (``core/dropout.py``, docs/design.md §6) on one process.

The distributed tests (tests/distributed/test_dropout_mask.py) run the layers at TP = 1, 2, 4,
where the slices tile the 8 blocks exactly; here every split of the columns, blocks cut by slice
edges included (TP = 3, 6, 12; TP = 16 above the block count), and the draw's peak memory there.
"""

import pytest
import torch

from megatron_lora.core.dropout import COLUMN_BLOCKS, column_block_bounds, dropout_mask
from tests.distributed.live_bytes import LiveBytes

ROWS, P = (16, 2), 0.3


def draw(width, start, length, seed=5):
    torch.manual_seed(seed)  # every rank's generator is in the same state at the draw
    return dropout_mask(list(ROWS) + [width], P, torch.device("cpu"), (start, length))


@pytest.mark.parametrize("width,tp", [(48, 1), (48, 2), (48, 3), (48, 4), (48, 6), (48, 8), (48, 12), (48, 16),
                                      (5, 5), (20, 4)])
def test_every_split_reassembles_the_tp1_mask(width, tp):
    """Rank i's slice is the TP = 1 mask's columns of rank i, aligned with the blocks or not."""
    whole = draw(width, 0, width)
    n = width // tp
    slices = [draw(width, i * n, n) for i in range(tp)]
    assert all(s.is_contiguous() and s.dtype == torch.bool and s.shape == (*ROWS, n) for s in slices)
    assert torch.equal(torch.cat(slices, -1), whole)
    assert abs(whole.float().mean().item() - (1 - P)) < 0.1


def test_blocks_tile_the_width():
    assert column_block_bounds(48) == [0, 6, 12, 18, 24, 30, 36, 42, 48]
    assert column_block_bounds(20) == [0, 2, 5, 7, 10, 12, 15, 17, 20]
    assert column_block_bounds(5) == [0, 1, 2, 3, 4, 5]  # narrower than COLUMN_BLOCKS: one column each
    assert COLUMN_BLOCKS == 8


@pytest.mark.parametrize("tp", [1, 2, 3, 8, 16])
def test_draw_peak_is_the_slice_and_one_block(tp):
    """Live bytes inside the draw: the kept bool slice plus one block's fp32, never the whole
    input's fp32 (``4 * ROWS * width``), at aligned and unaligned splits."""
    width = 48
    n = width // tp
    meter = LiveBytes()
    with meter:
        mask = draw(width, (tp - 1) * n, n)
    rows = ROWS[0] * ROWS[1]
    assert meter.peak <= mask.numel() + 4 * rows * (width // COLUMN_BLOCKS), meter.peak
    assert meter.peak < 4 * rows * width


def test_the_stream_decides_the_mask():
    """Another generator state, another mask; the same state, the same bits."""
    assert torch.equal(draw(48, 6, 12, seed=5), draw(48, 6, 12, seed=5))
    assert not torch.equal(draw(48, 6, 12, seed=5), draw(48, 6, 12, seed=6))
    torch.manual_seed(5)
    first = dropout_mask([*ROWS, 48], P, torch.device("cpu"), (0, 48))
    second = dropout_mask([*ROWS, 48], P, torch.device("cpu"), (0, 48))
    assert not torch.equal(first, second)  # the draw advanced the default generator


@pytest.mark.parametrize("columns", [(-1, 4), (0, 0), (40, 16)])
def test_columns_outside_the_width_are_refused(columns):
    with pytest.raises(ValueError, match="must lie within the logical width 48"):
        dropout_mask([*ROWS, 48], P, torch.device("cpu"), columns)


def test_a_cuda_graph_capture_is_refused(monkeypatch):
    """A row layer's block seeds are host values: a captured draw would replay one mask forever."""
    from megatron_lora.core import dropout

    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="cannot be captured in a CUDA graph"):
        dropout._stream_key(torch.device("cuda", 0))
