"""--tokenizer-type HuggingFaceTokenizer: a local tokenizer directory drives data and vocab size."""

import pytest

from megatron_lora.training.data import DataError, build_tokenizer, write_indexed_dataset
from megatron_lora.training.pretrain_args import UsageError, parse_args, validate_args


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    """A tiny word-level tokenizer made here (no download), saved the way HF models ship one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["</s>", "<unk>", "tensor", "shard", "rank", "adapter", "low", "update"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path_factory.mktemp("tok")
    PreTrainedTokenizerFast(tokenizer_object=core, eos_token="</s>", unk_token="<unk>").save_pretrained(path)
    return str(path)


def test_documents_end_with_the_eos_id_and_the_vocab_is_the_tokenizers(tokenizer_dir, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tok = build_tokenizer("HuggingFaceTokenizer", tokenizer_dir)
    assert (tok.eod, tok.vocab_size) == (0, 8)
    write_indexed_dataset(["tensor shard rank", "low update"], str(tmp_path / "d"), tok)
    ds = IndexedDataset(str(tmp_path / "d"))
    assert [list(map(int, ds[i])) for i in range(len(ds))] == [[2, 3, 4, 0], [6, 7, 0]]


def test_padded_vocab_follows_tokenizer_or_vocab_size_flag(tokenizer_dir, tmp_path):
    from megatron_lora.training.data import ByteTokenizer

    write_indexed_dataset(["x"], str(tmp_path / "c"), ByteTokenizer())
    flags = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "8",
             "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--data-path", str(tmp_path / "c"),
             "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir,
             "--make-vocab-size-divisible-by", "4"]
    assert validate_args(parse_args(flags), 1).padded_vocab_size == 8
    assert validate_args(parse_args(flags + ["--vocab-size", "10"]), 1).padded_vocab_size == 12
    with pytest.raises(UsageError, match="--vocab-size 5 is smaller than the tokenizer's 8"):
        validate_args(parse_args(flags + ["--vocab-size", "5"]), 1)


def test_missing_tokenizer_directory_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="expected a local Hugging Face tokenizer directory"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "nope"))
