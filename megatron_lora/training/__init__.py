"""The application: the training script's flags, loop, data, launcher, preemption, the GPT stage
builder, full-model (pretraining) checkpoints and the Megatron-LM wrapper, built on
``megatron_lora.core``."""
