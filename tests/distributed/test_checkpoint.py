"""Adapter checkpoints across layouts (docs/design.md §7): train at TP=2, save, load anywhere.

Reference: the saved model's own outputs (gathered logits, per-token losses) and its gathered
logical adapter. Every layout loads from the same base weights (gpt_cases.load_base).
"""

import os
import shutil

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import gpt_cases as G
from tests.distributed.launcher import run_distributed

TRAIN_STEPS = 3


def _outputs(model):
    """(gathered logits or None, per-token loss or None) of one fixed batch on this stage."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    inputs, labels = G.batches(1)[0]
    positions = torch.arange(inputs.shape[1]).unsqueeze(0).expand(inputs.shape[0], -1)
    model.eval()
    if ps.get_pipeline_model_parallel_world_size() == 1:
        with torch.no_grad():
            logits = model(inputs, positions, None)  # [b, s, vocab/t]
            loss = model(inputs, positions, None, labels=labels)
        shards = [torch.empty_like(logits) for _ in range(ps.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(shards, logits.contiguous(), group=ps.get_tensor_model_parallel_group())
        return torch.cat(shards, dim=-1), loss

    def step(data_iterator, m):
        batch = next(data_iterator)
        out = m(batch["input_ids"] if ps.is_pipeline_first_stage() else None, batch["position_ids"],
                None, labels=batch["labels"])
        return out, lambda loss: (loss.mean(), {"per_token": loss.detach().clone()})

    batch = dict(input_ids=inputs, position_ids=positions, labels=labels)
    out = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=inputs.shape[1], micro_batch_size=inputs.shape[0], forward_only=True)
    return None, (out[0]["per_token"] if ps.is_pipeline_last_stage() else None)


def save_worker(full_state, root):
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, save_adapter, save_full_adapter

    model = G.build_lora_gpt(full_state)
    G.plain_train(model, TRAIN_STEPS)
    save_adapter(model, root, iteration=TRAIN_STEPS)
    save_full_adapter(model, os.path.join(root, "full.safetensors"))
    logits, loss = _outputs(model)
    return dict(logits=logits, loss=loss, adapter=gather_full_adapter(model))


def load_worker(full_state, root, how):
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_adapter, load_full_adapter

    model = G.build_lora_gpt(full_state)
    if how == "dist":
        iteration = load_adapter(model, root)
    else:
        load_full_adapter(model, os.path.join(root, "full.safetensors"))
        iteration = None
    logits, loss = _outputs(model)
    return dict(logits=logits, loss=loss, adapter=gather_full_adapter(model), iteration=iteration)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("adapter"))
    base = run_distributed(G.base_state_worker, 1)[0]
    return base, root, run_distributed(save_worker, 2, base, root, tp=2)[0]


LAYOUTS = {"tp1": dict(world=1, tp=1), "tp2": dict(world=2, tp=2), "tp4": dict(world=4, tp=4),
           "pp2": dict(world=2, tp=1, pp=2)}


@pytest.mark.parametrize("how", ["dist", "full"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tp2_adapter_loads_with_equal_outputs(saved, layout, how):
    base, root, ref = saved
    lay = LAYOUTS[layout]
    ranks = run_distributed(load_worker, lay["world"], base, root, how, tp=lay["tp"], pp=lay.get("pp", 1))
    for key, value in ref["adapter"].items():
        assert torch.equal(ranks[0]["adapter"][key], value), key
    last = ranks[-1]
    torch.testing.assert_close(last["loss"], ref["loss"], rtol=1e-5, atol=1e-6)
    if last["logits"] is not None:
        torch.testing.assert_close(last["logits"], ref["logits"], rtol=1e-5, atol=1e-5)
    if how == "dist":
        assert last["iteration"] == TRAIN_STEPS


def test_trained_adapter_is_not_trivial(saved):
    _, _, ref = saved
    assert all(torch.count_nonzero(v) for k, v in ref["adapter"].items() if k.endswith("lora_B"))


def size_worker(root):
    """A model big enough that per-file overheads do not hide what is saved (base ~8 MB)."""
    from megatron.core import parallel_state as ps

    from megatron_lora import apply_lora, lora_parameters
    from megatron_lora.core.checkpoint.adapter import save_adapter
    from tests.distributed.models import build_tiny_gpt, tiny_gpt_config

    tp = ps.get_tensor_model_parallel_world_size()
    model = build_tiny_gpt(tiny_gpt_config(tp=tp, hidden_size=256, ffn_hidden_size=1024, **G.MODEL))
    apply_lora(model, LoRAConfig(rank=16, alpha=32))
    logical = lambda p: p.numel() * p.element_size() * (tp if getattr(p, "tensor_model_parallel", False) else 1)  # noqa: E731
    lora_bytes = sum(logical(p) for p in lora_parameters(model))
    total_bytes = sum(logical(p) for p in model.parameters())
    ckpt = save_adapter(model, root, iteration=0)
    return lora_bytes, total_bytes - lora_bytes, sum(os.path.getsize(os.path.join(ckpt, f)) for f in os.listdir(ckpt))


def test_adapter_only_checkpoint_is_the_size_of_the_adapter(tmp_path):
    lora_bytes, base_bytes, size = run_distributed(size_worker, 2, str(tmp_path), tp=2)[0]
    assert lora_bytes <= size <= 1.25 * lora_bytes, (size, lora_bytes)
    assert size < base_bytes / 8, "the frozen base must not be in an adapter checkpoint"


# ----------------------------------------------------------------------- bad inputs, one by one

def bad_input_worker(full_state, root):
    from megatron_lora import lora_modules
    from megatron_lora.core.checkpoint.adapter import load_adapter, load_full_adapter, read_full_adapter, save_adapter
    from megatron_lora.core.checkpoint.errors import CheckpointError

    model = G.build_lora_gpt(full_state)
    good, _ = read_full_adapter(os.path.join(root, "full.safetensors"))
    qkv = "decoder.layers.0.self_attention.linear_qkv"
    variants = {
        "missing key": {k: v for k, v in good.items() if k != f"{qkv}.lora_B"},
        "unexpected key": {**good, "decoder.layers.7.mlp.linear_fc1.lora_A": good[f"{qkv}.lora_A"]},
        "wrong rank": {**good, f"{qkv}.lora_A": torch.zeros(8, good[f"{qkv}.lora_A"].shape[1])},
        "size not divisible by TP": {**good, f"{qkv}.lora_B": torch.zeros(good[f"{qkv}.lora_B"].shape[0] + 1, 4)},
        "transposed": {**good, f"{qkv}.lora_A": good[f"{qkv}.lora_A"].t().contiguous()},
        "non-finite": {**good, f"{qkv}.lora_B": good[f"{qkv}.lora_B"].clone().index_fill_(0, torch.tensor([3]), float("nan"))},
        "integer": {**good, f"{qkv}.lora_A": good[f"{qkv}.lora_A"].to(torch.int32)},
    }
    errors = {}
    for label, tensors in variants.items():
        try:
            load_full_adapter(model, tensors)
        except CheckpointError as err:
            errors[label] = str(err)
    truncated = os.path.join(root, f"truncated-{torch.distributed.get_rank()}.safetensors")
    data = open(os.path.join(root, "full.safetensors"), "rb").read()
    open(truncated, "wb").write(data[: len(data) // 2])
    damaged = os.path.join(root, f"damaged-{torch.distributed.get_rank()}")
    if torch.distributed.get_rank() == 0:
        shutil.copytree(root, os.path.join(root, "damaged"), ignore=shutil.ignore_patterns("damaged*", "*.safetensors"))
        data_file = os.path.join(root, "damaged", f"iter_{TRAIN_STEPS:07d}", "__0_0.distcp")
        data = open(data_file, "rb").read()
        open(data_file, "wb").write(data[: len(data) // 2])
    torch.distributed.barrier()
    damaged = os.path.join(root, "damaged")
    stale = os.path.join(root, "stale")
    if torch.distributed.get_rank() == 0:
        shutil.copytree(root, stale, ignore=shutil.ignore_patterns("damaged*", "*.safetensors", "diverged"))
        with open(os.path.join(stale, "latest_adapter_iteration.txt"), "w") as f:
            f.write("99")
    torch.distributed.barrier()
    diverged = G.build_lora_gpt(full_state)
    with torch.no_grad():
        next(m for m in lora_modules(diverged)).lora_A.fill_(float("inf"))  # rank 0 and 1 alike
    save_adapter(diverged, os.path.join(root, "diverged"), iteration=1)
    for label, call in {
        "non-finite dist checkpoint": lambda: load_adapter(model, os.path.join(root, "diverged")),
        "tracker names a missing iteration": lambda: load_adapter(model, stale),
        "truncated dist checkpoint": lambda: load_adapter(model, damaged),
        "truncated safetensors": lambda: load_full_adapter(model, truncated),
        "other config (full)": lambda: load_full_adapter(G.build_lora_gpt(full_state, cfg=LoRAConfig(rank=4, alpha=32, seed=99)),
                                                         os.path.join(root, "full.safetensors")),
        "other config (dist)": lambda: load_adapter(G.build_lora_gpt(full_state, cfg=LoRAConfig(rank=4, alpha=32, seed=99)), root),
        "other rank (dist)": lambda: load_adapter(G.build_lora_gpt(full_state, cfg=LoRAConfig(rank=8, alpha=8, seed=99)), root),
    }.items():
        try:
            call()
        except CheckpointError as err:
            errors[label] = str(err)
    return errors


@pytest.fixture(scope="module")
def bad_input_errors(saved):
    base, root, _ = saved
    return run_distributed(bad_input_worker, 2, base, root, tp=2)[0]


@pytest.mark.parametrize("label, fragments", [
    ("missing key", ["missing decoder.layers.0.self_attention.linear_qkv.lora_B"]),
    ("unexpected key", ["no place for", "decoder.layers.7.mlp.linear_fc1.lora_A"]),
    ("wrong rank", ["(8, 32)", "expected the logical shape (4, 32)", "LoRA rank is 8", "--lora-rank"]),
    ("size not divisible by TP", ["(65, 4)", "TP=2", "does not divide by TP=2"]),
    ("transposed", ["(32, 4)", "looks transposed"]),
    ("non-finite", ["decoder.layers.0.self_attention.linear_qkv.lora_B holds 4 non-finite values", "earlier checkpoint"]),
    ("integer", ["decoder.layers.0.self_attention.linear_qkv.lora_A has dtype torch.int32", "floating point"]),
    ("non-finite dist checkpoint", ["iter_0000001", "decoder.layers.0.self_attention.linear_proj.lora_A holds 64",
                                    "non-finite values"]),
    ("truncated safetensors", ["truncated or corrupted"]),
    ("truncated dist checkpoint", ["__0_0.distcp in", "could not be read", "truncated or corrupted", "iteration=N"]),
    ("tracker names a missing iteration", ["iter_0000099 does not exist", "names iteration 99",
                                           f"['iter_{TRAIN_STEPS:07d}']"]),
    ("other config (full)", ["another LoRA config", "alpha: model has 32, checkpoint has 8"]),
    ("other config (dist)", ["another LoRA config", "alpha"]),
    ("other rank (dist)", ["another LoRA config", "rank: model has 8, checkpoint has 4"]),
])
def test_bad_input_raises_the_promised_error(bad_input_errors, label, fragments):
    assert label in bad_input_errors, f"{label}: no error raised"
    for fragment in fragments:
        assert fragment in bad_input_errors[label], bad_input_errors[label]


# ------------------------------------------------------------------------- crash in the middle

def crash_worker(full_state, root, crash_point):
    """Save iteration 1, then die (os._exit, like SIGKILL) in the middle of saving iteration 2."""
    import megatron.core.dist_checkpointing as dcp

    from megatron_lora.core.checkpoint import adapter as checkpoint
    from megatron_lora.core.checkpoint.adapter import save_adapter, save_full_adapter

    model = G.build_lora_gpt(full_state)
    G.plain_train(model, 2)
    save_adapter(model, root, iteration=1)
    save_full_adapter(model, os.path.join(root, "reference-iter1.safetensors"))
    G.plain_train(model, 2, first_step=2)
    original_save = dcp.save

    def dying_save(state, directory, *args, **kwargs):
        if crash_point == "between tensor writes" and torch.distributed.get_rank() == 1:
            os._exit(1)  # rank 0 may have written its shards, rank 1 never does
        original_save(state, directory, *args, **kwargs)
        if crash_point == "before commit":
            os._exit(1)  # every shard written, nothing committed

    dcp.save = dying_save
    checkpoint.save_adapter(model, root, iteration=2)
    return "survived"


def reload_worker(full_state, root):
    from megatron_lora.core.checkpoint.adapter import gather_full_adapter, load_adapter, read_full_adapter

    model = G.build_lora_gpt(full_state)
    iteration = load_adapter(model, root)
    reference, _ = read_full_adapter(os.path.join(root, "reference-iter1.safetensors"))
    return iteration, gather_full_adapter(model), reference


@pytest.mark.parametrize("crash_point", ["between tensor writes", "before commit"])
def test_crash_mid_save_leaves_the_previous_checkpoint_loadable(tmp_path, crash_point):
    base = run_distributed(G.base_state_worker, 1)[0]
    root = str(tmp_path)
    with pytest.raises(RuntimeError, match="rank"):  # a rank died, or failed when its peer did
        run_distributed(crash_worker, 2, base, root, crash_point, tp=2, timeout=120)
    iteration, loaded, reference = run_distributed(reload_worker, 2, base, root, tp=2)[0]
    assert iteration == 1
    assert loaded.keys() == reference.keys()
    for key in reference:
        assert torch.equal(loaded[key], reference[key]), key
    assert not os.path.exists(os.path.join(root, "iter_0000002"))


# ---------------------------------------------------------------- resume: optimizer + RNG state

def resume_worker(full_state, root, mode):
    """Megatron DDP + optimizer, LoRA dropout on (so RNG matters): 4 steps straight, or 2 + resume."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_lora.core.checkpoint.adapter import load_adapter, save_adapter

    model = G.build_lora_gpt(full_state, cfg=LoRAConfig(rank=4, alpha=8, seed=99, dropout=0.3))
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), module=model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=0.0), [ddp])
    first = 0
    if mode == "resume":
        first = load_adapter(model, root, optimizer=opt, load_rng=True)
    elif mode == "resume adapter only":  # what a resume without optimizer / RNG state gives
        first = load_adapter(model, root)
    losses = []
    for step, (inputs, labels) in enumerate(G.batches(4)):
        if step < first:
            continue
        ddp.zero_grad_buffer()
        opt.zero_grad()
        loss = G._loss(ddp, inputs, labels)
        loss.backward()
        finalize_model_grads([ddp])
        opt.step()
        losses.append(loss.item())
        if mode == "straight" and step == 1:
            save_adapter(model, root, iteration=2, optimizer=opt, save_rng=True)
    return losses


def test_resume_from_adapter_checkpoint_reproduces_the_losses(tmp_path):
    base = run_distributed(G.base_state_worker, 1)[0]
    straight = run_distributed(resume_worker, 2, base, str(tmp_path), "straight", tp=2)[0]
    resumed = run_distributed(resume_worker, 2, base, str(tmp_path), "resume", tp=2)[0]
    assert len(straight) == 4 and len(resumed) == 2
    assert resumed == straight[2:]  # bitwise: same adapter, Adam moments and dropout stream
    partial = run_distributed(resume_worker, 2, base, str(tmp_path), "resume adapter only", tp=2)[0]
    assert partial != straight[2:], "the test cannot tell a full resume from an adapter-only one"
