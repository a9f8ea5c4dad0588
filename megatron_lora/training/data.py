"""GPT pretraining data through Megatron-Core's own dataset machinery, identical on 0.13 and 0.16.

    text --ByteTokenizer--> write_indexed_dataset --> PREFIX.bin / PREFIX.idx   (IndexedDataset format)
         --build_gpt_datasets--> GPTDataset splits  (split, shuffle, pack into seq_length + 1 windows)
         --micro_batches--> {"tokens", "labels", "loss_mask", "position_ids"}  (Megatron's sample order)

Megatron quirks handled here (all present in both 0.13.0 and 0.16.1):

* The index cache (shuffle / sample / document indices, ``*.npy``) is keyed by the prefix path and
  the config, not by the file contents: rewriting a prefix would silently reuse stale indices. The
  default cache directory therefore carries a fingerprint of the .bin/.idx files.
* Global rank 0 builds every split first, then all ranks meet at a barrier, then the others load
  the cache. An exception on rank 0 would leave the others waiting at that barrier forever, so every
  check runs before the builder, on every rank, with the same outcome. The cache directory must be
  on a filesystem that every rank sees.
* A split with a non-zero weight but no documents does not fail: ``GPTDataset._get_num_epochs``
  loops forever. ``_check_split_documents`` turns that into a ``DataError``.
* ``BlendedDataset`` calls ``torch.distributed.get_rank()`` without checking ``is_initialized()``
  on a cache miss, so a single process building a blend runs inside a throwaway one-rank group.
"""

from __future__ import annotations

import contextlib
import hashlib
import numbers
import os
import re
from typing import Iterable, Iterator

import numpy
import torch

EOD_TEXT = "<|eod|>"  # how detokenize renders the end-of-document id
_INDEX_HEADER = b"MMIDIDX\x00\x00"  # first bytes of every Megatron .idx file
_BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
_SPLIT_NAMES = ("train", "valid", "test")


class DataError(ValueError):
    """Bad data input; the message says what was expected, what was found and the fix."""


class ByteTokenizer:
    """UTF-8 bytes as tokens plus one end-of-document id: no vocabulary file, nothing to download.

    ids 0..255 are the bytes, ``eod`` = 256, ``vocab_size`` = 257. It duck-types what ``GPTDataset``
    reads from ``config.tokenizer`` (``eod``, ``vocab_size``, ``unique_identifiers`` for the cache
    key) rather than subclassing Megatron's base class, because that class moved between releases
    (0.13: ``datasets.megatron_tokenizer.MegatronTokenizer``; 0.16: the same class renamed
    ``MegatronLegacyTokenizer`` and deprecated, next to a new ``tokenizers.MegatronTokenizerBase``).

    There is no pad and no bos token: GPTDataset packs documents and never pads, and it reads
    ``pad`` inside ``try`` and falls back to its own -1 sentinel, which no token equals, so no label
    is masked. Defining ``pad = eod`` instead would mask every EOD label on 0.13 and only warn on 0.16.
    """

    vocab_size = 257
    eod = 256

    def __init__(self):
        # Megatron serialises this into each dataset's cache key: it must be stable across runs.
        self.unique_identifiers = {"class": type(self).__name__, "vocab_size": self.vocab_size,
                                   "eod": self.eod}

    @property
    def pad(self):
        raise AttributeError("ByteTokenizer has no pad token (GPTDataset packs, it never pads)")

    @property
    def bos(self):
        raise AttributeError("ByteTokenizer has no bos token (documents are separated by eod)")

    def tokenize(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def detokenize(self, ids: Iterable[int]) -> str:
        """Bytes back to text (invalid UTF-8 becomes U+FFFD); each eod renders as ``EOD_TEXT``."""
        parts, run = [], bytearray()
        for i in map(int, ids):
            if 0 <= i < 256:
                run.append(i)
            elif i == self.eod:
                parts += [run.decode("utf-8", errors="replace"), EOD_TEXT]
                run = bytearray()
            else:
                raise DataError(f"ByteLevel detokenize: expected token ids 0..{self.eod}, found {i}; "
                                f"these ids come from a different tokenizer")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def __repr__(self):  # Megatron logs the whole config, tokenizer included
        return f"ByteTokenizer(vocab_size={self.vocab_size}, eod={self.eod})"


class HuggingFaceTokenizer:
    """A Hugging Face tokenizer read from a local directory (``transformers``; no downloads).

    The end-of-document id is the tokenizer's EOS token, the vocabulary its full length (added
    tokens included). Megatron caches dataset indices under a key that includes
    ``unique_identifiers``, so the directory is part of it.
    """

    def __init__(self, model_dir: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise DataError("--tokenizer-type HuggingFaceTokenizer needs transformers: "
                            "pip install -e '.[hf]'") from None
        if not model_dir or not os.path.isdir(model_dir):
            raise DataError(f"--tokenizer-model: expected a local Hugging Face tokenizer directory, "
                            f"found {model_dir!r}; pass the model directory (tokenizer.json etc.)")
        try:
            self._tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(f"--tokenizer-model {model_dir}: not a readable tokenizer ({err}); pass "
                            "the directory holding tokenizer.json / tokenizer_config.json") from None
        if self._tok.eos_token_id is None:
            raise DataError(f"--tokenizer-model {model_dir}: the tokenizer has no EOS token, which "
                            "ends every document; use a tokenizer with one")
        self.eod = int(self._tok.eos_token_id)
        self.vocab_size = len(self._tok)
        self.unique_identifiers = {"class": type(self).__name__, "model": os.path.abspath(model_dir),
                                   "vocab_size": self.vocab_size, "eod": self.eod}

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False)

    def detokenize(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def __repr__(self):
        return f"HuggingFaceTokenizer({self.unique_identifiers['model']}, vocab_size={self.vocab_size})"


TOKENIZERS = {"ByteLevel": ByteTokenizer, "HuggingFaceTokenizer": HuggingFaceTokenizer}


def build_tokenizer(name: str, model_dir: str | None = None):
    """The tokenizer ``--tokenizer-type`` names (``--tokenizer-model`` for Hugging Face ones)."""
    if name not in TOKENIZERS:
        raise DataError(f"--tokenizer-type: expected one of {sorted(TOKENIZERS)}, found {name!r}; "
                        f"pass --tokenizer-type ByteLevel")
    if name == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(model_dir)
    return TOKENIZERS[name]()


def write_indexed_dataset(documents: Iterable[str], output_prefix: str, tokenizer) -> dict:
    """Tokenize ``documents`` into ``output_prefix.bin/.idx``, one eod closing each document.

    Empty documents are skipped (a lone eod teaches nothing). Token dtype is Megatron's own choice
    for the vocabulary (``DType.optimal_dtype``: uint16 below 65500 ids, else int32), the same rule
    0.16's GPTDatasetConfig assumes. Both files are written under temporary names; the old .idx is
    removed before the new .bin is moved in and the new .idx goes last, so a crash at any point
    leaves either a complete dataset or one that ``check_data_prefixes`` reports as missing.
    """
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    if isinstance(documents, str):
        raise DataError("write_indexed_dataset: expected an iterable of document strings, found one "
                        "str (it would be split into characters); pass [text]")
    bin_path, idx_path = output_prefix + ".bin", output_prefix + ".idx"
    tmp_bin, tmp_idx = f"{bin_path}.tmp{os.getpid()}", f"{idx_path}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp_bin, dtype=dtype)
    n_docs = n_tokens = 0
    try:
        for k, text in enumerate(documents):
            if not isinstance(text, str):
                raise DataError(f"write_indexed_dataset: expected document {k} to be a str, found "
                                f"{type(text).__name__}; convert it to text first")
            if not text:
                continue
            ids = numpy.array(tokenizer.tokenize(text) + [tokenizer.eod], dtype=dtype)
            builder.add_document(ids, [ids.size])
            n_docs, n_tokens = n_docs + 1, n_tokens + ids.size
        if n_docs == 0:
            raise DataError(f"write_indexed_dataset: expected at least one non-empty document for "
                            f"{output_prefix}, found none; check the input file and --json-keys")
        builder.finalize(tmp_idx)
        if os.path.exists(idx_path):
            os.remove(idx_path)
        os.replace(tmp_bin, bin_path)
        os.replace(tmp_idx, idx_path)
    finally:
        builder.data_file.close()  # already closed after finalize; needed on the error path
        for path in (tmp_bin, tmp_idx):
            if os.path.exists(path):
                os.remove(path)
    return {"documents": n_docs, "tokens": n_tokens}


def _as_weight(item: str):
    try:
        return float(item)
    except ValueError:
        return None


def check_data_prefixes(data_path: list[str]) -> list[tuple[float | None, str]]:
    """Parse ``--data-path`` (``PREFIX ...`` or ``W1 PREFIX1 W2 PREFIX2 ...``) and check the files.

    Returns ``[(weight or None, prefix), ...]``. Only the file system is read (the .idx header), never
    torch.distributed: scripts call this before initialising anything, so a typo fails in a second.
    A string is split on whitespace.
    """
    items = data_path.split() if isinstance(data_path, str) else list(data_path or [])
    usage = "expected PREFIX [PREFIX ...] or W1 PREFIX1 W2 PREFIX2 ..."
    if not items:
        raise DataError(f"--data-path: {usage}, found nothing; pass the --output-prefix you gave "
                        f"scripts/preprocess_data.py")
    weights = [_as_weight(x) for x in items[0::2]]
    if len(items) % 2 == 0 and all(w is not None for w in weights):
        pairs = list(zip(weights, items[1::2]))
        if any(not w >= 0 or w == float("inf") for w in weights) or sum(weights) <= 0:
            raise DataError(f"--data-path: expected finite non-negative weights with a positive sum, "
                            f"found {weights}; fix the weights")
    elif any(_as_weight(x) is not None for x in items):
        raise DataError(f"--data-path: {usage} (a number before every prefix), found {items}; "
                        f"give every prefix a weight or none")
    else:
        pairs = [(None, x) for x in items]
    for _, prefix in pairs:
        _check_prefix(prefix)
    return pairs


def _check_prefix(prefix: str) -> None:
    fix = f"create it with scripts/preprocess_data.py --input FILE --output-prefix {prefix}"
    if prefix.endswith((".bin", ".idx")):
        raise DataError(f"--data-path: expected a prefix without .bin/.idx, found {prefix}; "
                        f"pass {prefix[:-4]}")
    missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
    if len(missing) == 2:
        raise DataError(f"--data-path: {prefix}.bin / .idx not found; {fix}")
    if missing:
        raise DataError(f"--data-path: {prefix}{missing[0]} not found but its partner exists "
                        f"(an interrupted write?); {fix}")
    with open(prefix + ".idx", "rb") as f:
        header = f.read(len(_INDEX_HEADER))
    if header != _INDEX_HEADER:
        raise DataError(f"--data-path: expected a Megatron index at {prefix}.idx, found header "
                        f"{header!r}; {fix}")


def _split_sizes(split_matrix, n: int) -> list[int | None]:
    """Documents per split, by the builder's own rounding (``_build_megatron_dataset_splits``)."""
    return [None if b is None else int(round(b[1] * float(n))) - int(round(b[0] * float(n)))
            for b in split_matrix]


def _check_split_documents(prefixes: list[str], split: str, split_matrix) -> None:
    """Every split with a weight needs a document, or GPTDataset spins forever counting epochs."""
    from megatron.core.datasets.gpt_dataset import GPTDataset
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    for prefix in prefixes:
        n = GPTDataset.numel_low_level_dataset(IndexedDataset(prefix))
        empty = [name for name, size in zip(_SPLIT_NAMES, _split_sizes(split_matrix, n)) if size == 0]
        if empty:
            need = next((m for m in range(n, 10**6) if 0 not in _split_sizes(split_matrix, m)), None)
            need = f"at least {need}" if need else "more than 1,000,000"
            raise DataError(
                f"--split {split!r}: expected every split with a non-zero weight to get a document "
                f"of {prefix}, found {n} documents and an empty {'/'.join(empty)} split; this split "
                f"needs {need} documents: add documents, or set those weights to 0 (e.g. --split 1,0,0)")


def _default_cache_dir(prefixes: list[str]) -> str:
    """``<first prefix>-index-cache/<fingerprint>``: next to the data, never in the source tree.

    Megatron's own default (``<prefix>/cache/GPTDataset_indices``) is not content-keyed either, and
    caches nothing for a blend; the fingerprint (path, size, mtime of every .bin/.idx) makes a
    rewritten dataset get fresh indices instead of stale ones.
    """
    h = hashlib.sha1()
    for prefix in prefixes:
        for ext in (".bin", ".idx"):
            st = os.stat(prefix + ext)
            h.update(f"{os.path.abspath(prefix)}{ext}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return os.path.join(prefixes[0] + "-index-cache", h.hexdigest()[:16])


@contextlib.contextmanager
def _process_group_if_needed(needed: bool):
    """A one-rank gloo group (in-memory store, no network) while a single process builds a blend."""
    if not needed or torch.distributed.is_initialized():
        yield
        return
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0,
                                         world_size=1)
    try:
        yield
    finally:
        torch.distributed.destroy_process_group()


def build_gpt_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                       num_samples: tuple[int, int, int], tokenizer, cache_dir: str | None = None):
    """(train, valid, test) GPTDatasets (or BlendedDatasets for several prefixes); None for a split
    of weight 0. Megatron-LM's GPT defaults: no position-id / attention-mask reset, no EOD loss mask,
    no attention mask in the samples (the model applies its own causal mask).

    Each dataset holds at least ``num_samples`` of its split (Megatron builds whole epochs and rounds
    blend parts up). ``cache_dir`` defaults to ``_default_cache_dir`` (next to the first prefix).
    Call it on every rank, with or without torch.distributed. Every rank builds (``is_built_on_rank``
    is always true); Megatron-LM instead builds on TP rank 0 and broadcasts batches.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    pairs = check_data_prefixes(data_path)
    prefixes = [p for _, p in pairs]
    weights = [w for w, _ in pairs] if pairs[0][0] is not None and len(pairs) > 1 else None
    if not (isinstance(seq_length, numbers.Integral) and seq_length > 0):
        raise DataError(f"--seq-length: expected a positive int, found {seq_length!r}")
    sizes = list(num_samples)
    if len(sizes) != 3 or not all(isinstance(s, numbers.Integral) and s >= 0 for s in sizes):
        raise DataError(f"num_samples: expected three non-negative ints (train, valid, test), found "
                        f"{num_samples!r}; compute them from iterations x global batch size")
    if not re.fullmatch(r"\s*\d+(\.\d*)?(\s*,\s*\d+(\.\d*)?){0,2}\s*", str(split)) or \
            sum(map(float, str(split).split(","))) <= 0:
        raise DataError(f"--split: expected up to three non-negative weights with a positive sum "
                        f"(train,valid,test), found {split!r}; e.g. --split 949,50,1")
    config = GPTDatasetConfig(
        random_seed=int(seed), sequence_length=int(seq_length), blend=(prefixes, weights), split=split,
        path_to_cache=cache_dir or _default_cache_dir(prefixes), mmap_bin_files=True,
        tokenizer=tokenizer, reset_position_ids=False, reset_attention_mask=False,
        eod_mask_loss=False, create_attention_mask=False)
    _check_split_documents(prefixes, split, config.split_matrix)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [int(s) for s in sizes], lambda: True, config)
    with _process_group_if_needed(len(prefixes) > 1):
        train, valid, test = builder.build()
    return train, valid, test


def micro_batches(dataset, consumed_samples: int, micro_batch_size: int, data_parallel_rank: int,
                  data_parallel_size: int) -> Iterator[dict]:
    """This rank's micro-batches in Megatron's ``MegatronPretrainingSampler`` order.

    Micro-batch k holds global samples ``consumed_samples + k*mbs*dp + dp_rank*mbs + j``, j < mbs.
    So resuming at ``consumed_samples`` replays an uninterrupted run exactly, and DP ranks split
    each step's samples in rank order. It stops before a step the dataset cannot fill for every
    rank (drop_last), so all ranks stop after the same number of micro-batches. Batches are CPU
    tensors ``[mbs, seq_length]``; any ``attention_mask`` / ``dataset_id`` is dropped.
    """
    if dataset is None:
        raise DataError("micro_batches: expected a dataset, found None (that split has weight 0 in "
                        "--split); give it a weight or do not iterate it")
    for name, value, low in (("consumed_samples", consumed_samples, 0),
                             ("micro_batch_size", micro_batch_size, 1),
                             ("data_parallel_size", data_parallel_size, 1)):
        if not (isinstance(value, numbers.Integral) and value >= low):
            raise DataError(f"micro_batches: expected {name} to be an int >= {low}, found {value!r}")
    if not (isinstance(data_parallel_rank, numbers.Integral)
            and 0 <= data_parallel_rank < data_parallel_size):
        raise DataError(f"micro_batches: expected 0 <= data_parallel_rank < {data_parallel_size}, "
                        f"found {data_parallel_rank!r}")

    def generate():
        step, start, total = micro_batch_size * data_parallel_size, consumed_samples, len(dataset)
        while start + step <= total:
            first = start + data_parallel_rank * micro_batch_size
            samples = [dataset[i] for i in range(first, first + micro_batch_size)]
            # stack copies: 0.13 hands every sample the same cached loss_mask / position_ids tensor
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in samples]) for k in _BATCH_KEYS}
            batch["loss_mask"] = batch["loss_mask"].float()
            yield batch
            start += step

    return generate()
