"""The LoRA dropout mask at TP = 1, 2, 4 (real gloo ranks): what a rank draws and keeps (docs/design.md §6).

A row layer's rank holds ``in/t`` columns of the branch input, so it must draw and keep only
those columns of the logical mask: the mask autograd saves is a contiguous bool tensor of
``s*b*in/t`` bytes, and the draw's transient is the slice plus one column block, not the logical
input. The mask is still TP-invariant: rank i's mask at TP = t is columns ``[i*in/t, (i+1)*in/t)``
of the TP = 1 mask (a column layer's is the whole TP = 1 mask on every rank), and drawing it
again from the same generator state (what activation recomputation and a resume do) gives the
same bits. Each for the local layers and for the external-GEMM layers the TE layers are built on
(``core/external_gemm.py``, driven by ``external_cases``' plain-torch GEMM).
"""

import dataclasses

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import external_cases as E
from tests.distributed import layer_cases as L
from tests.distributed.launcher import run_distributed
from tests.distributed.live_bytes import LiveBytes
from tests.distributed.shapes import B, H_IN, RANK, S

P = 0.5
CFG = LoRAConfig(rank=RANK, alpha=8, dropout=P)
LAYERS = [(L.Case("row", dropout=P), False), (L.Case("row", sp=True, dropout=P), False),
          (L.Case("column", dropout=P), False), (L.Case("column", sp=True, dropout=P), False),
          (L.Case("row", dropout=P), True), (L.Case("row", sp=True, dropout=P), True),
          (L.Case("column", sp=True, dropout=P), True)]  # (case, external GEMM)
T = L.logical_tensors()
BLOCK_COLUMNS = H_IN // 8  # docs/design.md §6: the logical mask is drawn in 8 column blocks


def _draw_metered(layer, meter):
    """Wrap the layer's mask draw (whatever its arguments) in ``meter``; record what it returned."""
    draw = layer._lora_dropout_mask
    drawn = []

    def metered(*args, **kwargs):
        with meter:
            mask = draw(*args, **kwargs)
        drawn.append((args, kwargs))
        return mask

    layer._lora_dropout_mask = metered
    return draw, drawn


def worker(layers, t, lora_config):
    """Per layer: the bool tensors the forward saves for backward, their storage bytes, the peak
    live bytes inside the mask draw, and the mask drawn again from the forward's generator state."""
    tp, _ = L.tp_rank()
    out = []
    for case, external in layers:
        cfg = dataclasses.replace(lora_config, dropout=case.dropout)
        layer = E.build(case.kind, False, case.sp, cfg) if external else L.build_layer(case, tp, cfg)
        L.load_shards(layer, t)
        x, dy = L.local_input_and_grad(case, t)
        meter = LiveBytes()
        draw, drawn = _draw_metered(layer, meter)
        saved = []

        def pack(tensor):
            if tensor.dtype == torch.bool:
                saved.append(tensor)
            return tensor

        torch.manual_seed(7)
        state = torch.get_rng_state()  # the generator state recomputation / a resume restores
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            y, _ = layer(x)
        y.backward(dy)
        after = torch.get_rng_state()
        (args, kwargs), = drawn
        torch.set_rng_state(state)
        replayed = draw(*args, **kwargs)
        stream_continues = draw(*args, **kwargs)  # the next draw from the advanced stream
        assert len(saved) == 1, [(s.dtype, s.shape) for s in saved]
        mask = saved[0]
        out.append(dict(mask=mask.clone(), storage_bytes=mask.untyped_storage().nbytes(),
                        contiguous=mask.is_contiguous(), peak=meter.peak, replayed=replayed.clone(),
                        next_mask=stream_continues.clone(), advanced=not torch.equal(state, after)))
    return out


_results = {}


def results(tp):
    if tp not in _results:
        _results[tp] = run_distributed(worker, tp, LAYERS, T, CFG, tp=tp)
    return _results[tp]


def per_rank(tp, layer):
    return [r[LAYERS.index(layer)] for r in results(tp)]


def layer_id(layer):
    case, external = layer
    return f"{'external ' if external else ''}{case}"


ROWS = [layer for layer in LAYERS if layer[0].kind == "row"]


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("layer", ROWS, ids=layer_id)
def test_row_mask_saved_for_backward_is_the_slice(layer, tp):
    """What backward keeps of the mask: exactly s*b*in/t bytes of bool on each rank."""
    for rank in per_rank(tp, layer):
        assert rank["storage_bytes"] == S * B * H_IN // tp, rank["storage_bytes"]
        assert rank["mask"].dtype == torch.bool and rank["contiguous"]
        assert tuple(rank["mask"].shape) == (S, B, H_IN // tp)


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("layer", ROWS, ids=layer_id)
def test_row_mask_draw_transient_is_the_slice(layer, tp):
    """Peak live bytes inside the draw: the kept bool slice and the fp32 of one column block."""
    slice_bytes = S * B * H_IN // tp
    bound = slice_bytes + 4 * S * B * BLOCK_COLUMNS
    for rank in per_rank(tp, layer):
        assert rank["peak"] <= bound, (rank["peak"], bound)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("layer", LAYERS, ids=layer_id)
def test_mask_is_the_tp1_mask_slice(layer, tp):
    """Rank i's mask at TP = t is the TP = 1 mask's columns of rank i (row) or the whole (column)."""
    logical = per_rank(1, layer)[0]["mask"]
    ranks = per_rank(tp, layer)
    for i, rank in enumerate(ranks):
        expected = logical.chunk(tp, -1)[i] if layer[0].kind == "row" else logical
        assert torch.equal(rank["mask"], expected), i
    assert 0.3 < logical.float().mean().item() < 0.7  # p = 0.5: a mask, not all True or all False


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("layer", LAYERS, ids=layer_id)
def test_mask_replays_from_the_generator_state(layer, tp):
    """Restoring the generator state redraws the same bits (recompute, resume); the draw advances
    the stream, so the next call's mask differs."""
    for rank in per_rank(tp, layer):
        assert rank["advanced"]
        assert torch.equal(rank["replayed"], rank["mask"])
        assert not torch.equal(rank["next_mask"], rank["mask"])
