"""The proof of issue 18 item 3: a PEFT adapter whose q/k/v and gate/up A's are distinct, of rank
r, imported as per-projection LoRA, trained a few steps at TP=2 and exported, comes back at rank r
on every projection, and transformers + peft with it give the Megatron model's logits.

The tiny random Llama (GQA, SwiGLU, random norms) is ``test_convert``'s; the PEFT adapter is made
here with peft (random A and B on all seven projections). ``peft-to-megatron --per-projection``
imports it; the TP=2 model is built by the training script's own argument parsing from the flags
the conversion wrote and the LoRA flags it printed. Exports: ``megatron-to-peft`` from the full
file and from the dist checkpoint, and the in-memory ``export_peft``. Rank workers:
``per_projection_cases.py``.
"""

import json
import os

import pytest
import torch

from megatron_lora.hf.mapping import arch_from_hf_config
from tests.distributed import per_projection_cases as P
from tests.distributed import script_runs as S
from tests.distributed.launcher import run_distributed

transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="needs the hf extra: pip install -e '.[hf]'")

from tests.distributed.test_convert import PROJECTIONS, _hf_model, _logits, _max_diff  # noqa: E402

R = 4


@pytest.fixture(scope="module")
def proof(tmp_path_factory):
    root = tmp_path_factory.mktemp("per_projection_peft")
    paths = {name: str(root / name) for name in (
        "llama", "peft", "mg_llama", "imported", "lora_save", "peft_full", "peft_dist")}
    _hf_model("llama").save_pretrained(paths["llama"])
    torch.manual_seed(3)
    lora = peft.LoraConfig(r=R, lora_alpha=8, target_modules=PROJECTIONS, init_lora_weights=False,
                           task_type="CAUSAL_LM")
    adapted = peft.get_peft_model(_hf_model("llama", paths["llama"]), lora)
    with torch.no_grad():
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)  # A: random per projection (init_lora_weights=False)
    adapted.save_pretrained(paths["peft"])
    paths["data"] = S.make_dataset(str(root), n=40)
    log = run_distributed(P.peft_import_worker, 1, paths)[0]
    trained = run_distributed(P.peft_train_worker, 2, paths, tp=2)[0]
    log += run_distributed(P.peft_offline_worker, 1, paths)[0]
    return paths, _logits(adapted.eval()), trained, log


def _exported(directory):
    from safetensors.torch import load_file

    return (load_file(os.path.join(directory, "adapter_model.safetensors")),
            json.load(open(os.path.join(directory, "adapter_config.json"))))


def test_the_peft_adapter_has_distinct_a_per_projection(proof):
    tensors, _ = _exported(proof[0]["peft"])
    a = {k.split(".")[-3]: v for k, v in tensors.items() if ".layers.0." in k and "lora_A" in k}
    assert not torch.equal(a["q_proj"], a["k_proj"]) and not torch.equal(a["gate_proj"], a["up_proj"])


def test_import_keeps_rank_r_and_the_printed_flags_say_per_projection(proof):
    _, peft_logits, trained, log = proof
    cfg = trained["config"]
    assert (cfg.rank, cfg.alpha, cfg.per_projection) == (R, 8, True)
    assert f"rank {R} per projection" in log and "--lora-per-projection" in log
    assert _max_diff(trained["imported"], peft_logits, "PEFT imported per projection, TP=2") < 1e-5


@pytest.mark.parametrize("source", ["peft_full", "peft_dist"])
def test_trained_adapter_exports_at_rank_r_on_every_projection(proof, source):
    paths, _, _, _ = proof
    tensors, config = _exported(paths[source])
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (R, 8, PROJECTIONS)
    shapes = arch_from_hf_config(json.load(open(os.path.join(paths["llama"], "config.json")))).part_shapes()
    assert len(tensors) == 2 * 7 * 2
    for key, tensor in tensors.items():
        out_features, in_features = shapes[key.split(".")[-3]]  # ...layers.N.self_attn.q_proj.lora_A.weight
        want = (R, in_features) if ".lora_A." in key else (out_features, R)
        assert tuple(tensor.shape) == want, key


def test_transformers_and_peft_give_the_megatron_logits(proof):
    paths, peft_logits, trained, _ = proof
    assert _max_diff(trained["trained"], peft_logits) > 1e-3  # training changed the adapter
    model = peft.PeftModel.from_pretrained(_hf_model("llama", paths["llama"]), paths["peft_full"]).eval()
    assert _max_diff(_logits(model), trained["trained"], "per projection, trained at TP=2, PEFT vs Megatron") < 1e-5


def test_in_memory_and_offline_exports_are_the_same_bits(proof):
    paths, _, trained, _ = proof
    tensors, config = trained["exported"]
    for source in ("peft_full", "peft_dist"):
        want, want_config = _exported(paths[source])
        assert config == want_config and sorted(tensors) == sorted(want)
        assert all(torch.equal(tensors[k], want[k]) for k in want)
