"""``megatron_lora.training.data`` and ``scripts/preprocess_data.py``, single process, against Megatron's reader.

References are independent of the code under test: Megatron's own ``IndexedDataset`` for the files,
the sampler's index formula written out for the order rules, and the CLI as a real subprocess.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_lora.training.data import (
    ByteTokenizer,
    DataError,
    build_gpt_datasets,
    build_tokenizer,
    check_data_prefixes,
    micro_batches,
    write_indexed_dataset,
)
from tests import REPO_ROOT

SEQ = 32
DOCS = [f"document {i}: " + "héllo wörld ✓ " * (i % 5 + 1) for i in range(60)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("data") / "corpus")
    write_indexed_dataset(DOCS, prefix, ByteTokenizer())
    return prefix


@pytest.fixture(scope="module")
def train(corpus, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    return build_gpt_datasets([corpus], "8,1,1", SEQ, 1234, (40, 4, 4), ByteTokenizer(), cache)[0]


def _preprocess_main():
    """The CLI's ``main`` in this process: each fresh interpreter spends seconds importing Megatron."""
    sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
    try:
        from preprocess_data import main
    finally:
        sys.path.pop(0)
    return main


def test_tokenizer_round_trips_non_ascii():
    tok = build_tokenizer("ByteLevel")
    text = "naïve café — 日本語 🙂\n"
    ids = tok.tokenize(text)
    assert ids == list(text.encode("utf-8")) and max(ids) < 256
    assert tok.detokenize(ids) == text
    assert tok.detokenize(ids + [tok.eod]).endswith("<|eod|>")
    assert tok.detokenize(list("é".encode("utf-8"))[:1]) == "\ufffd"  # cut mid-character
    assert (tok.vocab_size, tok.eod, getattr(tok, "pad", None)) == (257, 256, None)


def test_build_tokenizer_names_the_known_ones():
    with pytest.raises(DataError, match="ByteLevel"):
        build_tokenizer("GPT2BPETokenizer")


def test_megatron_reads_back_the_token_ids_with_one_eod_per_document(corpus):
    ds = IndexedDataset(corpus)
    tok = ByteTokenizer()
    assert len(ds) == len(DOCS) and ds.index.dtype.__name__ == "uint16"
    for i, text in enumerate(DOCS):
        assert ds[i].tolist() == tok.tokenize(text) + [tok.eod]


def test_write_counts_and_skips_empty_documents(tmp_path):
    stats = write_indexed_dataset(["ab", "", "c"], str(tmp_path / "x"), ByteTokenizer())
    assert stats == {"documents": 2, "tokens": 5}


def test_write_rejects_empty_input_and_leaves_no_files(tmp_path):
    with pytest.raises(DataError, match="at least one non-empty document"):
        write_indexed_dataset([], str(tmp_path / "x"), ByteTokenizer())

    def crash_midway():
        yield "first document"
        raise DataError("input broke")

    with pytest.raises(DataError, match="input broke"):
        write_indexed_dataset(crash_midway(), str(tmp_path / "y"), ByteTokenizer())
    assert os.listdir(tmp_path) == []


def test_check_data_prefixes_names_the_missing_prefix_and_the_fix(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(DataError) as err:
        check_data_prefixes([missing])
    assert f"{missing}.bin / .idx not found" in str(err.value)
    assert f"preprocess_data.py --input FILE --output-prefix {missing}" in str(err.value)
    assert "\n" not in str(err.value)


def test_check_data_prefixes_parses_weights(corpus):
    assert check_data_prefixes([corpus]) == [(None, corpus)]
    assert check_data_prefixes(["0.3", corpus, "0.7", corpus]) == [(0.3, corpus), (0.7, corpus)]
    with pytest.raises(DataError, match="a number before every prefix"):
        check_data_prefixes(["0.3", corpus, corpus])
    with pytest.raises(DataError, match="without .bin/.idx"):
        check_data_prefixes([corpus + ".bin"])


def test_samples_are_seq_length_windows_with_labels_shifted_by_one(train):
    for i in range(len(train)):
        s = train[i]
        assert "attention_mask" not in s and s["tokens"].shape == (SEQ,)
        assert torch.equal(s["tokens"][1:], s["labels"][:-1])
    joined = ByteTokenizer().detokenize(train[0]["tokens"].tolist())
    assert "héllo wörld" in joined or "<|eod|>" in joined


def test_build_is_deterministic_for_a_seed(corpus, train, tmp_path):
    again = build_gpt_datasets([corpus], "8,1,1", SEQ, 1234, (40, 4, 4), ByteTokenizer(),
                               str(tmp_path / "fresh"))[0]  # fresh cache: rebuilt, not reloaded
    other = build_gpt_datasets([corpus], "8,1,1", SEQ, 99, (40, 4, 4), ByteTokenizer(),
                               str(tmp_path / "other"))[0]
    tokens = lambda ds: torch.stack([ds[i]["tokens"] for i in range(len(ds))])  # noqa: E731
    assert torch.equal(tokens(again), tokens(train))
    assert not torch.equal(tokens(other)[:len(train)], tokens(train)[:len(other)])


def test_default_cache_is_next_to_the_data_and_follows_rewrites(tmp_path):
    prefix = str(tmp_path / "c")
    write_indexed_dataset(DOCS, prefix, ByteTokenizer())
    first = build_gpt_datasets([prefix], "1", SEQ, 1, (1, 0, 0), ByteTokenizer())[0]
    write_indexed_dataset(DOCS[:20], prefix, ByteTokenizer())  # same prefix, other contents
    second = build_gpt_datasets([prefix], "1", SEQ, 1, (1, 0, 0), ByteTokenizer())[0]
    assert sorted(os.listdir(tmp_path)) == ["c-index-cache", "c.bin", "c.idx"]
    assert len(os.listdir(tmp_path / "c-index-cache")) == 2
    assert len(second) < len(first)  # fresh indices, not the stale ones of 60 documents


def test_too_few_documents_for_the_split_is_a_data_error(corpus):
    with pytest.raises(DataError, match=r"empty test split; this split needs at least \d+ documents"):
        build_gpt_datasets([corpus], "949,50,1", SEQ, 1, (10, 1, 1), ByteTokenizer())


def test_blend_builds_in_a_single_process(corpus, tmp_path):
    train, valid, test = build_gpt_datasets(["0.25", corpus, "0.75", corpus], "8,2,0", SEQ, 1,
                                            (30, 6, 0), ByteTokenizer(), str(tmp_path))
    assert len(train) >= 30 and len(valid) >= 6 and test is None  # Megatron rounds each part up
    assert not torch.distributed.is_initialized()


def _stream(dataset, consumed, mbs, rank=0, dp=1):
    return [b["tokens"] for b in micro_batches(dataset, consumed, mbs, rank, dp)]


def test_micro_batches_follow_the_pretraining_sampler_order():
    fake = [{"tokens": torch.full((4,), i), "labels": torch.full((4,), i), "attention_mask": 0,
             "loss_mask": torch.ones(4), "position_ids": torch.arange(4)} for i in range(23)]
    c, mbs, dp, rank = 3, 2, 3, 1
    got = [b[:, 0].tolist() for b in _stream(fake, c, mbs, rank, dp)]
    want = [[c + k * mbs * dp + rank * mbs + j for j in range(mbs)] for k in range(3)]
    assert got == want  # a 4th step would need samples 21..26: dropped for every rank
    batch = next(micro_batches(fake, 0, 2, 0, 1))
    assert sorted(batch) == ["labels", "loss_mask", "position_ids", "tokens"]
    assert batch["loss_mask"].dtype == torch.float32 and batch["tokens"].dtype == torch.int64


def test_resume_at_consumed_samples_continues_the_uninterrupted_stream(train):
    full = torch.cat(_stream(train, 0, 1))
    for c in (0, 5, 13):
        assert torch.equal(torch.cat(_stream(train, c, 1)), full[c:])
    assert torch.equal(torch.cat(_stream(train, 6, 3)), full[6:6 + 3 * ((len(train) - 6) // 3)])


def test_two_dp_ranks_see_what_one_rank_sees_in_two_micro_batches(train):
    rank0, rank1 = _stream(train, 4, 1, 0, 2), _stream(train, 4, 1, 1, 2)
    single = _stream(train, 4, 2, 0, 1)
    assert len(rank0) == len(rank1) == len(single)
    for a, b, both in zip(rank0, rank1, single):
        assert torch.equal(torch.cat([a, b]), both)


def test_preprocess_cli_writes_the_dataset(tmp_path, capsys):
    src = tmp_path / "tiny.jsonl"
    src.write_text("".join(json.dumps({"body": t}) + "\n" for t in DOCS[:3]), encoding="utf-8")
    rc = _preprocess_main()(["--input", str(src), "--output-prefix", str(tmp_path / "tiny"),
                             "--json-keys", "body", "--append-eod"])
    out = capsys.readouterr().out
    assert rc == 0 and "3 documents" in out and len(out.strip().splitlines()) == 1
    ds = IndexedDataset(str(tmp_path / "tiny"))  # keep it alive: items are views into its mmap
    assert ds[2].tolist() == ByteTokenizer().tokenize(DOCS[2]) + [256]


def test_preprocess_cli_bad_json_line_is_one_error_line(tmp_path):
    """A real subprocess: script start-up, exit status and stderr exactly as a user sees them."""
    src = tmp_path / "bad.jsonl"
    src.write_text(json.dumps({"text": "fine"}) + "\n" + "{not json\n", encoding="utf-8")
    path = os.pathsep.join(filter(None, [REPO_ROOT, os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path)  # the package need not be installed in this interpreter
    run = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "preprocess_data.py"),
                          "--input", str(src), "--output-prefix", str(tmp_path / "bad")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1
    assert "bad.jsonl:2:" in run.stderr
    assert sorted(os.listdir(tmp_path)) == ["bad.jsonl"]  # no partial dataset, no temp files
