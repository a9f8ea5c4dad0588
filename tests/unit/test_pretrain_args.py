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
    (["--bf16", "--fp16"], 1, "--bf16 and --fp16 exclude each other"),
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
