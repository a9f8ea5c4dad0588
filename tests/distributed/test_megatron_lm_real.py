"""``patches/pretrain_gpt_lora.py`` on the real Megatron-LM ``pretrain_gpt.py`` (issue 22).

The Megatron-LM checkout of the installed megatron-core's release (core_v0.16.1 for 0.16.x,
core_v0.19.0 for 0.19.x; see ``megatron_lm_runs.find_checkout``) trains a tiny Llama-shaped GPT on
mock data on gloo ranks in CPU mode (``MEGATRON_LORA_CPU=1``). The references are plain Megatron-LM
runs of the same ``pretrain_gpt.py`` (CPU answers only), Megatron-LM's own checkpoints, and
transformers + peft for the conversions. One base, saved by plain Megatron-LM, serves every test.
"""

import importlib.util
import os
import pickle
import shutil

import pytest

from tests.distributed import megatron_lm_runs as M

CHECKOUT, MISSING = M.find_checkout()
IMPORTS = [m for m in ("six", "regex", "yaml", "pydantic", "psutil", "triton") if importlib.util.find_spec(m) is None]
pytestmark = [
    pytest.mark.megatron_lm,
    pytest.mark.skipif(CHECKOUT is None, reason=str(MISSING)),
    pytest.mark.skipif(bool(IMPORTS), reason=f"Megatron-LM's training code imports {IMPORTS}: "
                                              "pip install -e '.[test]'"),
]
TRACKER = "latest_checkpointed_iteration.txt"


def flags(*extra, iters):
    return [*M.MODEL, *M.RUN, "--train-iters", str(iters), *map(str, extra)]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("megatron_lm")


@pytest.fixture(scope="module")
def base(work):
    """(dir, losses) of plain Megatron-LM pretraining 3 iterations at TP=1 and saving the model."""
    root = work / "base"
    out = M.run(CHECKOUT, flags("--save", root, "--save-interval", 3, iters=3), lora_wrapper=False)
    return str(root), M.losses(out)


@pytest.fixture(scope="module")
def lora(work, base):
    """(dir, losses) of LoRA through the wrapper at TP=2 from the base: 4 iterations, saved at 2 and 4."""
    root = work / "lora"
    out = M.run(CHECKOUT, flags("--tensor-model-parallel-size", 2, "--pretrained-checkpoint", base[0], *M.LORA,
                                "--save", root, "--save-interval", 2, iters=4), nproc=2)
    return str(root), M.losses(out)


def _metadata_keys(ckpt_dir):
    with open(os.path.join(ckpt_dir, ".metadata"), "rb") as f:
        return list(pickle.load(f).state_dict_metadata)


def _size(ckpt_dir):
    return sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir))


def test_wrapper_without_lora_rank_trains_like_plain_pretrain_gpt(base):
    _, plain = base
    wrapped = M.losses(M.run(CHECKOUT, flags(iters=3)))
    assert sorted(plain) == [1, 2, 3] and plain[3] < plain[1], plain
    assert wrapped == plain  # the same printed losses, to Megatron-LM's 7 significant digits


def test_lora_from_a_megatron_lm_base_at_tp2_starts_at_plain_finetunes_loss_and_saves_the_adapter_only(base, lora):
    base_root, _ = base
    finetune = M.losses(M.run(CHECKOUT, flags("--tensor-model-parallel-size", 2, "--pretrained-checkpoint", base_root,
                                              iters=1), nproc=2, lora_wrapper=False))
    lora_root, losses = lora
    assert sorted(losses) == [1, 2, 3, 4]
    # B = 0 at iteration 1: LoRA's model is the base, so its loss is plain Megatron-LM's fine-tune's.
    assert losses[1] == pytest.approx(finetune[1], rel=1e-6, abs=0)
    for iteration in (2, 4):
        keys = _metadata_keys(os.path.join(lora_root, f"iter_{iteration:07d}"))
        # Besides: Megatron-LM's pickled RNG and rerun-machine state, and (megatron-core 0.19) its common state.
        model = [k for k in keys if not k.startswith(("optimizer.", "rng_state", "rerun_state", "common_state"))]
        optimizer = [k for k in keys if k.startswith("optimizer.")]
        assert len(model) == 8 and all(k.rsplit(".", 1)[-1] in ("lora_A", "lora_B") for k in model), model
        assert sorted(optimizer) == sorted(f"optimizer.state.{s}.{k}" for k in model for s in ("exp_avg", "exp_avg_sq"))
    base_dir = os.path.join(base_root, "iter_0000003")
    assert _size(os.path.join(lora_root, "iter_0000004")) < _size(base_dir) / 3


def _resumable_copy(lora_root, dst, iteration):
    """A copy of the adapter checkpoints whose tracker names ``iteration`` (Megatron-LM resumes the latest)."""
    shutil.copytree(lora_root, dst)
    with open(os.path.join(dst, TRACKER), "w") as f:
        f.write(str(iteration))
    return str(dst)


def test_resume_continues_the_uninterrupted_run_at_tp2_and_at_tp1(work, base, lora):
    """(c): the first iteration after a resume from the iteration-2 adapter equals the uninterrupted run's.

    Only the first: on this CPU path Megatron-LM's own resume (plain pretrain_gpt.py, whole model)
    differs from its uninterrupted run from the second iteration after the resume on (the torch
    Adam fallback's step count), with or without LoRA."""
    base_root, _ = base
    lora_root, uninterrupted = lora
    resume = _resumable_copy(lora_root, work / "resume", 2)
    at_tp2 = M.losses(M.run(CHECKOUT, flags("--tensor-model-parallel-size", 2, "--pretrained-checkpoint", base_root,
                                            *M.LORA, "--load", resume, iters=4), nproc=2))
    assert sorted(at_tp2) == [3, 4] and at_tp2[3] == uninterrupted[3], (at_tp2, uninterrupted)
    # The TP=2 adapter (and its Adam state) at TP=1; RNG state is per rank (dropout is off anyway).
    at_tp1 = M.losses(M.run(CHECKOUT, flags("--pretrained-checkpoint", base_root, *M.LORA, "--load", resume,
                                            "--no-load-rng", iters=4)))
    assert sorted(at_tp1) == [3, 4]
    assert at_tp1[3] == pytest.approx(uninterrupted[3], rel=1e-5, abs=0), (at_tp1, uninterrupted)


@pytest.fixture(scope="module")
def converted(work, base, lora):
    """The CLI's conversions of Megatron-LM's saves: the TP=2 LoRA checkpoint to PEFT and merged to HF,
    the base to HF; plus the Megatron-side logits at TP=2."""
    from tests.distributed import megatron_lm_cases
    from tests.distributed.launcher import run_distributed

    paths = {"base": base[0], "lora": lora[0],
             **{k: str(work / k) for k in ("peft", "merged_hf", "base_hf")}}
    run_distributed(megatron_lm_cases.convert_worker, 1, paths)
    return paths, run_distributed(megatron_lm_cases.logits_worker, 2, paths, tp=2)[0]


def test_megatron_lm_checkpoints_convert_to_peft_and_hf_with_transformers_logits(converted):
    """(d): logits of the converted checkpoints in transformers + peft equal Megatron's."""
    torch = pytest.importorskip("torch")
    transformers, peft = pytest.importorskip("transformers"), pytest.importorskip("peft")
    from tests.distributed.convert_cases import tokens

    paths, megatron = converted

    def logits(model):
        with torch.no_grad():
            return model.eval()(tokens()).logits.float()

    def hf(path):
        return transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="eager",
                                                             torch_dtype=torch.float32)

    def diff(a, b):
        return (a - b).abs().max().item()

    assert diff(logits(hf(paths["base_hf"])), megatron["base"]) < 1e-5
    assert diff(logits(peft.PeftModel.from_pretrained(hf(paths["base_hf"]), paths["peft"])), megatron["lora"]) < 1e-5
    assert diff(logits(hf(paths["merged_hf"])), megatron["lora"]) < 1e-5
    assert diff(megatron["lora"], megatron["base"]) > 1e-3  # the adapter Megatron-LM trained changes the model


def test_megatron_lm_base_loads_in_the_training_script(work, converted):
    """(e): scripts/pretrain_gpt_lora.py --pretrained-checkpoint <Megatron-LM's save>: its iteration-1 loss
    (LoRA's B = 0: the base's loss) equals transformers' loss of the base converted to HF on that batch."""
    torch, transformers = pytest.importorskip("torch"), pytest.importorskip("transformers")
    from megatron_lora.training.data import ByteTokenizer, build_gpt_datasets, micro_batches
    from tests.distributed import script_runs as S

    paths, _ = converted
    data = S.make_dataset(str(work))
    script_flags = ["--num-layers", 2, "--hidden-size", 64, "--ffn-hidden-size", 128, "--num-attention-heads", 4,
                    "--group-query-attention", "--num-query-groups", 2, "--seq-length", 32, "--swiglu",
                    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
                    "--untie-embeddings-and-output-weights", "--hidden-dropout", 0, "--attention-dropout", 0,
                    "--vocab-size", 384, "--make-vocab-size-divisible-by", 64, "--device", "cpu",
                    *S.TRAIN_FLAGS, "--train-iters", 1, "--data-path", data, *M.LORA]
    run = S.run_script([*script_flags, "--pretrained-checkpoint", paths["base"]])
    assert f"loaded base weights from {paths['base']}" in run.stdout
    script_loss = S.losses(run.stdout)[1]

    # The script's first global batch (4 samples: --global-batch-size 4, DP = 1), as its loop reads it.
    train, _, _ = build_gpt_datasets([data], "90,10,0", 32, 5, (4, 0, 0), ByteTokenizer())
    batch = next(micro_batches(train, 0, 4, 0, 1))
    hf = transformers.LlamaForCausalLM.from_pretrained(paths["base_hf"], attn_implementation="eager",
                                                       torch_dtype=torch.float32).eval()
    with torch.no_grad():
        logits = hf(batch["tokens"]).logits.double()
    per_token = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    reference = (per_token * batch["loss_mask"].flatten()).sum() / batch["loss_mask"].sum()
    assert script_loss == pytest.approx(reference.item(), rel=1e-5, abs=0), (script_loss, reference.item())
