"""Running the real Megatron-LM ``pretrain_gpt.py`` (plain, or through ``patches/pretrain_gpt_lora.py``).

The Megatron-LM training code is not on the package index: the tests use the checkout of the
release that matches the installed megatron-core, found at ``$MEGATRON_LM_DIR`` (a checkout, or a
folder of ``core_v0.16.1/`` / ``core_v0.19.0/`` checkouts) or ``<repo>/../shared/megatron-lm/``.
Every rank is a real process on gloo with ``MEGATRON_LORA_CPU=1``; the plain runs go through
``megatron_lm_plain.py``, which answers the same CUDA assumptions and nothing else.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

from tests import REPO_ROOT

WRAPPER = os.path.join(REPO_ROOT, "patches", "pretrain_gpt_lora.py")
PLAIN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_lm_plain.py")
RELEASES = {"0.16": "core_v0.16.1", "0.19": "core_v0.19.0"}

# A tiny Llama-shaped GPT (GQA, SwiGLU, RMSNorm, RoPE, no biases, untied output; NullTokenizer: 383 ids + EOD =
# 384, the conversion tests' vocabulary) on mock data, fp32,
# no dropout: layouts and wrappers must agree to fp32 rounding.
MODEL = ["--num-layers", "2", "--hidden-size", "64", "--ffn-hidden-size", "128", "--num-attention-heads", "4",
         "--group-query-attention", "--num-query-groups", "2", "--seq-length", "32",
         "--max-position-embeddings", "32", "--swiglu", "--normalization", "RMSNorm",
         "--position-embedding-type", "rope", "--disable-bias-linear", "--untie-embeddings-and-output-weights",
         "--hidden-dropout", "0", "--attention-dropout", "0",
         "--tokenizer-type", "NullTokenizer", "--vocab-size", "383", "--make-vocab-size-divisible-by", "64"]
RUN = ["--mock-data", "--transformer-impl", "local", "--distributed-backend", "gloo",
       "--no-masked-softmax-fusion", "--no-bias-gelu-fusion", "--no-bias-swiglu-fusion", "--no-bias-dropout-fusion",
       "--no-gradient-accumulation-fusion", "--no-persist-layer-norm", "--no-rope-fusion",
       "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "1e-2", "--lr-decay-style", "constant",
       "--min-lr", "1e-2", "--eval-iters", "0", "--eval-interval", "1000", "--log-interval", "1",
       "--seed", "1234"]
LORA = ["--lora-rank", "4", "--lora-alpha", "8", "--lora-seed", "7"]


def megatron_core_release() -> str:
    import megatron.core

    return ".".join(megatron.core.__version__.split(".")[:2])


def find_checkout():
    """(path, None) of the Megatron-LM checkout for the installed megatron-core, or (None, why)."""
    release = RELEASES.get(megatron_core_release())
    if release is None:
        return None, f"no Megatron-LM release is paired with megatron-core {megatron_core_release()} here"
    roots = [os.environ.get("MEGATRON_LM_DIR"), os.path.join(os.path.dirname(REPO_ROOT), "shared", "megatron-lm")]
    for root in filter(None, roots):
        for path in (root, os.path.join(root, release)):
            if os.path.isfile(os.path.join(path, "pretrain_gpt.py")) and os.path.isdir(
                    os.path.join(path, "megatron", "training")):
                return path, None
    return None, (f"Megatron-LM {release} (pretrain_gpt.py and megatron/training) not found in "
                  f"$MEGATRON_LM_DIR or {roots[1]}/{release}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(checkout, flags, nproc=1, lora_wrapper=True, timeout=240, python=None):
    """Run Megatron-LM's ``pretrain_gpt.py`` on ``nproc`` gloo ranks; returns the last rank's output
    (Megatron-LM logs the losses there).

    ``lora_wrapper``: through ``patches/pretrain_gpt_lora.py`` (else plain, CPU answers only).
    """
    script = WRAPPER if lora_wrapper else PLAIN
    port = _free_port()
    procs = []
    for rank in range(nproc):
        env = dict(os.environ, MEGATRON_LORA_CPU="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(nproc), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                   PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
                   OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [python or sys.executable, script, *map(str, flags)]
        procs.append(subprocess.Popen(cmd, cwd=checkout, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, start_new_session=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
                proc.wait()
    for rank, (proc, out) in enumerate(zip(procs, outputs)):
        if proc.returncode != 0:
            raise AssertionError(f"rank {rank} of {script} {' '.join(map(str, flags))} exited "
                                 f"{proc.returncode}:\n{out[-6000:]}")
    return outputs[-1]


_ITERATION = re.compile(r"iteration\s+(\d+)/\s*\d+ \|.*?\| lm loss: (\S+) \|")


def losses(stdout: str) -> dict:
    """{iteration: lm loss} from Megatron-LM's log lines (``--log-interval 1``)."""
    return {int(i): float(v) for i, v in _ITERATION.findall(stdout)}
