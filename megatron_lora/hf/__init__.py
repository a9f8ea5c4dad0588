"""Hugging Face conversion: base weights and PEFT adapters in and out, and merging."""
