"""The application: the training script's flags, loop, data, launcher, preemption and the
Megatron-LM wrapper, built on ``megatron_lora.core``."""
