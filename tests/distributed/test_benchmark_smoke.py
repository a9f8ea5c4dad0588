"""The TP=2 benchmark at a tiny size, so it cannot rot: it runs end to end, renders its table, and
its collective counts say what DESIGN §2 promises (LoRA issues exactly the frozen base's TP
collectives, with or without SP; the naive baseline issues more)."""

from benchmarks.bench_lora_tp2 import format_table, run_benchmark


def test_benchmark_runs_and_lora_adds_no_collectives():
    result = run_benchmark(hidden=64, ffn=128, layers=1, seq=32, rank=4, reps=1, warmup=0)
    rows = result["rows"]
    calls = {name: row["calls"] for name, row in rows.items()}

    assert calls["(a) base"] > 0, calls  # the counter sees the base layers' own collectives
    assert calls["(b) lora"] == calls["(a) base"], calls
    assert calls["(c) naive"] > calls["(a) base"], calls
    assert calls["(b) lora SP"] == calls["(a) base SP"], calls
    # The rank-r rider makes LoRA's messages slightly larger, never fewer or smaller.
    assert rows["(b) lora"]["comm_bytes"] > rows["(a) base"]["comm_bytes"]
    assert rows["(a) base"]["state"] == 0 < rows["(b) lora"]["state"]
    assert all(row["median_s"] > 0 and row["saved"] > 0 for row in rows.values())

    table = format_table(result)
    assert all(f"| {name} |" in table for name in rows), table
