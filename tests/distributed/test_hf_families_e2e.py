"""Qwen3, Qwen3-MoE and Mixtral end to end through the two scripts, as a user runs them (issue 26).

Tiny random models built with transformers (``tests/hf_moe.py``: Qwen3 with q/k norms and a head
size other than hidden / heads; Qwen3-MoE and Mixtral with 4 experts, top-2), each saved with
``save_pretrained`` beside a tiny word-level tokenizer made here, fp32:

1. base + a PEFT adapter whose every A and B is random and non-zero, on attention and the MLP
   (MoE: the fused experts through ``target_parameters``; Qwen3-MoE the router too) →
   ``hf-to-megatron`` + ``peft-to-megatron`` (``scripts/convert_checkpoint.py``) → the model the
   training script builds from ``model_flags.txt`` plus the LoRA flags the import printed, at TP=2
   (Qwen3), EP=2 and TP=2 + SP with ETP=2, EP=2 (MoE) → logits equal transformers + peft;
2. LoRA trained by ``scripts/pretrain_gpt_lora.py`` at EP=2 on each converted MoE base →
   ``megatron-to-peft`` (fused, from the run's adapter file; per-expert, from its EP=2 dist
   checkpoint) → ``PeftModel.from_pretrained`` loads every adapter key, none left over, and gives
   the logits of the Megatron model with the trained adapter;
3. ``merge --to hf`` of that adapter → ``from_pretrained`` matches every key → the same logits.

Model flags are parsed and validated here as the script does before it starts ranks; the ranks
build the model with the script's ``build_model`` (``hf_e2e_cases.py``).
"""

import copy
import json
import os
import shlex
import warnings

import pytest
import torch

from tests.distributed import family_cases as F
from tests.distributed import hf_e2e_cases as E
from tests.distributed import script_runs as S
from tests.distributed.launcher import run_distributed

transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="needs the hf extra: pip install -e '.[hf]'")

from tests.hf_moe import ATTENTION, EXPERTS, TOKENS, random_peft_model, tiny_hf  # noqa: E402

TOL = 1e-4  # fp32
KINDS = ("qwen3", "qwen3_moe", "mixtral")
ADAPTERS = {  # random_peft_model keywords
    "qwen3": dict(target_modules=ATTENTION + ["gate_proj", "up_proj", "down_proj"], target_parameters=()),
    "qwen3_moe": dict(one_qkv_a=True),  # experts and router; one q/k/v A keeps rank r <= 4 experts
    "mixtral": dict(target_parameters=EXPERTS),  # distinct q/k/v A's: imported stacked at rank 3r
}
LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2), "tp2_sp_ep2": dict(tp=2, sp=True, ep=2)}
IMPORTED = [("qwen3", "tp2"), ("qwen3_moe", "ep2"), ("qwen3_moe", "tp2_sp_ep2"), ("mixtral", "ep2"),
            ("mixtral", "tp2_sp_ep2")]
TRAINED = ("qwen3_moe", "mixtral")
ITERS = 3
ROUTED = {"qwen3_moe": ["router"], "mixtral": []}  # the router adapted too
TRAIN_LORA = {kind: ["--lora-rank", "4", "--lora-alpha", "8", "--lora-seed", "7", "--lora-target-modules",
                     "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2", *ROUTED[kind]] for kind in TRAINED}
EXPORTS = ("fused", "per-expert")


def _save_tokenizer(path):
    """A word-level tokenizer over the generated corpus's words (20 ids, under the vocabulary 64)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["</s>", "<unk>", *S._WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>",
                                         unk_token="<unk>").save_pretrained(path)


def _logits(model):
    with torch.no_grad():
        return model(TOKENS).logits.float()


def _max_diff(a, b, label=None):
    diff = (a - b).abs().max().item()
    if label:
        print(f"max |logit difference| {label}: {diff:.3g}")  # pytest -s shows the measured values
    return diff


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """HF models (with tokenizer), their PEFT adapters, reference logits, and a tokenized corpus."""
    from megatron_lora.training.data import build_tokenizer, write_indexed_dataset

    root = tmp_path_factory.mktemp("hf_e2e")
    paths = {name: str(root / name) for kind in KINDS
             for name in (kind, f"peft_{kind}", f"mg_{kind}", f"imported_{kind}.safetensors")}
    paths.update({name: str(root / name) for kind in TRAINED for name in (
        f"lora_{kind}", f"merged_{kind}", *(f"export_{layout}_{kind}" for layout in EXPORTS))})
    models, refs = {}, {}
    for kind in KINDS:
        models[kind] = tiny_hf(kind)
        models[kind].save_pretrained(paths[kind])
        _save_tokenizer(paths[kind])
        adapted = random_peft_model(models[kind], **ADAPTERS[kind])
        adapted.save_pretrained(paths[f"peft_{kind}"])
        refs[kind], refs[f"peft_{kind}"] = _logits(models[kind]), _logits(adapted)
    paths["data"] = os.path.join(str(root), "corpus")
    write_indexed_dataset(S.generated_documents(60, 0), paths["data"], build_tokenizer("HuggingFaceTokenizer",
                                                                                      paths["qwen3"]))
    return paths, refs, models


@pytest.fixture(scope="module")
def converted(work):
    """hf-to-megatron and peft-to-megatron of each model, in one rank; {kind: the printed LoRA flags}."""
    paths, _, _ = work
    targets = {"qwen3": ["--target-tensor-parallel-size", 2],
               "qwen3_moe": ["--target-tensor-parallel-size", 2, "--target-expert-model-parallel-size", 2],
               "mixtral": ["--target-tensor-parallel-size", 2, "--target-expert-model-parallel-size", 2]}
    commands = []
    for kind in KINDS:
        commands.append(["hf-to-megatron", "--hf-dir", kind, "--output", f"mg_{kind}", *targets[kind]])
        commands.append(["peft-to-megatron", "--peft-dir", f"peft_{kind}", "--base", f"mg_{kind}",
                         "--output", f"imported_{kind}.safetensors"])
    out = run_distributed(F.convert_worker, 1, paths, commands)[0]
    printed = {}
    for kind in KINDS:  # the line under "LoRA flags for pretrain_gpt_lora.py:"
        line = next(s for s in out.splitlines() if s.strip().startswith(
            f"--lora-load {paths[f'imported_{kind}.safetensors']} "))
        printed[kind] = shlex.split(line)
    return printed


def _args(paths, kind, layout, lora_flags=()):
    """The script's validated args: model_flags.txt as written, the layout, LoRA flags, a corpus."""
    from megatron_lora.training.pretrain_args import parse_args, validate_args

    with open(os.path.join(paths[f"mg_{kind}"], "model_flags.txt")) as f:
        flags = shlex.split(f.read())
    layout = LAYOUTS[layout]
    flags += ["--tensor-model-parallel-size", layout.get("tp", 1), "--expert-model-parallel-size", layout.get("ep", 1),
              *(["--sequence-parallel"] if layout.get("sp") else []), "--pretrained-checkpoint", paths[f"mg_{kind}"],
              *lora_flags, "--seq-length", TOKENS.shape[1], "--micro-batch-size", 1, "--train-iters", 1,
              "--lr", "1e-3", "--data-path", paths["data"], "--device", "cpu"]
    world = layout.get("tp", 1) * layout.get("ep", 1)
    return validate_args(parse_args([str(f) for f in flags]), world)


def _megatron(paths, layout, runs):
    """Rank 0's logits of each (kind, lora flags) model, built by the script at ``layout``."""
    tp, ep = LAYOUTS[layout].get("tp", 1), LAYOUTS[layout].get("ep", 1)
    args = [_args(paths, kind, layout, flags) for kind, flags in runs]
    return run_distributed(E.logits_worker, tp * ep, args, TOKENS, tp=tp, expert_model_parallel_size=ep,
                           expert_tensor_parallel_size=tp)[0]


@pytest.fixture(scope="module")
def trained(work, converted):
    """pretrain_gpt_lora.py: LoRA at EP=2 on each converted MoE base, the Qwen3-MoE router too."""
    paths, _, _ = work
    runs = {}
    for kind in TRAINED:
        with open(os.path.join(paths[f"mg_{kind}"], "model_flags.txt")) as f:
            flags = shlex.split(f.read())
        runs[kind] = S.run_script([
            *flags, "--expert-model-parallel-size", 2, "--moe-token-dispatcher-type", "alltoall",
            "--pretrained-checkpoint", paths[f"mg_{kind}"], *TRAIN_LORA[kind], *S.TRAIN_FLAGS,
            "--seq-length", 16, "--train-iters", ITERS, "--data-path", paths["data"], "--save", paths[f"lora_{kind}"],
            "--device", "cpu"], nproc=2)
    return runs


@pytest.fixture(scope="module")
def exported(work, trained):
    """megatron-to-peft (fused from the run's adapter file, per-expert from its EP=2 dist
    checkpoint) and merge --to hf (Mixtral keeping its config.json and tokenizer) of each run."""
    paths, _, _ = work
    commands = []
    for kind in TRAINED:
        base, lora = f"mg_{kind}", f"lora_{kind}"
        commands += [
            ["megatron-to-peft", "--adapter", lora, "--base", base, "--output", f"export_fused_{kind}"],
            ["megatron-to-peft", "--adapter", lora, "--iteration", ITERS, "--base", base, "--expert-layout",
             "per-expert", "--output", f"export_per-expert_{kind}"],
            ["merge", "--base", base, "--adapter", lora, "--to", "hf", "--output", f"merged_{kind}",
             *(["--hf-config-dir", kind] if kind == "mixtral" else [])]]
    return run_distributed(F.convert_worker, 1, paths, commands)[0]


@pytest.fixture(scope="module")
def megatron(work, converted, trained):
    """{(kind, layout): logits with the imported adapter} and {(kind, "trained"): logits with the
    adapter trained at EP=2, built at EP=2}."""
    paths, _, _ = work
    out = {}
    for layout in LAYOUTS:
        runs = [(kind, converted[kind]) for kind, name in IMPORTED if name == layout]
        if layout == "ep2":
            runs += [(kind, ["--lora-load", os.path.join(paths[f"lora_{kind}"], "adapter.safetensors"),
                             *TRAIN_LORA[kind]]) for kind in TRAINED]
        logits = _megatron(paths, layout, runs)
        for (kind, flags), got in zip(runs, logits):
            out[(kind, "trained" if flags[1].endswith("adapter.safetensors") else layout)] = got
    return out


# ------------------------------------------------------------------------------------ proofs

@pytest.mark.parametrize("kind, layout", IMPORTED)
def test_imported_peft_adapter_gives_the_peft_logits_in_the_scripts_model(megatron, work, kind, layout):
    _, refs, _ = work
    assert _max_diff(refs[f"peft_{kind}"], refs[kind]) > 1e-2  # the adapter matters
    assert _max_diff(megatron[(kind, layout)], refs[f"peft_{kind}"], f"{kind} + PEFT adapter, {layout}") <= TOL


def test_training_ran_at_ep2_and_moved_the_adapter(trained, megatron, work):
    _, refs, _ = work
    for kind in TRAINED:
        out = trained[kind].stdout
        assert "x EP 2 x" in out and sorted(S.losses(out)) == list(range(1, ITERS + 1)), out
        assert _max_diff(megatron[(kind, "trained")], refs[kind], f"{kind} trained adapter vs base") > 1e-3


def _peft_strict(model, path):
    """``PeftModel.from_pretrained`` of ``path`` on a copy of ``model``; fails on any adapter key
    of the model not in the file or of the file not in the model."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), path).eval()
    assert not [w for w in caught if "adapter keys" in str(w.message)], [str(w.message) for w in caught]
    again = loaded.load_adapter(path, adapter_name="again")  # the load result from_pretrained does not return
    assert not again.missing_keys and not again.unexpected_keys, again
    loaded.delete_adapter("again")
    return loaded


@pytest.mark.parametrize("layout", EXPORTS)
@pytest.mark.parametrize("kind", TRAINED)
def test_trained_adapter_exported_loads_in_peft_strictly_with_the_megatron_logits(exported, megatron, work, kind,
                                                                                   layout):
    paths, _, models = work
    path = paths[f"export_{layout}_{kind}"]
    config = json.load(open(os.path.join(path, "adapter_config.json")))
    targets = config.get("target_parameters", []) + config["target_modules"]
    if layout == "fused":
        assert {*EXPERTS} <= {*targets} and ("mlp.gate.weight" in targets) == bool(ROUTED[kind]), config
    else:  # per-expert: no target_parameters; Qwen3-MoE's router is the module mlp.gate
        assert "target_parameters" not in config and ("gate" in targets) == bool(ROUTED[kind]), config
    loaded = _peft_strict(models[kind], path)
    got = _logits(loaded)
    assert _max_diff(got, megatron[(kind, "trained")], f"{kind} trained at EP=2, {layout} PEFT vs Megatron") <= TOL


@pytest.mark.parametrize("kind", TRAINED)
def test_merged_trained_adapter_loads_with_every_key_matched_and_the_megatron_logits(exported, megatron, work, kind):
    paths, _, models = work
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        paths[f"merged_{kind}"], attn_implementation="eager", output_loading_info=True, dtype=torch.float32)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    assert type(model) is type(models[kind])
    got = _logits(model.eval())
    assert _max_diff(got, megatron[(kind, "trained")], f"{kind} trained at EP=2, merged HF vs Megatron") <= TOL


def test_an_iteration_the_run_did_not_save_is_one_line_naming_those_it_did(trained, work, tmp_path, capsys):
    from tests.distributed.convert_cases import cli

    paths, _, _ = work
    new = str(tmp_path / "new")
    assert cli().main(["megatron-to-peft", "--adapter", paths["lora_qwen3_moe"], "--iteration", "2", "--base",
                       paths["mg_qwen3_moe"], "--output", new]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --iteration 2: {paths['lora_qwen3_moe']} has no iter_0000002; its adapter checkpoints "
                   f"are at iterations {ITERS}."], err
    assert not os.path.exists(new)
