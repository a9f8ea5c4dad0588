"""Megatron-Core's training machinery runs on CPU/gloo under ``megatron_lora.cpu.enable_cpu()``.

Real processes through ``run_distributed``: the tiny GPT (weights created with
``device=torch.cuda.current_device()``) wrapped in Megatron's DDP with grad buffers, trained with
``get_megatron_optimizer`` (fp32 Adam, plain and distributed) and ``finalize_model_grads`` at TP=2
and DP=2 (also with sequence parallelism), and through the 1F1B pipeline schedule (p2p over gloo)
at PP=2 with tied embeddings; every run is done twice to show that CPU mode is deterministic.
Activation recomputation replays dropout exactly. The last tests pin down the launcher itself.
"""

import math
import os
import time

import pytest
import torch
from megatron.core import parallel_state
from megatron.core.distributed import (
    DistributedDataParallel,
    DistributedDataParallelConfig,
    finalize_model_grads,
)
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from tests.distributed.launcher import run_distributed
from tests.distributed.models import build_tiny_gpt, tiny_gpt_config
from tests.distributed.shapes import SEQ_LEN, VOCAB_SIZE

MICRO_BATCH = 2
NUM_MICROBATCHES = 2
STEPS = 2


def _batch(step, microbatch):
    """The same token batch on every rank, a pure function of (step, microbatch)."""
    g = torch.Generator().manual_seed(1000 * step + microbatch)
    tokens = torch.randint(0, VOCAB_SIZE, (MICRO_BATCH, SEQ_LEN + 1), generator=g)
    return dict(
        input_ids=tokens[:, :-1],
        labels=tokens[:, 1:],
        position_ids=torch.arange(SEQ_LEN).expand(MICRO_BATCH, SEQ_LEN),
        attention_mask=None,  # the local spec's causal mask type builds the mask
    )


def _build_trainable(tp, pp, use_distributed_optimizer, sp=False, **model_kwargs):
    """Tiny GPT in Megatron DDP (grad buffers, no overlap) plus its Megatron fp32 Adam."""
    config = tiny_gpt_config(tp=tp, pp=pp, sp=sp)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    model = DistributedDataParallel(config, ddp_config, build_tiny_gpt(config, **model_kwargs))
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=1e-2,
        clip_grad=1.0,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return model, get_megatron_optimizer(opt_config, [model])


def train_ddp(tp, sp, use_distributed_optimizer):
    """Plain forward/backward, then finalize_model_grads (DP grad reduce) and the optimizer.

    With ``sp`` the backward pass all-gathers into buffers allocated on
    ``torch.cuda.current_device()``, which only works if the CPU mode is active during backward.
    """
    model, optimizer = _build_trainable(tp, 1, use_distributed_optimizer, sp=sp)
    losses = []
    for step in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        loss = sum(model(**_batch(step, m)).mean() for m in range(NUM_MICROBATCHES))
        loss = loss / NUM_MICROBATCHES
        loss.backward()
        finalize_model_grads([model])
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful and math.isfinite(grad_norm)
        losses.append(loss.item())
    return losses


def _forward_step(data_iterator, model):
    batch = next(data_iterator)
    if not parallel_state.is_pipeline_first_stage():
        batch["input_ids"] = None  # later stages get their input from the previous stage
    output = model(**batch)

    def loss_func(per_token_loss):
        loss = per_token_loss.mean()
        return loss, {"lm loss": loss.detach().clone()}  # the schedule divides `loss` in place

    return output, loss_func


def train_pp():
    """PP=2: the 1F1B schedule with p2p over gloo, DDP grads finalized by the schedule.

    Tied embeddings make Megatron copy the embedding to the last stage (``weight.data.cuda()``)
    and all-reduce its gradient between the stages in ``finalize_model_grads``.
    """
    model, optimizer = _build_trainable(
        1, 2, use_distributed_optimizer=False, share_embeddings_and_output_weights=True
    )
    model.config.finalize_model_grads_func = finalize_model_grads
    model.config.no_sync_func = model.no_sync
    forward_backward = get_forward_backward_func()
    losses = []
    for step in range(STEPS):
        model.zero_grad_buffer()
        optimizer.zero_grad()
        out = forward_backward(
            forward_step_func=_forward_step,
            data_iterator=iter([_batch(step, m) for m in range(NUM_MICROBATCHES)]),
            model=[model],
            num_microbatches=NUM_MICROBATCHES,
            seq_length=SEQ_LEN,
            micro_batch_size=MICRO_BATCH,
        )
        update_successful, grad_norm, _ = optimizer.step()
        assert update_successful and math.isfinite(grad_norm)
        if parallel_state.is_pipeline_last_stage():
            losses.append(sum(o["lm loss"].item() for o in out) / NUM_MICROBATCHES)
    return losses


def _assert_trained(losses):
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses), losses
    assert losses[1] != losses[0], f"the optimizer step did not change the loss: {losses}"
    # Random tokens, so the loss starts near log(vocab).
    assert abs(losses[0] - math.log(VOCAB_SIZE)) < 1.0, losses


@pytest.mark.parametrize(
    "tp, sp, use_distributed_optimizer",
    [(2, False, False), (2, False, True), (2, True, False), (1, False, True)],
    ids=["tp2-adam", "tp2-distopt", "tp2-sp-adam", "dp2-distopt"],
)
def test_ddp_trains_deterministically(tp, sp, use_distributed_optimizer):
    first = run_distributed(train_ddp, 2, tp, sp, use_distributed_optimizer, tp=tp)
    assert first[0] == first[1], "both ranks see the same batch, so the same loss"
    _assert_trained(first[0])
    assert run_distributed(train_ddp, 2, tp, sp, use_distributed_optimizer, tp=tp) == first


def test_pipeline_pp2_trains_deterministically():
    first = run_distributed(train_pp, 2, pp=2)
    assert first[0] == [], "only the last stage reports losses"
    _assert_trained(first[1])
    assert run_distributed(train_pp, 2, pp=2) == first


def grads_with_recompute(recompute):
    """Weight gradients of one step at TP=2 with dropout on, with or without full recompute."""
    model_parallel_cuda_manual_seed(77)  # same init and dropout streams for both variants
    torch.manual_seed(77)
    kwargs = dict(hidden_dropout=0.2, attention_dropout=0.2)
    if recompute:
        kwargs.update(
            recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1
        )
    model = build_tiny_gpt(tiny_gpt_config(tp=2, **kwargs))
    model(**_batch(0, 0)).mean().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def test_activation_recompute_replays_dropout_exactly():
    plain = run_distributed(grads_with_recompute, 2, False, tp=2)
    recomputed = run_distributed(grads_with_recompute, 2, True, tp=2)
    for rank in range(2):
        for name, grad in plain[rank].items():
            # A different dropout mask in the recomputed forward would change these gradients.
            assert torch.equal(recomputed[rank][name], grad), (rank, name)


# The launcher every distributed test relies on.


def report_rank():
    rank = torch.distributed.get_rank()
    return dict(
        rank=rank,
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        shim_active=torch.empty(1, device="cuda").is_cpu,
        tensor=torch.full((2,), float(rank)),
    )


def test_run_distributed_returns_results_in_rank_order():
    results = run_distributed(report_rank, 2, tp=2)
    assert [r["rank"] for r in results] == [0, 1]
    assert [r["tp_rank"] for r in results] == [0, 1]
    assert all(r["shim_active"] for r in results)
    assert torch.equal(results[1]["tensor"], torch.ones(2))


def fail_on_rank_one():
    if torch.distributed.get_rank() == 1:
        raise ValueError("boom on purpose")
    torch.distributed.barrier()  # rank 0 would wait forever for rank 1


def test_run_distributed_reraises_a_rank_failure_with_its_traceback():
    with pytest.raises(RuntimeError, match="failed on rank 1") as failure:
        run_distributed(fail_on_rank_one, 2)
    assert "ValueError: boom on purpose" in str(failure.value)
    assert "in fail_on_rank_one" in str(failure.value), "the child's traceback is included"


def hang_on_rank_zero(pid_dir):
    rank = torch.distributed.get_rank()
    with open(os.path.join(pid_dir, str(rank)), "w") as f:
        f.write(str(os.getpid()))
    if rank == 0:
        time.sleep(3600)


def _running(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has finished
    except FileNotFoundError:
        return False


def test_run_distributed_kills_ranks_that_hang(tmp_path):
    with pytest.raises(TimeoutError, match=r"ranks \[0\] did not finish within timeout=4s"):
        run_distributed(hang_on_rank_zero, 2, str(tmp_path), timeout=4)
    pids = [int(p.read_text()) for p in tmp_path.iterdir()]
    assert len(pids) == 2
    assert not any(_running(pid) for pid in pids)
