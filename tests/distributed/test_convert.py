"""Hugging Face / PEFT conversion (issue 5): Megatron logits equal transformers + peft logits.

Tiny random models are built with transformers here (no downloads):
- a Llama with grouped-query attention (4 heads, 2 key/value heads), SwiGLU, untied embeddings,
  random RMSNorm weights, rope_theta 5000;
- a PEFT LoRA adapter on all seven Llama projections with random non-zero A and B, rsLoRA and
  dropout on, and distinct q/k/v (gate/up) A's, so the import has to stack them (rank 3r);
- a Qwen2 (q/k/v biases, tied embeddings).
Conversions run through ``scripts/convert_checkpoint.py``'s ``main`` in a one-rank process. The
Megatron models are then built by the training script's own ``parse_args`` / ``validate_args`` /
``gpt_stage_from_args`` from the ``model_flags.txt`` the conversion wrote, so the flags a user
pastes are what is tested, at TP=1 and TP=2. (Tokenizer flags aside: the tiny models have no
tokenizer; their vocabulary, 384, is what the byte-level tokenizer's 257 ids pad to.)
The rank workers live in ``convert_cases.py``.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from packaging.version import Version

from tests.distributed import convert_cases as C
from tests.distributed import script_runs as S
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import TINY_LLAMA

transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="needs the hf extra: pip install -e '.[hf]'")

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# ----------------------------------------------------------------------------- references

def _hf_model(kind, path=None):
    common = dict(TINY_LLAMA, vocab_size=C.VOCAB, rms_norm_eps=1e-5)
    if path is not None:
        cls = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
               "auto": transformers.AutoModelForCausalLM}[kind]
        dtype = "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
        return cls.from_pretrained(path, attn_implementation="eager", **{dtype: torch.float32}).eval()
    torch.manual_seed(0 if kind == "llama" else 1)
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            **common, rope_theta=5000.0, tie_word_embeddings=False, attn_implementation="eager"))
    else:
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            **common, rope_theta=20000.0, tie_word_embeddings=True, attn_implementation="eager"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)  # RMSNorm weights start at 1: make a wrong mapping visible
            elif name.endswith("bias"):
                param.normal_(0.0, 0.2)
    return model.eval()


def _logits(model):
    with torch.no_grad():
        return model(C.tokens()).logits.float()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """HF models, a PEFT adapter, their reference logits, and a corpus for validate_args."""
    root = tmp_path_factory.mktemp("convert")
    paths = {name: str(root / name) for name in (
        "llama", "qwen", "peft", "mg_llama", "mg_qwen", "imported.safetensors", "merged_hf", "merged_mg",
        "lora_save", "peft_export", "peft_export_dist", "peft_roundtrip", "base_hf_llama", "base_hf_qwen")}
    refs = {}
    for kind, key in (("llama", "llama"), ("qwen2", "qwen")):
        model = _hf_model(kind)
        model.save_pretrained(paths[key])
        refs[key] = _logits(model)
    torch.manual_seed(2)
    lora = peft.LoraConfig(r=4, lora_alpha=8, use_rslora=True, lora_dropout=0.05, target_modules=PROJECTIONS,
                           init_lora_weights=False, task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(_hf_model("llama", paths["llama"]), lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # A: kaiming (distinct per projection), B: random, non-zero
    adapted.save_pretrained(paths["peft"])
    refs["peft"] = _logits(adapted.eval())
    paths["data"] = S.make_dataset(str(root), n=40)
    return paths, refs


# --------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def converted(work):
    paths, _ = work
    return run_distributed(C.convert_worker, 1, paths)[0]


@pytest.fixture(scope="module")
def parity(work, converted):
    paths, _ = work
    return {tp: run_distributed(C.parity_worker, tp, paths, tp=tp)[0] for tp in (1, 2)}


@pytest.fixture(scope="module")
def exported(work, converted):
    paths, _ = work
    megatron_logits = run_distributed(C.train_worker, 2, paths, tp=2)[0]
    log = run_distributed(C.export_worker, 1, paths)[0]
    return megatron_logits, log


def _max_diff(a, b, label=None):
    diff = (a - b).abs().max().item()
    if label:
        print(f"max |logit difference| {label}: {diff:.3g}")  # pytest -s shows the measured values
    return diff


# ------------------------------------------------------------------------------------ proofs

def test_conversion_reports_progress_and_the_flags(converted, work):
    assert "layer 1/2 converted" in converted and "layer 2/2 converted" in converted
    assert "--num-query-groups 2" in converted and "--lora-rank 12" in converted
    paths, _ = work
    assert os.path.exists(os.path.join(paths["mg_llama"], "model_flags.txt"))


@pytest.mark.parametrize("tp", [1, 2])
def test_base_logits_match_transformers(parity, work, tp):
    _, refs = work
    got = parity[tp]
    assert got["flags_mismatch"] is None or got["flags_mismatch"].startswith("--tokenizer-type"), got["flags_mismatch"]
    assert _max_diff(got["base"], refs["llama"], f"Llama base, TP={tp}") < 1e-5
    assert _max_diff(got["qwen"], refs["qwen"], f"Qwen2 base (q/k/v bias, tied), TP={tp}") < 1e-5


@pytest.mark.parametrize("kind", ["llama", "qwen"])
def test_megatron_base_converts_back_to_hugging_face(converted, work, kind):
    """megatron-to-hf without the original config: the written config.json rebuilds the model."""
    paths, refs = work
    model = _hf_model("auto", paths[f"base_hf_{kind}"])
    assert type(model).__name__ == {"llama": "LlamaForCausalLM", "qwen": "Qwen2ForCausalLM"}[kind]
    assert _max_diff(_logits(model), refs[kind], f"{kind} -> Megatron -> HF (config written)") < 1e-5


def test_qkv_read_as_blocks_would_be_caught(parity, work):
    _, refs = work
    assert _max_diff(parity[1]["qkv_as_blocks"], refs["llama"], "QKV read as [Q; K; V] blocks (must be large)") > 1e-2


@pytest.mark.parametrize("tp", [1, 2])
def test_imported_peft_adapter_logits_match_peft(parity, work, tp):
    _, refs = work
    cfg = parity[tp]["lora_config"]
    assert (cfg.rank, cfg.alpha, cfg.use_rslora) == (12, 48.0, False)  # 3 x r=4 stacked; s = 8 / sqrt(4) = 48 / 12
    assert _max_diff(refs["peft"], refs["llama"]) > 1e-2  # the adapter matters
    assert _max_diff(parity[tp]["lora"], refs["peft"], f"PEFT adapter imported, TP={tp}") < 1e-5


def test_merged_checkpoints_match_peft(parity, work):
    paths, refs = work
    merged = _hf_model("llama", paths["merged_hf"])
    assert _max_diff(_logits(merged), refs["peft"], "merged HF vs PEFT") < 1e-5
    assert sorted(os.listdir(paths["merged_hf"])) == ["config.json", "generation_config.json", "model.safetensors"]
    # --to megatron, from the PEFT directory directly, loaded at TP=2
    assert _max_diff(parity[2]["merged_mg"], refs["peft"], "merged Megatron (TP=2) vs PEFT") < 1e-5


def test_adapter_trained_at_tp2_exports_to_peft_with_equal_logits(exported, work):
    paths, _ = work
    megatron_logits, _ = exported
    model = peft.PeftModel.from_pretrained(_hf_model("llama", paths["llama"]), paths["peft_export"]).eval()
    assert _max_diff(_logits(model), megatron_logits, "trained at TP=2, exported, PEFT vs Megatron") < 1e-5
    base_logits = _logits(_hf_model("llama", paths["llama"]))
    assert _max_diff(megatron_logits, base_logits) > 1e-3  # the trained adapter changed the model
    config = json.load(open(os.path.join(paths["peft_export"], "adapter_config.json")))
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (4, 8, PROJECTIONS)


def test_export_from_the_dist_checkpoint_equals_export_from_the_full_file(exported, work):
    from safetensors.torch import load_file

    paths, _ = work
    a = load_file(os.path.join(paths["peft_export"], "adapter_model.safetensors"))
    b = load_file(os.path.join(paths["peft_export_dist"], "adapter_model.safetensors"))
    assert sorted(a) == sorted(b) and len(a) == 2 * 7 * 2
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_peft_megatron_peft_round_trip_keeps_the_weight_deltas(exported, work):
    from safetensors.torch import load_file

    from tests.peft_reference import peft_deltas

    paths, _ = work
    original = load_file(os.path.join(paths["peft"], "adapter_model.safetensors"))
    back = load_file(os.path.join(paths["peft_roundtrip"], "adapter_model.safetensors"))
    config = json.load(open(os.path.join(paths["peft_roundtrip"], "adapter_config.json")))
    scale_back = config["lora_alpha"] / (config["r"] ** 0.5 if config["use_rslora"] else config["r"])
    want, got = peft_deltas(original, 8 / 4 ** 0.5), peft_deltas(back, scale_back)
    assert sorted(want) == sorted(got) and len(want) == 2 * 7
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-12, atol=1e-12)
    assert config["r"] == 4  # compaction drops the stacked blocks each projection does not use


# ---------------------------------------------------------------------------------- bad input

def test_bad_input_is_one_error_line_without_traceback(work, tmp_path):
    paths, _ = work
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, C.CLI, "hf-to-megatron", "--hf-dir", paths["llama"], "--output", str(out),
                          "--target-tensor-parallel-size", "3"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr
    assert "attention heads 4 does not divide by TP=3" in lines[0] and "Traceback" not in run.stderr
    assert not out.exists()


def _edited_copy(src, dst, file, **changes):
    shutil.copytree(src, dst)
    path = os.path.join(dst, file)
    config = json.load(open(path))
    config.update(changes)
    json.dump(config, open(path, "w"))
    return dst


def _bad_inputs(paths, tmp, new):
    """{case: (command, the fix the message must name)}, each built only when its case runs."""
    def peft_cmd(peft_dir, base=paths["mg_llama"]):
        return ["peft-to-megatron", "--peft-dir", peft_dir, "--base", base, "--output", new + ".safetensors"]

    def edited_peft(**changes):
        return _edited_copy(paths["peft"], os.path.join(tmp, "peft"), "adapter_config.json", **changes)

    return {
        "unsupported architecture": lambda: (
            ["hf-to-megatron", "--hf-dir", _edited_copy(paths["llama"], os.path.join(tmp, "hf"), "config.json",
                                                        model_type="gpt2"), "--output", new],
            "model_type 'gpt2' is not supported"),
        "DoRA adapter": lambda: (peft_cmd(edited_peft(use_dora=True)),
                                 "use_dora: layer 0 q_proj has LoRA factors but no lora_magnitude_vector"),
        "modules_to_save": lambda: (peft_cmd(edited_peft(modules_to_save=["lm_head"])), "modules_to_save"),
        "unknown target": lambda: (peft_cmd(edited_peft(target_modules=["q_proj", "embed_tokens"])),
                                   "['embed_tokens']"),
        "adapter of another model": lambda: (
            peft_cmd(paths["peft"], _edited_copy(paths["mg_llama"], os.path.join(tmp, "mg"),
                                                 "iter_0000000/model_args.json", num_query_groups=4)),
            "belongs to another model (check --base)"),
        "megatron dir as PEFT dir": lambda: (peft_cmd(edited_peft(format="megatron_lora.adapter")),
                                             "use megatron-to-peft"),
        "output exists": lambda: (["peft-to-megatron", "--peft-dir", paths["peft"], "--base", paths["mg_llama"],
                                   "--output", paths["imported.safetensors"]], "already exists"),
        "merge an HF base": lambda: (["merge", "--base", paths["llama"], "--adapter", paths["peft"], "--to", "hf",
                                      "--output", new], "convert it with hf-to-megatron first"),
        "base without model_args": lambda: (["megatron-to-peft", "--adapter", paths["imported.safetensors"], "--base",
                                             tmp, "--output", new], "no model_args.json"),
        "NaN adapter exported to PEFT": lambda: (["megatron-to-peft", "--adapter", _nan_adapter(paths, tmp), "--base",
                                                  paths["mg_llama"], "--output", new], "holds 1 non-finite values"),
        "NaN adapter merged": lambda: (["merge", "--base", paths["mg_llama"], "--adapter", _nan_adapter(paths, tmp),
                                        "--to", "hf", "--output", new], "holds 1 non-finite values"),
        "NaN PEFT adapter imported": lambda: (peft_cmd(_nan_peft(paths, tmp)), "holds 1 non-finite values"),
    }


def _nan_adapter(paths, tmp):
    """The imported full adapter with one NaN in one tensor."""
    from safetensors.torch import load_file, save_file

    from megatron_lora.core.checkpoint.adapter import read_full_adapter

    tensors, meta = read_full_adapter(paths["imported.safetensors"])
    tensors["decoder.layers.1.mlp.linear_fc2.lora_B"][0, 0] = float("nan")
    path = os.path.join(tmp, "nan.safetensors")
    save_file(tensors, path, metadata=meta)
    assert torch.isnan(load_file(path)["decoder.layers.1.mlp.linear_fc2.lora_B"]).sum() == 1
    return path


def _nan_peft(paths, tmp):
    """The PEFT adapter with one Inf in one tensor."""
    from safetensors.torch import load_file, save_file

    peft_dir = os.path.join(tmp, "peft_inf")
    shutil.copytree(paths["peft"], peft_dir)
    weights = os.path.join(peft_dir, "adapter_model.safetensors")
    tensors = load_file(weights)
    key = sorted(k for k in tensors if k.endswith("lora_B.weight"))[0]
    tensors[key][0, 0] = float("inf")
    save_file(tensors, weights, metadata={"format": "pt"})
    return peft_dir


BAD_INPUTS = ["unsupported architecture", "DoRA adapter", "modules_to_save", "unknown target",
              "adapter of another model", "megatron dir as PEFT dir", "output exists", "merge an HF base",
              "base without model_args", "NaN adapter exported to PEFT", "NaN adapter merged",
              "NaN PEFT adapter imported"]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_says_what_to_fix(work, converted, tmp_path, capsys, case):
    paths, _ = work
    new = str(tmp_path / "new")
    command, needle = _bad_inputs(paths, str(tmp_path), new)[case]()
    assert C.cli().main([str(c) for c in command]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
    assert not os.path.exists(new) and not os.path.exists(new + ".safetensors")
