"""The TP=2 benchmark at a tiny size, so it cannot rot: it runs end to end, renders its table, and
its collective counts say what docs/design.md §2 promises (LoRA issues exactly the frozen base's TP
collectives, with or without SP; the naive baseline issues more).

It runs as a user runs it, ``python -m benchmarks.bench_lora_tp2``, in a subprocess (tests do not
import ``benchmarks/``): the table is its output, the measurements its ``--json`` file."""

import json
import subprocess
import sys

from tests import REPO_ROOT

TINY = ["--hidden", "64", "--ffn", "128", "--layers", "1", "--seq", "32", "--rank", "4", "--reps", "1",
        "--warmup", "0"]


def test_benchmark_runs_and_lora_adds_no_collectives(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.bench_lora_tp2", *TINY, "--json", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    calls = {name: row["calls"] for name, row in rows.items()}

    assert calls["(a) base"] > 0, calls  # the counter sees the base layers' own collectives
    assert calls["(b) lora"] == calls["(a) base"], calls
    assert calls["(c) naive"] > calls["(a) base"], calls
    assert calls["(b) lora SP"] == calls["(a) base SP"], calls
    # The rank-r rider makes LoRA's messages slightly larger, never fewer or smaller.
    assert rows["(b) lora"]["comm_bytes"] > rows["(a) base"]["comm_bytes"]
    assert rows["(a) base"]["state"] == 0 < rows["(b) lora"]["state"]
    assert all(row["median_s"] > 0 and row["saved"] > 0 for row in rows.values())

    table = run.stdout
    assert all(f"| {name} |" in table for name in rows), table
