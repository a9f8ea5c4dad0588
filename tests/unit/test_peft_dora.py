"""DoRA magnitudes between PEFT and full adapters, without Megatron (issue 27, item 4).

The reference is PEFT's DoRA weight per projection, ``W'_p = m_p / ‖W_p + s·B_p·A_p‖ ⊙ (W_p + s·B_p·A_p)``
(row norms, fp64), written out here; the Megatron side forms the same formula on the FUSED layer
(fused base rows, the layer's B and A, its ``lora_magnitude``) and splits the result by the fused
row layout, so a magnitude fused in the wrong row order is caught.
"""

import pytest
import torch

from megatron_lora.core.config import LoRAConfig
from megatron_lora.core.projections import block_structured_b, column_index
from megatron_lora.hf.mapping import MODULES, Arch, ConversionError
from megatron_lora.hf.peft_adapters import check_peft_config, megatron_from_peft, peft_from_megatron, peft_key
from megatron_lora.hf.peft_dora import peft_key as magnitude_key
from tests.unit.test_hf_mapping import ARCH, PROJECTIONS, _config, _peft
from tests.unit.test_per_projection import _rows

SCALE = 2.0  # lora_alpha 8 / r 4


def _base(seed=5):
    g = torch.Generator().manual_seed(seed)
    return {(layer, part): torch.randn(shape, generator=g, dtype=torch.float64)
            for layer in range(2) for part, shape in ARCH.part_shapes().items()}


def _dora_peft(base, parts=PROJECTIONS, layers=(0, 1), seed=0):
    """A DoRA adapter: random factors, magnitudes = ‖W + s·B·A‖ times random factors in [0.5, 1.5]."""
    peft = _peft(parts=parts, layers=layers, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    for layer in layers:
        for part in parts:
            adapted = base[(layer, part)] + SCALE * _delta(peft, layer, part)
            jitter = 0.5 + torch.rand(adapted.shape[0], generator=g, dtype=torch.float64)
            peft[magnitude_key(layer, part)] = (adapted.norm(dim=1) * jitter).float()
    return peft


def _delta(peft, layer, part):
    return peft[peft_key(layer, part, "lora_B")].double() @ peft[peft_key(layer, part, "lora_A")].double()


def _peft_weights(peft, base, scale=SCALE):
    """PEFT's DoRA weight of every projection (the base where the adapter leaves a projection out)."""
    out = {}
    for (layer, part), w in base.items():
        if magnitude_key(layer, part) not in peft:
            out[(layer, part)] = w
            continue
        adapted = w + scale * _delta(peft, layer, part)
        m = peft[magnitude_key(layer, part)].double()
        out[(layer, part)] = (m / adapted.norm(dim=1)).unsqueeze(1) * adapted
    return out


def _megatron_weights(tensors, cfg, base):
    """The DoRA weight of every fused layer from the full adapter, split into projections."""
    out = {}
    for layer in range(2):
        for module, (_, parts) in MODULES.items():
            w = ARCH.fuse(module, [base[(layer, p)] for p in parts])
            prefix = f"decoder.layers.{layer}.{module}."
            if prefix + "lora_A" not in tensors:
                out.update({(layer, p): base[(layer, p)] for p in parts})
                continue
            b, a = tensors[prefix + "lora_B"].double(), tensors[prefix + "lora_A"].double()
            rows = _rows(module) if cfg.per_projection else None
            if rows is not None:
                b = block_structured_b(b, column_index(rows, cfg.rank), int(rows.max()) + 1)
            adapted = w + cfg.scaling * b @ a
            m = tensors[prefix + "lora_magnitude"].double()
            merged = (m / adapted.norm(dim=1)).unsqueeze(1) * adapted
            out.update(zip(((layer, p) for p in parts), ARCH.split(module, merged)))
    return out


def _assert_weights_equal(got, want, tolerance=1e-12):
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=tolerance, atol=tolerance, msg=str(key))


@pytest.mark.parametrize("per_projection", [False, True], ids=["stacked", "per-projection"])
def test_imported_dora_weight_equals_peft_per_projection(per_projection):
    base = _base()
    peft = _dora_peft(base)
    tensors, cfg = megatron_from_peft(peft, _config(use_dora=True), ARCH, per_projection=per_projection)
    assert cfg.use_dora and cfg.rank == (4 if per_projection else 12)
    assert tensors["decoder.layers.0.self_attention.linear_qkv.lora_magnitude"].shape == (128,)
    _assert_weights_equal(_megatron_weights(tensors, cfg, base), _peft_weights(peft, base))
    assert (_peft_weights(peft, base)[(0, "k_proj")] - base[(0, "k_proj")]).abs().max() > 0.1  # DoRA matters


def test_left_out_projections_keep_their_base_norm_read_from_the_base():
    """q, v and gate adapted in layer 1 only: k, up and all of layer 0 get m = ‖W‖ (scale 1)."""
    base = _base()
    peft = _dora_peft(base, parts=("q_proj", "v_proj", "gate_proj"), layers=(1,))
    config = _config(use_dora=True, target_modules=["q_proj", "v_proj", "gate_proj"])
    asked = []

    def base_norms(needed):
        asked.extend(needed)
        return {k: base[k].norm(dim=1) for k in needed}

    tensors, cfg = megatron_from_peft(peft, config, ARCH, base_norms=base_norms)
    assert cfg.target_modules == ("linear_qkv", "linear_fc1")
    assert sorted(asked) == sorted([(0, p) for p in ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")] +
                                   [(1, "k_proj"), (1, "up_proj")])
    qkv = tensors["decoder.layers.0.self_attention.linear_qkv.lora_magnitude"]  # the norms, in the adapter's fp32
    norms = [base[(0, p)].norm(dim=1) for p in ("q_proj", "k_proj", "v_proj")]
    assert qkv.dtype == torch.float32 and torch.equal(qkv, ARCH.fuse("self_attention.linear_qkv", norms).float())
    # m = fp32(‖W‖) against the fp64 norm here: a scale of 1 within fp32 rounding on the left-out rows
    _assert_weights_equal(_megatron_weights(tensors, cfg, base), _peft_weights(peft, base), tolerance=1e-6)
    with pytest.raises(ConversionError) as err:
        megatron_from_peft(peft, config, ARCH)
    message = str(err.value)
    assert "no magnitude for layer 0 q_proj" in message and "pass --base as the Megatron checkpoint" in message


@pytest.mark.parametrize("per_projection", [False, True], ids=["stacked", "per-projection"])
def test_peft_to_megatron_to_peft_is_bitwise_and_keep_rank_the_same_weight(per_projection):
    base = _base()
    peft = _dora_peft(base)
    tensors, cfg = megatron_from_peft(peft, _config(use_dora=True), ARCH, per_projection=per_projection)
    back, config = peft_from_megatron(tensors, cfg, ARCH)
    assert set(back) == set(peft) and all(torch.equal(back[k], peft[k]) for k in peft)
    assert config["use_dora"] and config["r"] == 4 and len(back) == 2 * 7 * 3
    kept, kept_config = peft_from_megatron(tensors, cfg, ARCH, compact=False)  # --keep-rank: r 12 when stacked
    assert kept_config["r"] == cfg.rank
    scale = kept_config["lora_alpha"] / kept_config["r"]
    _assert_weights_equal(_peft_weights(kept, base, scale), _peft_weights(peft, base))


def test_dora_config_checks():
    check_peft_config(_config(use_dora=True))
    for change, message in ((dict(target_parameters=["mlp.experts.down_proj"]), "use_dora with target_parameters"),
                            (dict(lora_bias=True), "lora_bias=True"), (dict(fan_in_fan_out=True), "fan_in_fan_out")):
        with pytest.raises(ConversionError) as err:
            check_peft_config(_config(use_dora=True, **change))
        assert message in str(err.value)


@pytest.mark.parametrize("edit, use_dora, message", [
    (lambda t: None, False, "is a DoRA magnitude, but adapter_config.json has no use_dora=true"),
    (lambda t: t.pop(magnitude_key(1, "v_proj")), True, "layer 1 v_proj has LoRA factors but no lora_magnitude_vector"),
    (lambda t: t.update({magnitude_key(0, "q_proj"): torch.ones(32)}), True, "has shape (32,), expected (64,)"),
    (lambda t: t.update({"base_model.model.model.layers.0.mlp.experts.0.gate_proj.lora_magnitude_vector":
                         torch.ones(8)}), True, "PEFT has no DoRA on experts or the router"),
])
def test_dora_tensors_that_do_not_fit_are_refused(edit, use_dora, message):
    peft = _dora_peft(_base())
    edit(peft)
    with pytest.raises(ConversionError) as err:
        megatron_from_peft(peft, _config(use_dora=use_dora), ARCH)
    assert message in str(err.value)


def test_dora_on_experts_does_not_export_to_peft():
    moe = Arch(num_layers=1, hidden_size=32, ffn_hidden_size=64, num_heads=4, num_groups=2, head_dim=8, vocab_size=64,
               tied=False, qkv_bias=False, qk_norm=True, num_experts=4, moe_topk=2, moe_ffn_hidden_size=16)
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=("linear_qkv", "linear_fc1"), use_dora=True)
    with pytest.raises(ConversionError) as err:
        peft_from_megatron({}, cfg, moe)
    assert "DoRA on mlp.experts.local_experts.0.linear_fc1" in str(err.value) and "merge --to hf" in str(err.value)
