"""Write two demo corpora as JSON lines, read at run time from this machine's Python standard library.

    python scripts/demo_corpus.py --output-dir /tmp/corpus [--max-files 120]
    python scripts/preprocess_data.py --input /tmp/corpus/code.jsonl --output-prefix /tmp/corpus/code

``code.jsonl``: one document per stdlib module, its source with every docstring removed (parsed
and unparsed with ``ast``, so comments go too). ``docstrings.jsonl``: one document per module,
class or function docstring. Two clearly different distributions (pretrain on code, LoRA-tune on
prose) with no download and no text in this repository. Records are ``{"text": ..., "source": ...}``.
"""

import argparse
import ast
import json
import os
import pathlib
import sysconfig
import time

_DOCUMENTED = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def split_module(source: str):
    """(code without docstrings, [docstrings]) of one module; raises SyntaxError if unparsable."""
    tree = ast.parse(source)
    docstrings = []
    for node in ast.walk(tree):
        if isinstance(node, _DOCUMENTED):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                docstrings.append(doc)
                node.body = node.body[1:] or [ast.Pass()]  # a body cannot be empty
    return ast.unparse(tree), docstrings


def stdlib_files(max_files: int):
    """The first ``max_files`` top-level stdlib modules in sorted order (stable across runs)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(root.glob("*.py"))[:max_files]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", required=True)
    p.add_argument("--max-files", type=int, default=120, help="stdlib modules to read")
    args = p.parse_args(argv)
    if args.max_files < 1:
        p.error(f"--max-files: expected a positive number of modules, found {args.max_files}")
    start = time.time()
    os.makedirs(args.output_dir, exist_ok=True)
    code_path = os.path.join(args.output_dir, "code.jsonl")
    doc_path = os.path.join(args.output_dir, "docstrings.jsonl")
    n_files = n_code = n_doc = skipped = 0
    with open(code_path, "w", encoding="utf-8") as code_out, \
            open(doc_path, "w", encoding="utf-8") as doc_out:
        for path in stdlib_files(args.max_files):
            try:
                code, docstrings = split_module(path.read_text(encoding="utf-8"))
            except (SyntaxError, UnicodeDecodeError):  # e.g. lib2to3 test data, odd encodings
                skipped += 1
                continue
            n_files += 1
            code_out.write(json.dumps({"text": code, "source": path.name}) + "\n")
            n_code += len(code)
            for doc in docstrings:
                doc_out.write(json.dumps({"text": doc, "source": path.name}) + "\n")
                n_doc += 1
    print(f"demo_corpus: {n_files} modules ({skipped} skipped) -> {code_path} "
          f"({os.path.getsize(code_path):,} B, {n_code:,} chars), {doc_path} "
          f"({os.path.getsize(doc_path):,} B, {n_doc:,} docstrings) in {time.time() - start:.1f}s")


if __name__ == "__main__":
    main()
