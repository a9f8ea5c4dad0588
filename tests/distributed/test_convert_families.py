"""Hugging Face <-> Megatron for Qwen3 (q/k norms), Qwen3-MoE and Mixtral (issue 26): Megatron
logits equal transformers' logits, and what Megatron writes back loads in transformers.

Tiny random models are built with transformers here (no downloads) and saved with
``save_pretrained`` (experts one by one on disk):
- Qwen3: grouped-query attention with a head size (16) other than hidden / heads (8), tied
  embeddings, random q/k norm weights;
- Qwen3-MoE: 4 experts, top-2, expert FFN 24, ``norm_topk_prob`` false, and the SAME weights
  with ``norm_topk_prob`` true (the two routings give different logits);
- Mixtral: 4 experts, top-2.
Norm weights are drawn around 1 and router / expert weights made large enough that a wrong
mapping moves the logits far beyond the tolerance. The MoE models are also written in
transformers 5's in-memory layout (``mlp.experts.gate_up_proj`` ...), which must convert to the
same checkpoint. Conversions run through ``scripts/convert_checkpoint.py``'s ``main`` in one rank;
the Megatron models are built by the training script's ``parse_args`` / ``validate_args`` /
``gpt_stage_from_args`` from the written ``model_flags.txt`` at TP=2 (Qwen3), EP=2 and TP=2 + SP
with EP=2 (MoE). The rank workers live in ``family_cases.py``.
"""

import json
import os
import shutil

import pytest
import torch
from packaging.version import Version

from tests.distributed import convert_cases as C
from tests.distributed import family_cases as F
from tests.distributed import script_runs as S
from tests.distributed.launcher import run_distributed

transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")

SIZES = dict(vocab_size=C.VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
TOL = 1e-4  # fp32


def _config(kind, **change):
    if kind == "qwen3":
        return transformers.Qwen3Config(**SIZES, head_dim=16, rope_theta=20000.0, tie_word_embeddings=True, **change)
    if kind.startswith("qwen3_moe"):
        return transformers.Qwen3MoeConfig(**SIZES, head_dim=16, moe_intermediate_size=24, num_experts=4,
                                           num_experts_per_tok=2, norm_topk_prob=kind.endswith("norm"),
                                           rope_theta=30000.0, **change)
    return transformers.MixtralConfig(**SIZES, num_local_experts=4, num_experts_per_tok=2, **change)


def _cls(kind):
    return {"qwen3": transformers.Qwen3ForCausalLM, "mixtral": transformers.MixtralForCausalLM}.get(
        kind, transformers.Qwen3MoeForCausalLM)


def _random_model(kind, seed, **change):
    torch.manual_seed(seed)
    model = _cls(kind)(_config(kind, **change))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)  # RMSNorm weights start at 1: make a wrong mapping visible
            elif name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 0.5)  # decisive routing: no near-ties between the 2nd and 3rd expert
            elif ".experts." in name:
                param.normal_(0.0, 0.1)
    return model.eval()


def _load(path, kind="auto"):
    dtype = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
    cls = transformers.AutoModelForCausalLM if kind == "auto" else _cls(kind)
    model, info = cls.from_pretrained(path, attn_implementation="eager", output_loading_info=True,
                                      **{dtype: torch.float32})
    return model.eval(), info


def _logits(model):
    with torch.no_grad():
        return model(C.tokens()).logits.float()


def _save_fused(model, path):
    """transformers 5's in-memory layout on disk: mlp.experts.gate_up_proj [E, 2I, h] ..."""
    from safetensors.torch import save_file

    os.makedirs(path)
    model.config.save_pretrained(path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


MODELS = ("qwen3", "qwen3_moe", "qwen3_moe_norm", "mixtral")
FUSED = ("qwen3_moe", "mixtral")


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The HF models (and their fused copies), their reference logits, and a corpus for validate_args."""
    root = tmp_path_factory.mktemp("families")
    paths, refs, models = {}, {}, {}
    for kind in MODELS:
        for prefix in ("", "mg_", "back_"):
            paths[f"{prefix}{kind}"] = str(root / f"{prefix}{kind}")
    for i, kind in enumerate(("qwen3", "qwen3_moe", "mixtral")):
        models[kind] = _random_model(kind, seed=i)
    models["qwen3_moe_norm"] = _cls("qwen3_moe")(_config("qwen3_moe_norm")).eval()
    models["qwen3_moe_norm"].load_state_dict(models["qwen3_moe"].state_dict())  # only the routing differs
    for kind, model in models.items():
        model.save_pretrained(paths[kind])
        refs[kind] = _logits(model)
    for kind in FUSED:
        for prefix in ("", "mg_", "back_"):
            paths[f"{prefix}{kind}_fused"] = str(root / f"{prefix}{kind}_fused")
        _save_fused(models[kind], paths[f"{kind}_fused"])
        paths[f"lora_{kind}"] = str(root / f"lora_{kind}.safetensors")
        paths[f"merged_{kind}"] = str(root / f"merged_{kind}")
    paths["data"] = S.make_dataset(str(root), n=40)
    return paths, refs, {k: m.state_dict() for k, m in models.items()}


@pytest.fixture(scope="module")
def converted(work):
    paths, _, _ = work
    targets = {"qwen3": ["--target-tensor-parallel-size", 2],
               "qwen3_moe": ["--target-tensor-parallel-size", 2, "--target-expert-model-parallel-size", 2],
               "qwen3_moe_norm": ["--target-expert-model-parallel-size", 2],
               "mixtral": ["--target-tensor-parallel-size", 2, "--target-expert-model-parallel-size", 2]}
    commands = []
    for kind in (*MODELS, *(f"{k}_fused" for k in FUSED)):
        commands.append(["hf-to-megatron", "--hf-dir", kind, "--output", f"mg_{kind}", *targets.get(kind, [])])
        commands.append(["megatron-to-hf", "--base", f"mg_{kind}", "--output", f"back_{kind}"])
    return run_distributed(F.convert_worker, 1, paths, commands)[0]


LAYOUTS = {  # (model, layout): world size
    ("qwen3", "tp2"): 2, ("qwen3_moe", "ep2"): 2, ("qwen3_moe", "tp2_sp_ep2"): 4, ("qwen3_moe_norm", "ep2"): 2,
    ("mixtral", "ep2"): 2, ("mixtral", "tp2_sp_ep2"): 4}
LAYOUT = {"tp2": dict(tp=2), "ep2": dict(ep=2), "tp2_sp_ep2": dict(tp=2, sp=True, ep=2)}


@pytest.fixture(scope="module")
def parity(work, converted):
    """{(model, layout): the parity worker's rank-0 result}; the EP=2 runs of the two MoE families
    also save a LoRA adapter on attention and experts (and Qwen3-MoE's swaps two experts)."""
    paths, _, _ = work
    out = {}
    for (kind, name), world in LAYOUTS.items():
        layout = dict(LAYOUT[name], swap_experts=(kind, name) == ("qwen3_moe", "ep2"))
        hf_config = json.load(open(os.path.join(paths[kind], "config.json")))
        adapter = paths.get(f"lora_{kind}") if name == "ep2" else None
        tp, ep = LAYOUT[name].get("tp", 1), LAYOUT[name].get("ep", 1)
        out[(kind, name)] = run_distributed(F.parity_worker, world, paths, f"mg_{kind}", layout, hf_config, adapter,
                                            tp=tp, expert_model_parallel_size=ep, expert_tensor_parallel_size=tp)[0]
    return out


@pytest.fixture(scope="module")
def merged(work, parity):
    """merge --to hf of each MoE base with the adapter its EP=2 run saved (Mixtral: keeping the
    original config.json, which is checked against the checkpoint)."""
    paths, _, _ = work
    commands = [["merge", "--base", "mg_qwen3_moe", "--adapter", "lora_qwen3_moe", "--to", "hf",
                 "--output", "merged_qwen3_moe"],
                ["merge", "--base", "mg_mixtral", "--adapter", "lora_mixtral", "--to", "hf", "--hf-config-dir",
                 "mixtral", "--output", "merged_mixtral"]]
    return run_distributed(F.convert_worker, 1, paths, commands)[0]


def _max_diff(a, b, label=None):
    diff = (a - b).abs().max().item()
    if label:
        print(f"max |logit difference| {label}: {diff:.3g}")  # pytest -s shows the measured values
    return diff


# ------------------------------------------------------------------------------------ proofs

def test_model_flags_carry_qk_norm_and_experts(converted, work):
    paths, _, _ = work
    flags = {kind: open(os.path.join(paths[f"mg_{kind}"], "model_flags.txt")).read() for kind in MODELS}
    assert "--qk-layernorm" in flags["qwen3"] and "--num-experts" not in flags["qwen3"]
    assert "--kv-channels 16" in flags["qwen3"]
    for part in ("--qk-layernorm", "--num-experts 4", "--moe-router-topk 2", "--moe-ffn-hidden-size 24",
                 "--moe-router-pre-softmax"):
        assert part in flags["qwen3_moe"], part
    assert "--moe-router-pre-softmax" not in flags["qwen3_moe_norm"]
    assert "--num-experts 4 --moe-router-topk 2 --moe-ffn-hidden-size 64" in flags["mixtral"]
    assert "--qk-layernorm" not in flags["mixtral"] and "--moe-router-pre-softmax" not in flags["mixtral"]
    assert "layer 2/2 converted" in converted and "4 experts top-2" in converted


@pytest.mark.parametrize("kind, layout", list(LAYOUTS))
def test_converted_logits_match_transformers(parity, work, kind, layout):
    paths, refs, _ = work
    got = parity[(kind, layout)]
    assert got["mismatch"] is None or got["mismatch"].startswith("--tokenizer-type"), got["mismatch"]
    assert _max_diff(got["logits"], refs[kind], f"{kind} {layout} vs transformers") <= TOL
    from megatron_lora.hf.mapping import arch_from_hf_config

    config = json.load(open(os.path.join(paths[kind], "config.json")))
    assert got["arch"] == arch_from_hf_config(config)  # the in-memory export reads the same architecture


def test_the_two_qwen3_moe_routings_differ_and_each_matches(parity, work):
    """norm_topk_prob false (--moe-router-pre-softmax) and true, on the same weights."""
    _, refs, _ = work
    assert _max_diff(refs["qwen3_moe"], refs["qwen3_moe_norm"], "norm_topk_prob false vs true (must be large)") > 1e-2
    assert _max_diff(parity[("qwen3_moe_norm", "ep2")]["logits"], refs["qwen3_moe"]) > 1e-2


def test_experts_read_in_another_order_would_be_caught(parity, work):
    _, refs, _ = work
    swapped = parity[("qwen3_moe", "ep2")]["swapped"]
    assert _max_diff(swapped, refs["qwen3_moe"], "layer 0 experts 0 and 1 exchanged (must be large)") > 1e-2


@pytest.mark.parametrize("kind", MODELS)
def test_megatron_to_hf_loads_in_transformers_with_every_tensor_matched(converted, work, kind):
    """megatron-to-hf without the original config: the written config.json rebuilds the family,
    every tensor is loaded (none missing or unexpected) and equals the original bit for bit."""
    paths, refs, states = work
    model, info = _load(paths[f"back_{kind}"])
    assert type(model) is _cls(kind)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    state = model.state_dict()
    assert sorted(state) == sorted(states[kind]) and all(torch.equal(state[k], states[kind][k]) for k in state)
    assert model.config.to_dict().get("norm_topk_prob") == _config(kind).to_dict().get("norm_topk_prob")
    assert _max_diff(_logits(model), refs[kind], f"{kind} -> Megatron -> HF") == 0.0


@pytest.mark.parametrize("kind", FUSED)
def test_the_fused_in_memory_layout_converts_to_the_same_checkpoint(converted, work, kind):
    from safetensors.torch import load_file

    paths, _, _ = work
    via_fused = load_file(os.path.join(paths[f"back_{kind}_fused"], "model.safetensors"))
    via_disk = load_file(os.path.join(paths[f"back_{kind}"], "model.safetensors"))
    assert sorted(via_fused) == sorted(via_disk) and all(torch.equal(via_fused[k], via_disk[k]) for k in via_disk)
    written = [k for k in via_disk if ".experts.3." in k and ".layers.1." in k]
    assert len(written) == 3  # per-expert on disk, as save_pretrained writes it


@pytest.mark.parametrize("kind", FUSED)
def test_merged_adapter_loads_in_transformers_with_the_megatron_logits(merged, parity, work, kind):
    """A LoRA adapter on attention and experts, made at EP=2, merged by ``merge --to hf``."""
    paths, refs, _ = work
    model, info = _load(paths[f"merged_{kind}"])
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    megatron = parity[(kind, "ep2")]["lora_logits"]
    assert _max_diff(megatron, refs[kind]) > 1e-2  # the adapter matters
    assert _max_diff(_logits(model), megatron, f"{kind} + adapter merged, HF vs Megatron EP=2") <= TOL
    if kind == "mixtral":  # --hf-config-dir: the original config.json is kept
        assert json.load(open(os.path.join(paths[f"merged_{kind}"], "config.json")))["bos_token_id"] == 1


# ---------------------------------------------------------------------------------- refusals

def _edited(paths, tmp, kind, **changes):
    dst = os.path.join(tmp, f"{kind}_edited")
    shutil.copytree(paths[kind], dst)
    config = json.load(open(os.path.join(dst, "config.json")))
    config.update(changes)
    json.dump(config, open(os.path.join(dst, "config.json"), "w"))
    return dst


def _saved(tmp, name, model):
    path = os.path.join(tmp, name)
    model.save_pretrained(path)
    return path


def _unsupported(paths, tmp):
    """{case: (hf dir, extra flags, what the one line must say)}, each built when its case runs."""
    return {
        "shared expert (qwen2_moe)": lambda: (_saved(tmp, "q2m", transformers.Qwen2MoeForCausalLM(
            transformers.Qwen2MoeConfig(**SIZES, moe_intermediate_size=16, shared_expert_intermediate_size=32,
                                        num_experts=4, num_experts_per_tok=2))), [],
            "model_type 'qwen2_moe' is not supported (shared experts); first unsupported tensor "
            "model.layers.0.mlp.shared_expert.down_proj.weight; supported: llama"),
        "MLA (deepseek_v3)": lambda: (_saved(tmp, "ds", transformers.DeepseekV3ForCausalLM(
            transformers.DeepseekV3Config(**{**SIZES, "num_key_value_heads": 4}, moe_intermediate_size=16,
                                          n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                                          kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                          v_head_dim=8, first_k_dense_replace=1, n_group=1, topk_group=1))), [],
            "model_type 'deepseek_v3' is not supported (multi-latent attention (MLA); shared experts); first "
            "unsupported tensor model.layers.0.self_attn.kv_a_layernorm.weight"),
        "GeLU": lambda: (_edited(paths, tmp, "qwen3", hidden_act="gelu_pytorch_tanh"), [],
                         "qwen3 cannot convert exactly: hidden_act 'gelu_pytorch_tanh' (only SwiGLU"),
        "dense layers between MoE layers": lambda: (_saved(tmp, "mlp_only", _cls("qwen3_moe")(
            _config("qwen3_moe", mlp_only_layers=[1]))), [],
            "qwen3_moe cannot convert exactly: mlp_only_layers [1] (dense layers between MoE layers; every layer "
            "here is MoE); first unsupported tensor model.layers.1.mlp.down_proj.weight."),
        "decoder_sparse_step": lambda: (_saved(tmp, "sparse_step", _cls("qwen3_moe")(
            _config("qwen3_moe", decoder_sparse_step=2))), [],
            "decoder_sparse_step 2 (dense layers between MoE layers; every layer here is MoE); first unsupported "
            "tensor model.layers.0.mlp.down_proj.weight."),
        "router jitter": lambda: (_edited(paths, tmp, "mixtral", router_jitter_noise=0.1), [],
                                  "mixtral cannot convert exactly: router_jitter_noise 0.1"),
        "sliding window": lambda: (_edited(paths, tmp, "mixtral", sliding_window=16), [],
                                   "mixtral cannot convert exactly: sliding_window 16 (attention here is full causal)"),
        "attention bias on qwen3": lambda: (_saved(tmp, "biased", _cls("qwen3")(_config("qwen3", attention_bias=True))),
                                            [], "qwen3 cannot convert exactly: attention_bias=true (bias on q/k/v AND "
                                                "o_proj; --add-qkv-bias covers q/k/v only); first unsupported tensor "
                                                "model.layers.0.self_attn.k_proj.bias."),
        "EP target": lambda: (paths["qwen3_moe"], ["--target-expert-model-parallel-size", 3],
                              "this model cannot load at TP=1 PP=1 EP=3 ETP=1: experts 4 does not divide by EP=3"),
        "ETP target": lambda: (paths["mixtral"], ["--target-expert-tensor-parallel-size", 3],
                               "expert ffn hidden size 64 does not divide by ETP=3"),
        "EP on a dense model": lambda: (paths["qwen3"], ["--target-expert-model-parallel-size", 2],
                                        "EP=2 / ETP=1 lay out experts, and this qwen3 model is dense"),
    }


UNSUPPORTED = ["shared expert (qwen2_moe)", "MLA (deepseek_v3)", "GeLU", "dense layers between MoE layers",
               "decoder_sparse_step", "router jitter", "sliding window", "attention bias on qwen3", "EP target",
               "ETP target", "EP on a dense model"]


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_models_and_layouts_are_one_line_naming_what(work, tmp_path, capsys, case):
    paths, _, _ = work
    hf_dir, flags, needle = _unsupported(paths, str(tmp_path))[case]()
    capsys.readouterr()  # save_pretrained's progress bar
    new = str(tmp_path / "new")
    assert C.cli().main(["hf-to-megatron", "--hf-dir", hf_dir, "--output", new, *map(str, flags)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not os.path.exists(new)
