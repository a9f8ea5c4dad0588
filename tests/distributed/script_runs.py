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

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "scripts", "pretrain_gpt_lora.py")

# GQA + SwiGLU + RMSNorm + RoPE + tied embeddings (Megatron-LM's default), no dropout: the
# layouts must then agree to fp32 rounding.
MODEL_FLAGS = [
    "--num-layers", "2", "--hidden-size", "32", "--ffn-hidden-size", "64",
    "--num-attention-heads", "4", "--num-query-groups", "2", "--swiglu",
    "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--seq-length", "16",
    "--make-vocab-size-divisible-by", "64", "--device", "cpu",
]
LORA_FLAGS = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-seed", "7"]

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
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


_ITERATION = re.compile(r"^iteration\s+(\d+)/\s*\d+ .*\| lm loss (\S+) \|", re.M)


def losses(stdout: str) -> dict:
    """{iteration: lm loss} from the script's log lines (``--log-interval 1``)."""
    return {int(i): float(v) for i, v in _ITERATION.findall(stdout)}
