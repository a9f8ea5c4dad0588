"""The tiny shapes the tests build from, in one place.

Every size divides by TP=4 where a test shards it; changing one changes what many tests compute.
"""

# One LoRA layer (layer_cases, external_cases, te_double_cases): sequence, micro-batch, input and
# output features, LoRA rank; the sequence and both feature sizes divide by TP=4.
S, B, H_IN, H_OUT, RANK = 8, 2, 16, 24, 4
EPS = 1e-5  # RMS norm epsilon of the fused-norm layers

# The tiny Megatron GPT (models.tiny_gpt_config; the same model as script_runs.MODEL_FLAGS):
# grouped-query attention, SwiGLU's linear_fc1 holding [gate; up].
VOCAB_SIZE = 64
SEQ_LEN = 16
TINY_GPT = dict(num_layers=2, hidden_size=32, ffn_hidden_size=64, num_attention_heads=4, num_query_groups=2)

# The tiny Hugging Face Llama the conversion tests build (transformers config fields).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
