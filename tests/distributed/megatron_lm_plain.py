"""Plain Megatron-LM ``pretrain_gpt.py`` on the CPU: the reference runs of the Megatron-LM tests.

Run from a Megatron-LM checkout (as its ``pretrain_gpt.py`` is); answers Megatron-LM's CUDA
assumptions with ``megatron_lora.training.megatron_lm_cpu`` and changes nothing else: no LoRA, no
wrapped ``pretrain``.
"""

import os
import runpy
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())
    from megatron_lora.training.megatron_lm_cpu import enable_megatron_lm_cpu

    enable_megatron_lm_cpu()
    runpy.run_path(os.path.join(os.getcwd(), "pretrain_gpt.py"), run_name="__main__")
