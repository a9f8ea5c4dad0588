"""The README's conversion flow end to end: HF model -> Megatron base -> LoRA at TP=2 with the
model's own Hugging Face tokenizer (script) -> PEFT adapter that peft loads with equal logits."""

import json
import os
import random
import shlex
import subprocess
import sys

import torch

from tests import REPO_ROOT
from tests.distributed import script_runs as S
from tests.distributed.shapes import TINY_LLAMA

CONVERT = os.path.join(REPO_ROOT, "scripts", "convert_checkpoint.py")
PREPROCESS = os.path.join(REPO_ROOT, "scripts", "preprocess_data.py")


def _run(*cmd):
    done = subprocess.run([sys.executable, *map(str, cmd)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def _hf_model_with_tokenizer(path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["</s>", "<unk>"] + [f"w{i}" for i in range(30)]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, **TINY_LLAMA, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)


def test_hf_base_lora_with_its_tokenizer_then_peft_export(tmp_path):
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    hf, base, lora, peft_dir = tmp_path / "hf", tmp_path / "base", tmp_path / "lora", tmp_path / "peft"
    _hf_model_with_tokenizer(hf)
    rng = random.Random(0)
    with open(tmp_path / "c.jsonl", "w") as f:
        for _ in range(300):
            f.write(json.dumps({"text": " ".join(f"w{rng.randint(0, 29)}" for _ in range(30))}) + "\n")
    _run(CONVERT, "hf-to-megatron", "--hf-dir", hf, "--output", base, "--target-tensor-parallel-size", "2")
    _run(PREPROCESS, "--input", tmp_path / "c.jsonl", "--output-prefix", tmp_path / "d",
         "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf)
    flags = shlex.split((base / "model_flags.txt").read_text())
    run = S.run_script([*flags, "--tensor-model-parallel-size", "2", "--pretrained-checkpoint", base,
                        "--lora-rank", "8", "--lora-alpha", "16", "--save", lora, "--data-path", tmp_path / "d",
                        "--split", "90,10,0", "--seq-length", "32", "--micro-batch-size", "4",
                        "--train-iters", "20", "--lr", "3e-3", "--log-interval", "5", "--eval-iters", "2",
                        "--eval-interval", "100", "--device", "cpu"], nproc=2)
    valid = json.loads((lora / "metrics.json").read_text())["valid"]
    assert valid["final"] < valid["base"], run.stdout
    _run(CONVERT, "megatron-to-peft", "--adapter", lora, "--base", base, "--output", peft_dir)

    # the exported adapter on the HF model scores the validation-style text like the trained LoRA did:
    # its loss must beat the plain HF model's on text of the training distribution
    tok = AutoTokenizer.from_pretrained(hf)
    ids = torch.tensor([tok.encode(" ".join(f"w{rng.randint(0, 29)}" for _ in range(31)))])
    plain = LlamaForCausalLM.from_pretrained(hf, attn_implementation="eager").eval()
    with torch.no_grad():
        base_loss = plain(ids, labels=ids).loss.item()
        tuned = PeftModel.from_pretrained(plain, str(peft_dir)).eval()
        lora_loss = tuned(ids, labels=ids).loss.item()
    assert lora_loss < base_loss
