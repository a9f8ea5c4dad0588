"""One repr for every LoRA layer family (issue 24 item 2): the adapter's settings, per-projection
included, read the same on a local layer and on a Transformer Engine layer (run on the CPU double
of TE, tests/te_double.py); the TE repr used to lack per-projection and dropout."""

from tests.distributed.launcher import run_distributed

NAME = "decoder.layers.0.mlp.linear_fc1"


def repr_worker():
    import torch
    from megatron.core import ModelParallelConfig

    from megatron.core.transformer import TransformerConfig

    from megatron_lora import LoRAColumnParallelLinear, LoRAConfig
    from megatron_lora.core import te_layers
    from tests.distributed.shapes import H_IN, H_OUT

    cfg = LoRAConfig(rank=4, alpha=8, dropout=0.25, per_projection=True)
    mp = ModelParallelConfig(tensor_model_parallel_size=1, use_cpu_initialization=True,
                             perform_initialization=False)
    mp.gated_linear_unit = True  # what is_gated_fc1 reads (a TransformerConfig field)
    local = LoRAColumnParallelLinear(H_IN, H_OUT, config=mp, init_method=torch.nn.init.zeros_, bias=False,
                                     gather_output=False, lora_config=cfg, lora_init_name=NAME,
                                     tp_comm_buffer_name="fc1")
    te_config = TransformerConfig(num_layers=1, hidden_size=H_IN, num_attention_heads=4, gated_linear_unit=True)
    external = te_layers.LoRATEColumnParallelLinear(
        H_IN, H_OUT, config=te_config, init_method=torch.nn.init.zeros_, bias=False, skip_bias_add=False,
        is_expert=False, gather_output=False, tp_comm_buffer_name="fc1", lora_config=cfg, lora_init_name=NAME)
    before = (repr(local), repr(external))
    local.merge()
    return before + (repr(local),)


def test_local_and_external_layers_share_one_repr():
    local, external, merged = run_distributed(repr_worker, 1, te_double=True)[0]
    suffix = ", lora_rank=4, lora_alpha=8, per_projection=2, lora_dropout=0.25, merged=False, enabled=True)"
    assert local.startswith("LoRAColumnParallelLinear(") and local.endswith(suffix), local
    assert external.startswith("LoRATEColumnParallelLinear(in=") and external.endswith(suffix), external
    assert merged.endswith(suffix.replace("merged=False", "merged=True")), merged
