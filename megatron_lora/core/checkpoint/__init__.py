"""Adapter checkpoints and the checkpoint I/O they share with the application's full-model
checkpoints (``megatron_lora.training.model_checkpoint``): atomic saves, safe loads, RNG state."""
