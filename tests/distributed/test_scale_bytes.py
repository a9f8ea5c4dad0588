"""Bytes per rank at scale (issue 23 item 1, docs/design.md §16): what every rank receives in
``export_peft(dst=0)`` and in the final ``save_full_adapter``, counted by ``ReceivedBytes``.

The tiny GPT (2 layers, LoRA r=4 on all four targets) at TP=2 x PP=2 on 4 ranks and at
TP=2 x PP=2 x DP=2 on 8 ranks. Each rank's figure is checked against the formula of §16, computed
here from what the ranks hold (names, logical and local shapes): ``dst`` receives the adapter
once minus the shards it holds, plus one header per other stage; a rank on ``dst``'s pipeline
group receives its stage's sharded factors less its own shard, plus 8 bytes; the other ranks of
``dst``'s replica 8 bytes; the other replica nothing (export_peft: plus the 8-byte finite check on
every rank). No ``*_object`` collective runs. The results are checked bit for bit against an
independent all-gather of each layer (``gather_factor``) and, for PEFT, against
``peft_from_megatron`` of that reference.
"""

import pytest
import torch

from megatron_lora import LoRAConfig
from tests.distributed import scale_cases as S
from tests.distributed.launcher import run_distributed

DST = 0
WORLDS = (4, 8)  # TP=2 x PP=2, then x DP=2
FINITE_CHECK = 8  # export_peft's int64 all-reduce: the lowest rank with a non-finite factor
ROUTE = 8  # the int64 broadcast of dst's TP rank to dst's replica


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    out = {}
    for world in WORLDS:
        path = str(root / f"adapter-{world}.safetensors")
        out[world] = (run_distributed(S.bytes_worker, world, path, tp=2, pp=2), path)
    return out


def _nbytes(shape, element):
    n = element
    for d in shape:
        n *= d
    return n


def _header(names):
    """One stage's header: int64 [2] sizes, its names joined by NUL bytes, 4 int64 per 2-D tensor."""
    names = sorted(names)
    return 16 + sum(len(n.encode()) for n in names) + len(names) - 1 + 32 * len(names)


def _expected(ranks, what):
    """{rank: bytes it must receive} by the formulas of docs/design.md §16."""
    dst = len(ranks) - 1 if what == "last_rank" else DST
    me = ranks[dst]
    stages = {}
    for r in ranks:
        if r["dp"] == me["dp"] and r["tp"] == me["tp"]:
            stages[r["pp"]] = r["held"]
    adapter = sum(_nbytes(h["logical"], h["element"]) for held in stages.values() for h in held.values())
    out = {}
    if what == "shapes":  # every stage's header, over the pipeline group, to every rank
        return {r["rank"]: sum(_header(held) for stage, held in stages.items() if stage != r["pp"]) for r in ranks}
    for r in ranks:
        local = sum(_nbytes(h["local"], h["element"]) for h in r["held"].values())
        if r["rank"] == dst:
            got = adapter - local + sum(_header(held) for stage, held in stages.items() if stage != me["pp"])
        elif r["dp"] != me["dp"]:
            got = 0  # another replica
        elif r["tp"] == me["tp"]:  # the collector of another stage
            got = ROUTE + sum(_nbytes(h["logical"], h["element"]) - _nbytes(h["local"], h["element"])
                              for h in r["held"].values() if h["sharded"])
        else:
            got = ROUTE
        if what == "every_rank":  # gathered onto rank 0, which broadcasts it with one header
            got += 0 if r["rank"] == dst else adapter + _header([n for held in stages.values() for n in held])
        out[r["rank"]] = got + (FINITE_CHECK if what == "export_peft" else 0)
    return out


def _report(runs):
    lines = ["rank (tp,pp,dp): export_peft / save / dst=None bytes received [own logical factors]"]
    for world, (ranks, _) in runs.items():
        for r in ranks:
            own = sum(_nbytes(h["logical"], h["element"]) for h in r["held"].values())
            lines.append(f"  world {world} rank {r['rank']} ({r['tp']},{r['pp']},{r['dp']}): "
                         f"{r['export_peft']['total']} / {r['save']['total']} / {r['every_rank']['total']} "
                         f"[{own}] peak "
                         f"{r['export_peft']['peak']} / {r['save']['peak']} "
                         f"{r['export_peft']['by_op']} {r['export_peft']['object_calls'] or ''}")
    print("\n".join(lines))


@pytest.mark.parametrize("what", ["export_peft", "save", "every_rank", "last_rank", "shapes"])
@pytest.mark.parametrize("world", WORLDS)
def test_dst_receives_the_adapter_once_and_others_at_most_their_own_layers(runs, world, what):
    """``last_rank``: ``gather_full_adapter(dst=world - 1)``, TP rank 1 of stage 1 (at 8 ranks in
    replica 1): the route follows ``dst``'s TP rank and replica."""
    ranks, _ = runs[world]
    if what == "export_peft":
        _report({world: runs[world]})
    expected = _expected(ranks, what)
    found = {r["rank"]: r[what]["total"] for r in ranks}
    assert found == expected
    dst = len(ranks) - 1 if what == "last_rank" else DST
    for r in ranks:
        assert not r[what]["object_calls"], (r["rank"], r[what]["object_calls"])
        own = sum(_nbytes(h["logical"], h["element"]) for h in r["held"].values())
        if r["rank"] != dst and what not in ("every_rank", "shapes"):
            assert found[r["rank"]] <= own + ROUTE + FINITE_CHECK


@pytest.mark.parametrize("what", ["export_peft", "save"])
@pytest.mark.parametrize("world", WORLDS)
def test_peak_memory_is_the_adapter_on_dst_and_two_tensors_elsewhere(runs, world, what):
    """Peak bytes of tensors allocated during the call (``LiveBytes``): ``dst`` holds the adapter
    (export_peft: and the PEFT tensors) plus at most two copies of the largest factor (the TP
    gather's shards and their concatenation); every other rank at most those two copies."""
    ranks, _ = runs[world]
    factors = [_nbytes(h["logical"], h["element"]) for r in ranks for h in r["held"].values()]
    adapter = sum(_nbytes(t.shape, t.element_size()) for r in ranks if r["dp"] == 0 and r["tp"] == 0
                  for t in r["reference"].values())
    peft = sum(t.nbytes for t in ranks[DST]["export_peft_result"][0].values()) if what == "export_peft" else 0
    for r in ranks:
        bound = 2 * max(factors) + (adapter + peft if r["rank"] == DST else 0)
        assert r[what]["peak"] <= bound, (r["rank"], r[what]["peak"], bound)


@pytest.mark.parametrize("what", ["export_peft", "save"])
def test_bytes_per_rank_do_not_grow_with_data_parallel_replicas(runs, what):
    small, _ = runs[4]
    big, _ = runs[8]
    per_position = {(r["tp"], r["pp"]): r[what]["total"] for r in small}
    for r in big:
        if r["dp"] == 0:
            assert r[what]["total"] == per_position[(r["tp"], r["pp"])], r["rank"]
        else:
            assert r[what]["total"] <= FINITE_CHECK, r["rank"]
    assert max(r[what]["total"] for r in big) == max(per_position.values())
    assert max(r[what]["peak"] for r in big) == max(r[what]["peak"] for r in small)


@pytest.mark.parametrize("world", WORLDS)
def test_gathered_adapter_equals_an_all_gather_of_every_layer_bit_for_bit(runs, world):
    from safetensors.torch import load_file

    from megatron_lora.hf.peft_adapters import peft_from_megatron

    ranks, path = runs[world]
    reference = {}
    for r in ranks:
        reference.update(r["reference"])
    saved = load_file(path)
    assert sorted(saved) == sorted(reference)
    assert all(saved[k].dtype == reference[k].dtype and torch.equal(saved[k], reference[k]) for k in reference)
    for r in ranks:
        assert r["shapes_result"] == {name: list(t.shape) for name, t in reference.items()}
        assert list(r["shapes_result"]) == list(reference)  # stage order, as the descriptor lists them
    last = ranks[-1]["last_rank_result"]
    assert all(r["last_rank_result"] is None for r in ranks[:-1]) and sorted(last) == sorted(reference)
    assert all(last[k].dtype == reference[k].dtype and torch.equal(last[k], reference[k]) for k in reference)
    for r in ranks:  # gather_full_adapter() on every rank
        got = r["every_rank_result"]
        assert sorted(got) == sorted(reference)
        assert all(got[k].dtype == reference[k].dtype and torch.equal(got[k], reference[k]) for k in reference)

    assert all(r["export_peft_result"] is None for r in ranks if r["rank"] != DST)
    tensors, config = ranks[DST]["export_peft_result"]
    want, want_config = peft_from_megatron(reference, LoRAConfig(**S.LORA), ranks[DST]["arch"])
    assert config == want_config and sorted(tensors) == sorted(want)
    assert all(torch.equal(tensors[k], want[k]) for k in want)


def test_a_non_finite_factor_on_one_rank_raises_the_same_error_on_every_rank():
    messages = run_distributed(S.non_finite_worker, 4, 3, tp=2, pp=2)
    assert len(set(messages)) == 1, messages
    assert "decoder.layers.1." in messages[0] and "holds 1 non-finite values" in messages[0], messages[0]
