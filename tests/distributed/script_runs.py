"""Running ``scripts/pretrain_gpt_lora.py`` as a user does: real processes, real flags.

A tiny generated corpus (no downloads, no copied text) is written as a Megatron indexed dataset;
runs go through the script's own local launcher (``--nproc-per-node``), so every rank is a real
process on gloo, and their log lines are parsed back into numbers.
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

from tests import REPO_ROOT
from tests.distributed.shapes import SEQ_LEN, TINY_GPT

SCRIPT = os.path.join(REPO_ROOT, "scripts", "pretrain_gpt_lora.py")

# The tiny GPT of models.tiny_gpt_config: GQA + SwiGLU + RMSNorm + RoPE + tied embeddings
# (Megatron-LM's default), no dropout: the layouts must then agree to fp32 rounding.
MODEL_FLAGS = [
    *(word for field, value in TINY_GPT.items() for word in (f"--{field.replace('_', '-')}", str(value))),
    "--swiglu",
    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--seq-length", str(SEQ_LEN),
    "--make-vocab-size-divisible-by", "64", "--device", "cpu",
]
LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-seed", "7"]
# Batch, optimizer, logging and data split of every scripted run (each adds --train-iters).
TRAIN_FLAGS = ["--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--log-interval", "1",
               "--lr-decay-style", "constant", "--eval-iters", "0", "--seed", "5", "--split", "90,10,0"]

_WORDS = ("tensor", "shard", "rank", "adapter", "gradient", "pipeline", "stage", "token", "layer",
          "weight", "reduce", "gather", "scatter", "matrix", "low", "update", "frozen", "base")


def generated_documents(n: int, seed: int):
    """Pseudo-sentences over a small vocabulary: learnable structure, nothing copied."""
    rng = random.Random(seed)
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(20, 60))]
        yield " ".join(words).capitalize() + "."


def make_dataset(directory: str, name: str = "corpus", n: int = 300, seed: int = 0) -> str:
    from megatron_lora.training.data import ByteTokenizer, write_indexed_dataset

    prefix = os.path.join(directory, name)
    write_indexed_dataset(generated_documents(n, seed), prefix, ByteTokenizer())
    return prefix


def run_script(flags, nproc: int = 1, check: bool = True, timeout: int = 300):
    """Run the script; returns the CompletedProcess (stdout / stderr as text)."""
    cmd = [sys.executable, SCRIPT, "--nproc-per-node", str(nproc), *map(str, flags)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


_ITERATION = re.compile(r"^iteration\s+(\d+)/\s*\d+ .*\| lm loss (\S+) \|", re.M)


def losses(stdout: str) -> dict:
    """{iteration: lm loss} from the script's log lines (``--log-interval 1``)."""
    return {int(i): float(v) for i, v in _ITERATION.findall(stdout)}
