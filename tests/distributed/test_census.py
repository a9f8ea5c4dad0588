"""The LoRA census (``benchmarks/census.py``, issues 16 and 25) at a small shape, TP=1 and TP=2 (with
and without SP; the MoE layer at TP=1 and TP=2 SP only, as Megatron's MoE needs SP at TP > 1): it
runs end to end as a user runs it (``python -m benchmarks.census``, in a subprocess: tests do not
import ``benchmarks/``), and its numbers obey what holds by construction.

No current op count is pinned except the GEMMs, an invariant: see ``test_gemm_counts``."""

import json
import subprocess
import sys

import pytest

from tests import REPO_ROOT

# Tokens per rank 96 (48 under SP) differ from every weight dimension (128, 256, 512, 8, ...), so
# the activation-shaped split of the bytes is never ambiguous. The MoE layer: 8 experts, top-2,
# expert ffn 112 (weight dimensions 224 / 112, 112 / 56 at TP=2; the experts get 22 to 33 tokens),
# the last expert shut out by the router's expert bias, so that the GEMM invariant covers an
# expert that runs on 0 tokens.
SMALL = ["--seq", "32", "--batch", "3", "--hidden", "128", "--out-features", "256", "--ffn", "256",
         "--heads", "8", "--groups", "4", "--rank", "8", "--alpha", "16", "--experts", "8", "--topk", "2",
         "--moe-ffn", "112", "--empty-experts", "1"]
EXPERTS, EMPTY = 8, 1
ROWS = {(layout, target) for layout in ("TP=1", "TP=2", "TP=2 SP") for target in ("column", "row", "layer")} | {
    ("TP=1", "moe"), ("TP=2 SP", "moe")}  # no moe row at TP=2 without SP
ROW_KEYS = {"layout", "tp", "sp", "target", "input_bytes", "output_bytes", "base", "base_vs_base",
            "variants", "ranks_agree"}
MEASURE_KEYS = {"ops", "collectives", "no_data_ops", "bytes_touched", "bytes_by_name", "param_shaped_bytes",
                "saved_bytes", "saved_input_bytes", "param_split_ambiguous"}
EXTRA_KEYS = {"aten_ops", "aten_ops_by_name", "collectives", "collectives_by_name", "no_data_ops",
              "bytes_touched", "param_shaped_bytes", "saved_bytes", "saved_input_bytes",
              "bytes_touched_x_activations", "activation_shaped_bytes_x_activations", "saved_x_input"}
GEMMS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "addbmm", "_addmm_activation"}
FP32 = 4


@pytest.fixture(scope="module")
def census(tmp_path_factory):
    out = tmp_path_factory.mktemp("census") / "census.json"
    run = subprocess.run([sys.executable, "-m", "benchmarks.census", "--tp", "1", "2", *SMALL, "--json", str(out)],
                         cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


def _lora_rows(result):
    for row in result["rows"]:
        for name, v in row["variants"].items():
            yield row, name, v


def test_json_has_the_documented_keys_and_every_row(census):
    result, table = census
    assert {"rows", "shape", "variants", "skipped_variants", "meta"} <= set(result)
    assert {(r["layout"], r["target"]) for r in result["rows"]} == ROWS
    for row in result["rows"]:
        assert ROW_KEYS <= set(row), row.keys()
        assert MEASURE_KEYS <= set(row["base"])
        assert EXTRA_KEYS <= set(row["base_vs_base"])
        # every variant this LoRAConfig supports is measured or refused by name ("lora" always is measured)
        assert set(row["variants"]) | set(row.get("refused", {})) == \
            set(result["variants"]) - set(result["skipped_variants"])
        assert "lora" in row["variants"]
        for v in row["variants"].values():
            assert MEASURE_KEYS <= set(v["lora"]) and EXTRA_KEYS <= set(v["extra"])
    for row, name, _ in _lora_rows(result):
        assert f"| {row['layout']} | {row['target']} | {name} |" in table, table


def test_dora_is_refused_only_where_an_expert_row_layer_is_reduced_by_the_dispatcher(census):
    """The moe row at TP=2 SP has expert-TP 2: its experts' linear_fc2 has no reduction of its own
    for DoRA's norm (docs/design.md §18); every other row measures DoRA."""
    result, table = census
    refused = {(r["layout"], r["target"], name): message for r in result["rows"]
               for name, message in r.get("refused", {}).items()}
    assert list(refused) == [("TP=2 SP", "moe", "dora")], refused
    assert "linear_fc2" in refused[("TP=2 SP", "moe", "dora")] and "Refused by the package" in table


def test_counts_are_positive_integers_and_the_control_is_zero(census):
    result, _ = census
    for row in result["rows"]:
        assert row["ranks_agree"], row.get("ops_per_rank")
        # Two separately built base layers: the method itself adds nothing.
        control = row["base_vs_base"]
        assert control["aten_ops_by_name"] == {} and control["collectives_by_name"] == {}, control
        assert control["bytes_touched"] == control["saved_bytes"] == 0, control
        assert not row["base"]["param_split_ambiguous"]
        for m in [row["base"]] + [v["lora"] for v in row["variants"].values()]:
            assert m["ops"] and all(isinstance(n, int) and n > 0 for n in m["ops"].values()), m["ops"]
            assert m["bytes_touched"] > 0
    for row, _, v in _lora_rows(result):
        e = v["extra"]
        assert isinstance(e["aten_ops"], int) and e["aten_ops"] > 0, e
        assert e["bytes_touched"] > 0 and e["bytes_touched_x_activations"] > 0, e
        assert not v["lora"]["param_split_ambiguous"]


def test_collectives_are_seen_and_lora_adds_none(census):
    result, _ = census
    for row, _, v in _lora_rows(result):
        # The dispatch mode sees c10d ops: the base's own all-reduce / gather / reduce-scatter.
        assert (sum(row["base"]["collectives"].values()) > 0) == (row["tp"] > 1), row["base"]
        # docs/design.md §2: the rank-r term rides in the base layer's own collectives.
        assert v["extra"]["collectives_by_name"] == {}, (row["layout"], row["target"], v["extra"])


def test_gemm_counts(census):
    """The one pinned count. Per LoRA linear call the branch is six GEMM-class ops whatever the
    kernels: forward u = X A^T and Y += s u B^T; backward g = dY B, dX += s g A, dB = s dY^T u and
    dA = s g^T X. The frozen base runs two (Y = X W^T, dX = dY W): no weight-gradient GEMM.
    Recomputing the branch input recomputes a norm / activation, never a GEMM. DoRA adds one per
    call: W + s B A for the weight norm (forward).

    The MoE layer calls its adapted linears 2 + 2 x experts times: linear_qkv, linear_proj and
    every expert's linear_fc1 and linear_fc2, because Megatron's SequentialMLP runs every local
    expert, one with 0 tokens too, and its six branch ops still dispatch (on empty operands)."""
    result, _ = census
    for row in result["rows"]:
        if row["target"] in ("column", "row"):
            assert sum(n for k, n in row["base"]["ops"].items() if k in GEMMS) == 2, row["base"]["ops"]
        calls = {"column": 1, "row": 1, "layer": 4, "moe": 2 + 2 * EXPERTS}[row["target"]]
        assert row["linear_calls"] == calls, (row["layout"], row["target"], row["linear_calls"])
        if row["target"] == "moe":  # the empty expert is there, and ran
            tokens = row["tokens_per_expert"]
            assert len(tokens) == EXPERTS and tokens[-EMPTY:] == [0] * EMPTY and min(tokens[:-EMPTY]) > 0, tokens
    for row, name, v in _lora_rows(result):
        gemms = sum(n for k, n in v["extra"]["aten_ops_by_name"].items() if k in GEMMS)
        per_call = 7 if name == "dora" else 6
        assert gemms == per_call * row["linear_calls"], (row["layout"], row["target"], name, v["extra"])


def test_saved_for_backward(census):
    result, _ = census
    sh = result["shape"]
    for row in result["rows"]:
        # Megatron's frozen linear keeps only its weight: nothing here.
        if row["target"] in ("column", "row"):
            assert row["base"]["saved_bytes"] == 0, row["base"]
    for row, name, v in _lora_rows(result):
        e = v["extra"]
        if row["target"] in ("layer", "moe") or name != "lora":
            assert 0 < e["saved_bytes"], e
            continue
        # Without recompute, the standalone column / row layer keeps exactly its own input (the
        # branch input, which the frozen base never keeps) and, besides it, at most one rank-r
        # activation of the full sequence (u = X A^T or the reduced X_i A_i^T).
        assert e["saved_input_bytes"] == row["input_bytes"], (row["layout"], row["target"], name, e)
        rank_r = sh["seq"] * sh["batch"] * sh["rank"] * FP32
        assert 0 <= e["saved_bytes"] - e["saved_input_bytes"] <= rank_r, (row["layout"], row["target"], name, e)
    # DoRA keeps, beyond LoRA, the unscaled output Z for the magnitude's gradient (a row layer at TP > 1:
    # the reduced message it is a view of, [Z | rank-r rider | norm tail]) and two fp32 [out] vectors.
    for row in result["rows"]:
        if row["target"] not in ("column", "row") or "dora" not in row["variants"]:
            continue
        more = row["variants"]["dora"]["extra"]["saved_bytes"] - row["variants"]["lora"]["extra"]["saved_bytes"]
        out = sh["out_features"] // (row["tp"] if row["target"] == "column" else 1)
        tokens = row["output_bytes"] // (out * FP32)
        message = 0 if row["target"] == "column" or row["tp"] == 1 else (tokens * sh["rank"] + out) * FP32
        assert more == row["output_bytes"] + message + 2 * out * FP32, (row["layout"], row["target"], more)
    # Recomputing the branch input never keeps more than keeping it.
    for row in result["rows"]:
        recompute = row["variants"].get("lora recompute_branch_input")
        if recompute is not None:
            assert recompute["extra"]["saved_bytes"] <= row["variants"]["lora"]["extra"]["saved_bytes"]
