"""LoRA on a MoE router (target ``router``, ``core/router.py``): the gating logits get exactly
``s (X A^T) B^T`` on top of the frozen router's, A is the name-seeded logical A, merge folds the
adapter into the router weight and unmerge restores its bits, and the factors carry the router
weight's reduction flags."""

import torch

from tests.distributed.launcher import run_distributed


def router_worker():
    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.core.init import logical_lora_a
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    cfg = LoRAConfig(rank=4, alpha=8, seed=3, target_modules=("router",))
    model = build_tiny_gpt(tiny_gpt_config(num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.0))
    apply_lora(model, cfg)
    router = model.decoder.layers[1].mlp.router
    torch.nn.init.normal_(router.lora_B.data)
    x = torch.randn(16, 2, 32)
    with torch.no_grad():
        got = router.gating(x)
        base = x @ router.weight.t()
        want = base + cfg.scaling * (x @ router.lora_A.t()) @ router.lora_B.t()
        weight = router.weight.clone()
        router.merge()
        merged = router.gating(x)
        router.unmerge()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    return dict(got=got, want=want, merged=merged, restored=torch.equal(weight, router.weight),
                a=router.lora_A.detach().clone(),
                logical_a=logical_lora_a((4, 32), cfg.init, cfg.seed, "decoder.layers.1.mlp.router"),
                trainable=trainable, flags=[(p.allreduce, p.sequence_parallel) for p in (router.lora_A, router.lora_B)],
                repr=repr(router))


def test_router_lora_adds_the_low_rank_term_to_the_gating_logits():
    r = run_distributed(router_worker, 1)[0]
    torch.testing.assert_close(r["got"], r["want"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(r["merged"], r["want"], rtol=1e-5, atol=1e-5)
    assert r["restored"], "unmerge must give the router weight back bit for bit"
    assert torch.equal(r["a"], r["logical_a"]), "A is the name-seeded logical A"
    assert r["trainable"] == [f"decoder.layers.{i}.mlp.router.lora_{f}" for i in (0, 1) for f in "AB"]
    assert r["flags"] == [(True, False), (True, False)]  # dense DP reduction; no SP here
    assert "lora_rank=4" in r["repr"] and "experts=4" in r["repr"]


def spec_path_worker():
    """The same model built from the LoRA layer spec (0.19 names the router in it; 0.16 builds it
    inside MoELayer, and apply_lora swaps it): the same logical A as the built-model path."""
    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.core.init import logical_lora_a
    from megatron_lora.core.router import LoRATopKRouter
    from megatron_lora.training.gpt import build_gpt_stage
    from tests.distributed.models import tiny_gpt_config
    from tests.distributed.shapes import SEQ_LEN, VOCAB_SIZE

    cfg = LoRAConfig(rank=4, alpha=8, seed=3, target_modules=("router", "experts.linear_fc1"))
    model = build_gpt_stage(tiny_gpt_config(num_moe_experts=4, moe_router_topk=2, moe_aux_loss_coeff=0.0),
                            VOCAB_SIZE, SEQ_LEN, lora_config=cfg, position_embedding_type="rope")
    apply_lora(model, cfg)
    router = model.decoder.layers[1].mlp.router
    return (type(router) is LoRATopKRouter,
            torch.equal(router.lora_A.detach(),
                        logical_lora_a((4, 32), cfg.init, cfg.seed, "decoder.layers.1.mlp.router")))


def test_router_lora_from_the_spec_path_is_the_same_adapter():
    assert run_distributed(spec_path_worker, 1)[0] == (True, True)
