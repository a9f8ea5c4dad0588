"""The training loop of ``scripts/pretrain_gpt_lora.py``, on Megatron-Core's own machinery.

Per iteration it does what Megatron-LM's ``train_step`` does, with Megatron-Core parts only:
``DistributedDataParallel`` grad buffers, the pipeline schedule of ``get_forward_backward_func``
(which calls ``finalize_model_grads``: DP reduce-scatter / all-reduce, the TP all-reduce of
sequence-parallel and replicated-LoRA partial grads, tied-embedding sync over PP), then
``get_megatron_optimizer``'s step and an ``OptimizerParamScheduler`` step.

Data order is Megatron's: sample ``iteration * global_batch + k`` in a fixed shuffle, so a
resumed run (adapter / model + optimizer + RNG state, see ``checkpoint`` / ``model_checkpoint``)
sees exactly the batches an uninterrupted run sees. Validation always reads the SAME first
``eval_iters`` batches of the validation split, so losses at different iterations (and of the
frozen base against the adapter) compare like with like.

With ``--lora-rank`` the base comes from ``--pretrained-checkpoint`` and stays frozen; ``--save``
receives only the adapter (dist checkpoint for resume, plus ``adapter.safetensors`` at the end).
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from megatron_lora.core.checkpoint.atomic_save import atomic_write_text
from megatron_lora.core.checkpoint.errors import CheckpointError
from megatron_lora.training.checkpoint_dirs import describe_mismatch
from megatron_lora.training.pretrain_args import (
    UsageError,
    model_args,
    model_dtype,
    transformer_config_from_args,
)

METRICS_FILE = "metrics.json"  # this run's losses, for scripts (rank 0 writes it into --save)


class Log:
    """Rank 0 prints lines; a progress bar on stderr when it is a terminal; optional TensorBoard."""

    def __init__(self, args, rank0: bool):
        self.rank0 = rank0
        self.bar = self.rank0 and not args.no_progress_bar and sys.stderr.isatty()
        self.writer = None
        if self.rank0 and args.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter  # validate_args checked it exists

            self.writer = SummaryWriter(log_dir=args.tensorboard_dir)

    def line(self, text: str) -> None:
        if self.rank0:
            if self.bar:
                sys.stderr.write("\r\033[K")
            print(text, flush=True)

    def progress(self, iteration: int, total: int, elapsed: float) -> None:
        if self.bar:
            done = int(30 * iteration / total)
            eta = elapsed / max(iteration, 1) * (total - iteration)
            sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {iteration}/{total} eta {eta:5.0f}s")
            sys.stderr.flush()

    def scalars(self, iteration: int, values: dict) -> None:
        if self.writer is not None:
            for name, value in values.items():
                self.writer.add_scalar(name, value, iteration)
            self.writer.flush()

    def close(self) -> None:
        if self.bar:
            sys.stderr.write("\r\033[K")
        if self.writer is not None:
            self.writer.close()


# ----------------------------------------------------------------------------------- set-up

def initialize(args) -> None:
    """Process group (NCCL, or gloo on CPU), Megatron's parallel state and seeds."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if args.use_cpu:
        from megatron_lora.cpu import enable_cpu

        enable_cpu()
    else:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("gloo" if args.use_cpu else "nccl")
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size)
    # Megatron-LM's rule: one seed per pipeline stage; TP ranks share it (the tracker adds the
    # TP rank for the model-parallel stream), DP replicas share it.
    seed = args.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def gpt_stage_from_args(args, lora_config=None, initialize: bool = True):
    """This rank's ``GPTModel`` stage for the flags (LoRA layers optional): the one builder of
    the script, the conversions and the tests. ``initialize=False`` leaves the weights
    uninitialised, for a model whose weights are loaded next."""
    from megatron_lora.training.gpt import build_gpt_stage

    config = transformer_config_from_args(args)
    config.perform_initialization = initialize
    return build_gpt_stage(
        config, args.padded_vocab_size, args.max_position_embeddings,
        lora_config=lora_config, transformer_impl=args.transformer_impl,
        position_embedding_type=args.position_embedding_type,
        rotary_base=args.rotary_base,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights)


def build_model(args, log: Log):
    """This rank's model stage: base loaded (frozen under LoRA), LoRA applied; unwrapped."""
    from megatron_lora import apply_lora
    from megatron_lora.core.checkpoint.adapter import load_full_adapter
    from megatron_lora.training.model_checkpoint import load_model, read_model_args

    model = gpt_stage_from_args(args, args.lora)
    config = model.config
    if args.pretrained_checkpoint:
        saved = read_model_args(args.pretrained_checkpoint)
        mismatch = saved and describe_mismatch(saved, model_args(args))
        if mismatch:
            raise UsageError(f"--pretrained-checkpoint {args.pretrained_checkpoint} has another "
                             f"architecture ({mismatch}); use the checkpoint's flags.")
        load_model(model, args.pretrained_checkpoint)
        log.line(f"loaded base weights from {args.pretrained_checkpoint}")
    elif args.lora is not None:
        log.line("warning: LoRA on a randomly initialised base (no --pretrained-checkpoint)")
    if args.lora is not None:
        apply_lora(model, args.lora)
        if args.lora_load:
            load_full_adapter(model, args.lora_load)
            log.line(f"loaded adapter from {args.lora_load}")
    if args.bf16 or args.fp16:
        from megatron.core.transformer.module import Float16Module

        return model, Float16Module(config, model)
    return model, model


def build_optimizer(args, config, ddp):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from megatron_lora.core.lora_plus import megatron_optimizer_kwargs

    optimizer_config = OptimizerConfig(
        optimizer="adam", lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_eps=args.adam_eps,
        clip_grad=args.clip_grad, bf16=args.bf16, fp16=args.fp16, params_dtype=model_dtype(args),
        initial_loss_scale=args.initial_loss_scale, use_distributed_optimizer=args.use_distributed_optimizer)
    plus = {} if args.lora_plus_ratio is None else megatron_optimizer_kwargs(optimizer_config, args.lora_plus_ratio)
    optimizer = get_megatron_optimizer(optimizer_config, [ddp], **plus)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if args.lr_warmup_iters else args.lr, max_lr=args.lr, min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters, lr_decay_steps=args.lr_decay_iters,
        lr_decay_style=args.lr_decay_style, start_wd=args.weight_decay, end_wd=args.weight_decay,
        wd_incr_steps=args.train_iters, wd_incr_style="constant")
    return optimizer, scheduler


# ------------------------------------------------------------------------------- one step

def _forward_step(data_iterator, model):
    """Megatron's forward_step contract: (output, loss function of that output)."""
    batch = {k: v.to(torch.cuda.current_device()) for k, v in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, functools.partial(_masked_mean_loss, batch["loss_mask"])


def _masked_mean_loss(loss_mask, per_token_loss):
    mask = loss_mask.reshape(-1).float()
    loss = (per_token_loss.float().reshape(-1) * mask).sum() / mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro-batches
    return loss, {"lm loss": loss.detach().clone()}


def _run_schedule(args, ddp, data_iterator, forward_only: bool) -> float:
    """One global batch through the pipeline schedule; the batch's mean loss on every rank."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    reduced = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=data_iterator, model=[ddp],
        num_microbatches=args.num_microbatches, seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size, decoder_seq_length=args.seq_length,
        forward_only=forward_only)
    # Only the last stage has losses; average them over micro-batches, then over DP replicas.
    mine = 0.0
    if parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0:
        mine = sum(float(r["lm loss"]) for r in reduced) / len(reduced)
    # on the rank's device: NCCL reduces only CUDA tensors (the CPU shim maps it to the CPU)
    total = torch.tensor([mine], dtype=torch.float64, device=torch.cuda.current_device())
    dist.all_reduce(total)
    return total.item() / args.data_parallel_size


def _batches(args, dataset, consumed_samples: int):
    from megatron.core import parallel_state

    from megatron_lora.training.data import micro_batches

    return micro_batches(dataset, consumed_samples, args.micro_batch_size,
                         parallel_state.get_data_parallel_rank(), args.data_parallel_size)


def evaluate(args, model, ddp, valid) -> float:
    """Mean loss over the first ``eval_iters`` global batches of the validation split."""
    iterator = _batches(args, valid, 0)
    model.eval()
    with torch.no_grad():
        losses = [_run_schedule(args, ddp, iterator, forward_only=True) for _ in range(args.eval_iters)]
    model.train()
    return sum(losses) / len(losses)


# ------------------------------------------------------------------------------ checkpoints

def save(args, model, optimizer, iteration: int, consumed_samples: int, final: bool) -> None:
    from megatron_lora.core.checkpoint.adapter import save_adapter, save_full_adapter
    from megatron_lora.core.checkpoint.files import FULL_ADAPTER_FILE
    from megatron_lora.training.model_checkpoint import save_model

    from torch.distributed.checkpoint.api import CheckpointException

    optim = None if args.no_save_optim else optimizer
    record = {"consumed_samples": consumed_samples}
    if args.lora_plus_ratio is not None:
        record["lora_plus_ratio"] = args.lora_plus_ratio  # the optimizer's parameter groups (checked on resume)
    try:
        if args.lora is not None:
            record["base"] = base_identity(args.pretrained_checkpoint)
            record["model_args"] = model_args(args)  # the architecture it adapts (checked on resume)
            save_adapter(model, args.save, iteration, optimizer=optim, save_rng=not args.no_save_rng,
                         record=record)
            if final:
                save_full_adapter(model, os.path.join(args.save, FULL_ADAPTER_FILE))
        else:
            save_model(model, args.save, iteration, model_args(args), optimizer=optim,
                       save_rng=not args.no_save_rng, record=record)
    except (OSError, CheckpointException) as err:  # the latter is a BaseException
        raise CheckpointError(failed_save_message(args, iteration, err)) from err


def failed_save_message(args, iteration: int, err: BaseException) -> str:
    """One line for a save that failed midway (disk full, quota, a lost mount): the reason, and
    that the previous complete checkpoint is untouched (saves are atomic: docs/design.md §7)."""
    from megatron_lora.core.checkpoint import files

    reason = getattr(err, "strerror", None) or str(err).strip().splitlines()[0][:200]
    tracker = files.ADAPTER_TRACKER if args.lora is not None else files.MODEL_TRACKER
    try:
        with open(os.path.join(args.save, tracker), encoding="utf-8") as f:
            kept = f"the latest complete checkpoint, iteration {f.read().strip()}, is intact"
    except OSError:
        kept = "no earlier checkpoint was there"
    return f"--save {args.save}: saving iteration {iteration} failed ({reason}); {kept}."


def base_identity(pretrained_checkpoint):
    """The base an adapter trains on, as its checkpoint records it: the path and a digest of the
    base checkpoint's ``.metadata`` (None: a randomly initialised base)."""
    import hashlib

    from megatron_lora.training.model_checkpoint import resolve

    if pretrained_checkpoint is None:
        return None
    with open(os.path.join(resolve(pretrained_checkpoint), ".metadata"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return {"path": os.path.abspath(pretrained_checkpoint), "metadata_sha256": digest}


def _check_same_base(args, record: dict) -> None:
    """An adapter resumes on the base it was trained on (checkpoints that record it)."""
    if "base" not in record:
        return
    saved, current = record["base"], base_identity(args.pretrained_checkpoint)
    if saved == current or (saved and current and saved["metadata_sha256"] == current["metadata_sha256"]):
        return
    if saved is None:
        raise UsageError(f"--load {args.load}: the adapter was trained on a randomly initialised base, "
                         f"this run loads --pretrained-checkpoint {args.pretrained_checkpoint}; drop the flag "
                         "or start a new adapter.")
    found = "no --pretrained-checkpoint" if current is None else f"--pretrained-checkpoint {current['path']}, another checkpoint"
    raise UsageError(f"--load {args.load}: the adapter was trained on the base {saved['path']}, this run has "
                     f"{found}; pass --pretrained-checkpoint {saved['path']}.")


def resume(args, model, optimizer, log: Log):
    """Load the latest checkpoint under ``--load``: (iteration, consumed samples) to continue from,
    (0, 0) without one. The consumed samples are the checkpoint's own count, so a resumed run with
    another batch size reads on from where the data stopped.

    Weights and optimizer state reshard to this run's TP / PP / DP layout; RNG state is per rank
    and resumes only on the layout that saved it (else it is dropped with a warning, as it is
    with ``--no-load-rng``). A checkpoint saved without optimizer or RNG state resumes without.
    """
    from megatron_lora.core.checkpoint import adapter as checkpoint
    from megatron_lora.training import model_checkpoint
    from megatron_lora.core.checkpoint.atomic_save import iteration_dir
    from megatron_lora.core.checkpoint.files import read_descriptor

    if not args.load:
        return 0, 0
    module = checkpoint if args.lora is not None else model_checkpoint
    latest = module.latest_iteration(args.load)
    if latest is None:  # checked before start: only the resume-or-start launch gets here
        log.line(f"no checkpoint under --load {args.load} yet; starting at iteration 0")
        return 0, 0
    if args.lora is not None:
        record = read_descriptor(iteration_dir(args.load, latest))
        _check_same_base(args, record)
        architecture = record.get("model_args", {})  # adapters saved before it was recorded: none
    else:
        record = architecture = model_checkpoint.read_model_args(args.load) or {}
    mismatch = describe_mismatch(architecture, model_args(args))
    if mismatch:
        raise UsageError(f"--load {args.load} has another architecture ({mismatch}); resume with the "
                         "checkpoint's flags.")
    load_optim, load_rng = _resumable_state(args, record, log)
    optim = optimizer if load_optim else None
    if args.lora is not None:
        iteration = checkpoint.load_adapter(model, args.load, optimizer=optim, load_rng=load_rng)
    else:
        iteration = model_checkpoint.load_model(model, args.load, optimizer=optim, load_rng=load_rng)
    consumed = int(record.get("consumed_samples", iteration * args.global_batch_size))
    log.line(f"resumed from {args.load} at iteration {iteration} ({consumed} samples consumed)")
    return iteration, consumed


def _resumable_state(args, record: dict, log: Log):
    """(load the optimizer state, load the RNG state) for the checkpoint ``record`` describes."""
    from megatron_lora.core.checkpoint import dist_state

    layout = dist_state.layout_record()
    load_optim = not args.no_load_optim and bool(record.get("has_optimizer"))
    if not args.no_load_optim and not record.get("has_optimizer"):
        log.line(f"warning: --load {args.load} holds no optimizer state (saved with --no-save-optim): "
                 "the optimizer starts afresh")
    saved_dtype, dtype = record.get("params_dtype"), str(model_dtype(args)).replace("torch.", "")
    if load_optim and saved_dtype is not None and saved_dtype != dtype:
        raise UsageError(f"--load {args.load} was saved with {saved_dtype} parameters, this run has {dtype} "
                         "(--bf16 / --fp16): its optimizer state does not fit. Resume with the precision "
                         "it was saved with, or pass --no-load-optim to restart the optimizer.")
    saved_ratio = record.get("lora_plus_ratio")
    if load_optim and saved_ratio != args.lora_plus_ratio:
        said = lambda ratio: "without --lora-plus-ratio" if ratio is None else f"with --lora-plus-ratio {ratio:g}"  # noqa: E731
        raise UsageError(f"--load {args.load} was saved {said(saved_ratio)}, this run is {said(args.lora_plus_ratio)}: "
                         "its optimizer state has other learning-rate groups. Resume with the same ratio, or "
                         "pass --no-load-optim to restart the optimizer.")
    load_rng = not args.no_load_rng and bool(record.get("has_rng"))
    saved_layout = record.get("layout")
    same_layout = saved_layout == layout if saved_layout else record.get("world_size") == args.world_size
    if load_rng and not same_layout:
        described = saved_layout or f"{record.get('world_size')} ranks"
        log.line(f"warning: --load {args.load} holds RNG state of another layout ({described}, this run "
                 f"{layout}): not restored, so dropout draws differ from an uninterrupted run")
        load_rng = False
    elif not args.no_load_rng and not record.get("has_rng"):
        log.line(f"warning: --load {args.load} holds no RNG state (saved with --no-save-rng): not restored")
    return load_optim, load_rng


def save_merged(args, model, log: Log) -> None:
    """Fold the adapter into the base and write a plain (no-LoRA) model checkpoint."""
    from megatron_lora import merge_lora, unmerge_lora
    from megatron_lora.training.model_checkpoint import save_model

    merge_lora(model)
    try:
        plain_args = dict(model_args(args))
        save_model(model, args.lora_save_merged, 0, plain_args)
    finally:
        unmerge_lora(model)
    log.line(f"saved the merged model (base + adapter) to {args.lora_save_merged}")


# ----------------------------------------------------------------------------------- train

def _replicated_factors_identical(model) -> tuple:
    """(identical, total) over replicated LoRA factors, compared bitwise across each TP group.

    They must be identical by construction (docs/design.md §3); a run that prints less than total/total
    has a bug, so the script reports it at the end of every TP > 1 LoRA run.
    """
    from megatron_lora import lora_modules
    from megatron_lora.core import collectives as C
    same = total = 0
    for m in lora_modules(model):
        for factor in m.lora_tensor_names():
            if m.lora_layout.partition_dim(factor) is None and C.group_size(m.lora_group) > 1:
                copies = C.all_gather_list(getattr(m, factor).detach(), m.lora_group)
                same += all(torch.equal(c, copies[0]) for c in copies)
                total += 1
    from megatron.core import parallel_state

    counts = torch.tensor([same, total], device=torch.cuda.current_device())
    if parallel_state.get_tensor_model_parallel_rank() or parallel_state.get_data_parallel_rank():
        counts.zero_()  # count each logical factor once: sum over pipeline stages only
    dist.all_reduce(counts)
    return int(counts[0]), int(counts[1])


def _expert_layout(args) -> str:
    """The experts' share of the layout line: ETP x EP x expert-DP per pipeline stage, and the MoE."""
    if args.num_experts is None:
        return ""
    return (f", experts ETP {args.expert_tensor_parallel_size} x EP {args.expert_model_parallel_size} x "
            f"expert-DP {args.expert_data_parallel_size} ({args.num_experts} experts, top-{args.moe_router_topk}, "
            f"{args.moe_token_dispatcher_type})")


def pretrain(args) -> dict:
    """Run the job the flags describe; returns {"losses": {iteration: loss}, "valid": ...}."""
    from megatron.core import parallel_state
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_lora import adapters_disabled
    from megatron_lora.training.data import build_gpt_datasets, build_tokenizer
    from megatron_lora.training.preemption import INTERVAL, ExitCheck

    start = time.time()
    # installed first: a signal that arrives while the model is being built still stops the run
    # cleanly, after its first iteration
    exit_check = ExitCheck(args.exit_signal if args.exit_signal_handler else None,
                           args.exit_duration_in_mins, start)
    initialize(args)
    log = Log(args, rank0=dist.get_rank() == 0)
    dp, tp, pp = args.data_parallel_size, args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    log.line(f"world {args.world_size} = TP {tp} x PP {pp} x DP {dp}"
             f"{' + SP' if args.sequence_parallel else ''}{_expert_layout(args)} on "
             f"{'CPU/gloo' if args.use_cpu else 'GPU/NCCL'}; "
             f"global batch {args.global_batch_size} = {args.num_microbatches} micro-batches of "
             f"{args.micro_batch_size} x DP {dp}")
    train_ds, valid_ds, _ = build_gpt_datasets(
        args.data_path, args.split, args.seq_length, args.seed,
        (args.train_iters * args.global_batch_size, args.eval_iters * args.global_batch_size, 0),
        build_tokenizer(args.tokenizer_type, args.tokenizer_model), args.data_cache_path)
    model, wrapped = build_model(args, log)
    config = model.config
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.bf16 or args.fp16, use_distributed_optimizer=args.use_distributed_optimizer), module=wrapped)
    optimizer, scheduler = build_optimizer(args, config, ddp)
    config.no_sync_func = ddp.no_sync
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.line(f"{'LoRA r=%d on %s: ' % (args.lora.rank, ' '.join(args.lora.target_modules)) if args.lora else ''}"
             f"{trainable:,} trainable of {sum(p.numel() for p in model.parameters()):,} parameters "
             f"on rank 0 (TP/PP shard)")

    iteration, consumed = resume(args, model, optimizer, log)
    scheduler.step(increment=iteration)
    result = {"losses": {}, "valid": {}}
    if args.lora is not None and args.eval_iters and valid_ds is not None:
        with adapters_disabled(model):
            result["valid"]["base"] = evaluate(args, wrapped, ddp, valid_ds)
        log.line(f"validation lm loss of the frozen base: {result['valid']['base']:.6E}")

    data = _batches(args, train_ds, consumed)
    tokens_per_iter = args.global_batch_size * args.seq_length
    window_start, window_losses = time.time(), []
    exit_reason = exit_text = None
    while iteration < args.train_iters:
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = _run_schedule(args, ddp, data, forward_only=False)
        lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
        _, grad_norm, _ = optimizer.step()
        scheduler.step(increment=1)
        iteration += 1
        consumed += args.global_batch_size
        result["losses"][iteration] = loss
        window_losses.append(loss)
        if not math.isfinite(loss):
            raise FloatingPointError(f"lm loss is {loss} at iteration {iteration}; lower --lr or check the data.")
        if iteration % args.log_interval == 0 or iteration == args.train_iters:
            seconds = time.time() - window_start
            mean = sum(window_losses) / len(window_losses)
            tps = tokens_per_iter * len(window_losses) / max(seconds, 1e-9)
            log.line(f"iteration {iteration:6d}/{args.train_iters} | consumed samples "
                     f"{consumed:8d} | lm loss {mean:.6E} | lr {lr:.3E} | "
                     f"grad norm {float(grad_norm or 0.0):.4f} | tokens/s {tps:8.0f} | elapsed {time.time() - start:7.1f}s")
            log.scalars(iteration, {"lm loss": mean, "learning rate": lr, "grad norm": float(grad_norm or 0.0),
                                    "tokens per second": tps})
            window_start, window_losses = time.time(), []
        log.progress(iteration, args.train_iters, time.time() - start)
        if args.eval_iters and valid_ds is not None and iteration % args.eval_interval == 0 \
                and iteration < args.train_iters:
            value = evaluate(args, wrapped, ddp, valid_ds)
            result["valid"][iteration] = value
            log.line(f"validation lm loss at iteration {iteration}: {value:.6E}")
            log.scalars(iteration, {"validation lm loss": value})
        if args.save and args.save_interval and iteration % args.save_interval == 0 \
                and iteration < args.train_iters:
            save(args, model, optimizer, iteration, consumed, final=False)
            log.line(f"saved checkpoint at iteration {iteration} to {args.save}")
        if args.exit_interval and iteration % args.exit_interval == 0 and iteration < args.train_iters:
            exit_reason, exit_text = INTERVAL, f"--exit-interval {args.exit_interval}"
            break
        exit_reason = exit_check.reason() if iteration < args.train_iters else None
        if exit_reason:
            exit_text = exit_check.describe(exit_reason)
            break

    if args.eval_iters and valid_ds is not None and exit_reason is None:
        value = evaluate(args, wrapped, ddp, valid_ds)
        result["valid"]["final"] = value
        log.scalars(iteration, {"validation lm loss": value})
        if "base" in result["valid"]:
            log.line(f"validation lm loss: frozen base {result['valid']['base']:.4f} -> "
                     f"LoRA {value:.4f} after {iteration} iterations")
        else:
            log.line(f"validation lm loss after {iteration} iterations: {value:.6E}")
    if args.save:
        save(args, model, optimizer, iteration, consumed, final=exit_reason is None)
        log.line(f"saved {'adapter' if args.lora else 'checkpoint'} at iteration {iteration} to {args.save}")
    if args.lora_save_merged and exit_reason is None:
        save_merged(args, model, log)
    if args.lora is not None and args.tensor_model_parallel_size > 1:
        same, total = _replicated_factors_identical(model)
        log.line(f"replicated LoRA factors bitwise identical across TP ranks: {same}/{total}")
        if same != total:
            raise RuntimeError(f"only {same} of {total} replicated LoRA factors agree across "
                                     "TP ranks: a bug in megatron_lora, please report it.")
    if args.save and log.rank0:
        atomic_write_text(os.path.join(args.save, METRICS_FILE), json.dumps(
            {"iteration": iteration, "losses": result["losses"], "valid": result["valid"],
             "exit_reason": exit_reason}, indent=1))
    if exit_reason:
        log.line(f"exiting at iteration {iteration}: {exit_text}")
    exit_check.close()
    log.close()
    result["iteration"] = iteration
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return result
