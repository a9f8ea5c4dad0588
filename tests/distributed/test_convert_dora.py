"""PEFT DoRA adapters (``use_dora=True``) through the conversions (issue 27, item 4): Megatron
logits equal transformers + peft logits.

The tiny random Llama and Qwen2 of ``test_convert`` (GQA, random norms; Qwen2 with q/k/v biases,
which DoRA adds outside its scale), each with a PEFT DoRA adapter of random factors and magnitudes
off the norm (x [0.5, 1.5)):
- Llama: all seven projections, distinct q/k/v (gate/up) A's, rsLoRA;
- Qwen2: q, v, gate and down in layer 1 only (``layers_to_transform``), so k, up and all of layer 0
  have no magnitude and keep their base norm, read from ``--base``.
Conversions run through ``scripts/convert_checkpoint.py``'s ``main`` in one rank; the Megatron
models are built as the training script builds them from the flags the conversion printed
(``--lora-load`` + ``--lora-use-dora``), at TP=2. The rank workers live in ``convert_dora_cases.py``.
"""

import json
import os

import pytest
import torch

from tests.distributed import convert_cases as C
from tests.distributed import convert_dora_cases as D
from tests.distributed import script_runs as S
from tests.distributed.launcher import run_distributed

transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="needs the hf extra: pip install -e '.[hf]'")

from tests.distributed.test_convert import PROJECTIONS, _hf_model, _logits, _max_diff  # noqa: E402

TOLERANCE = 1e-4  # fp32 logits; measured values are printed (pytest -s)


def _dora_adapter(hf_dir, out_dir, seed, **lora):
    """A PEFT DoRA adapter with random B's and magnitudes; returns its logits."""
    torch.manual_seed(seed)
    config = peft.LoraConfig(r=4, lora_alpha=8, use_dora=True, init_lora_weights=False, task_type="CAUSAL_LM", **lora)
    adapted = peft.get_peft_model(_hf_model("auto", hf_dir), config)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(0.5 + torch.rand_like(param))
    adapted.save_pretrained(out_dir)
    return _logits(adapted.eval())


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    root = tmp_path_factory.mktemp("convert_dora")
    paths = {name: str(root / name) for name in (
        "llama", "qwen", "peft_llama", "peft_qwen", "mg_llama", "mg_qwen", "merged_llama", "merged_qwen",
        "merged_mg_qwen", "rt_llama", "rt_llama_keep", "rt_llama_pp", "rt_qwen")}
    paths.update({name: str(root / f"{name}.safetensors")
                  for name in ("llama_dora", "llama_dora_pp", "qwen_dora", "qwen_dora_hf")})
    refs = {}
    for kind, key in (("llama", "llama"), ("qwen2", "qwen")):
        model = _hf_model(kind)
        model.save_pretrained(paths[key])
        refs[key] = _logits(model)
    refs["peft_llama"] = _dora_adapter(paths["llama"], paths["peft_llama"], 2, use_rslora=True,
                                       target_modules=PROJECTIONS)
    refs["peft_qwen"] = _dora_adapter(paths["qwen"], paths["peft_qwen"], 3, layers_to_transform=[1],
                                      target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"])
    paths["data"] = S.make_dataset(str(root), n=40)
    return paths, refs


@pytest.fixture(scope="module")
def converted(work):
    paths, _ = work
    return run_distributed(D.convert_worker, 1, paths)[0]


@pytest.fixture(scope="module")
def parity(work, converted):
    paths, _ = work
    return run_distributed(D.parity_worker, 2, paths, tp=2)[0]


def _load(path, file="adapter_model.safetensors"):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, file) if file else path)


def _peft_logits(work, kind, adapter):
    paths, _ = work
    model = peft.PeftModel.from_pretrained(_hf_model("auto", paths[kind]), paths[adapter]).eval()
    return _logits(model)


# ------------------------------------------------------------------------------------- import

@pytest.mark.parametrize("name, ref", [("llama_dora", "peft_llama"), ("llama_dora_pp", "peft_llama"),
                                       ("qwen_dora", "peft_qwen")])
def test_imported_dora_adapter_in_the_training_script_starts_at_the_peft_logits(parity, work, name, ref):
    _, refs = work
    got = parity[name]
    assert "--lora-use-dora" in got["flags"]
    assert _max_diff(refs[ref], refs["llama" if "llama" in ref else "qwen"]) > 1e-2  # the adapter matters
    assert _max_diff(got["logits"], refs[ref], f"{name} at TP=2 vs PEFT") < TOLERANCE


def test_left_out_projections_read_the_same_norms_from_either_base(converted, work):
    """The partial Qwen2 adapter imported with --base the Megatron checkpoint and the HF
    directory: the same tensors, bit for bit."""
    paths, _ = work
    from_megatron, from_hf = _load(paths["qwen_dora"], None), _load(paths["qwen_dora_hf"], None)
    assert sorted(from_megatron) == sorted(from_hf)
    assert all(torch.equal(from_megatron[k], from_hf[k]) for k in from_megatron)
    assert "decoder.layers.0.mlp.linear_fc2.lora_magnitude" in from_megatron  # layer 0: base norms only


def test_trained_further_then_exported_gives_peft_the_megatron_logits(parity, work):
    """The stacked Llama import trained 3 AdamW steps at TP=2 (magnitudes included), exported in memory."""
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    paths, refs = work
    trained = parity["trained"]
    assert trained["magnitudes_moved"]
    tensors, config = trained["peft"]
    model = get_peft_model(_hf_model("llama", paths["llama"]), PeftConfig.from_peft_type(**config))
    result = set_peft_model_state_dict(model, tensors)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    assert _max_diff(trained["logits"], refs["peft_llama"]) > 1e-3  # training moved it
    diff = _max_diff(_logits(model.eval()), trained["logits"], "trained at TP=2, exported, PEFT vs Megatron")
    assert diff < TOLERANCE


# -------------------------------------------------------------------------------------- merge

@pytest.mark.parametrize("kind, ref", [("llama", "peft_llama"), ("qwen", "peft_qwen")])
def test_merged_dora_checkpoint_loads_strictly_with_the_peft_logits(converted, work, kind, ref):
    paths, refs = work
    merged = _load(paths[f"merged_{kind}"], "model.safetensors")
    assert sorted(merged) == sorted(_load(paths[kind], "model.safetensors"))  # every tensor, nothing more
    model = _hf_model("auto", paths[kind])
    model.load_state_dict(merged, strict=kind == "llama")  # tied Qwen2: lm_head is the embedding
    assert _max_diff(_logits(model), refs[ref], f"merged {kind} (DoRA folded) vs PEFT") < TOLERANCE


def test_merged_dora_megatron_checkpoint_loads_at_tp2_with_the_peft_logits(parity, work):
    """merge --to megatron of the partial Qwen2 adapter (straight from the PEFT directory)."""
    _, refs = work
    assert _max_diff(parity["merged_mg_qwen"]["logits"], refs["peft_qwen"], "merged Megatron qwen, TP=2") < TOLERANCE


# ------------------------------------------------------------------------------------- export

def test_peft_megatron_peft_round_trip_is_bitwise(converted, work):
    paths, _ = work
    original = _load(paths["peft_llama"])
    for name in ("rt_llama", "rt_llama_pp"):
        back = _load(paths[name])
        assert sorted(back) == sorted(original) and len(original) == 2 * 7 * 3
        assert all(torch.equal(back[k], original[k]) for k in original), name
        config = json.load(open(os.path.join(paths[name], "adapter_config.json")))
        scale = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
        assert config["use_dora"] and config["r"] == 4 and scale == 8 / 4 ** 0.5  # the alpha rule keeps s


@pytest.mark.parametrize("adapter, kind, ref", [("rt_llama_keep", "llama", "peft_llama"),
                                                ("rt_qwen", "qwen", "peft_qwen")])
def test_exported_dora_adapter_gives_peft_the_same_logits(converted, work, adapter, kind, ref):
    """--keep-rank (rank 12, no compaction) and the partial Qwen2 adapter exported whole (k, up and
    layer 0 with B = 0 and their base norms)."""
    paths, refs = work
    config = json.load(open(os.path.join(paths[adapter], "adapter_config.json")))
    assert config["use_dora"] and config["r"] == (12 if adapter == "rt_llama_keep" else 4)
    assert _max_diff(_peft_logits(work, kind, adapter), refs[ref], f"{adapter} in PEFT vs the original") < TOLERANCE


# ------------------------------------------------------------------------------------ refused

def test_partial_dora_adapter_without_base_weights_is_one_error_line(converted, work, tmp_path, capsys):
    paths, _ = work
    output = str(tmp_path / "new.safetensors")
    base = os.path.join(paths["mg_qwen"], "iter_0000000", "model_args.json")
    assert C.cli().main(["peft-to-megatron", "--peft-dir", paths["peft_qwen"], "--base", base,
                         "--output", output]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no magnitude for layer 0 q_proj" in err[0], err
    assert "pass --base as the Megatron checkpoint or the Hugging Face model directory" in err[0]
    assert not os.path.exists(output)
