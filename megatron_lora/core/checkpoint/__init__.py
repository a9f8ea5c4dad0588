"""Adapter and base-model checkpoints (Megatron dist checkpoints and safetensors)."""
