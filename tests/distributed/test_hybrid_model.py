"""LoRA on Megatron-Core's HybridModel (megatron-core >= 0.19), against a GPTModel with the same weights.

A HybridModel of pattern ``"*-" * L`` is the GPT of L layers split into attention and MLP layers
(``megatron_lora.core.hybrid``). Both start from the same base weights and the same adapter; the
logits, the training trajectory and the final adapter must agree, at TP=1 and TP=2; an adapter
dist checkpoint saved at TP=2 reloads at TP=1.
"""

import os

import pytest
import torch

from tests.distributed import gpt_cases as G
from tests.distributed.launcher import run_distributed
from tests.distributed.shapes import SEQ_LEN, TINY_GPT, VOCAB_SIZE

PATTERN = "*-" * TINY_GPT["num_layers"]
STEPS = 6


def _has_hybrid_model() -> bool:
    try:
        from megatron_lora.core import compat

        compat.hybrid_model_api()
    except ImportError:
        return False
    return True


pytestmark = pytest.mark.skipif(not _has_hybrid_model(), reason="HybridModel needs megatron-core >= 0.19")


def _gathered_logits(model):
    from megatron.core import parallel_state as ps

    inputs = G.batches(1)[0][0]
    local = G.logits(model, inputs).contiguous()
    shards = [torch.empty_like(local) for _ in range(ps.get_tensor_model_parallel_world_size())]
    torch.distributed.all_gather(shards, local, group=ps.get_tensor_model_parallel_group())
    return torch.cat(shards, dim=-1)


def build_lora_hybrid(full_state, path="spec", cfg=None):
    """The tiny model as a HybridModel "*-*-" at this layout, the GPT base weights loaded, LoRA
    applied: built with LoRA layers from the spec (``path="spec"``) or converted by ``apply_lora``
    ("apply"), or built plain and given the weights of a GPT stage by ``copy_gpt_weights`` ("copy")."""
    from megatron_lora import apply_lora
    from megatron_lora.core.hybrid import build_hybrid_stage, copy_gpt_weights, hybrid_key_of_gpt
    from tests.distributed.models import tiny_gpt_config, tp_rank

    cfg = cfg or G.lora_cfg()
    config = tiny_gpt_config(tp=tp_rank()[0], **{**G.MODEL, "num_layers": len(PATTERN)})
    model = build_hybrid_stage(config, VOCAB_SIZE, SEQ_LEN, PATTERN, lora_config=cfg if path == "spec" else None,
                               position_embedding_type="rope", share_embeddings_and_output_weights=False)
    if path == "copy":  # the way a GPT checkpoint (e.g. converted from Hugging Face) reaches it
        copy_gpt_weights(model, G.build_lora_gpt(full_state, cfg=cfg))
    else:
        G.load_base(model, {hybrid_key_of_gpt(k): v for k, v in full_state.items()})
    return apply_lora(model, cfg)


def hybrid_vs_gpt_worker(full_state, path, cfg=None):
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_full_adapter

    gpt = G.build_lora_gpt(full_state, cfg=cfg)
    hybrid = build_lora_hybrid(full_state, path, cfg)
    load_full_adapter(hybrid, gather_full_adapter(gpt))  # the same adapter, by its GPT names
    out = {"logits": (_gathered_logits(gpt), _gathered_logits(hybrid))}
    out["losses"] = (G.plain_train(gpt, STEPS), G.plain_train(hybrid, STEPS))
    out["adapters"] = (gather_full_adapter(gpt), gather_full_adapter(hybrid))
    out["trained_logits"] = (_gathered_logits(gpt), _gathered_logits(hybrid))
    return out


@pytest.mark.parametrize("tp,path", [(1, "spec"), (2, "spec"), (2, "apply"), (2, "copy")])
def test_hybrid_model_matches_gpt_with_the_same_weights(tp, path):
    _assert_hybrid_matches_gpt(run_distributed(hybrid_vs_gpt_worker, tp, G.base_state(), path, tp=tp)[0])


@pytest.mark.parametrize("path", ["spec", "apply"])
def test_per_projection_hybrid_model_matches_gpt(path):
    """Per-projection LoRA (issue 18): HybridModel's linear_qkv and gated linear_fc1 are the GPT's."""
    from tests.distributed.per_projection_cases import PER_PROJECTION

    _assert_hybrid_matches_gpt(run_distributed(hybrid_vs_gpt_worker, 2, G.base_state(), path, PER_PROJECTION, tp=2)[0])


def _assert_hybrid_matches_gpt(out):
    gpt_logits, hybrid_logits = out["logits"]
    torch.testing.assert_close(hybrid_logits, gpt_logits, rtol=1e-6, atol=1e-6)
    gpt_losses, hybrid_losses = out["losses"]
    assert gpt_losses[-1] < gpt_losses[0]  # the adapter trained
    torch.testing.assert_close(torch.tensor(hybrid_losses), torch.tensor(gpt_losses), rtol=1e-5, atol=0)
    gpt_adapter, hybrid_adapter = out["adapters"]
    assert sorted(hybrid_adapter) == sorted(gpt_adapter) and len(gpt_adapter) == G.ADAPTER_TENSORS
    for name, tensor in gpt_adapter.items():
        torch.testing.assert_close(hybrid_adapter[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    torch.testing.assert_close(*out["trained_logits"][::-1], rtol=1e-5, atol=1e-5)


def save_worker(full_state, root):
    from megatron_lora import save_adapter

    model = build_lora_hybrid(full_state)
    G.plain_train(model, 3)
    save_adapter(model, root, iteration=3)
    return _gathered_logits(model)


def load_worker(full_state, root):
    from megatron_lora import load_adapter

    model = build_lora_hybrid(full_state)
    assert load_adapter(model, root) == 3
    return _gathered_logits(model)


def test_hybrid_adapter_checkpoint_saved_at_tp2_loads_at_tp1(tmp_path):
    root = os.path.join(str(tmp_path), "adapter")
    saved = run_distributed(save_worker, 2, G.base_state(), root, tp=2)[0]
    loaded = run_distributed(load_worker, 1, G.base_state(), root)[0]
    torch.testing.assert_close(loaded, saved, rtol=1e-5, atol=1e-6)
    assert not torch.equal(loaded, run_distributed(_fresh_logits_worker, 1, G.base_state())[0])


def _fresh_logits_worker(full_state):
    return _gathered_logits(build_lora_hybrid(full_state))

