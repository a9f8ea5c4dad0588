"""The full (logical) adapter of a MoE model at expert parallelism > 1 and at expert-TP != TP
(issue 25; docs/design.md §16, the expert pass): ``gather_full_adapter`` / ``save_full_adapter``
/ ``load_full_adapter`` and the strict check's names (``gather.every_stage``).

A tiny MoE GPT (2 layers, 4 SequentialMLP experts, top-2, LoRA r=4 on attention and both expert
linears) on real gloo ranks, at five layouts run in this order, each loading the files the
earlier ones saved:

    name          world  TP  SP  EP  ETP   loads                 saves   (PP = 1 but pp2_ep2)
    ep2           2      1   -   2   1     -                     ep2
    ep4           4      1   -   4   1     ep2                   ep4
    ep1           1      1   -   1   1     ep2, ep4              ep1
    tp2_etp2_ep2  4      2   on  2   2     ep1, ep4              -
    tp2_etp1_ep2  4      2   on  2   1     ep1, ep4              -
    etp2          2      1   -   1   2     ep4                   -
    pp2_ep2       4      1   -   2   1     ep1                   -       (PP = 2)

Every layout loads the same seeded logical adapter (strict) and saves / gathers it. The reference
is assembled here by hand from every rank's local shards (``held``): the shards of one layer are
put together by its TP-group rank along its split dim, gated ``linear_fc1`` rows as
``[gate; up]`` from each shard's halves. The bytes each rank receives (``ReceivedBytes``) are
checked exactly against the formulas of §16.
"""

import pytest
import torch

from tests.distributed import moe_adapter_cases as M
from tests.distributed.launcher import run_distributed

LAYOUTS = {
    "ep2": dict(world=2, tp=1, ep=2, etp=1, loads=()),
    "ep4": dict(world=4, tp=1, ep=4, etp=1, loads=("ep2",)),
    "ep1": dict(world=1, tp=1, ep=1, etp=1, loads=("ep2", "ep4")),
    "tp2_etp2_ep2": dict(world=4, tp=2, ep=2, etp=2, loads=("ep1", "ep4")),
    "tp2_etp1_ep2": dict(world=4, tp=2, ep=2, etp=1, loads=("ep1", "ep4")),
    "etp2": dict(world=2, tp=1, ep=1, etp=2, loads=("ep4",)),
    "pp2_ep2": dict(world=4, tp=1, pp=2, ep=2, etp=1, loads=("ep1",)),
}
ROUTE = 8  # an int64 broadcast of dst's (expert-)TP rank
MISSING = "decoder.layers.1.mlp.experts.local_experts.3.linear_fc2.lora_A"
UNKNOWN = "decoder.layers.1.mlp.experts.local_experts.4.linear_fc2.lora_A"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_full")
    path = {name: str(root / f"{name}.safetensors") for name in LAYOUTS}
    out = {}
    for name, lay in LAYOUTS.items():
        ranks = run_distributed(M.full_adapter_worker, lay["world"], path[name], [path[n] for n in lay["loads"]],
                                name == "ep4", tp=lay["tp"], pp=lay.get("pp", 1), expert_model_parallel_size=lay["ep"],
                                expert_tensor_parallel_size=lay["etp"])
        out[name] = (ranks, path)
    return out


def _hand_assembled(ranks):
    """{name: logical tensor} from every rank's local shards; replicas must agree bit for bit."""
    pieces = {}
    for r in ranks:
        for name, h in r["held"].items():
            index = h["group_rank"] if h["dim"] is not None else 0
            seen = pieces.setdefault(name, {})
            if index in seen:
                assert torch.equal(seen[index][1], h["local"]), (name, r["rank"])
            else:
                seen[index] = (h, h["local"])
    out = {}
    for name, seen in pieces.items():
        h = next(iter(seen.values()))[0]
        if h["dim"] is None:
            out[name] = seen[0][1]
            continue
        assert sorted(seen) == list(range(h["group"])), (name, sorted(seen))
        shards = [seen[i][1] for i in range(h["group"])]
        if name.endswith("linear_fc1.lora_B"):  # gated: shard i is [gate_i; up_i]
            halves = [s.chunk(2, dim=0) for s in shards]
            out[name] = torch.cat([g for g, _ in halves] + [u for _, u in halves], dim=0)
        else:
            out[name] = torch.cat(shards, dim=h["dim"])
        assert tuple(out[name].shape) == h["logical"], name
    return out


def _expected_names():
    dense = [f"decoder.layers.{layer}.{module}.{f}" for layer in range(2)
             for module in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.router")
             for f in ("lora_A", "lora_B")]
    experts = [f"decoder.layers.{layer}.mlp.experts.local_experts.{e}.{linear}.{f}" for layer in range(2)
               for e in range(M.EXPERTS) for linear in ("linear_fc1", "linear_fc2") for f in ("lora_A", "lora_B")]
    return dense, experts


def _equal(got, want):
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gathered_adapter_is_the_hand_assembled_one_bit_for_bit(runs, layout):
    from safetensors.torch import load_file

    ranks, path = runs[layout]
    reference = _hand_assembled(ranks)
    dense, experts = _expected_names()
    assert sorted(reference) == sorted(dense + experts)  # global expert names, 4 experts x 2 layers
    _equal(reference, M.moe_adapter({n: t.shape for n, t in reference.items()}))  # what was loaded
    _equal(load_file(path[layout]), reference)
    for r in ranks:
        _equal(r["every_rank_result"], reference)
        assert r["shapes"] == {n: list(t.shape) for n, t in reference.items()}
        if r["rank"] == len(ranks) - 1:
            _equal(r["last_rank_result"], reference)
        else:
            assert r["last_rank_result"] is None
        if r["rank"] != 0:
            assert r["save_result"] is None


@pytest.mark.parametrize("layout", [name for name, lay in LAYOUTS.items() if lay["loads"]])
def test_a_full_adapter_saved_at_one_expert_layout_loads_exactly_at_another(runs, layout):
    from safetensors.torch import load_file

    ranks, path = runs[layout]
    for source in LAYOUTS[layout]["loads"]:
        saved = load_file(path[source])
        _equal(saved, load_file(path["ep2"]))  # every layout saved the same logical adapter
        _equal(ranks[0]["checks"][path[source]], saved)
        assert all(r["checks"][path[source]] is None for r in ranks[1:])


def test_a_full_adapter_missing_an_expert_or_with_an_unknown_one_is_refused_on_every_rank(runs):
    ranks, _ = runs["ep4"]
    missing, unknown = zip(*(r["refusals"] for r in ranks))
    assert len(set(missing)) == 1 and MISSING in missing[0] and "is missing" in missing[0], missing
    assert len(set(unknown)) == 1 and UNKNOWN in unknown[0] and "no place for" in unknown[0], unknown


# ------------------------------------------------------------------------------- bytes (§16)

def _bytes(h):
    n = 4  # fp32
    for d in h["logical"]:
        n *= d
    return n


def _local_bytes(h):
    return h["local"].numel() * h["local"].element_size()


def _sharded(h):
    return h["dim"] is not None and h["group"] > 1


def _header(names):
    """One collector's header: int64 [2] sizes, its names joined by NUL bytes, 4 int64 per 2-D tensor."""
    if not names:
        return 16
    return 16 + sum(len(n.encode()) for n in names) + len(names) - 1 + 32 * len(names)


def _pass(ranks, dst, members, collects, items):
    """{rank: bytes} of one gather pass: ``members`` take part, ``collects(r)`` the collectors,
    ``items(r)`` the layers the pass moves. Formulas of docs/design.md §16."""
    out = {}
    route = ROUTE if len(members) > 1 else 0
    for r in members:
        duty = sum(_bytes(h) - _local_bytes(h) for h in items(r).values() if _sharded(h))
        if r["rank"] == dst:
            out[r["rank"]] = duty + sum(sum(_bytes(h) for h in items(c).values()) + _header(list(items(c)))
                                        for c in members if collects(c) and c["rank"] != dst)
        else:
            out[r["rank"]] = route + (duty if collects(r) else 0)
    return out


def _expected(ranks, layout, dst, what):
    lay = LAYOUTS[layout]
    split = lay["ep"] > 1 or lay["etp"] != lay["tp"]
    me = ranks[dst]
    dense = lambda r: {n: h for n, h in r["held"].items() if not (split and h["expert"])}  # noqa: E731
    experts = lambda r: {n: h for n, h in r["held"].items() if split and h["expert"]}  # noqa: E731
    out = {r["rank"]: 0 for r in ranks}
    if what == "shapes":  # each other stage's dense header; each expert position's, from expert-TP rank 0
        for r in ranks:
            stages = [c for c in ranks if c["dp"] == r["dp"] and c["tp"] == r["tp"] and c["rank"] != r["rank"]]
            group = [c for c in ranks if c["edp"] == r["edp"]]
            out[r["rank"]] = sum(_header(list(dense(c))) for c in stages) + sum(
                _header(list(experts(c))) for c in group if split and c["etp"] == 0 and c["rank"] != r["rank"])
        return out
    replica = [r for r in ranks if r["dp"] == me["dp"]]
    for rank, got in _pass(ranks, dst, replica, lambda r: r["tp"] == me["tp"], dense).items():
        out[rank] += got
    if split:
        group = [r for r in ranks if r["edp"] == me["edp"]]
        for rank, got in _pass(ranks, dst, group, lambda r: r["etp"] == me["etp"], experts).items():
            out[rank] += got
    if what == "every_rank":  # rank 0 gathers, then broadcasts one header and the adapter
        adapter = {n: h for r in ranks for n, h in r["held"].items()}
        for r in ranks[1:]:
            out[r["rank"]] += sum(_bytes(h) for h in adapter.values()) + _header(list(adapter))
    return out


@pytest.mark.parametrize("what", ["save", "last_rank", "every_rank", "shapes"])
@pytest.mark.parametrize("layout", [name for name, lay in LAYOUTS.items() if lay["world"] > 1])
def test_dst_receives_the_adapter_once_and_others_at_most_their_own_layers(runs, layout, what):
    ranks, _ = runs[layout]
    dst = len(ranks) - 1 if what == "last_rank" else 0
    found = {r["rank"]: r[what if what != "shapes" else "shapes_bytes"]["total"] for r in ranks}
    print(layout, what, found)
    assert found == _expected(ranks, layout, dst, what)
    for r in ranks:
        assert not r[what if what != "shapes" else "shapes_bytes"]["object_calls"]
        if what in ("save", "last_rank") and r["rank"] != dst:  # its own TP gathers and two routes at most
            duty = sum(_bytes(h) - _local_bytes(h) for h in r["held"].values() if _sharded(h))
            assert found[r["rank"]] <= duty + 2 * ROUTE, r["rank"]
    if what in ("save", "last_rank"):  # dst: the adapter once, less what it holds, plus headers
        adapter = {n: h for r in ranks for n, h in r["held"].items()}
        own = sum(_local_bytes(h) for h in ranks[dst]["held"].values())
        headers = found[dst] - (sum(_bytes(h) for h in adapter.values()) - own)
        assert 0 <= headers <= LAYOUTS[layout]["world"] * _header(list(adapter)), headers
