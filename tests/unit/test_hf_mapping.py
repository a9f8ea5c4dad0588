"""Pure mapping functions of the Hugging Face / PEFT conversion (no Megatron, no transformers).

References are written out independently: row labels for the fused layouts, explicit
``s * B @ A`` products for adapters.
"""

import math

import pytest
import torch

from megatron_lora.core.config import LoRAConfig
from megatron_lora.hf.peft_adapters import (
    check_peft_config, megatron_from_peft, peft_from_megatron, peft_key,
)
from megatron_lora.hf.mapping import (
    Arch, ConversionError, arch_from_hf_config, arch_from_model_args, check_hf_config, check_hf_tensors,
    check_parallel_layout, fuse_qkv, hf_from_megatron, hf_shapes, megatron_flags, megatron_from_hf, split_qkv,
    vocab_divisor,
)
from tests.peft_reference import peft_deltas

LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, rms_norm_eps=1e-5, rope_theta=5000.0, hidden_act="silu",
             max_position_embeddings=64, tie_word_embeddings=False)
ARCH = arch_from_hf_config(LLAMA)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ------------------------------------------------------------------------------ fused layouts

def test_fuse_qkv_groups_query_heads_with_their_key_and_value_head():
    """8 heads, 2 groups, head dim 1: every row carries its own label."""
    q = torch.arange(8.0).unsqueeze(1)            # q heads 0..7
    k = 100 + torch.arange(2.0).unsqueeze(1)      # k heads 0, 1
    v = 200 + torch.arange(2.0).unsqueeze(1)
    fused = fuse_qkv(q, k, v, num_heads=8, num_groups=2).flatten().tolist()
    assert fused == [0, 1, 2, 3, 100, 200, 4, 5, 6, 7, 101, 201]


@pytest.mark.parametrize("heads, groups", [(4, 2), (8, 2), (4, 4), (4, 1)])
def test_qkv_round_trip_with_gqa(heads, groups):
    d, h = 3, 5
    q, k, v = torch.randn(heads * d, h), torch.randn(groups * d, h), torch.randn(groups * d, h)
    fused = fuse_qkv(q, k, v, heads, groups)
    # Megatron's reading: [G, (H/G + 2) * d] rows, split per group into q, k, v
    per_group = fused.view(groups, (heads // groups + 2) * d, h)
    assert torch.equal(per_group[:, : heads // groups * d].reshape(-1, h), q)
    assert torch.equal(per_group[:, heads // groups * d: (heads // groups + 1) * d].reshape(-1, h), k)
    for got, want in zip(split_qkv(fused, heads, groups), (q, k, v)):
        assert torch.equal(got, want)
    bias = fuse_qkv(q[:, 0], k[:, 0], v[:, 0], heads, groups)  # 1-d tensors (Qwen2 biases) too
    assert torch.equal(bias, fused[:, 0])


def test_qkv_with_gqa_is_not_q_k_v_blocks():
    q, k, v = torch.randn(4, 2), torch.randn(2, 2), torch.randn(2, 2)
    assert not torch.equal(fuse_qkv(q, k, v, 4, 2), torch.cat([q, k, v]))


def test_fc1_is_gate_then_up():
    gate, up = torch.randn(6, 4), torch.randn(6, 4)
    fused = ARCH.fuse("mlp.linear_fc1", [gate, up])
    assert torch.equal(fused[:6], gate) and torch.equal(fused[6:], up)
    assert all(torch.equal(a, b) for a, b in zip(ARCH.split("mlp.linear_fc1", fused), (gate, up)))


def test_qkv_shapes_that_do_not_fit_the_heads_are_refused():
    with pytest.raises(ConversionError, match="do not fit 4 heads"):
        fuse_qkv(torch.randn(8, 2), torch.randn(3, 2), torch.randn(3, 2), 4, 2)
    with pytest.raises(ConversionError, match="linear_qkv has 13 rows"):
        split_qkv(torch.randn(13, 2), 4, 2)


# ------------------------------------------------------------------------------- name maps

def _random_hf(arch, qkv_bias=False):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g) for n, s in hf_shapes(arch).items()}


@pytest.mark.parametrize("tied, qkv_bias", [(False, False), (True, True)])
def test_hf_names_round_trip_through_megatron_names(tied, qkv_bias):
    arch = Arch(**{**ARCH.__dict__, "tied": tied, "qkv_bias": qkv_bias})
    hf = _random_hf(arch)
    megatron = dict(megatron_from_hf(hf.__getitem__, arch))
    expected = {"embedding.word_embeddings.weight", "decoder.final_layernorm.weight"} | \
        ({"output_layer.weight"} if not tied else set()) | \
        {f"decoder.layers.{i}.{m}" for i in range(2) for m in (
            "input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.weight",
            "self_attention.linear_proj.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")} | \
        ({f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in range(2)} if qkv_bias else set())
    assert set(megatron) == expected
    assert megatron["decoder.layers.1.self_attention.linear_qkv.weight"].shape == ((4 + 2 * 2) * 16, 64)
    assert torch.equal(megatron["decoder.layers.0.pre_mlp_layernorm.weight"],
                       hf["model.layers.0.post_attention_layernorm.weight"])
    back = hf_from_megatron(megatron, arch)
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)


def test_hf_checkpoint_that_does_not_match_its_config_is_refused():
    shapes = {n: s for n, s in hf_shapes(ARCH).items() if n != "model.layers.1.mlp.up_proj.weight"}
    shapes["model.layers.0.self_attn.k_proj.weight"] = (64, 64)
    shapes["model.layers.0.self_attn.rotary_emb.inv_freq"] = (8,)  # ignored: old checkpoints carry it
    with pytest.raises(ConversionError) as err:
        check_hf_tensors(shapes, ARCH, "ckpt")
    assert "missing ['model.layers.1.mlp.up_proj.weight']" in str(err.value)
    assert "model.layers.0.self_attn.k_proj.weight: expected (32, 64), found (64, 64)" in str(err.value)


# --------------------------------------------------------------------------------- configs

def test_flags_reproduce_the_hf_config():
    rope = {"rope_theta": 500000.0, "rope_type": "default"}  # the transformers 5 spelling
    flags = megatron_flags({**LLAMA, "rope_theta": None, "rope_parameters": rope}, "/models/x")
    text = " ".join(flags)
    for part in ("--num-layers 2", "--hidden-size 64", "--ffn-hidden-size 128", "--num-attention-heads 4",
                 "--num-query-groups 2", "--kv-channels 16", "--swiglu", "--normalization RMSNorm",
                 "--norm-epsilon 1e-05", "--position-embedding-type rope", "--rotary-base 500000",
                 "--disable-bias-linear", "--untie-embeddings-and-output-weights",
                 "--make-vocab-size-divisible-by 128", "--tokenizer-model /models/x"):
        assert part in text, part
    assert "--add-qkv-bias" not in text
    qwen = " ".join(megatron_flags({**LLAMA, "model_type": "qwen2", "tie_word_embeddings": True}, "q"))
    assert "--add-qkv-bias" in qwen and "--untie" not in qwen


def test_vocab_divisor_adds_no_padding():
    for vocab in (256, 32000, 128256, 151936, 50257, 100):
        m = vocab_divisor(vocab)
        assert vocab % m == 0 and m <= 128 and (m == 128 or vocab % (2 * m))


@pytest.mark.parametrize("change, message", [
    (dict(model_type="gpt2"), "model_type 'gpt2' is not supported"),
    (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "rope scaling 'llama3'"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 1e4}), "rope scaling 'yarn'"),
    (dict(attention_bias=True), "attention_bias=true"),
    (dict(mlp_bias=True), "mlp_bias=true"),
    (dict(model_type="qwen2", use_sliding_window=True), "use_sliding_window=true"),
    (dict(num_key_value_heads=3), "not a multiple of num_key_value_heads 3"),
])
def test_unsupported_hf_configs_are_refused_with_the_reason(change, message):
    with pytest.raises(ConversionError) as err:
        check_hf_config({**LLAMA, **change})
    assert message in str(err.value)


@pytest.mark.parametrize("tp, pp, message", [
    (3, 1, "attention heads 4 does not divide by TP=3"),
    (4, 1, "key/value heads (query groups) 2 does not divide by TP=4"),
    (1, 3, "layers 2 does not divide by PP=3"),
])
def test_parallel_layout_is_checked_at_conversion_time(tp, pp, message):
    with pytest.raises(ConversionError) as err:
        check_parallel_layout(ARCH, tp, pp)
    assert message in str(err.value) and "Choose sizes that divide them" in str(err.value)
    check_parallel_layout(ARCH, 2, 2)


def test_non_llama_megatron_models_are_refused_for_export():
    args = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4, num_query_groups=2,
                kv_channels=16, swiglu=False, normalization="LayerNorm", position_embedding_type="rope",
                add_bias_linear=True, padded_vocab_size=256, untie_embeddings_and_output_weights=False)
    with pytest.raises(ConversionError) as err:
        arch_from_model_args(args)
    assert "--swiglu False" in str(err.value) and "--normalization 'LayerNorm'" in str(err.value)
    arch = arch_from_model_args({**args, "swiglu": True, "normalization": "RMSNorm", "add_bias_linear": False})
    assert arch == Arch(2, 64, 128, 4, 2, 16, 256, tied=True, qkv_bias=False)
    llama = {**args, "swiglu": True, "normalization": "RMSNorm", "add_bias_linear": False}
    with pytest.raises(ConversionError, match="\\(a shared expert\\) 64 \\(need None\\).*without a shared expert"):
        arch_from_model_args({**llama, "num_experts": 4, "moe_router_topk": 2,
                              "moe_shared_expert_intermediate_size": 64})


# ---------------------------------------------------------------------------- PEFT adapters

def _peft(r=4, parts=PROJECTIONS, layers=(0, 1), shared_a=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = ARCH.part_shapes()
    out, a_shared = {}, torch.randn(r, 64, generator=g)
    for layer in layers:
        for part in parts:
            out_f, in_f = shapes[part]
            a = a_shared if shared_a and in_f == 64 and part != "o_proj" else torch.randn(r, in_f, generator=g)
            out[peft_key(layer, part, "lora_A")] = a
            out[peft_key(layer, part, "lora_B")] = torch.randn(out_f, r, generator=g)
    return out


def _config(**change):
    return {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": list(PROJECTIONS), **change}


def _megatron_deltas(tensors, cfg, b_as_multiplied=lambda module, b: b):
    """{(layer, projection): s * B @ A} of a full adapter, split back by the layouts;
    ``b_as_multiplied(module, B)``: the B a layer multiplies (per-projection: its block form)."""
    out = {}
    for key, a in tensors.items():
        if key.endswith("lora_A"):
            layer, module = int(key.split(".")[2]), ".".join(key.split(".")[3:5])
            delta = cfg.scaling * (b_as_multiplied(module, tensors[key[:-1] + "B"]).double() @ a.double())
            from megatron_lora.hf.mapping import MODULES

            for part, d in zip(MODULES[module][1], ARCH.split(module, delta)):
                out[(layer, part)] = d
    return out


@pytest.mark.parametrize("use_rslora", [False, True])
def test_distinct_qkv_a_import_as_stacked_rank_with_the_same_deltas(use_rslora):
    peft = _peft()
    tensors, cfg = megatron_from_peft(peft, _config(use_rslora=use_rslora), ARCH)
    scale = 8 / (math.sqrt(4) if use_rslora else 4)
    assert cfg.rank == 12 and not cfg.use_rslora and cfg.scaling == pytest.approx(scale, rel=1e-15)
    assert cfg.target_modules == ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")
    got, want = _megatron_deltas(tensors, cfg), peft_deltas(peft, scale)
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
    # B is copied bit for bit: the k block of the fused B holds exactly B_k
    fused_b = tensors["decoder.layers.0.self_attention.linear_qkv.lora_B"]
    k_block = ARCH.split("self_attention.linear_qkv", fused_b)[1][:, 4:8]
    assert torch.equal(k_block, peft[peft_key(0, "k_proj", "lora_B")])


def test_equal_a_keep_the_rank_and_alpha():
    tensors, cfg = megatron_from_peft(_peft(shared_a=True), _config(use_rslora=True), ARCH)
    assert (cfg.rank, cfg.alpha, cfg.use_rslora) == (4, 8, True)


def test_missing_projections_and_layers_are_exact_zeros():
    peft = _peft(parts=("q_proj", "v_proj"), layers=(1,))
    tensors, cfg = megatron_from_peft(peft, _config(target_modules=["q_proj", "v_proj"]), ARCH)
    assert cfg.target_modules == ("linear_qkv",) and cfg.rank == 8
    deltas = _megatron_deltas(tensors, cfg)
    assert not deltas[(0, "q_proj")].any() and not deltas[(1, "k_proj")].any()
    torch.testing.assert_close(deltas[(1, "v_proj")], peft_deltas(peft, 2.0)[(1, "v_proj")])


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_to_megatron_to_peft_returns_the_original_factors(use_rslora):
    peft = _peft()
    tensors, cfg = megatron_from_peft(peft, _config(use_rslora=use_rslora), ARCH)
    back, config = peft_from_megatron(tensors, cfg, ARCH)
    assert set(back) == set(peft) and all(torch.equal(back[k], peft[k]) for k in peft)
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config["use_rslora"] else config["r"])
    assert config["r"] == 4 and scale == pytest.approx(8 / (math.sqrt(4) if use_rslora else 4), rel=1e-15)
    assert config["target_modules"] == list(PROJECTIONS)


def test_megatron_export_shares_a_and_deinterleaves_b():
    cfg = LoRAConfig(rank=4, alpha=16, target_modules=("linear_qkv", "linear_fc1"))
    g = torch.Generator().manual_seed(1)
    tensors = {}
    for layer in range(2):
        for module in ("self_attention.linear_qkv", "mlp.linear_fc1"):
            out_f, in_f = ARCH.module_shape(module)
            tensors[f"decoder.layers.{layer}.{module}.lora_A"] = torch.randn(4, in_f, generator=g)
            tensors[f"decoder.layers.{layer}.{module}.lora_B"] = torch.randn(out_f, 4, generator=g)
    peft, config = peft_from_megatron(tensors, cfg, ARCH)
    assert (config["r"], config["lora_alpha"]) == (4, 16)
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    a = tensors["decoder.layers.1.mlp.linear_fc1.lora_A"]
    assert torch.equal(peft[peft_key(1, "up_proj", "lora_A")], a)
    assert torch.equal(peft[peft_key(1, "up_proj", "lora_B")], tensors["decoder.layers.1.mlp.linear_fc1.lora_B"][128:])
    for key, delta in peft_deltas(peft, 4.0).items():
        torch.testing.assert_close(delta, _megatron_deltas(tensors, cfg)[key], rtol=1e-12, atol=1e-12)
    untrained = {k: (v if k.endswith("lora_A") else torch.zeros_like(v)) for k, v in tensors.items()}
    peft, config = peft_from_megatron(untrained, cfg, ARCH)  # B = 0: nothing to drop, A's kept
    assert config["r"] == 4 and peft[peft_key(0, "q_proj", "lora_A")].any()


@pytest.mark.parametrize("change, message", [
    (dict(use_dora=True, lora_bias=True), "lora_bias=True"),
    (dict(bias="lora_only"), "bias='lora_only'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(rank_pattern={"q_proj": 8}), "rank_pattern"),
    (dict(alpha_pattern={"q_proj": 8}), "alpha_pattern"),
    (dict(target_modules=["q_proj", "lm_head"]), "target_modules ['lm_head']"),
    (dict(peft_type="IA3"), "only LoRA adapters"),
    (dict(format="megatron_lora.adapter"), "use megatron-to-peft"),
])
def test_unsupported_peft_configs_are_refused(change, message):
    with pytest.raises(ConversionError) as err:
        check_peft_config(_config(**change))
    assert message in str(err.value)
    check_peft_config(_config(modules_to_save=[], rank_pattern={}, bias="none", use_dora=False))


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}), "not a LoRA factor"),
    (lambda t: t.update({peft_key(0, "q_proj", "lora_A"): torch.zeros(4, 32)}), "expected (4, 64)"),
    (lambda t: t.pop(peft_key(1, "o_proj", "lora_B")), "o_proj has lora_A but not both"),
    (lambda t: t.update({peft_key(5, "q_proj", "lora_A"): torch.zeros(4, 64)}), "the model has 2 layers"),
])
def test_peft_tensors_that_do_not_fit_are_refused(edit, message):
    peft = _peft()
    edit(peft)
    with pytest.raises(ConversionError) as err:
        megatron_from_peft(peft, _config(), ARCH)
    assert message in str(err.value)


def test_export_refuses_an_adapter_of_another_model():
    cfg = LoRAConfig(rank=4, alpha=8, target_modules=("linear_proj",))
    tensors = {f"decoder.layers.{i}.self_attention.linear_proj.lora_{f}": torch.zeros(s)
               for i in range(2) for f, s in (("A", (4, 32)), ("B", (64, 4)))}
    with pytest.raises(ConversionError, match=r"wrong shapes.*expected \(4, 64\)"):
        peft_from_megatron(tensors, cfg, ARCH)


# ------------------------------------------------------------------------- checkpoint files

def test_sharded_hf_checkpoint_is_written_and_read_back(tmp_path):
    from megatron_lora.hf.merge import write_hf
    from megatron_lora.hf.sources import HFCheckpoint

    tensors = _random_hf(ARCH)
    args = dict(norm_epsilon=1e-5, rotary_base=5000, max_position_embeddings=64)
    write_hf(tensors, ARCH, args, str(tmp_path), None, "float32", shard_bytes=200_000)
    assert len([f for f in tmp_path.iterdir() if f.suffix == ".safetensors"]) > 1
    ckpt = HFCheckpoint(str(tmp_path))  # reads through model.safetensors.index.json
    try:
        assert ckpt.shapes() == {n: tuple(t.shape) for n, t in tensors.items()}
        assert all(torch.equal(ckpt.get(n), t) for n, t in tensors.items())
        assert arch_from_hf_config(ckpt.config) == ARCH
    finally:
        ckpt.close()


def test_pickled_hf_weights_are_refused(tmp_path):
    from megatron_lora.hf.sources import HFCheckpoint

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConversionError, match="would be unpickled"):
        HFCheckpoint(str(tmp_path))
