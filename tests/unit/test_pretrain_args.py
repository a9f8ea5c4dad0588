"""Flag checks of scripts/pretrain_gpt_lora.py that need no process group (the rest run the script)."""

import argparse
import io

import pytest

from megatron_lora.training.pretrain_args import UsageError, parse_args, validate_args

BASE = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "16",
        "--micro-batch-size", "2", "--train-iters", "3", "--lr", "1e-3"]


@pytest.fixture
def data(tmp_path):
    from megatron_lora.training.data import ByteTokenizer, write_indexed_dataset

    prefix = str(tmp_path / "c")
    write_indexed_dataset(["some text", "more text"], prefix, ByteTokenizer())
    return ["--data-path", prefix]


def check(flags, world=1):
    return validate_args(parse_args(BASE + flags), world)


def test_defaults_are_derived_like_megatron_lm(data):
    args = check(data + ["--tensor-model-parallel-size", "2"], world=4)
    assert (args.data_parallel_size, args.global_batch_size, args.num_microbatches) == (2, 4, 1)
    assert args.ffn_hidden_size == 128 and args.num_query_groups == 4 and args.lora is None
    assert args.padded_vocab_size == 384  # 257 byte-level ids padded to 128, independent of TP


@pytest.mark.parametrize("flags, world, needle", [
    (["--global-batch-size", "6"], 4, "--global-batch-size 6 is not a multiple"),
    (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 2 does not divide"),
    (["--tensor-model-parallel-size", "2"], 3, "3 ranks do not divide into TP=2"),
    (["--num-query-groups", "3"], 1, "--num-query-groups 3"),
    (["--lora-save-merged", "x"], 1, "need --lora-rank"),
    (["--lora-rank", "0"], 1, "--lora-rank must be a positive integer"),
    (["--lora-plus-ratio", "16"], 1, "--lora-plus-ratio need --lora-rank"),
    (["--lora-rank", "4", "--lora-plus-ratio", "0"], 1, "--lora-plus-ratio 0: B's learning rate / A's must be > 0"),
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 exclude each other"),
    (["--lr-warmup-iters", "3"], 1, "--lr-warmup-iters 3 must be below --lr-decay-iters 3"),
    (["--transformer-impl", "transformer_engine", "--device", "cpu"], 1,
     "transformer_engine needs CUDA .*use --transformer-impl local"),
    (["--lora-rank", "4", "--lora-recompute-branch-input", "--transformer-impl", "transformer_engine"], 1,
     "--lora-recompute-branch-input works with --transformer-impl local"),
    (["--tensor-model-parallel-size", "4", "--make-vocab-size-divisible-by", "2", "--num-attention-heads", "4"],
     4, "does not divide by TP=4"),
])
def test_bad_combinations_name_the_flag(data, flags, world, needle):
    with pytest.raises(UsageError, match=needle) as err:
        check(data + flags, world)
    assert "\n" not in str(err.value)


def test_branch_kernel_choices_are_argparse_choices(data, capsys):
    with pytest.raises(SystemExit):
        check(data + ["--lora-rank", "4", "--lora-branch-kernels", "cuda"])
    assert "invalid choice: 'cuda' (choose from 'auto', 'torch', 'triton')" in capsys.readouterr().err.replace('"', "'")
    assert check(data + ["--lora-rank", "4", "--lora-branch-kernels", "torch"]).lora.branch_kernels == "torch"


def test_gradient_accumulation_fusion_only_where_it_can_run(data):
    """Megatron-LM's default is on; on CPU (no fused kernel, no TE) it must be off, or Megatron's
    local layers refuse to build."""
    assert parse_args(BASE + data).gradient_accumulation_fusion is True
    assert check(data + ["--device", "cpu"]).gradient_accumulation_fusion is False
    assert check(data + ["--device", "cpu", "--no-gradient-accumulation-fusion"]).gradient_accumulation_fusion is False


def test_progress_bar_only_on_a_terminal(monkeypatch, capsys):
    from megatron_lora.training.loop import Log

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    monkeypatch.setattr("sys.stderr", term)
    args = argparse.Namespace(no_progress_bar=False, tensorboard_dir=None)
    log = Log(args, rank0=True)
    log.progress(5, 10, elapsed=2.0)
    assert "[###############...............] 5/10" in term.getvalue()
    log.line("iteration 5")
    assert term.getvalue().endswith("\r\033[K") and capsys.readouterr().out == "iteration 5\n"
    quiet = Log(argparse.Namespace(no_progress_bar=True, tensorboard_dir=None), rank0=True)
    before = term.getvalue()
    quiet.progress(6, 10, elapsed=2.0)
    assert term.getvalue() == before


# ------------------------------------------------------------------------------ mixture of experts

MOE = ["--num-experts", "4", "--moe-router-topk", "2"]


def test_moe_flags_reach_the_transformer_config_and_the_expert_layout(data):
    """Megatron-LM's arithmetic: attention over TP x PP x DP, experts over ETP x EP x expert-DP."""
    from megatron_lora.training.pretrain_args import transformer_config_from_args

    # (megatron-core 0.13 refuses linear biases in MoE models; later releases allow them at ETP=1)
    args = check(data + MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--disable-bias-linear",
                               "--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "1",
                               "--moe-token-dispatcher-type", "alltoall", "--moe-aux-loss-coeff", "0.01",
                               "--moe-router-load-balancing-type", "seq_aux_loss",
                               "--moe-shared-expert-intermediate-size", "64", "--device", "cpu"], world=8)
    assert (args.data_parallel_size, args.expert_data_parallel_size) == (4, 4)
    config = transformer_config_from_args(args)
    got = {k: getattr(config, k) for k in (
        "num_moe_experts", "moe_router_topk", "moe_token_dispatcher_type", "moe_aux_loss_coeff",
        "moe_router_load_balancing_type", "moe_shared_expert_intermediate_size", "moe_grouped_gemm",
        "expert_model_parallel_size", "expert_tensor_parallel_size")}
    assert got == dict(num_moe_experts=4, moe_router_topk=2, moe_token_dispatcher_type="alltoall",
                       moe_aux_loss_coeff=0.01, moe_router_load_balancing_type="seq_aux_loss",
                       moe_shared_expert_intermediate_size=64, moe_grouped_gemm=False,
                       expert_model_parallel_size=2, expert_tensor_parallel_size=1)


def test_qk_norm_and_expert_size_flags_reach_the_config_and_the_checkpoint_record(data):
    """--qk-layernorm, --moe-ffn-hidden-size and --moe-router-pre-softmax are architecture: they
    reach Megatron's TransformerConfig and the model_args.json record."""
    from megatron_lora.training.pretrain_args import model_args, transformer_config_from_args

    args = check(data + MOE + ["--qk-layernorm", "--moe-ffn-hidden-size", "48", "--moe-router-pre-softmax",
                               "--norm-epsilon", "1e-6", "--device", "cpu", "--disable-bias-linear"])
    config = transformer_config_from_args(args)
    assert (config.qk_layernorm, config.moe_ffn_hidden_size, config.moe_router_pre_softmax) == (True, 48, True)
    assert (config.ffn_hidden_size, config.layernorm_epsilon) == (128, 1e-6)  # q/k norms use --norm-epsilon
    record = model_args(args)
    assert (record["qk_layernorm"], record["moe_ffn_hidden_size"], record["moe_router_pre_softmax"]) == (True, 48, True)
    default = check(data + MOE + ["--device", "cpu", "--disable-bias-linear"])  # experts' FFN: --ffn-hidden-size
    assert default.moe_ffn_hidden_size == 128 and transformer_config_from_args(default).moe_router_pre_softmax is False
    dense = check(data + ["--device", "cpu"])
    assert (dense.qk_layernorm, dense.moe_ffn_hidden_size, dense.moe_router_pre_softmax) == (False, None, False)


def test_a_record_written_before_the_qk_norm_and_expert_size_fields_reads_as_off(data):
    """model_args.json of older checkpoints lacks the new fields: the model they describe is the
    flags' defaults (no q/k norm, experts of --ffn-hidden-size, renormalised top-k)."""
    from megatron_lora.training.pretrain_args import args_for_model, model_args, transformer_config_from_args

    record = model_args(check(data + MOE + ["--device", "cpu", "--disable-bias-linear"]))  # 0.13: no MoE biases
    old = {k: v for k, v in record.items() if k not in ("qk_layernorm", "moe_ffn_hidden_size", "moe_router_pre_softmax")}
    config = transformer_config_from_args(args_for_model(old, use_cpu=True))
    assert (config.qk_layernorm, config.moe_ffn_hidden_size, config.moe_router_pre_softmax) == (False, 128, False)


def test_expert_ffn_size_is_checked_against_the_expert_tensor_parallel_size(data):
    with pytest.raises(UsageError, match="--moe-ffn-hidden-size 30 \\(each expert's\\) does not divide by "
                                         "--expert-tensor-parallel-size 4"):
        check(data + MOE + ["--moe-ffn-hidden-size", "30", "--tensor-model-parallel-size", "4",
                            "--sequence-parallel", "--disable-bias-linear"], world=4)
    check(data + MOE + ["--moe-ffn-hidden-size", "30", "--tensor-model-parallel-size", "4", "--sequence-parallel",
                        "--disable-bias-linear", "--expert-tensor-parallel-size", "2"], world=4)


def test_expert_tensor_parallel_size_defaults_to_tp_and_a_dense_config_has_no_experts(data):
    from megatron_lora.training.pretrain_args import transformer_config_from_args

    moe = check(data + MOE + ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--disable-bias-linear",
                              "--device", "cpu"], world=2)
    assert moe.expert_tensor_parallel_size == 2 and moe.expert_data_parallel_size == 1
    assert transformer_config_from_args(moe).expert_tensor_parallel_size == 2
    dense = check(data + ["--device", "cpu"])
    assert transformer_config_from_args(dense).num_moe_experts is None


@pytest.mark.parametrize("flags, world, needle", [
    (["--expert-model-parallel-size", "3"], 3, "--num-experts 4 does not divide by --expert-model-parallel-size 3"),
    (["--expert-model-parallel-size", "4", "--tensor-model-parallel-size", "2", "--sequence-parallel"], 4,
     "4 ranks do not divide into ETP=2 x EP=4 x PP=1"),
    (["--moe-router-topk", "5"], 1, "--moe-router-topk 5 must be between 1 and --num-experts 4"),
    (["--tensor-model-parallel-size", "2"], 2, "refuses to train at TP=2 without --sequence-parallel"),
    (["--moe-aux-loss-coeff", "0.01", "--moe-router-load-balancing-type", "none"], 1,
     "--moe-aux-loss-coeff 0.01 weighs a load-balancing loss, but --moe-router-load-balancing-type is none"),
    (["--moe-grouped-gemm"], 1, "--moe-grouped-gemm needs --transformer-impl transformer_engine"),
    # LoRA adapts TE's grouped experts: the MoE checks pass, only CUDA is missing here
    (["--moe-grouped-gemm", "--transformer-impl", "transformer_engine", "--lora-rank", "4", "--device", "cpu"], 1,
     "--transformer-impl transformer_engine needs CUDA"),
    (["--moe-grouped-gemm", "--transformer-impl", "transformer_engine", "--lora-rank", "4", "--save", "ckpt"], 1,
     "--moe-grouped-gemm with --lora-rank: the optimizer state of grouped-expert adapters cannot be "
     "checkpointed yet .*add --no-save-optim"),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
     "experts have biases only at --expert-tensor-parallel-size 1, found ETP=2 .*--disable-bias-linear"),
    (["--expert-tensor-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel",
      "--disable-bias-linear", "--ffn-hidden-size", "33"], 2, "--ffn-hidden-size 33 .* does not divide by --expert-tensor-parallel-size 2"),
    (["--moe-shared-expert-intermediate-size", "33", "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
     "--moe-shared-expert-intermediate-size 33 must be >= 1 and divide by TP=2"),
])
def test_bad_moe_combinations_name_the_flag(data, flags, world, needle):
    with pytest.raises(UsageError, match=needle) as err:
        check(data + MOE + flags, world)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("flags, needle", [
    (["--lora-target-modules", "experts.linear_fc1"], "experts.linear_fc1 matches no module: this model is dense"),
    (MOE + ["--lora-target-modules", "linear_qkv", "shared_experts.linear_fc2"],
     "shared_experts.linear_fc2 matches no module: it has no shared expert"),
    (MOE + ["--lora-target-modules", "mlp.linear_fc1"], "mlp.linear_fc1 matches no module: its MLPs are experts"),
    (["--lora-target-modules", "linear_qkv", "router"], "router matches no module: this model is dense"),
    (MOE + ["--lora-rank", "5", "--lora-target-modules", "router"], "--lora-rank 5 exceeds .* Choose --lora-rank <= 4"),
])
def test_scoped_targets_the_model_lacks_are_refused_before_building(data, flags, needle):
    with pytest.raises(UsageError, match=needle):
        check(data + ["--lora-rank", "4"] + flags)
    check(data + MOE + ["--lora-rank", "4", "--lora-target-modules", "experts.linear_fc1", "linear_qkv"])
    assert "router" in check(data + MOE + ["--lora-rank", "4", "--lora-target-modules", "router"]).lora.target_modules


@pytest.mark.parametrize("flags", [["--expert-model-parallel-size", "2"], ["--moe-grouped-gemm"],
                                   ["--moe-shared-expert-intermediate-size", "64"],
                                   ["--moe-ffn-hidden-size", "64"], ["--moe-router-pre-softmax"]])
def test_expert_flags_on_a_dense_model_are_refused(data, flags):
    with pytest.raises(UsageError, match=f"{flags[0]} apply to mixture-of-experts models.*add --num-experts"):
        check(data + flags, world=2)


def _adapter_checkpoint(root, run_flags, world):
    """An adapter checkpoint's directory as a LoRA run with ``run_flags`` leaves it (descriptor
    only: the flag checks before start read nothing else)."""
    import json

    from megatron_lora.core.checkpoint import files
    from megatron_lora.training.pretrain_args import model_args

    args = check(run_flags, world)
    ckpt = root / "iter_0000002"
    ckpt.mkdir(parents=True)
    (ckpt / files.DESCRIPTOR_FILE).write_text(json.dumps(dict(
        format=files.FORMAT, format_version=files.FORMAT_VERSION, lora_config=args.lora.to_dict(),
        tensors={}, iteration=2, model_args=model_args(args))))
    (root / files.ADAPTER_TRACKER).write_text("2")
    return str(root)


@pytest.mark.parametrize("change, needle", [
    (["--num-experts", "8"], "--num-experts: checkpoint 4, this run 8"),
    (["--moe-router-topk", "1"], "--moe-router-topk: checkpoint 2, this run 1"),
    (["--moe-ffn-hidden-size", "32"], "--moe-ffn-hidden-size: checkpoint 128, this run 32"),
    (["--moe-router-pre-softmax"], "--moe-router-pre-softmax: checkpoint False, this run True"),
    (["--qk-layernorm"], "--qk-layernorm: checkpoint False, this run True"),
])
def test_resume_of_another_moe_architecture_names_the_flag(data, tmp_path, change, needle):
    lora = ["--lora-rank", "4", "--expert-model-parallel-size", "2"]
    saved = _adapter_checkpoint(tmp_path / "run", data + MOE + lora, world=2)
    with pytest.raises(UsageError, match=f"--load {saved} holds checkpoints of an adapter of another model "
                                         f"\\({needle}\\); resume with the checkpoint's flags") as err:
        check(data + MOE + ["--lora-rank", "4", "--load", saved, "--save", saved] + change, world=1)
    assert "\n" not in str(err.value)


def test_resume_at_another_expert_layout_passes_the_checks(data, tmp_path):
    """EP and ETP are layouts, as TP is: the adapter reshards through its dist checkpoint."""
    lora = ["--lora-rank", "4", "--disable-bias-linear"]
    saved = _adapter_checkpoint(tmp_path / "run", data + MOE + lora + ["--expert-model-parallel-size", "2"], world=2)
    for layout, world in (([], 1), (["--expert-model-parallel-size", "4"], 4),
                          (["--tensor-model-parallel-size", "2", "--sequence-parallel",
                            "--expert-tensor-parallel-size", "2", "--expert-model-parallel-size", "2"], 4)):
        check(data + MOE + lora + ["--load", saved, "--save", saved] + layout, world)


def test_lora_use_dora_is_a_switch_of_the_lora_config(data):
    assert check(data + ["--lora-rank", "4", "--lora-use-dora"]).lora.use_dora
    assert not check(data + ["--lora-rank", "4"]).lora.use_dora
    tp2_etp1 = ["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-tensor-parallel-size", "1"]
    assert check(data + MOE + tp2_etp1 + ["--lora-rank", "4", "--lora-use-dora"], 2).lora.use_dora


@pytest.mark.parametrize("flags, world, needle", [
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--disable-bias-linear"], 2,
     "--lora-use-dora is not supported on the experts' linear_fc2 at --expert-tensor-parallel-size 2"),
    (["--moe-grouped-gemm", "--transformer-impl", "transformer_engine"], 1,
     "--lora-use-dora is not supported on grouped experts"),
])
def test_dora_where_its_norm_has_no_reduction_is_refused(data, flags, world, needle):
    with pytest.raises(UsageError, match=needle) as err:
        check(data + MOE + ["--lora-rank", "4", "--lora-use-dora"] + flags, world)
    assert "\n" not in str(err.value)
