"""scripts/pretrain_gpt_lora.py on a mixture-of-experts GPT (issue 25 items 6 and 7).

The tiny GPT of script_runs with 4 experts, top-2, pretrained briefly at EP=1 as the frozen base;
LoRA adapts attention, experts included, at EP=2 (two gloo ranks, all-to-all dispatcher).
"""

import math

import pytest

from tests.distributed import script_runs as S

MOE_FLAGS = ["--num-experts", "4", "--moe-router-topk", "2"]
EP2 = ["--expert-model-parallel-size", "2", "--moe-token-dispatcher-type", "alltoall"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("pretrain_moe")


@pytest.fixture(scope="module")
def data(workdir):
    return S.make_dataset(str(workdir))


def run(workdir, data, name, nproc, extra, lora=True, iters=4):
    flags = [*S.MODEL_FLAGS, *S.TRAIN_FLAGS, *MOE_FLAGS, "--train-iters", iters, "--data-path", data,
             "--save", workdir / name, *extra]
    if lora:
        flags += [*S.LORA_FLAGS, "--pretrained-checkpoint", workdir / "base"]
    return S.run_script(flags, nproc=nproc)


def test_moe_lora_saved_at_ep2_resumes_at_ep1_on_the_uninterrupted_losses(workdir, data):
    """Stopped at iteration 2 at EP=2, resumed at EP=1 (another dispatcher too): the expert
    adapters and their optimizer state reshard through the dist checkpoint, and every iteration
    follows the uninterrupted EP=1 run to the layout precision (dense runs: 2e-5 relative; the
    frozen MoE base is bitwise equal across pure EP layouts)."""
    base = run(workdir, data, "base", 1, [], lora=False, iters=2)
    assert "experts ETP 1 x EP 1 x expert-DP 1 (4 experts, top-2, allgather)" in base.stdout, base.stdout
    full = run(workdir, data, "full", 1, [])
    ref = S.losses(full.stdout)
    assert sorted(ref) == [1, 2, 3, 4], full.stdout
    stopped = run(workdir, data, "part", 2, [*EP2, "--exit-interval", "2"])
    assert "experts ETP 1 x EP 2 x expert-DP 1 (4 experts, top-2, alltoall)" in stopped.stdout, stopped.stdout
    assert "exiting at iteration 2" in stopped.stdout
    resumed = run(workdir, data, "part", 1, ["--load", workdir / "part"])
    assert "resumed from" in resumed.stdout and "at iteration 2" in resumed.stdout, resumed.stdout
    assert "holds RNG state of another layout" in resumed.stdout  # EP differs: per-rank RNG dropped
    got = {**S.losses(stopped.stdout), **S.losses(resumed.stdout)}
    assert sorted(got) == [1, 2, 3, 4], resumed.stdout
    for it in got:
        assert math.isclose(got[it], ref[it], rel_tol=2e-5), (it, got[it], ref[it])
    assert (workdir / "part" / "adapter.safetensors").exists()  # at EP=1 the full adapter is written
