"""In-memory exports of a mixture-of-experts LoRA model at expert parallelism (issue 26):
``export_merged`` and ``export_peft`` of a Qwen3-MoE model at EP=2, EP=4, TP=2 + SP with
expert-TP=2 and EP=2, TP=1 with expert-TP=2 and EP=2, PP=2 with EP=2 and TP=2 + SP with
expert-TP=1 (every rank holds every expert), against the file conversions, transformers and peft:
bit for bit, the logits, the bytes each rank receives and the peak memory; and DoRA experts (issue
27), which export merged only.

A tiny random Qwen3-MoE (q/k norms, 4 experts top-2, ``test_convert_families``' model) is
converted with ``hf-to-megatron``; each layout builds it from the written flags with LoRA r=4 on
attention, both expert linears and the router, random non-zero B's for the logical adapter (the
same at every layout: checked), and exports in memory; one rank then runs ``merge --to hf`` and
``megatron-to-peft`` (both expert layouts) on the adapter the layouts saved. The rank workers live
in ``export_moe_cases.py``.
"""

import os

import pytest
import torch

from megatron_lora.hf.mapping import arch_from_hf_config, hf_shapes
from tests.distributed import export_moe_cases as E
from tests.distributed import family_cases as F
from tests.distributed import script_runs as S
from tests.distributed.launcher import run_distributed

transformers = pytest.importorskip("transformers", reason="needs the hf extra: pip install -e '.[hf]'")
peft = pytest.importorskip("peft", reason="needs the hf extra: pip install -e '.[hf]'")

from tests.distributed.test_convert_families import _cls, _config, _logits, _random_model  # noqa: E402
from tests.distributed.test_export import _bitwise_equal, _load  # noqa: E402

KIND = "qwen3_moe"
TOL = 1e-4  # fp32


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The HF model, its Megatron conversion, and each layout's exports (run once per module)."""
    root = tmp_path_factory.mktemp("export_moe")
    paths = {name: str(root / name) for name in ("hf_model", "mg_base", "offline")}
    hf = _random_model(KIND, seed=1)
    hf.save_pretrained(paths["hf_model"])
    paths["data"] = S.make_dataset(str(root), n=40)
    run_distributed(F.convert_worker, 1, paths, [["hf-to-megatron", "--hf-dir", "hf_model", "--output", "mg_base"]])
    runs, saved = {}, {}
    for name, lay in E.LAYOUTS.items():
        saved[name] = str(root / f"{name}.safetensors")
        runs[name] = run_distributed(E.export_worker, lay["world"], paths, name, saved[name], tp=lay["tp"],
                                     pp=lay.get("pp", 1), expert_model_parallel_size=lay["ep"],
                                     expert_tensor_parallel_size=lay["etp"])
    run_distributed(E.offline_worker, 1, paths, saved["ep2"])
    return paths, runs, saved, hf


def _megatron_logits(ranks):
    return ranks[-1]["logits"]  # the last stage has them (every rank at PP=1)


def test_every_layout_holds_the_same_adapter(work):
    """The offline conversions read the EP=2 save; the others saved the same adapter bit for bit."""
    _, _, saved, _ = work
    reference = _load(os.path.dirname(saved["ep2"]), os.path.basename(saved["ep2"]))
    assert any(".local_experts.3.linear_fc2.lora_B" in k for k in reference)
    assert all(t.abs().sum() > 0 for k, t in reference.items() if k.endswith("lora_B"))  # trained: B != 0
    for name, path in saved.items():
        _bitwise_equal(_load(os.path.dirname(path), os.path.basename(path)), reference)


@pytest.mark.parametrize("layout", E.LAYOUTS)
def test_merged_stream_equals_merge_to_hf_bit_for_bit(work, layout):
    paths, runs, _, _ = work
    ranks = runs[layout]
    want = _load(os.path.join(paths["offline"], "merged"), "model.safetensors")
    assert any(".mlp.experts.3.down_proj.weight" in k for k in want) and any("q_norm" in k for k in want)
    _bitwise_equal(ranks[0]["merged"], want)
    assert list(ranks[0]["merged"]) == list(hf_shapes(arch_from_hf_config(_config(KIND).to_dict())))  # pipeline order
    assert all(r["merged"] == {} for r in ranks[1:])  # dst=0: the others only send
    _bitwise_equal(ranks[0]["merged_bf16"], _load(os.path.join(paths["offline"], "merged_bf16"), "model.safetensors"))
    for r in ranks:
        _bitwise_equal(r["merged_every_rank"], want)
        _bitwise_equal(r["merged_bf16_every_rank"], ranks[0]["merged_bf16"])
        assert r["unchanged"]
    _bitwise_equal(ranks[-1]["merged_on_last"], want)
    assert all(r["merged_on_last"] == {} for r in ranks[:-1])


@pytest.mark.parametrize("layout", E.LAYOUTS)
def test_peft_export_equals_megatron_to_peft_bit_for_bit_in_both_expert_layouts(work, layout):
    import json

    paths, runs, _, _ = work
    ranks = runs[layout]
    for key, directory in (("peft_fused", "peft_fused"), ("peft_per_expert", "peft_per_expert")):
        tensors, config = ranks[0][key]
        _bitwise_equal(tensors, _load(os.path.join(paths["offline"], directory), "adapter_model.safetensors"))
        written = json.load(open(os.path.join(paths["offline"], directory, "adapter_config.json")))
        assert json.loads(json.dumps(config)) == written
        assert all(r[key] is None for r in ranks[1:])
    assert any(".mlp.experts.2.up_proj.lora_B" in k for k in ranks[0]["peft_per_expert"][0])
    assert any(".mlp.experts.base_layer.lora_A" in k for k in ranks[0]["peft_fused"][0])
    for r in ranks:  # dst=None
        _bitwise_equal(r["peft_every_rank"][0], ranks[0]["peft_per_expert"][0])
        assert r["peft_every_rank"][1] == ranks[0]["peft_per_expert"][1]


def _fused_experts(state, num_layers, num_experts):
    """A per-expert Hugging Face state dict (as ``save_pretrained`` writes Qwen3-MoE) in the layout
    transformers 5 holds in memory: per layer ``mlp.experts.gate_up_proj [E, 2I, H]`` (each
    expert's gate rows, then its up rows) and ``mlp.experts.down_proj [E, H, I]``."""
    out = {k: v for k, v in state.items() if ".mlp.experts." not in k}
    for n in range(num_layers):
        p = f"model.layers.{n}.mlp.experts."
        gate_up = [torch.cat([state[f"{p}{e}.gate_proj.weight"], state[f"{p}{e}.up_proj.weight"]])
                   for e in range(num_experts)]
        out[p + "gate_up_proj"] = torch.stack(gate_up)
        out[p + "down_proj"] = torch.stack([state[f"{p}{e}.down_proj.weight"] for e in range(num_experts)])
    return out


def test_the_fusing_of_the_test_is_transformers_own(work):
    """``_fused_experts`` of what ``save_pretrained`` wrote is the model's in-memory state, bit for bit."""
    paths, _, _, hf = work
    _bitwise_equal(_fused_experts(_load(paths["hf_model"], "model.safetensors"), 2, 4), hf.state_dict())


@pytest.mark.parametrize("layout", E.LAYOUTS)
def test_merged_stream_loaded_strictly_in_transformers_gives_the_megatron_logits(work, layout):
    _, runs, _, hf = work
    ranks = runs[layout]
    model = _cls(KIND)(_config(KIND)).eval()
    model.load_state_dict(_fused_experts(ranks[0]["merged"], 2, 4), strict=True)
    megatron = _megatron_logits(ranks)
    assert (megatron - _logits(hf)).abs().max() > 1e-2  # the adapter matters
    diff = (_logits(model) - megatron).abs().max().item()
    print(f"max |logit difference| merged stream ({layout}) in transformers vs Megatron: {diff:.3g}")
    assert diff <= TOL


@pytest.mark.parametrize("layout", ["ep2", "tp2_sp_etp2_ep2", "etp2_ep2"])
@pytest.mark.parametrize("key", ["peft_fused", "peft_per_expert"])
def test_peft_export_loaded_in_peft_gives_the_megatron_logits(work, layout, key):
    from peft import PeftConfig, get_peft_model, set_peft_model_state_dict

    _, runs, _, hf = work
    ranks = runs[layout]
    tensors, config = ranks[0][key]
    base = _cls(KIND)(_config(KIND)).eval()
    base.load_state_dict(hf.state_dict())
    model = get_peft_model(base, PeftConfig.from_peft_type(**config))
    result = set_peft_model_state_dict(model, tensors)
    assert not result.unexpected_keys and not [k for k in result.missing_keys if "lora_" in k]
    diff = (_logits(model.eval()) - _megatron_logits(ranks)).abs().max().item()
    print(f"max |logit difference| PEFT ({key}, {layout}) vs Megatron: {diff:.3g}")
    assert diff <= TOL


# ------------------------------------------------------------------------------- bytes (§16)

DENSE_NAMES = 1 + 2 * 7 + 2  # embedding; per layer 2 norms, qkv, q/k norms, proj, router; final norm, output


def _routes(lay, every_rank, is_dst):
    """Bytes of the routes a rank receives: the expert group's coordinates (3 int32 per other rank),
    the pipeline flags (an int32 per dense tensor name per other stage), ``dst``'s pipeline ranks
    (an int64 per stage, on ranks other than ``dst``)."""
    pp = lay.get("pp", 1)
    return 12 * (lay["etp"] * lay["ep"] * pp - 1) + 4 * DENSE_NAMES * (pp - 1) + (0 if every_rank or is_dst else 8 * pp)


def _own_sources(r, dst):
    """Whether ``r`` (not ``dst``) gathers and sends the experts it holds: it has ``dst``'s expert-TP
    rank (expert-TP rank 0 when every rank receives)."""
    return r["etp"] == (0 if dst is None else dst["etp"])


@pytest.mark.parametrize("layout", E.LAYOUTS)
def test_merged_stream_to_dst_receives_each_tensor_once_and_the_others_their_own_shards(work, layout):
    """``export_merged(dtype=bf16, dst=0)``: bytes each rank receives (``ReceivedBytes``), exactly.
    ``dst``: the merged model less its own base shards (each tensor once). A rank with ``dst``'s
    expert-TP rank sources its experts: their other expert-TP shards, ``(ETP - 1)`` x its own; the
    dense collector of another stage likewise ``(TP - 1)`` x its sharded dense tensors; everyone
    else receives no payload. Plus the routes (``_routes``) and two int64 checks (finite factors,
    experts where Megatron numbers them); no ``*_object`` call."""
    _, runs, _, _ = work
    ranks, lay = runs[layout], E.LAYOUTS[layout]
    model = sum(t.nbytes for t in ranks[0]["merged_bf16"].values())
    dst, figures = ranks[0], []
    for r in ranks:
        got = r["received"]
        payload = got.get("gather", 0) + got.get("recv", 0)
        if r is dst:
            expected = model - r["own_bf16"]
        else:
            expected = (lay["etp"] - 1) * r["own_expert_bf16"] * _own_sources(r, dst)
            if r["pp"] != dst["pp"] and r["tp"] == dst["tp"] and r["dp"] == dst["dp"]:
                expected += (lay["tp"] - 1) * r["own_dense_sharded_bf16"]
        routes = got.get("all_gather", 0) + got.get("broadcast", 0)
        figures.append((r["rank"], payload, routes))
        assert (payload, routes) == (expected, _routes(lay, False, r is dst)), r["rank"]
        assert got.get("all_reduce", 0) == 16 and got["objects"] == 0
        assert r is dst or payload <= r["own_bf16"]  # O(its own shards)
    print(f"{layout}: merged model {model} B; (rank, payload, routes) {figures}")


@pytest.mark.parametrize("layout", E.LAYOUTS)
def test_merged_stream_to_every_rank_receives_each_tensor_once(work, layout):
    """``export_merged(dtype=bf16, dst=None)``: every rank receives the merged model once, less its
    own dense shards and, on the expert-TP rank 0 that sources its experts, less its own expert
    shards (the other expert-TP ranks get their experts back whole from the broadcast)."""
    _, runs, _, _ = work
    ranks, lay = runs[layout], E.LAYOUTS[layout]
    model = sum(t.nbytes for t in ranks[0]["merged_bf16"].values())
    figures = []
    for r in ranks:
        got = r["received_every_rank"]
        moved = sum(got.get(op, 0) for op in ("gather", "recv", "broadcast", "all_gather"))
        payload = moved - _routes(lay, True, False)
        expected = model - r["own_bf16"] + r["own_expert_bf16"] * (not _own_sources(r, None))
        figures.append((r["rank"], payload))
        assert payload == expected, r["rank"]
        assert got.get("all_reduce", 0) == 16 and got["objects"] == 0
    print(f"{layout}: every rank: merged model {model} B; (rank, payload) {figures}")


def _bound(t, factors, d=2):
    """``export_merged``'s documented peak for one tensor: max((4 + d)·S, d·(N + 2·S)) + the factors."""
    return max((4 + d) * t["S"], d * (t["N"] + 2 * t["S"])) + factors


@pytest.mark.parametrize("dst", [None, 0], ids=["every-rank", "dst0"])
def test_merged_stream_peak_memory_is_the_documented_bound(work, dst):
    """TP=2 + SP, expert-TP=2, EP=2, a bf16 model exported in bf16: each receiving rank's peak
    while it makes a tensor stays under the bound of that tensor's N and this rank's shard S (an
    expert: N/ETP on its EP rank, 0 elsewhere); with ``dst=0`` a rank that sources experts stays
    under the bound of the tensors it holds, and a rank that only contributes shards under
    ``(4 + d)·S``."""
    paths, _, _, _ = work
    ranks = run_distributed(E.memory_worker, 4, paths, "tp2_sp_etp2_ep2", dst, tp=2, expert_model_parallel_size=2,
                            expert_tensor_parallel_size=2)
    for r in ranks:
        assert r["param_dtype"] == "torch.bfloat16"
        held = [t for t in r["tensors"].values() if t["S"]]
        print(f"rank {r['rank']} (ep {r['ep']}, etp {r['etp']}) peak {r['peak']} B; largest bound "
              f"{max(_bound(t, r['factors']) for t in r['tensors'].values())} B")
        if dst is None or r["rank"] == dst:
            over = {n: (t["peak"], _bound(t, r["factors"])) for n, t in r["tensors"].items()
                    if t["peak"] > _bound(t, r["factors"])}
            assert not over, over
            assert any(t["peak"] > 0 for t in r["tensors"].values())
        elif r["etp"] == ranks[dst]["etp"]:  # sources its EP rank's experts
            assert r["peak"] <= max(_bound(t, r["factors"]) for t in held)
        else:
            assert r["peak"] <= max(6 * t["S"] for t in held) + r["factors"]


def test_experts_where_megatron_numbering_does_not_put_them_fail_on_every_rank():
    """EP=2: rank 1 holds experts named 0 and 1 (Megatron puts them on EP rank 0); both ranks raise
    the same one-line error before anything moves."""
    errors = run_distributed(E.misplaced_experts_worker, 2, expert_model_parallel_size=2)
    assert errors[0] == errors[1] and errors[0] is not None
    assert errors[0].startswith("ConversionError: rank 1 (EP rank 1, stage 0) holds "
                                "decoder.layers.0.mlp.experts.local_experts.0.linear_fc1.weight: the export expects "
                                "Megatron's local spec"), errors[0]
    assert "grouped experts (TEGroupedMLP) are not supported" in errors[0]


@pytest.mark.parametrize("dst, raising_rank", [(0, 0), (None, 3)], ids=["dst0", "every-rank"])
def test_a_consumer_raising_leaves_every_rank_with_the_schedule_intact(dst, raising_rank):
    """TP=2 + SP, expert-TP=2, EP=2 (the tiny MoE GPT, 41 tensors): ``export_merged_to``'s consumer
    raises on its 2nd tensor on ``raising_rank``; every rank returns, only that rank re-raises,
    and a plain export then runs to the end everywhere (``test_export``'s dense case, with experts)."""
    from tests.distributed.export_cases import assert_schedule_kept, failing_consumer_worker

    ranks = run_distributed(failing_consumer_worker, 4, dst, raising_rank, True, tp=2, expert_model_parallel_size=2,
                            expert_tensor_parallel_size=2, timeout=120)
    everything = 3 + 2 * (2 + 4 + 1 + 4 * 3)  # embedding, norm, output; per layer 2 norms, q/k/v/o, router, experts
    assert_schedule_kept(ranks, dst, raising_rank, everything)


def test_dora_experts_merge_and_refuse_peft_on_every_rank():
    """EP=2, DoRA on attention and the SequentialMLP experts: ``export_peft`` refuses on every rank
    alike, naming the expert layer and the way out (PEFT has no DoRA on experts); ``export_merged``
    streams every tensor and folds each expert's magnitude as DoRA's formula does."""
    ranks = run_distributed(E.dora_experts_worker, 2, expert_model_parallel_size=2)
    assert ranks[0]["error"] == ranks[1]["error"]
    assert ranks[0]["error"].startswith("the model's adapter: DoRA on mlp.experts.local_experts.0.linear_fc1: PEFT "
                                        "has no DoRA on experts or the router"), ranks[0]["error"]
    assert "merge the adapter instead (merge --to hf, or export_merged)" in ranks[0]["error"]
    for r in ranks:
        print(f"DoRA experts merged (EP=2), max |difference| to the formula: {r['diff']:.3g}")
        assert r["experts"] > 0 and r["streamed"] == ranks[0]["streamed"] and r["diff"] < 1e-6
