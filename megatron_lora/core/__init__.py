"""The LoRA library: config, layout, init, collectives, operators, layers, injection, checkpoints.

It imports torch and Megatron-Core only, never ``megatron_lora.training`` or ``megatron_lora.hf``.
"""
