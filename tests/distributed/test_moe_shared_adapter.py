"""One LoRA adapter shared by all routed experts of a layer (``expert_adapters="shared"``).

Same harness as test_moe_lora.py (one logical base resharded by Megatron, 4 AdamW steps, one
step with a starved expert). Reference: the shared layout on one rank in a plain loop. Each
layout must follow its loss trajectory and reach its trained logical adapter, every expert of a
layer holding the very same Parameter objects (and so the same values); the shared gradient after
Megatron's DDP + finalize_model_grads must equal the sum over experts of a per-expert model's
gradients over all ranks; a shared adapter's checkpoint loads into a per-expert model, and a
per-expert checkpoint whose experts differ is refused by a shared model (dist and safetensors).
"""

import os

import pytest
import torch

from megatron_lora.core.checkpoint.errors import CheckpointError
from tests.distributed import moe_cases as M
from tests.distributed.launcher import run_distributed
from tests.distributed.test_moe_lora import LOSS_RTOL, LOGITS_RTOL, ADAPTER_ATOL, ADAPTER_RTOL, logical, rel_err

SHARED = dict(shared=True)
# name: (world size, run_distributed layout kwargs, run_worker options)
LAYOUTS = {
    "ref": (1, {}, SHARED),
    "ep2": (2, dict(ep=2), SHARED),
    "tp2-sp-etp2-ep2": (4, dict(tp=2, etp=2, ep=2), dict(SHARED, sp=True, loop="ddp")),
    "tp2-sp-etp1-ep2": (4, dict(tp=2, ep=2), dict(SHARED, sp=True, loop="ddp")),
}
OTHERS = [n for n in LAYOUTS if n != "ref"]
_runs = {}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_shared")
    base = str(root / "base")
    os.makedirs(base)
    run_distributed(M.save_base_worker, 1, base)
    return dict(base=base, shared=str(root / "shared"), per_expert=str(root / "per_expert"))


def run(dirs, name, save=None):
    if name not in _runs:
        world, layout, options = LAYOUTS[name]
        _runs[name] = run_distributed(M.run_worker, world, dirs["base"], dict(options, save=save),
                                      **M.dist_kwargs(layout))
    return _runs[name]


def _expert_groups(adapter):
    """{(layer, linear, factor): [each expert's tensor]} of a logical adapter."""
    groups = {}
    for key, value in adapter.items():
        if ".local_experts." in key:
            groups.setdefault(M._LOCAL_EXPERT.sub(".", key), []).append(value)
    return groups


@pytest.mark.parametrize("name", OTHERS)
def test_shared_adapter_trains_like_reference(dirs, name):
    ref = run(dirs, "ref")[0]
    assert ref["losses"][-1] < ref["losses"][0]
    got, want = logical(run(dirs, name)), logical(run(dirs, "ref"))
    for r in run(dirs, name):
        assert rel_err(r["losses"], ref["losses"]) <= LOSS_RTOL, (r["losses"], ref["losses"])
        assert rel_err(r["logits"], ref["logits"]) <= LOGITS_RTOL
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=ADAPTER_RTOL, atol=ADAPTER_ATOL,
                                   msg=lambda m: f"{key}: {m}")


@pytest.mark.parametrize("name", ["ref"] + OTHERS)
def test_experts_hold_one_adapter(dirs, name):
    """One Parameter object per (layer, linear, factor) on every rank, and every expert's values
    equal at init and after training (over all ranks: the EP ranks' copies agree)."""
    ranks = run(dirs, name)
    for r in ranks:
        assert r["sharing"] and set(r["sharing"].values()) == {1}, r["sharing"]
    for field in ("init", "adapter"):
        groups = _expert_groups(logical(ranks, field))
        assert len(groups) == 2 * 2 * 2  # layers x linears x factors
        for key, tensors in groups.items():
            assert len(tensors) == M.EXPERTS and all(torch.equal(t, tensors[0]) for t in tensors), key
    assert any(torch.count_nonzero(t[0]) for k, t in _expert_groups(logical(ranks)).items() if k.endswith("lora_B"))


def test_shared_adapter_differs_from_per_expert_training(dirs):
    """The shared layout is a different model: its trained logical adapter is not per-expert's
    (the experts' per-expert adapters differ after training)."""
    per = run_distributed(M.run_worker, 1, dirs["base"], dict(steps=4))[0]
    groups = _expert_groups(logical([per]))
    assert any(not torch.equal(t[0], t[1]) for k, t in groups.items() if k.endswith("lora_B"))


@pytest.mark.parametrize("layout", [dict(ep=2), dict(tp=2, ep=2)], ids=["ep2", "tp2-sp-etp1-ep2"])
def test_shared_gradient_is_sum_of_per_expert_gradients(dirs, layout):
    world = 4 if layout.get("tp", 1) > 1 else 2
    ranks = run_distributed(M.shared_gradient_worker, world, dirs["base"], dict(sp=layout.get("tp", 1) > 1),
                            **M.dist_kwargs(layout))
    for r in ranks:
        assert len(r) == 2 * 2 * 2
        for key, (got, want) in r.items():
            assert torch.count_nonzero(want), key
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7, msg=lambda m: f"{key}: {m}")


def test_shared_checkpoint_loads_into_per_expert_model(dirs):
    """Saved at EP=2 (each expert's keys hold the shared tensors), loaded at EP=1 per-expert."""
    saver = run_distributed(M.run_worker, 2, dirs["base"], dict(SHARED, save=dirs["shared"]), **M.dist_kwargs(dict(ep=2)))
    ranks = run_distributed(M.load_worker, 1, dirs["base"], dirs["shared"], {})
    got, want = logical(ranks), logical(saver)
    assert got.keys() == want.keys() and [k for k in want if not torch.equal(got[k], want[k])] == []
    assert rel_err(ranks[0]["logits"], saver[0]["logits"]) <= 1e-6


def test_shared_model_refuses_checkpoint_whose_experts_differ(dirs):
    run_distributed(M.run_worker, 1, dirs["base"], dict(save=dirs["per_expert"], steps=2))
    with pytest.raises(Exception) as err:
        run_distributed(M.load_worker, 2, dirs["base"], dirs["per_expert"], SHARED, **M.dist_kwargs(dict(ep=2)))
    assert "experts' adapters differ" in str(err.value) and "at offset" in str(err.value), str(err.value)


def test_shared_model_refuses_full_adapter_whose_experts_differ(dirs, tmp_path):
    from safetensors.torch import save_file

    ranks = run_distributed(M.run_worker, 1, dirs["base"], dict(steps=2))
    path = str(tmp_path / "per_expert.safetensors")
    tensors = logical(ranks)
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    with pytest.raises(Exception) as err:
        run_distributed(M.load_worker, 1, dirs["base"], path, dict(SHARED, full=True))
    assert "experts' adapters differ" in str(err.value)
    assert "local_experts.1." in str(err.value) or "local_experts.2." in str(err.value)
