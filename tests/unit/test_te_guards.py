"""Transformer Engine and apex stay optional: what runs on CPU, and what a user without TE is told.

The TE layers themselves need CUDA (tests/gpu); their TP math is covered on CPU by
tests/distributed/test_external_gemm.py, which shares all of their LoRA and collective code.
"""

import importlib.util
import subprocess
import sys

import pytest

from megatron_lora import LoRAConfig, get_gpt_lora_layer_spec
from megatron_lora.core.inject import lora_classes

# Blocks the optional packages (a None in sys.modules makes `import x` raise ImportError), then
# builds a LoRA GPT on CPU and runs one training step through apply_lora, Megatron's DDP and
# optimizer: the whole CPU path must work with neither package importable.
_BLOCKED_RUN = r"""
import sys
for name in ("transformer_engine", "apex", "fused_weight_gradient_mlp_cuda"):
    sys.modules[name] = None
import torch
from megatron_lora.cpu import enable_cpu
enable_cpu()
import torch.distributed as dist
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:%d" % PORT, rank=0, world_size=1)
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
parallel_state.initialize_model_parallel(1, 1)
model_parallel_cuda_manual_seed(0)
from megatron.core.transformer import TransformerConfig
from megatron_lora import LoRAConfig, apply_lora, lora_parameters
from megatron_lora.training.gpt import build_gpt_stage
config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, use_cpu_initialization=True,
                           normalization="RMSNorm", bias_dropout_fusion=False, masked_softmax_fusion=False,
                           persist_layer_norm=False, apply_rope_fusion=False)
model = apply_lora(build_gpt_stage(config, 64, 8), LoRAConfig(rank=2))
tokens = torch.randint(0, 64, (1, 8))
loss = model(tokens, torch.arange(8)[None], None, labels=tokens).float().mean()
loss.backward()
assert all(p.grad is not None for p in lora_parameters(model))
try:
    import megatron_lora.core.te_layers
except ImportError as err:
    print("TE-ERROR:", err)
loaded = sorted(n for n in ("transformer_engine", "apex") if sys.modules.get(n) is not None)
print("LOADED:", loaded)
dist.destroy_process_group()
"""


def test_cpu_path_needs_neither_transformer_engine_nor_apex(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "blocked.py"
    script.write_text(_BLOCKED_RUN.replace("PORT", str(port)))
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "LOADED: []" in run.stdout
    assert "TE-ERROR: megatron_lora.core.te_layers needs Transformer Engine (CUDA only)" in run.stdout
    assert "pip install 'megatron_lora[te]'" in run.stdout


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                    reason="checks the message shown where transformer-engine is not installed")
def test_te_spec_without_te_says_what_to_install():
    with pytest.raises(ImportError, match=r"needs Transformer Engine .*megatron_lora\[te\]"):
        get_gpt_lora_layer_spec(LoRAConfig(), transformer_impl="transformer_engine")


def test_unknown_transformer_impl_is_named():
    with pytest.raises(ValueError, match="transformer_impl must be one of .*'local', 'transformer_engine'.*'te'"):
        get_gpt_lora_layer_spec(LoRAConfig(), transformer_impl="te")


def test_local_spec_lookup_does_not_import_te():
    classes = lora_classes()
    assert "transformer_engine" not in sys.modules or len(classes) == 8
    if "transformer_engine" not in sys.modules:
        assert {c.__name__ for c in classes} == {"ColumnParallelLinear", "RowParallelLinear", "TopKRouter"}
