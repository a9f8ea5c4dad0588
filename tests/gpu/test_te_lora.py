"""LoRA on Transformer Engine layers, on a real GPU (issue 7's acceptance; TP = 1).

Skipped, with the reason printed, where there is no CUDA device or no transformer-engine: never a
silent pass. Run on a GPU machine with ``python -m pytest -m gpu tests/gpu -rs``.

NCCL cannot put two ranks on one GPU, so these tests run TP = 1; the TP > 1 math of the TE layers
is the ``external_gemm`` code they share with tests/distributed/test_external_gemm.py (CPU), and
tests/distributed/test_te_double.py runs the same TE layers at TP = 2 (+SP) on a CPU double of TE.
These tests are what checks that double's reading of TE against the real thing.

Reference: the local-spec GPT (Megatron-Core's own layers + our LoRA layers, tested against
TP = 1, transformers and peft elsewhere) with the same base weights (one dist checkpoint loaded
into both) and the same adapter.
"""

import importlib.util
import os

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                       reason="needs transformer-engine (pip install 'megatron_lora[te]')"),
]

VOCAB, SEQ, BATCH, STEPS = 256, 64, 2, 10
TARGETS = ("linear_qkv", "linear_proj", "linear_fc1", "linear_fc2")


@pytest.fixture(scope="module", autouse=True)
def process_group():
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    torch.cuda.set_device(0)
    dist.init_process_group("nccl", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    model_parallel_cuda_manual_seed(1234)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 comparisons mean fp32 GEMMs
    torch.backends.cudnn.allow_tf32 = False
    yield
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


def config(dtype=torch.float32, **overrides):
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=2, hidden_size=128, ffn_hidden_size=256, num_attention_heads=8, num_query_groups=4,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=dtype == torch.bfloat16, params_dtype=dtype,
        pipeline_dtype=dtype, **overrides)


def build(impl, dtype=torch.float32, lora=True, **overrides):
    from megatron_lora import LoRAConfig, apply_lora
    from megatron_lora.training.gpt import build_gpt_stage

    cfg = LoRAConfig(rank=8, alpha=16.0, target_modules=TARGETS)
    model = build_gpt_stage(config(dtype, **overrides), VOCAB, SEQ, lora_config=cfg if lora else None,
                            transformer_impl=impl, position_embedding_type="rope").cuda()
    return apply_lora(model, cfg) if lora else model


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """One base checkpoint, saved from the local spec; both specs load it."""
    from megatron_lora.training.model_checkpoint import save_model

    root = str(tmp_path_factory.mktemp("base"))
    save_model(build("local", lora=False), root, iteration=1, model_args={})
    return root


@pytest.fixture(scope="module")
def adapter():
    """A random full adapter (B != 0, so the branch matters)."""
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter

    g = torch.Generator().manual_seed(7)
    full = gather_full_adapter(build("local"))
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in full.items()}


def loaded(impl, base_dir, adapter, dtype=torch.float32, **overrides):
    from megatron_lora.core.checkpoint.adapter import load_full_adapter
    from megatron_lora.training.model_checkpoint import load_model

    model = build(impl, dtype, **overrides)
    load_model(model, base_dir)
    load_full_adapter(model, {k: v.to(dtype) for k, v in adapter.items()})
    return model


def batch(step=0):
    g = torch.Generator().manual_seed(100 + step % 2)
    tokens = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g).cuda()
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def forward(model, inputs, labels=None):
    positions = torch.arange(SEQ, device="cuda")[None].expand(BATCH, -1)
    return model(inputs, positions, None, labels=labels)


def train(model, steps=STEPS, lr=1e-3):
    from megatron_lora import lora_parameters

    opt = torch.optim.AdamW(lora_parameters(model), lr=lr)
    losses = []
    for step in range(steps):
        inputs, labels = batch(step)
        loss = forward(model, inputs, labels).float().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_te_layers_are_in_place(base_dir, adapter):
    from megatron_lora.core.te_layers import LoRATELayerNormColumnParallelLinear, LoRATERowParallelLinear

    layer = loaded("transformer_engine", base_dir, adapter).decoder.layers[0]
    assert isinstance(layer.self_attention.linear_qkv, LoRATELayerNormColumnParallelLinear)
    assert isinstance(layer.mlp.linear_fc1, LoRATELayerNormColumnParallelLinear)
    assert isinstance(layer.self_attention.linear_proj, LoRATERowParallelLinear)
    assert isinstance(layer.mlp.linear_fc2, LoRATERowParallelLinear)


def test_te_spec_logits_and_fp32_trajectory_match_the_local_spec(base_dir, adapter):
    local, te = loaded("local", base_dir, adapter), loaded("transformer_engine", base_dir, adapter)
    inputs, _ = batch()
    with torch.no_grad():
        ref, got = forward(local, inputs), forward(te, inputs)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    ref_losses, got_losses = train(local), train(te)
    torch.testing.assert_close(torch.tensor(got_losses), torch.tensor(ref_losses), rtol=1e-4, atol=0)
    assert ref_losses[-1] < ref_losses[1]


def test_adapters_move_between_local_and_te_spec(base_dir, adapter):
    """Train on one spec, load the adapter into the other: equal logits, both directions."""
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_full_adapter
    from megatron_lora.core.inject import global_module_names

    inputs, _ = batch()
    for source_impl, target_impl in (("transformer_engine", "local"), ("local", "transformer_engine")):
        source = loaded(source_impl, base_dir, adapter)
        train(source, steps=3)
        target = loaded(target_impl, base_dir, adapter)
        load_full_adapter(target, gather_full_adapter(source))
        with torch.no_grad():
            torch.testing.assert_close(forward(target, inputs), forward(source, inputs), atol=1e-4, rtol=1e-4)
    names = lambda m: {n for n in global_module_names(m).values() if n.endswith(TARGETS)}  # noqa: E731
    assert names(loaded("local", base_dir, adapter)) == names(loaded("transformer_engine", base_dir, adapter))


def _megatron_train(model, steps, fuse=False, fp8=False):
    """bf16 through Megatron's Float16Module, DDP (fp32 grads) and mixed-precision optimizer."""
    from contextlib import nullcontext

    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.transformer.module import Float16Module

    config = model.config
    config.gradient_accumulation_fusion = fuse
    wrapped = Float16Module(config, model)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module=wrapped)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=2e-3, bf16=True,
                                                 params_dtype=torch.bfloat16, clip_grad=1.0), [ddp])
    autocast = nullcontext
    if fp8:
        from transformer_engine.pytorch import fp8_autocast
        autocast = lambda: fp8_autocast(enabled=True)  # noqa: E731
    losses = []
    for step in range(steps):
        inputs, labels = batch(0)  # one batch: the adapter can fit it
        ddp.zero_grad_buffer()
        opt.zero_grad()
        with autocast():
            loss = forward(ddp, inputs, labels).float().mean()
        loss.backward()
        finalize_model_grads([ddp])
        opt.step()
        losses.append(loss.item())
    return losses


def test_bf16_te_lora_training_loss_decreases(base_dir, adapter):
    losses = _megatron_train(loaded("transformer_engine", base_dir, adapter, torch.bfloat16), 20)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses


def test_gradient_accumulation_fusion_on_te_layers_changes_nothing(base_dir, adapter):
    plain = _megatron_train(loaded("transformer_engine", base_dir, adapter, torch.bfloat16), 4)
    fused = _megatron_train(loaded("transformer_engine", base_dir, adapter, torch.bfloat16), 4, fuse=True)
    assert plain == fused


def test_fp8_base_gemms_keep_working(base_dir, adapter):
    from transformer_engine.pytorch.fp8 import check_fp8_support

    supported, reason = check_fp8_support()
    if not supported:
        pytest.skip(f"FP8 not supported on this GPU: {reason}")
    losses = _megatron_train(loaded("transformer_engine", base_dir, adapter, torch.bfloat16, fp8="hybrid"), 20,
                             fp8=True)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.9 * losses[0], losses
