"""Rank worker of ``test_peft_moe_adapter.py``: a real Megatron MoE GPT with LoRA, the sizes of
``tests/hf_moe.py``'s tiny Qwen3-MoE (hidden 32, 4 heads in 2 groups, 4 experts of ffn 16, top-2),
loads a full adapter imported from PEFT (strict) and gathers it back."""


def load_worker(path):
    """Build the model for the layout ``parallel_state`` holds with the adapter file's LoRAConfig,
    load the file (strict: every name and shape must fit), return the gathered adapter on rank 0."""
    import json

    from megatron.core import parallel_state as ps

    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_full_adapter, read_full_adapter
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    cfg = LoRAConfig.from_dict(json.loads(read_full_adapter(path)[1]["lora_config"]))
    tp = ps.get_tensor_model_parallel_world_size()
    config = tiny_gpt_config(tp=tp, sp=tp > 1, num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=16,
                             expert_model_parallel_size=ps.get_expert_model_parallel_world_size(),
                             expert_tensor_parallel_size=ps.get_expert_tensor_parallel_world_size(),
                             moe_token_dispatcher_type="alltoall")
    model = apply_lora(build_tiny_gpt(config), cfg)
    load_full_adapter(model, path)
    return gather_full_adapter(model, dst=0)
