"""A Megatron-LM checkout's own ``pretrain_gpt.py``, with LoRA from ``megatron_lora``; no file edited.

    cd /path/to/Megatron-LM            # core_r0.13.0 .. core_r0.16.x (see patches/README.md)
    torchrun --nproc-per-node 8 /path/to/megatron_lora/patches/pretrain_gpt_lora.py \\
        <the pretrain_gpt.py flags of the base model> --transformer-impl local \\
        --pretrained-checkpoint /ckpt/base --load /ckpt/lora --save /ckpt/lora --lora-rank 16

It runs the checkout's own ``pretrain_gpt.py`` as ``__main__`` (its ``__main__`` block, dataset
provider, ``forward_step``, model provider and defaults, whatever the release) after wrapping
``megatron.training.pretrain`` with ``megatron_lora.training.megatron_lm.lora_pretrain``: the --lora-* flags,
LoRA in the model provider, a frozen base from --pretrained-checkpoint, adapter-only checkpoints.
All logic lives in that module; this file only finds the checkout and starts it.
"""

import os
import runpy
import sys

SCRIPT = "pretrain_gpt.py"


def find_megatron_lm() -> str:
    """The checkout to run: the current directory, else the directory this file was copied to."""
    candidates = [os.getcwd(), os.path.dirname(os.path.abspath(__file__))]
    for root in candidates:
        if os.path.isfile(os.path.join(root, SCRIPT)):
            return root
    raise SystemExit(f"pretrain_gpt_lora.py: no {SCRIPT} in {candidates}; run it from the root of a "
                     f"Megatron-LM checkout, or copy it next to {SCRIPT}.")


def main(root=None) -> None:
    """Run ``root/pretrain_gpt.py`` (default: ``find_megatron_lm()``) as ``__main__`` with LoRA."""
    root = os.path.abspath(root or find_megatron_lm())
    # pretrain_gpt.py imports megatron (a namespace package) and its sibling modules
    # (gpt_builders, model_provider) from the checkout root.
    sys.path.insert(0, root)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isdir(os.path.join(repo, "megatron_lora")):  # run from this repository, not installed
        sys.path.append(repo)
    import importlib

    importlib.import_module("megatron.training")
    from megatron_lora.training import megatron_lm, megatron_lm_cpu  # the logic lives in the package

    if megatron_lm_cpu.requested():  # MEGATRON_LORA_CPU=1: Megatron-LM on a host without a GPU
        megatron_lm_cpu.enable_megatron_lm_cpu()
    megatron_lm.install()
    runpy.run_path(os.path.join(root, SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main()
