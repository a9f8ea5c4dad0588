"""Tokenize a text corpus into a Megatron indexed dataset (PREFIX.bin + PREFIX.idx) for --data-path.

    python scripts/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus
    python scripts/demo_corpus.py --output-dir /tmp/c && \
        python scripts/preprocess_data.py --input /tmp/c/code.jsonl --output-prefix /tmp/c/code

Flags follow Megatron-LM's tools/preprocess_data.py, with two differences: the files are exactly
``--output-prefix``.bin/.idx (Megatron-LM appends ``_<key>_document``), and one --json-keys key.

Input formats (``--input-format auto`` picks by suffix: ``.txt`` is text, anything else JSON lines):
  jsonl  one JSON object per line, the document in ``--json-keys`` (default "text"); blank lines
         are skipped. Use this for code: it keeps blank lines inside a document.
  text   documents separated by one or more blank lines.
``--input -`` reads stdin (JSON lines unless ``--input-format text``). Every document ends with one
end-of-document token (``--append-eod`` is accepted and always on). Input errors print one line
``error: ...`` to stderr and exit 2; a failed run leaves no partial dataset behind.
"""

import argparse
import json
import os
import sys
import time

from megatron_lora.training.quiet import quiet_known_messages

quiet_known_messages()  # before Megatron-Core is imported

from megatron_lora.training.data import TOKENIZERS, DataError, build_tokenizer, write_indexed_dataset  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--input", required=True, help="corpus file (.jsonl or .txt), or - for stdin")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-keys", default="text", help="JSON key holding the document (jsonl input)")
    p.add_argument("--input-format", choices=["auto", "jsonl", "text"], default="auto",
                   help="auto: .txt is text (blank-line separated), anything else is JSON lines")
    p.add_argument("--tokenizer-type", choices=sorted(TOKENIZERS), default="ByteLevel")
    p.add_argument("--tokenizer-model", default=None,
                   help="local Hugging Face tokenizer directory (--tokenizer-type HuggingFaceTokenizer)")
    p.add_argument("--append-eod", action="store_true",
                   help="accepted for Megatron-LM compatibility; an EOD always ends each document")
    return p.parse_args(argv)


def jsonl_documents(lines, name, key):
    """One document per JSON line; errors name the line so it can be fixed in place."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{name}:{lineno}: expected one JSON object per line, found invalid "
                            f"JSON ({err.msg}); fix the line or pass --input-format text") from None
        if not isinstance(obj, dict) or key not in obj:
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{name}:{lineno}: expected key {key!r} (--json-keys), found {found}; "
                            f"pass --json-keys with the key that holds the text")
        if not isinstance(obj[key], str):
            raise DataError(f"{name}:{lineno}: expected a string under {key!r}, found "
                            f"{type(obj[key]).__name__}; store the document as text")
        yield obj[key]


def text_documents(lines):
    """Documents separated by blank lines; a document keeps its own line breaks."""
    doc = []
    for line in lines:
        if line.strip():
            doc.append(line.rstrip("\n"))
        elif doc:
            yield "\n".join(doc)
            doc = []
    if doc:
        yield "\n".join(doc)


def main(argv=None):
    args = parse_args(argv)
    fmt = args.input_format
    if fmt == "auto":
        fmt = "text" if args.input.endswith(".txt") else "jsonl"
    start = time.time()
    try:
        if args.input == "-":
            stream, name = sys.stdin, "<stdin>"
        elif not os.path.isfile(args.input):
            raise DataError(f"--input: expected an existing file, found no file at {args.input}; "
                            f"check the path (scripts/demo_corpus.py writes a sample corpus)")
        else:
            stream, name = open(args.input, encoding="utf-8"), args.input
        with stream:
            docs = jsonl_documents(stream, name, args.json_keys) if fmt == "jsonl" \
                else text_documents(stream)
            stats = write_indexed_dataset(docs, args.output_prefix, build_tokenizer(args.tokenizer_type, args.tokenizer_model))
    except UnicodeDecodeError as err:
        print(f"error: --input: expected UTF-8 text, found {err}; convert the file to UTF-8",
              file=sys.stderr)
        return 2
    except (DataError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    files = ", ".join(f"{args.output_prefix}{ext} ({os.path.getsize(args.output_prefix + ext):,} B)"
                      for ext in (".bin", ".idx"))
    print(f"preprocess_data: {stats['documents']:,} documents, {stats['tokens']:,} tokens "
          f"({args.tokenizer_type}) -> {files} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
