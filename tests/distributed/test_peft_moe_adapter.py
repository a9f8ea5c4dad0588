"""A PEFT adapter of Qwen3-MoE (fused experts, router) imported by ``megatron_from_peft`` fits a
real Megatron MoE LoRA model: its full adapter loads strictly at EP = 2 and at TP = 2 + SP with
expert-TP = 2 and EP = 2, and gathers back bit for bit (the names carry the global expert index;
an expert's fc1 rows are ``[gate; up]``). That the update equals peft's is
``tests/unit/test_peft_experts.py``; worker: ``peft_moe_cases.py``."""

import pytest
import torch

from megatron_lora.core.checkpoint.adapter import write_full_adapter
from megatron_lora.hf.peft_adapters import megatron_from_peft
from tests.distributed import peft_moe_cases as P
from tests.distributed.launcher import run_distributed

pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
pytest.importorskip("peft", reason="needs the hf extra: pip install -e '.[hf]'")

from tests.hf_moe import EXPERTS, arch_of, random_peft_model, tiny_hf  # noqa: E402

CASES = {  # adapter, import mode, layout
    "router_tp2_etp2_ep2": (dict(one_qkv_a=True), False, dict(world=4, tp=2, ep=2, etp=2)),
    "per_projection_ep2": (dict(target_parameters=EXPERTS), True, dict(world=2, tp=1, ep=2, etp=1)),
}


@pytest.mark.parametrize("case", CASES)
def test_an_imported_peft_moe_adapter_loads_strictly_and_gathers_back_bit_for_bit(case, tmp_path):
    import peft

    adapter, per_projection, layout = CASES[case]
    base = tiny_hf("qwen3_moe")
    tensors = {k: v.detach().clone() for k, v in
               peft.get_peft_model_state_dict(random_peft_model(base, **adapter)).items()}
    config = dict(peft_type="LORA", r=2, lora_alpha=6, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                  target_parameters=adapter.get("target_parameters", EXPERTS + ["mlp.gate.weight"]))
    full, cfg = megatron_from_peft(tensors, config, arch_of(base), per_projection=per_projection)
    assert ("router" in cfg.target_modules) != per_projection and cfg.per_projection == per_projection
    path = str(tmp_path / "imported.safetensors")
    write_full_adapter(full, cfg, path)
    gathered = run_distributed(P.load_worker, layout["world"], path, tp=layout["tp"],
                               expert_model_parallel_size=layout["ep"],
                               expert_tensor_parallel_size=layout["etp"])[0]
    assert sorted(gathered) == sorted(full)
    for name, tensor in full.items():
        assert torch.equal(gathered[name], tensor), name
