"""Qwen3 (q/k norm), Qwen3-MoE and Mixtral in the pure mapping functions (``hf/mapping.py``,
``hf/families.py``): configs, flags, names, both expert layouts, refusals.

The configs are what transformers 5.25's ``save_pretrained`` writes for tiny models (checked by
``tests/distributed/test_convert_families.py`` against the real classes). References are written
out independently: labelled rows for the fused layouts, ``torch.stack`` / ``cat`` for the
in-memory expert layout.
"""

import pytest
import torch

from megatron_lora.hf.mapping import (
    Arch, ConversionError, arch_from_hf_config, arch_from_model_args, check_hf_config, check_hf_tensors,
    check_parallel_layout, fused_experts, hf_config_for, hf_from_megatron, hf_from_megatron_tensor, hf_names_of,
    hf_shapes, megatron_flags, megatron_from_hf, megatron_names,
)

COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              vocab_size=384, hidden_act="silu", max_position_embeddings=64, tie_word_embeddings=False,
              attention_dropout=0.0, rope_parameters={"rope_theta": 10000.0, "rope_type": "default"})
QWEN3 = dict(COMMON, model_type="qwen3", head_dim=16, rms_norm_eps=1e-6, attention_bias=False, use_sliding_window=False,
             sliding_window=None, max_window_layers=28, layer_types=["full_attention"] * 2)
QWEN3_MOE = dict(COMMON, model_type="qwen3_moe", head_dim=16, rms_norm_eps=1e-6, attention_bias=False,
                 use_sliding_window=False, sliding_window=None, decoder_sparse_step=1, mlp_only_layers=[],
                 moe_intermediate_size=24, num_local_experts=4, num_experts_per_tok=2, norm_topk_prob=False)
MIXTRAL = dict(COMMON, model_type="mixtral", head_dim=None, rms_norm_eps=1e-5, sliding_window=None,
               num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0,
               rope_parameters={"rope_theta": 1e6, "rope_type": "default"})
CONFIGS = {"qwen3": QWEN3, "qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL}
MODEL_ARGS = dict(norm_epsilon=1e-6, rotary_base=10000, max_position_embeddings=64)


def _random(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in shapes.items()}


# ----------------------------------------------------------------------------------- configs

def test_sizes_are_read_in_each_familys_spelling():
    qwen3 = arch_from_hf_config(QWEN3)
    assert (qwen3.model_type, qwen3.qk_norm, qwen3.num_experts, qwen3.head_dim) == ("qwen3", True, 0, 16)
    moe = arch_from_hf_config(QWEN3_MOE)
    assert (moe.model_type, moe.num_experts, moe.moe_topk, moe.moe_ffn_hidden_size) == ("qwen3_moe", 4, 2, 24)
    assert moe.moe_pre_softmax and moe.ffn_hidden_size == 64  # norm_topk_prob=false: not renormalised
    assert not arch_from_hf_config({**QWEN3_MOE, "norm_topk_prob": True}).moe_pre_softmax
    published = {k: v for k, v in QWEN3_MOE.items() if k != "num_local_experts"}  # Qwen's own spelling
    assert arch_from_hf_config({**published, "num_experts": 4}) == moe
    mixtral = arch_from_hf_config(MIXTRAL)
    assert (mixtral.model_type, mixtral.qk_norm, mixtral.moe_ffn_hidden_size) == ("mixtral", False, 64)
    assert mixtral.head_dim == 8  # head_dim null: hidden / heads
    assert not mixtral.moe_pre_softmax  # Mixtral always renormalises its top-k weights
    no_head_dim = {k: v for k, v in QWEN3.items() if k != "head_dim"}
    assert arch_from_hf_config(no_head_dim).head_dim == 128  # Qwen3Config's default, not hidden / heads


def test_flags_carry_qk_norm_and_experts():
    qwen3 = " ".join(megatron_flags(QWEN3, "/m"))
    assert "--qk-layernorm" in qwen3 and "--num-experts" not in qwen3 and "--kv-channels 16" in qwen3
    assert "--norm-epsilon 1e-06" in qwen3
    moe = " ".join(megatron_flags(QWEN3_MOE, "/m"))
    for part in ("--qk-layernorm", "--num-experts 4", "--moe-router-topk 2", "--moe-ffn-hidden-size 24",
                 "--moe-router-pre-softmax", "--ffn-hidden-size 64"):
        assert part in moe, part
    assert "--moe-router-pre-softmax" not in " ".join(megatron_flags({**QWEN3_MOE, "norm_topk_prob": True}, "/m"))
    bare = {k: v for k, v in MIXTRAL.items() if k not in ("rope_parameters", "rms_norm_eps")}
    mixtral = " ".join(megatron_flags(bare, "/m"))
    for part in ("--num-experts 4", "--moe-ffn-hidden-size 64", "--rotary-base 1000000", "--norm-epsilon 1e-05"):
        assert part in mixtral, part  # the last two: MixtralConfig's defaults
    assert "--qk-layernorm" not in mixtral and "--moe-router-pre-softmax" not in mixtral


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_written_config_reads_back_as_the_same_model(family):
    arch = arch_from_hf_config(CONFIGS[family])
    cfg = hf_config_for(arch, MODEL_ARGS, "float32")
    assert cfg["model_type"] == family and arch_from_hf_config(cfg) == arch
    check_hf_config(cfg)


def test_written_moe_configs_spell_routing_as_transformers_does():
    qwen = hf_config_for(arch_from_hf_config(QWEN3_MOE), MODEL_ARGS, "float32")
    assert (qwen["norm_topk_prob"], qwen["num_experts"], qwen["moe_intermediate_size"]) == (False, 4, 24)
    assert (qwen["decoder_sparse_step"], qwen["mlp_only_layers"]) == (1, [])
    assert qwen["architectures"] == ["Qwen3MoeForCausalLM"]
    mixtral = hf_config_for(arch_from_hf_config(MIXTRAL), MODEL_ARGS, "float32")
    assert (mixtral["num_local_experts"], mixtral["intermediate_size"], mixtral["router_jitter_noise"]) == (4, 64, 0.0)


# ------------------------------------------------------------------------------ tensor names

def test_megatron_names_of_a_moe_layer_in_order():
    arch = arch_from_hf_config(QWEN3_MOE)
    layer = [n[len("decoder.layers.1."):] for n in megatron_names(arch) if n.startswith("decoder.layers.1.")]
    assert layer == ["input_layernorm.weight", "pre_mlp_layernorm.weight", "self_attention.linear_qkv.weight",
                     "self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight",
                     "self_attention.linear_proj.weight", "mlp.router.weight"] + \
        [f"mlp.experts.local_experts.{e}.{leaf}.weight" for e in range(4) for leaf in ("linear_fc1", "linear_fc2")]
    assert megatron_names(arch)[0] == "embedding.word_embeddings.weight"
    assert megatron_names(arch)[-2:] == ["decoder.final_layernorm.weight", "output_layer.weight"]


@pytest.mark.parametrize("family, prefix, parts", [
    ("qwen3_moe", "mlp", ("gate_proj", "up_proj", "down_proj")),
    ("mixtral", "block_sparse_moe", ("w1", "w3", "w2")),
])
def test_expert_tensors_map_to_per_expert_names(family, prefix, parts):
    arch = arch_from_hf_config(CONFIGS[family])
    gate, up, down = parts
    p = "model.layers.1."
    assert hf_names_of("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight", arch) == \
        [f"{p}{prefix}.experts.3.{gate}.weight", f"{p}{prefix}.experts.3.{up}.weight"]
    assert hf_names_of("decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.weight", arch) == \
        [f"{p}{prefix}.experts.3.{down}.weight"]
    assert hf_names_of("decoder.layers.1.mlp.router.weight", arch) == [f"{p}{prefix}.gate.weight"]
    i = arch.moe_ffn_hidden_size
    fc1 = torch.cat([torch.zeros(i, 32), torch.ones(i, 32)])  # [gate; up], labelled
    (g_name, g), (u_name, u) = hf_from_megatron_tensor("decoder.layers.1.mlp.experts.local_experts.3.linear_fc1.weight",
                                                       fc1, arch)
    assert g_name.endswith(f"3.{gate}.weight") and not g.any() and u_name.endswith(f"3.{up}.weight") and u.all()
    with pytest.raises(ConversionError, match="mixture-of-experts tensor: .*pass the model's Arch"):
        hf_names_of("decoder.layers.1.mlp.router.weight")


def test_qk_norms_map_without_the_architecture():
    for megatron, hf in (("q_layernorm", "q_norm"), ("k_layernorm", "k_norm")):
        assert hf_names_of(f"decoder.layers.0.self_attention.{megatron}.weight") == \
            [f"model.layers.0.self_attn.{hf}.weight"]


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_hf_to_megatron_to_hf_round_trip(family):
    arch = arch_from_hf_config(CONFIGS[family])
    hf = _random(hf_shapes(arch))
    megatron = dict(megatron_from_hf(hf.__getitem__, arch))
    assert list(megatron) == megatron_names(arch)
    back = hf_from_megatron(megatron, arch)
    assert set(back) == set(hf) and all(torch.equal(back[n], hf[n]) for n in hf)
    if arch.qk_norm:
        assert torch.equal(megatron["decoder.layers.0.self_attention.k_layernorm.weight"],
                           hf["model.layers.0.self_attn.k_norm.weight"])
    if arch.num_experts:
        parent, gate, up = (("mlp", "gate_proj", "up_proj") if family == "qwen3_moe"
                            else ("block_sparse_moe", "w1", "w3"))
        fc1 = megatron["decoder.layers.1.mlp.experts.local_experts.2.linear_fc1.weight"]
        want = torch.cat([hf[f"model.layers.1.{parent}.experts.2.{gate}.weight"],
                          hf[f"model.layers.1.{parent}.experts.2.{up}.weight"]])
        assert torch.equal(fc1, want)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_in_memory_experts_convert_to_the_same_tensors(family):
    """transformers 5's layout: gate_up_proj [E, 2I, h] (each expert's [gate; up]), down_proj [E, h, I]."""
    arch = arch_from_hf_config(CONFIGS[family])
    per_expert = _random(hf_shapes(arch))
    parent, (gate, up, down) = (("mlp", ("gate_proj", "up_proj", "down_proj")) if family == "qwen3_moe"
                                else ("block_sparse_moe", ("w1", "w3", "w2")))
    fused = {k: v for k, v in per_expert.items() if f".{parent}.experts." not in k and f".{parent}.gate." not in k}
    for layer in range(2):
        p = f"model.layers.{layer}.{parent}."
        fused[f"model.layers.{layer}.mlp.gate.weight"] = per_expert[f"{p}gate.weight"]
        fused[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[f"{p}experts.{e}.{gate}.weight"], per_expert[f"{p}experts.{e}.{up}.weight"]])
             for e in range(4)])
        fused[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [per_expert[f"{p}experts.{e}.{down}.weight"] for e in range(4)])
    assert fused_experts(fused) and not fused_experts(per_expert)
    shapes = {k: tuple(v.shape) for k, v in fused.items()}
    assert shapes == hf_shapes(arch, fused=True)
    check_hf_tensors(shapes, arch, "ckpt")
    check_hf_tensors({k: tuple(v.shape) for k, v in per_expert.items()}, arch, "ckpt")
    reads = []
    got = dict(megatron_from_hf(lambda n: reads.append(n) or fused[n], arch, fused=True))
    want = dict(megatron_from_hf(per_expert.__getitem__, arch))
    assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert reads.count("model.layers.1.mlp.experts.gate_up_proj") == 1  # read once per layer, then sliced


def test_one_tensor_maps_like_the_whole_state_dict_with_experts():
    arch = arch_from_hf_config(MIXTRAL)
    hf = _random(hf_shapes(arch))
    state = dict(megatron_from_hf(hf.__getitem__, arch))
    whole = hf_from_megatron(state, arch)
    names = [h for n in megatron_names(arch) for h in hf_names_of(n, arch)]
    assert len(names) == len(set(names)) and set(names) == set(hf_shapes(arch))
    for name in megatron_names(arch):
        for hf_name, tensor in hf_from_megatron_tensor(name, state[name], arch):
            assert torch.equal(tensor, whole[hf_name])


# ---------------------------------------------------------------------------------- refusals

@pytest.mark.parametrize("config, change, message", [
    (QWEN3, dict(attention_bias=True), "qwen3 cannot convert exactly: attention_bias=true"),
    (QWEN3, dict(use_sliding_window=True), "use_sliding_window=true"),
    (QWEN3_MOE, dict(mlp_only_layers=[1]), "qwen3_moe cannot convert exactly: mlp_only_layers [1] (dense layers"),
    (QWEN3_MOE, dict(decoder_sparse_step=2), "decoder_sparse_step 2 (dense layers between MoE layers"),
    (QWEN3_MOE, dict(hidden_act="gelu"), "hidden_act 'gelu' (only SwiGLU"),
    (QWEN3_MOE, dict(num_experts_per_tok=5), "num_experts_per_tok 5 not between 1 and 4 experts"),
    (MIXTRAL, dict(sliding_window=4096), "mixtral cannot convert exactly: sliding_window 4096"),
    (MIXTRAL, dict(router_jitter_noise=0.01), "router_jitter_noise 0.01"),
    (dict(QWEN3_MOE, model_type="qwen2_moe", shared_expert_intermediate_size=64), {},
     "model_type 'qwen2_moe' is not supported (shared experts); supported: llama (LlamaForCausalLM)"),
    (dict(QWEN3_MOE, model_type="deepseek_v3", kv_lora_rank=16, n_shared_experts=1), {},
     "model_type 'deepseek_v3' is not supported (multi-latent attention (MLA); shared experts)"),
    (dict(QWEN3_MOE, model_type="gpt_oss"), {}, "model_type 'gpt_oss' is not supported; supported:"),
    ({k: v for k, v in QWEN3_MOE.items() if k != "moe_intermediate_size"}, {}, "moe_intermediate_size missing"),
])
def test_unsupported_configs_are_refused_naming_the_model_type(config, change, message):
    with pytest.raises(ConversionError) as err:
        check_hf_config({**config, **change})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_the_first_unsupported_tensor_is_named_when_the_checkpoint_is_given():
    shared = dict(QWEN3_MOE, model_type="qwen2_moe", shared_expert_intermediate_size=64)
    names = list(hf_shapes(arch_from_hf_config(QWEN3_MOE))) + [
        f"model.layers.{i}.mlp.shared_expert.{p}.weight" for i in (10, 2) for p in ("gate_proj", "up_proj")]
    with pytest.raises(ConversionError, match="^cfg: model_type 'qwen2_moe' is not supported \\(shared experts\\); "
                                              "first unsupported tensor model.layers.2.mlp.shared_expert.gate_proj"
                                              ".weight; supported: llama \\(LlamaForCausalLM\\), qwen2"):
        check_hf_config(shared, "cfg", names)
    dense_layer = list(hf_shapes(arch_from_hf_config(QWEN3_MOE))) + ["model.layers.1.mlp.down_proj.weight"]
    with pytest.raises(ConversionError, match=r"mlp_only_layers \[1\].*; first unsupported tensor "
                                              r"model.layers.1.mlp.down_proj.weight\.$"):
        check_hf_config({**QWEN3_MOE, "mlp_only_layers": [1]}, "cfg", dense_layer)
    biased = list(hf_shapes(arch_from_hf_config(QWEN3))) + ["model.layers.0.self_attn.q_proj.bias",
                                                             "model.layers.0.self_attn.o_proj.bias"]
    with pytest.raises(ConversionError, match="first unsupported tensor model.layers.0.self_attn.o_proj.bias"):
        check_hf_config({**QWEN3, "attention_bias": True}, "cfg", biased)


@pytest.mark.parametrize("sizes, message", [
    (dict(tp=1, pp=1, ep=3), "experts 4 does not divide by EP=3"),
    (dict(tp=2, pp=1, ep=1, etp=5), "this model cannot load at TP=2 PP=1 EP=1 ETP=5: expert ffn hidden size 24 "
                                    "does not divide by ETP=5"),
    (dict(tp=1, pp=1, ep=0), "parallel sizes must be >= 1"),
])
def test_expert_layout_is_checked_at_conversion_time(sizes, message):
    with pytest.raises(ConversionError) as err:
        check_parallel_layout(arch_from_hf_config(QWEN3_MOE), **sizes)
    assert message in str(err.value)
    check_parallel_layout(arch_from_hf_config(QWEN3_MOE), 2, 2, ep=4, etp=2)
    with pytest.raises(ConversionError, match="this qwen3 model is dense; drop the expert-parallel sizes"):
        check_parallel_layout(arch_from_hf_config(QWEN3), 1, 1, ep=2)


# --------------------------------------------------------------------- Megatron model_args

LLAMA_ARGS = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2,
                  kv_channels=16, swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                  add_bias_linear=False, padded_vocab_size=384, untie_embeddings_and_output_weights=True)


def test_model_args_of_each_family_give_its_architecture():
    moe = dict(LLAMA_ARGS, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=24)
    assert arch_from_model_args(dict(moe, qk_layernorm=True, moe_router_pre_softmax=True)) == \
        arch_from_hf_config(QWEN3_MOE)
    mixtral = arch_from_model_args(dict(moe, moe_ffn_hidden_size=None))  # a record before the field: ffn size
    assert (mixtral.model_type, mixtral.moe_ffn_hidden_size, mixtral.moe_pre_softmax) == ("mixtral", 64, False)
    assert arch_from_model_args(dict(LLAMA_ARGS, qk_layernorm=True)) == arch_from_hf_config(QWEN3)


@pytest.mark.parametrize("change, message", [
    (dict(num_experts=4, moe_router_topk=2, moe_shared_expert_intermediate_size=64),
     "--moe-shared-expert-intermediate-size (a shared expert) 64 (need None)"),
    (dict(num_experts=4, moe_router_topk=2, moe_router_pre_softmax=True),
     "--moe-router-pre-softmax without --qk-layernorm (Mixtral renormalises"),
    (dict(qk_layernorm=True, add_qkv_bias=True), "--add-qkv-bias with --qk-layernorm or --num-experts"),
])
def test_megatron_models_without_a_hugging_face_family_are_refused(change, message):
    with pytest.raises(ConversionError) as err:
        arch_from_model_args({**LLAMA_ARGS, **change})
    assert message in str(err.value) and "without a shared expert convert" in str(err.value)


def test_family_defaults_are_the_transformers_defaults():
    """For fields a config.json leaves out (``families._DEFAULTS``)."""
    transformers = pytest.importorskip("transformers")
    from megatron_lora.hf.families import default

    cases = {"qwen3": transformers.Qwen3Config(), "qwen3_moe": transformers.Qwen3MoeConfig(),
             "mixtral": transformers.MixtralConfig(), "llama": transformers.LlamaConfig()}
    for model_type, config in cases.items():
        assert default({"model_type": model_type}, "rms_norm_eps") == config.rms_norm_eps
        assert default({"model_type": model_type}, "rope_theta") == config.rope_parameters["rope_theta"]
    assert default({"model_type": "qwen3"}, "head_dim") == transformers.Qwen3Config().head_dim
    assert default({"model_type": "qwen3_moe"}, "norm_topk_prob") is transformers.Qwen3MoeConfig().norm_topk_prob
