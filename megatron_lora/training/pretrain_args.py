"""Flags of ``scripts/pretrain_gpt_lora.py``: Megatron-LM's names, checked before any work starts.

The model, parallel-layout, optimizer, data and checkpoint flags keep Megatron-LM's spelling and
meaning (``--tensor-model-parallel-size``, ``--num-query-groups``, ``--global-batch-size``, ...)
so an existing launch line carries over; the LoRA group comes from ``megatron_lora.training.arguments``.

``validate_args`` runs on every rank before the process group exists and before anything is
written: a bad flag combination is a :class:`UsageError` whose message is one line naming the
flag, what was found and what to do.
"""

from __future__ import annotations

import argparse
import importlib.util
import os

import torch

from megatron_lora.training.arguments import add_lora_args, lora_config_from_args
from megatron_lora.training.checkpoint_dirs import check_checkpoint_dirs
from megatron_lora.core.config import DEFAULT_TARGET_MODULES, TARGET_SCOPES
from megatron_lora.training.preemption import EXIT_SIGNALS

ROUTER_TARGET = "router"  # LoRA on a MoE router's gating, opt-in (core/router.py)

# The architecture flags a checkpoint records (``model_args.json``) and a run must match.
MODEL_ARG_NAMES = (
    "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
    "kv_channels", "swiglu", "normalization", "norm_epsilon", "position_embedding_type",
    "rotary_base", "max_position_embeddings", "untie_embeddings_and_output_weights",
    "add_bias_linear", "add_qkv_bias", "padded_vocab_size", "tokenizer_type",
    "num_experts", "moe_router_topk", "moe_shared_expert_intermediate_size",
    "qk_layernorm", "moe_ffn_hidden_size", "moe_router_pre_softmax",
)
# A model_args.json written before a field was added lacks it: reading it back (``args_for_model``)
# gives the flag's default, which is what such a checkpoint's model was (off / dense MLP size).
# Not architecture, so not in that record: the expert layout (EP / ETP reshard through dist
# checkpoints, as TP does), the dispatcher and the router's auxiliary loss (how tokens travel and
# how training is steered, not what the weights mean).
TOKEN_DISPATCHERS = ("allgather", "alltoall")
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")


class UsageError(ValueError):
    """A flag combination that cannot work; the message is the one line the user sees."""


def build_parser(require_run_flags: bool = True) -> argparse.ArgumentParser:
    """The script's parser. ``require_run_flags=False`` leaves the flags every training run must
    give (sequence length, batch size, iterations, learning rate) optional: for reading model flags
    outside a run (conversions, see ``model_args_from_flags`` / ``args_for_model``)."""
    required = require_run_flags
    p = argparse.ArgumentParser(
        description="GPT pretraining / LoRA fine-tuning on Megatron-Core (Megatron-LM flag names).",
        allow_abbrev=False)
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, default=2)
    g.add_argument("--hidden-size", type=int, default=128)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="Default: 4 * hidden size.")
    g.add_argument("--num-attention-heads", type=int, default=8)
    g.add_argument("--group-query-attention", action="store_true",
                   help="Accepted for Megatron-LM compatibility; --num-query-groups decides.")
    g.add_argument("--num-query-groups", type=int, default=None, help="Default: one per head (MHA).")
    g.add_argument("--kv-channels", type=int, default=None, help="Default: hidden size / heads.")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU MLP (linear_fc1 holds [gate; up]).")
    g.add_argument("--normalization", choices=("LayerNorm", "RMSNorm"), default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--position-embedding-type", choices=("learned_absolute", "rope"),
                   default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--max-position-embeddings", type=int, default=None, help="Default: --seq-length.")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_false", dest="add_bias_linear")
    g.add_argument("--add-qkv-bias", action="store_true")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="Per-head norm (--normalization, --norm-epsilon) on queries and keys before RoPE, "
                        "one weight of --kv-channels per layer for each (Qwen3).")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--seq-length", type=int, required=required)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and activations.")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 parameters and activations, with dynamic loss scaling.")
    g.add_argument("--initial-loss-scale", type=float, default=2.0 ** 16,
                   help="First dynamic loss scale under --fp16.")
    g.add_argument("--transformer-impl", choices=("local", "transformer_engine"), default="local",
                   help="Layer implementation: Megatron-Core's local layers (any device) or "
                        "Transformer Engine's (CUDA + transformer-engine). Megatron-LM's default is "
                        "transformer_engine; ours is local so that CPU runs need no flag.")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false",
                   dest="gradient_accumulation_fusion",
                   help="Gradient-accumulation fusion (on by default where it can run: CUDA with "
                        "TE layers, or apex's fused kernel for local layers; always off on CPU).")

    g = p.add_argument_group("mixture of experts (Megatron-Core's MoELayer)")
    g.add_argument("--num-experts", type=int, default=None,
                   help="Experts per MoE layer; every layer's MLP becomes a router + experts. Default: dense.")
    g.add_argument("--moe-router-topk", type=int, default=2, help="Experts each token is routed to.")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None,
                   help="FFN size of one expert. Default: --ffn-hidden-size.")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="Softmax over all experts, then top-k, the k weights not renormalised (Hugging Face "
                        "norm_topk_prob=false). Default: top-k of the logits, then softmax over those k "
                        "(renormalised: norm_topk_prob=true, Mixtral).")
    g.add_argument("--moe-token-dispatcher-type", choices=TOKEN_DISPATCHERS, default="allgather",
                   help="How tokens reach their experts across EP ranks.")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="All local experts in one grouped GEMM (TEGroupedMLP: --transformer-impl "
                        "transformer_engine).")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0,
                   help="Weight of the router's load-balancing loss (0: off).")
    g.add_argument("--moe-router-load-balancing-type", choices=LOAD_BALANCING_TYPES, default="aux_loss",
                   help="The load-balancing loss --moe-aux-loss-coeff weighs.")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="FFN size of a shared expert every token also passes through. Default: none.")

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--expert-model-parallel-size", type=int, default=1,
                   help="Expert parallelism (EP): each rank holds num-experts / EP experts.")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="Tensor parallelism inside each expert (ETP). Default: --tensor-model-parallel-size.")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--recompute-granularity", choices=("full", "selective"), default=None)
    g.add_argument("--recompute-method", choices=("uniform", "block"), default="uniform")
    g.add_argument("--recompute-num-layers", type=int, default=1)
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: CUDA + NCCL when a GPU is present, else CPU + gloo.")
    g.add_argument("--nproc-per-node", type=int, default=None,
                   help="Start this many local ranks (instead of torchrun). Default: 1, or the "
                        "launcher's ranks when started by torchrun / srun.")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=required)
    g.add_argument("--global-batch-size", type=int, default=None,
                   help="Default: micro batch size * data-parallel size.")
    g.add_argument("--train-iters", type=int, required=required)
    g.add_argument("--lr", type=float, required=required)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=("constant", "linear", "cosine"), default="linear")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="Default: --train-iters.")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="Save and exit once this much wall time has passed.")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="Save and exit after an iteration divisible by this number.")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="On --exit-signal, finish the current iteration, save a checkpoint (--save) "
                        "and exit 0; a relaunch with --load resumes. For Slurm preemption / time limits.")
    g.add_argument("--exit-signal", choices=EXIT_SIGNALS, default="SIGTERM",
                   help="The signal --exit-signal-handler catches (Slurm: --signal=USR1@SECONDS).")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="Indexed dataset prefix(es), optionally weighted: [W1] PREFIX1 [W2 PREFIX2].")
    g.add_argument("--split", default="969,30,1", help="Train,valid,test document split weights.")
    g.add_argument("--tokenizer-type", choices=("ByteLevel", "HuggingFaceTokenizer"), default="ByteLevel")
    g.add_argument("--tokenizer-model", default=None,
                   help="Local Hugging Face tokenizer directory (--tokenizer-type HuggingFaceTokenizer).")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="Embedding rows before padding, when larger than the tokenizer's vocabulary "
                        "(e.g. a Hugging Face model whose config.vocab_size exceeds len(tokenizer)).")
    g.add_argument("--data-cache-path", default=None)

    g = p.add_argument_group("checkpointing and evaluation")
    g.add_argument("--save", default=None, help="Checkpoint directory (LoRA runs: the adapter only).")
    g.add_argument("--load", default=None, help="Resume from the latest checkpoint here, if any.")
    g.add_argument("--pretrained-checkpoint", default=None,
                   help="Base model checkpoint to start from (loaded frozen under LoRA).")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--no-save-optim", action="store_true")
    g.add_argument("--no-save-rng", action="store_true")
    g.add_argument("--no-load-optim", action="store_true",
                   help="Resume without the optimizer state (it restarts); also automatic when --load's "
                        "checkpoint has none.")
    g.add_argument("--no-load-rng", action="store_true",
                   help="Resume without the RNG state; also automatic, with a warning, when the checkpoint "
                        "has none or was saved at another TP / PP / DP layout.")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=10)

    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--no-progress-bar", action="store_true",
                   help="No progress bar (it is only drawn when stderr is a terminal).")
    add_lora_args(p)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def _known_target(target: str) -> bool:
    """A target of a GPT layer: one of the four linears, one scoped (``experts.linear_fc1``), or
    a mixture of experts' ``router`` (``core/router.py``; PEFT imports with a router name it)."""
    scope, _, leaf = target.rpartition(".")
    return target == ROUTER_TARGET or (leaf in DEFAULT_TARGET_MODULES and scope in ("", *TARGET_SCOPES))


def _fail(message: str) -> None:
    raise UsageError(message)


def validate_args(args: argparse.Namespace, world_size: int) -> argparse.Namespace:
    """Check every flag combination and fill derived values; raises UsageError (one line)."""
    from megatron_lora.training.data import DataError, check_data_prefixes

    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    for flag, value in (("--tensor-model-parallel-size", tp), ("--pipeline-model-parallel-size", pp),
                        ("--num-layers", args.num_layers), ("--hidden-size", args.hidden_size),
                        ("--num-attention-heads", args.num_attention_heads),
                        ("--micro-batch-size", args.micro_batch_size), ("--seq-length", args.seq_length),
                        ("--train-iters", args.train_iters)):
        if value < 1:
            _fail(f"{flag} must be >= 1, found {value}.")
    if world_size % (tp * pp):
        _fail(f"{world_size} ranks do not divide into TP={tp} x PP={pp}; start a multiple of "
              f"{tp * pp} ranks (--nproc-per-node / torchrun --nproc-per-node).")
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * pp)
    fill_model_defaults(args)
    check_moe_args(args, world_size)
    heads = args.num_attention_heads
    if heads % tp:
        _fail(f"--num-attention-heads {heads} does not divide by --tensor-model-parallel-size {tp}; "
              f"pick a TP size that divides {heads}.")
    if args.num_query_groups % tp or heads % args.num_query_groups:
        _fail(f"--num-query-groups {args.num_query_groups} must divide --num-attention-heads {heads} "
              f"and divide by --tensor-model-parallel-size {tp}.")
    if args.kv_channels is None and args.hidden_size % heads:
        _fail(f"--hidden-size {args.hidden_size} does not divide by --num-attention-heads {heads}; "
              "set --kv-channels or change the sizes.")
    if args.ffn_hidden_size % tp:
        _fail(f"--ffn-hidden-size {args.ffn_hidden_size} does not divide by TP={tp}.")
    if args.num_layers % pp:
        _fail(f"--num-layers {args.num_layers} does not divide by --pipeline-model-parallel-size {pp}.")
    if args.sequence_parallel and tp == 1:
        _fail("--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits the sequence "
              "over the TP ranks); drop the flag or raise the TP size.")
    if args.sequence_parallel and args.seq_length % tp:
        _fail(f"--seq-length {args.seq_length} does not divide by TP={tp}, which --sequence-parallel needs.")
    step = args.micro_batch_size * args.data_parallel_size
    args.global_batch_size = args.global_batch_size or step
    if args.global_batch_size % step:
        _fail(f"--global-batch-size {args.global_batch_size} is not a multiple of --micro-batch-size "
              f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}.")
    args.num_microbatches = args.global_batch_size // step
    args.lr_decay_iters = args.lr_decay_iters or args.train_iters
    if args.lr_warmup_iters and args.lr_warmup_iters >= args.lr_decay_iters:
        _fail(f"--lr-warmup-iters {args.lr_warmup_iters} must be below --lr-decay-iters {args.lr_decay_iters} "
              "(default: --train-iters); Megatron's scheduler refuses it. Shorten the warm-up or train longer.")
    if args.save_interval is not None and args.save_interval < 1:
        _fail(f"--save-interval must be >= 1, found {args.save_interval}.")
    if args.data_path is None:
        _fail("--data-path is required: an indexed dataset prefix made by scripts/preprocess_data.py.")
    try:
        check_data_prefixes(args.data_path)
    except DataError as err:
        _fail(str(err))
    if args.pretrained_checkpoint is not None and not os.path.isdir(args.pretrained_checkpoint):
        _fail(f"--pretrained-checkpoint {args.pretrained_checkpoint}: no such directory; pass a "
              "checkpoint saved with --save.")
    if args.lora_load is not None and not os.path.exists(args.lora_load):
        _fail(f"--lora-load {args.lora_load}: no such file; pass a full adapter (.safetensors).")
    if args.lora_load is not None and os.path.isdir(args.lora_load):
        _fail(f"--lora-load {args.lora_load} is a directory; pass the full adapter file (the "
              "adapter.safetensors a LoRA run writes into --save, or the file peft-to-megatron writes).")
    try:
        args.lora = lora_config_from_args(args)
    except ValueError as err:
        _fail(str(err))
    if args.lora is not None:
        unknown = [t for t in args.lora.target_modules if not _known_target(t)]
        if unknown:
            _fail(f"--lora-target-modules {' '.join(unknown)}: no such module in a GPT layer; "
                  f"choose from {' '.join(DEFAULT_TARGET_MODULES)}, each optionally scoped by one "
                  f"of {' '.join(TARGET_SCOPES)} (experts.linear_fc1), or {ROUTER_TARGET} (a MoE router).")
        if ROUTER_TARGET in args.lora.target_modules and args.num_experts is None:
            _fail(f"--lora-target-modules {ROUTER_TARGET} matches no module: this model is dense (no "
                  "--num-experts); drop it.")
        absent = {"experts": args.num_experts is None and "this model is dense (no --num-experts)",
                  "shared_experts": args.moe_shared_expert_intermediate_size is None
                  and "it has no shared expert (--moe-shared-expert-intermediate-size)",
                  "mlp": args.num_experts is not None and "its MLPs are experts: scope them with experts."}
        for target in args.lora.target_modules:
            scope = target.rpartition(".")[0]
            if absent.get(scope):
                _fail(f"--lora-target-modules {target} matches no module: {absent[scope]}; drop it or "
                      "use the unscoped name.")
        # The smallest side of the four targets: hidden, attention width (heads x kv channels), ffn.
        if args.lora.recompute_branch_input and args.transformer_impl == "transformer_engine":
            _fail("--lora-recompute-branch-input works with --transformer-impl local: the TE layers "
                  "run their norm inside the layer, so there is no input to recompute from.")
        if args.lora.use_dora:  # where DoRA's norm has no reduction of its own (docs/design.md §18)
            _check_dora_targets(args)
        kv_channels = args.kv_channels or args.hidden_size // heads
        sides = [args.hidden_size, heads * kv_channels, args.moe_ffn_hidden_size or args.ffn_hidden_size]
        if ROUTER_TARGET in args.lora.target_modules:
            sides.append(args.num_experts)
        smallest = min(sides)
        if args.lora.rank > smallest:
            _fail(f"--lora-rank {args.lora.rank} exceeds the smallest side of the adapted layers ({smallest}: "
                  "hidden size, heads x kv channels, (expert) ffn hidden size, experts of a router target); a "
                  f"rank above it adds nothing. Choose --lora-rank <= {smallest}.")
    elif args.lora_load or args.lora_save_merged or args.lora_plus_ratio is not None:
        _fail("--lora-load / --lora-save-merged / --lora-plus-ratio need --lora-rank (the adapter's rank).")
    if args.lora_plus_ratio is not None and not args.lora_plus_ratio > 0:
        _fail(f"--lora-plus-ratio {args.lora_plus_ratio:g}: B's learning rate / A's must be > 0 "
              "(16 is the LoRA+ paper's suggestion; 1 is plain LoRA).")
    from megatron_lora.training.data import build_tokenizer

    try:
        tokenizer_vocab = build_tokenizer(args.tokenizer_type, args.tokenizer_model).vocab_size
    except DataError as err:
        _fail(str(err))
    if args.vocab_size is not None and args.vocab_size < tokenizer_vocab:
        _fail(f"--vocab-size {args.vocab_size} is smaller than the tokenizer's {tokenizer_vocab} ids; "
              "drop the flag or raise it.")
    args.padded_vocab_size = padded_vocab_size(max(tokenizer_vocab, args.vocab_size or 0), args)
    if args.padded_vocab_size % tp:
        _fail(f"the padded vocabulary ({args.padded_vocab_size}) does not divide by TP={tp}; set "
              f"--make-vocab-size-divisible-by to a multiple of {tp}.")
    if args.tensorboard_dir and importlib.util.find_spec("tensorboard") is None:
        _fail("--tensorboard-dir needs the tensorboard package: pip install 'megatron_lora[tensorboard]'.")
    if args.device == "cuda" and not torch.cuda.is_available():
        _fail("--device cuda: no CUDA device is visible; use --device cpu (gloo) or auto.")
    args.use_cpu = args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())
    if args.bf16 and args.fp16:
        _fail("--bf16 and --fp16 exclude each other; pick one.")
    if args.transformer_impl == "transformer_engine":
        if args.use_cpu:
            _fail("--transformer-impl transformer_engine needs CUDA (Transformer Engine has no CPU "
                  "kernels); use --transformer-impl local on CPU.")
        if importlib.util.find_spec("transformer_engine") is None:
            _fail("--transformer-impl transformer_engine: transformer-engine is not installed; "
                  "pip install 'megatron_lora[te]', or use --transformer-impl local.")
    check_checkpoint_dirs(args, model_args(args), _fail)
    args.gradient_accumulation_fusion = args.gradient_accumulation_fusion and not args.use_cpu and (
        args.transformer_impl == "transformer_engine"
        or importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None)
    return args


def check_moe_args(args: argparse.Namespace, world_size: int) -> None:
    """The mixture-of-experts flags and the expert layout (EP x ETP), as Megatron-LM checks them:
    the world divides by TP x PP (attention) and by ETP x EP x PP (experts); fills
    ``expert_tensor_parallel_size`` (default: TP) and ``expert_data_parallel_size``."""
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    given_etp = args.expert_tensor_parallel_size
    etp = args.expert_tensor_parallel_size = given_etp or tp
    for flag, value in (("--expert-model-parallel-size", ep), ("--expert-tensor-parallel-size", etp)):
        if value < 1:
            _fail(f"{flag} must be >= 1, found {value}.")
    experts = args.num_experts
    if experts is None:
        needs = [flag for flag, used in (
            ("--expert-model-parallel-size", ep > 1), ("--expert-tensor-parallel-size", given_etp is not None),
            ("--moe-grouped-gemm", args.moe_grouped_gemm),
            ("--moe-shared-expert-intermediate-size", args.moe_shared_expert_intermediate_size is not None),
            ("--moe-ffn-hidden-size", args.moe_ffn_hidden_size is not None),
            ("--moe-router-pre-softmax", args.moe_router_pre_softmax))
            if used]
        if needs:
            _fail(f"{' / '.join(needs)} apply to mixture-of-experts models, and this one is dense (no "
                  "--num-experts); add --num-experts N or drop them.")
        args.expert_data_parallel_size = args.data_parallel_size
        return
    if experts < 1:
        _fail(f"--num-experts must be >= 1, found {experts}.")
    if not 1 <= args.moe_router_topk <= experts:
        _fail(f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts {experts}.")
    if experts % ep:
        _fail(f"--num-experts {experts} does not divide by --expert-model-parallel-size {ep}: each EP rank "
              f"holds the same number of experts; pick an EP size that divides {experts}.")
    if world_size % (etp * ep * pp):
        _fail(f"{world_size} ranks do not divide into ETP={etp} x EP={ep} x PP={pp} (the experts' layout); "
              f"start a multiple of {etp * ep * pp} ranks, or change --expert-model-parallel-size / "
              "--expert-tensor-parallel-size.")
    args.expert_data_parallel_size = world_size // (etp * ep * pp)
    if args.moe_ffn_hidden_size < 1:
        _fail(f"--moe-ffn-hidden-size must be >= 1, found {args.moe_ffn_hidden_size}.")
    if args.moe_ffn_hidden_size % etp:
        flag = "--ffn-hidden-size" if args.moe_ffn_hidden_size == args.ffn_hidden_size else "--moe-ffn-hidden-size"
        _fail(f"{flag} {args.moe_ffn_hidden_size} (each expert's) does not divide by "
              f"--expert-tensor-parallel-size {etp}.")
    shared = args.moe_shared_expert_intermediate_size
    if shared is not None and (shared < 1 or shared % tp):
        _fail(f"--moe-shared-expert-intermediate-size {shared} must be >= 1 and divide by TP={tp} (the shared "
              "expert is split like the dense MLP).")
    if tp > 1 and not args.sequence_parallel:
        _fail(f"Megatron's MoE layer refuses to train at TP={tp} without --sequence-parallel; add "
              "--sequence-parallel (or use --expert-model-parallel-size instead of TP).")
    if args.add_bias_linear and etp > 1:
        _fail(f"Megatron's experts have biases only at --expert-tensor-parallel-size 1, found ETP={etp} (it "
              "defaults to TP); pass --disable-bias-linear, or --expert-tensor-parallel-size 1.")
    if args.moe_aux_loss_coeff < 0:
        _fail(f"--moe-aux-loss-coeff must be >= 0, found {args.moe_aux_loss_coeff}.")
    if args.moe_aux_loss_coeff > 0 and args.moe_router_load_balancing_type == "none":
        _fail(f"--moe-aux-loss-coeff {args.moe_aux_loss_coeff} weighs a load-balancing loss, but "
              "--moe-router-load-balancing-type is none; choose aux_loss or seq_aux_loss, or set the "
              "coefficient to 0.")
    if args.moe_grouped_gemm and args.lora_rank and args.save and not args.no_save_optim:
        _fail("--moe-grouped-gemm with --lora-rank: the optimizer state of grouped-expert adapters cannot "
              "be checkpointed yet (docs/moe.md); add --no-save-optim (the adapter alone is saved; a "
              "resume restarts Adam's moments), or drop --moe-grouped-gemm (SequentialMLP experts).")
    if args.moe_grouped_gemm and args.transformer_impl == "local":
        _fail("--moe-grouped-gemm needs --transformer-impl transformer_engine (grouped experts are TE's "
              "TEGroupedMLP; Megatron's local spec builds the legacy GroupedMLP, which LoRA cannot adapt, "
              "or none); with local layers drop the flag: the experts run as SequentialMLP.")


def _check_dora_targets(args: argparse.Namespace) -> None:
    if not args.num_experts:
        return
    targets, etp = set(args.lora.target_modules), args.expert_tensor_parallel_size or args.tensor_model_parallel_size
    refused = None
    if args.moe_grouped_gemm and targets & {"linear_fc1", "linear_fc2", "experts.linear_fc1", "experts.linear_fc2"}:
        refused = "grouped experts (--moe-grouped-gemm)"
    elif etp > 1 and targets & {"linear_fc2", "experts.linear_fc2"}:
        refused = f"the experts' linear_fc2 at --expert-tensor-parallel-size {etp}"
    if refused:
        _fail(f"--lora-use-dora is not supported on {refused}; drop it from --lora-target-modules, use "
              "--expert-tensor-parallel-size 1 (SequentialMLP experts), or drop --lora-use-dora.")


def fill_model_defaults(args: argparse.Namespace) -> None:
    """The architecture values the flags leave to defaults (Megatron-LM's rules)."""
    args.num_query_groups = args.num_query_groups or args.num_attention_heads
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    if args.num_experts is not None and args.moe_ffn_hidden_size is None:
        args.moe_ffn_hidden_size = args.ffn_hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length


def model_args_from_flags(flags) -> dict:
    """The ``model_args.json`` record a run with these model flags writes, without reading a
    tokenizer: ``--vocab-size`` gives the vocabulary (padded as the script pads it)."""
    args = build_parser(require_run_flags=False).parse_args([str(f) for f in flags])
    if args.vocab_size is None:
        raise UsageError("model_args_from_flags needs --vocab-size (no tokenizer is read).")
    fill_model_defaults(args)
    args.padded_vocab_size = padded_vocab_size(args.vocab_size, args)
    return model_args(args)


def args_for_model(saved_model_args: dict, **settings) -> argparse.Namespace:
    """The script's flags for the model a checkpoint records (``model_args.json``), defaults
    elsewhere, ``settings`` on top (e.g. the layout, dtype, ``use_cpu``): how a model is built
    outside a training run, by the same builder (``loop.gpt_stage_from_args``)."""
    args = build_parser(require_run_flags=False).parse_args([])
    vars(args).update({k: v for k, v in saved_model_args.items() if k in MODEL_ARG_NAMES})
    vars(args).update(settings)
    return args


def model_dtype(args: argparse.Namespace) -> torch.dtype:
    """Parameter and activation dtype of --bf16 / --fp16 / neither."""
    return torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32


def transformer_config_from_args(args: argparse.Namespace):
    """Megatron's ``TransformerConfig`` for these flags (fusions off on CPU: they need CUDA)."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    cuda_fusions = not args.use_cpu  # Megatron's fused kernels need CUDA
    recompute = {}
    if args.recompute_granularity == "full":
        recompute = dict(recompute_granularity="full", recompute_method=args.recompute_method,
                         recompute_num_layers=args.recompute_num_layers)
    elif args.recompute_granularity == "selective":
        recompute = dict(recompute_granularity="selective")
    dtype = model_dtype(args)
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads, num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels, gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu, normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon, add_bias_linear=args.add_bias_linear,
        add_qkv_bias=args.add_qkv_bias, hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout, init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        sequence_parallel=args.sequence_parallel, qk_layernorm=args.qk_layernorm, bf16=args.bf16, fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype, bias_dropout_fusion=False, masked_softmax_fusion=False,
        apply_rope_fusion=False, gradient_accumulation_fusion=args.gradient_accumulation_fusion,
        bias_activation_fusion=cuda_fusions and args.add_bias_linear, persist_layer_norm=False,
        **recompute, **moe_config_from_args(args))


def moe_config_from_args(args: argparse.Namespace) -> dict:
    """The ``TransformerConfig`` fields of the MoE flags; none for a dense model."""
    if args.num_experts is None:
        return {}
    return dict(
        num_moe_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size or args.ffn_hidden_size,  # unset in older records
        moe_router_pre_softmax=args.moe_router_pre_softmax,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type, moe_grouped_gemm=args.moe_grouped_gemm,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size or args.tensor_model_parallel_size)


def model_args(args: argparse.Namespace) -> dict:
    """The architecture flags a checkpoint records (and a later run must match)."""
    return {name: getattr(args, name) for name in MODEL_ARG_NAMES}


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Round up to a multiple of --make-vocab-size-divisible-by.

    Megatron-LM multiplies that by the TP size, so the embedding's shape (and every checkpoint)
    would depend on TP; here it does not, and a vocabulary that does not divide by TP is an error.
    """
    multiple = args.make_vocab_size_divisible_by
    return -(-vocab_size // multiple) * multiple
